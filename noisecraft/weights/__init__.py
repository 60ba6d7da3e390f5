"""Known weight files: the manifest, checks, safe loading (no unpickling) and downloads.

``weights_manifest.json`` at the repository root lists every weight file the pack knows. Files
load only through safetensors or ``torch.load(weights_only=True)``. Every download is checked
before it gets its final name and writes only inside its destination folder.

- :mod:`.manifest`: :class:`WeightEntry`, reading the manifest, the ComfyUI folder a file goes to,
  and the file-name and inside-the-folder checks.
- :mod:`.verify`: sha256, the format checks (safetensors header, torch zip archive, HTML/text
  refused) and :func:`verify_file`.
- :mod:`.fetch`: :func:`download`, through huggingface_hub for Hugging Face entries and urllib
  (resumable, validated) for other URLs.

Every name is re-exported here: ``from noisecraft.weights import download`` is the public path.
"""

from .manifest import (
    COMFYUI_ENV,
    MANIFEST_PATH,
    PACKAGE_DIR,
    PathLike,
    WeightEntry,
    check_file_name,
    find_comfyui_root,
    find_entry,
    load_folder_aliases,
    load_manifest,
    resolve_models_dir,
)
from .verify import sha256_file, verify_file
from .fetch import DownloadError, Progress, download

__all__ = [
    "MANIFEST_PATH",
    "WeightEntry",
    "DownloadError",
    "load_manifest",
    "load_folder_aliases",
    "find_entry",
    "sha256_file",
    "check_file_name",
    "verify_file",
    "download",
    "resolve_models_dir",
    "find_comfyui_root",
    "COMFYUI_ENV",
]
