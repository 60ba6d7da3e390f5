"""NoiseCraft core: better initial noise for diffusion sampling, in pure torch.

Modules: :mod:`~noisecraft.sigmas` (schedules, model kinds), :mod:`~noisecraft.ode` (sampling and
inversion for any denoiser ``D(x, sigma) -> x0``), :mod:`~noisecraft.stability` (inversion-
stability selection and optimization), :mod:`~noisecraft.analytic` (exact Gaussian denoisers),
:mod:`~noisecraft.rng` (ComfyUI-compatible seeded noise), :mod:`~noisecraft.weights` (manifest and
safe loading). This package never imports ComfyUI.
"""

__version__ = "0.1.0"
