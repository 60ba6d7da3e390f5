"""NoiseCraft: ComfyUI entry point.

ComfyUI imports this folder as a package. The node glue (``nodes/``) needs ComfyUI; the core
library (``noisecraft/``) does not. Importing this file outside ComfyUI (tests, tools) must not
fail, so the nodes are only loaded when ComfyUI's V3 API is importable, and only when this file
is imported as a package (ComfyUI imports the pack folder as one; pytest imports this file as a
plain module when the folder name is no Python identifier, e.g. ``ComfyUI-NoiseCraft``, and the
nodes' relative imports have no parent package then).
"""

import logging

WEB_DIRECTORY = "./js"
__all__ = ["WEB_DIRECTORY"]

try:  # ComfyUI present?
    import comfy_api.latest  # noqa: F401
except ImportError:  # imported outside ComfyUI: expose nothing to register
    logging.getLogger(__name__).debug("ComfyUI not found; NoiseCraft nodes not loaded")
else:
    if __package__:  # imported as the pack (by ComfyUI), not as a loose module (by pytest)
        from .nodes import comfy_entrypoint  # noqa: F401

        __all__.append("comfy_entrypoint")
