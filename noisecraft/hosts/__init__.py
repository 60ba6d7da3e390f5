"""Adapters that turn a host's model (diffusers, ComfyUI) into a sigma-space denoiser D(x, sigma) -> x0."""
