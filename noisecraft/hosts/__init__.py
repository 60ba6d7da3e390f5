"""Hosts: a model behind a sigma-space denoiser ``D(x, sigma) -> x0`` for the CLI and the trainers.

:mod:`~noisecraft.hosts.diffusers`: the adapter over a diffusers model, ``RefinerHost`` (what
a trainer needs from a model), model loading and prompt encoding. :mod:`~noisecraft.hosts.toy`: the
shipped toy model as a host and its classifier as a scorer (for the demo, ``--toy``, scripts and
tests only). Inside ComfyUI the host is ComfyUI itself (``nodes/bridge.py``).
"""
