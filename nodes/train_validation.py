"""Train Refiner's held-out validation in ComfyUI: the core's :class:`~noisecraft.train.validation.Validator` on the
sampler run's model, its grid as the node's preview, its gap-closed curve to the chart extension.

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895). The validation itself is the
core's (:mod:`noisecraft.train.validation`: unguided | refined | teacher from the same held-out noise, the share of
the latent-MSE gap closed, ``validation.jsonl``, ``refiner_best.safetensors`` in a named run folder); this module
only puts it on the ComfyUI host:

* Held-out prompts: ``validation_prompts`` (a CONDITIONING, one entry per prompt as for Build Teacher Cache), else
  Load Prompts' validation split (encoded by Build Teacher Cache and carried on its TEACHER_CACHE), else the
  first :data:`TRAIN_PROMPTS` (32) training prompts (a paper-scale cache has 50K+), each with ``validation_seeds``
  seeds from
  :data:`~noisecraft.train.validation.VALIDATION_SEED_BASE` (the cache's noises come from one generator seeded
  with the cache's seed, so these are other noises). Their entries and the cache's negative are prepared by
  ComfyUI in the same sampler run as the training prompts (appended after them).
* Teacher: CFG at the cache's scale, steps and scheduler, from two cfg-1 passes (negative, positive): ComfyUI's CFG
  formula; a post-CFG model patch the cache's teacher ran with is not applied here.
* Grid: decoded with the ``vae`` input when connected (the latents shown directly otherwise); each new grid is
  sent as the node's preview while the run goes on, and the last one is the node's output image.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Optional

import torch
from comfy_api.latest import io

import comfy.utils
import folder_paths

from ..noisecraft.train.validation import ValidationSet, Validator, held_out_seeds
from . import bridge

__all__ = ["validation_inputs", "NodeValidation"]

log = logging.getLogger(__name__)


def validation_inputs() -> list:
    """Train Refiner's validation inputs (optional; their defaults keep old graphs as they were: off)."""
    return [
        io.Int.Input("validate_every", default=0, min=0, max=1000000, optional=True,
                     tooltip="Held-out validation at step 0, every N steps and the last step: unguided | refined | "
                     "teacher sampled from the same held-out noise, the share of the unguided -> teacher latent-MSE "
                     "gap the refiner closes (charted next to the loss) and a grid image (the node's preview). "
                     "0 turns it off."),
        io.Int.Input("validation_seeds", default=2, min=1, max=64, optional=True,
                     tooltip="Held-out seeds per validation prompt (fixed seeds the teacher cache never used). Used "
                     "only when validate_every > 0."),
        io.Conditioning.Input("validation_prompts", optional=True,
                              tooltip="Held-out prompts (CLIP Text Encode, several joined with Conditioning (Combine)). "
                              "Not connected: the held-out prompts of Load Prompts (its validation split, encoded by Build "
                              "Teacher Cache), else the first 32 training prompts with held-out seeds."),
        io.Vae.Input("vae", optional=True, tooltip="Decodes the validation grid. Not connected: the latents are "
                     "shown directly."),
    ]


TRAIN_PROMPTS = 32  # training prompts validated on when no validation_prompts are connected


class NodeValidation:
    """One Train Refiner run's validation: the extra conditioning entries to prepare, the validator bound inside
    the sampler run, and what the node shows afterwards (``records``, ``grid``: a temp-folder image)."""

    def __init__(self, validate_every: int = 0, validation_seeds: int = 2, validation_prompts=None, vae=None,
                 node: str = "Train Refiner"):
        self.every, self.seeds, self.vae, self.node = int(validate_every or 0), int(validation_seeds or 2), vae, node
        from .nodes_train import split_prompts  # (here: nodes_train imports this module)

        self.held_out = split_prompts(validation_prompts, node) if validation_prompts is not None else None
        self.records: list = []
        self.grid: Optional[bytes] = None  # the newest grid (PNG)
        self.validator: Optional[Validator] = None

    @property
    def on(self) -> bool:
        return self.every > 0

    def entries(self, cache) -> list:
        """The conditioning entries appended after the training prompts: the negative, then the held-out prompts."""
        if not self.on:
            return []
        held = self.held_out or []
        return [e for c in [cache.negative[:1], *held] for e in c]

    def bind(self, model, cache, host, method, out_dir, steps: int, node_id=None) -> None:
        """Make the validator for ``method`` on ``host`` (inside the sampler run; files in ``out_dir``) and hang it
        on the method."""
        if not self.on:
            return
        p = cache.prompt_count
        neg = p
        # without held-out prompts: the first TRAIN_PROMPTS training prompts (a paper-scale cache has 50K+)
        ids = list(range(p + 1, p + 1 + len(self.held_out))) if self.held_out else list(range(min(p, TRAIN_PROMPTS)))
        idx, seeds = held_out_seeds(len(ids), self.seeds)
        cond_ids = torch.tensor([ids[i] for i in idx])
        cfg = float(cache.settings.get("cfg", 1.0))

        def teacher(c):
            d_pos, d_neg = host.denoiser(c), host.denoiser(torch.full_like(torch.as_tensor(c), neg))
            return lambda x, s: (lambda n: n + cfg * (d_pos(x, s) - n))(d_neg(x, s))

        tsig = bridge.get_sigmas(model, cache.settings.get("scheduler", "normal"), int(cache.settings.get("steps", 20)))
        names = [f"{'held-out' if self.held_out else 'prompt'} {ids[i] - (p + 1 if self.held_out else 0)}" for i in idx]
        vset = ValidationSet(host.denoiser, teacher, cond_ids, seeds, tuple(cache.data.shape), tsig, names=names,
                             decode=self._decoder(model), batch_size=8)
        bar = comfy.utils.ProgressBar(steps, node_id=node_id)

        def shown(rec, grid_path):
            self.records.append(rec)
            if grid_path is not None:
                from PIL import Image

                with Image.open(grid_path) as img:
                    bar.update_absolute(min(rec["step"], steps), steps, ("PNG", img.convert("RGB"), 1024))
                self.grid = grid_path.read_bytes()  # (a run without resume_from deletes its folder afterwards)

        self.validator = Validator(vset, every=self.every, on_result=shown).bind(method, out_dir)
        method.monitor = self.validator

    def _decoder(self, model):
        if self.vae is None:
            return None
        fmt = model.get_model_object("latent_format")

        def decode(x0: torch.Tensor) -> torch.Tensor:
            images = self.vae.decode(fmt.process_out(x0.float().cpu()))
            images = images.reshape(-1, *images.shape[-3:])  # video VAEs add a frame axis
            return images.movedim(-1, 1).float().clamp(0, 1).cpu()

        return decode

    def ui(self) -> dict:
        """The node's UI extras: the gap-closed curve and the last grid as the output image (a temp copy)."""
        if not self.records:
            return {}
        out = {"noisecraft_validation": [[r["step"], r["gap_closed"]] for r in self.records]}
        if self.grid is not None:
            name = f"noisecraft_validation_{uuid.uuid4().hex[:8]}.png"
            temp = Path(folder_paths.get_temp_directory())
            temp.mkdir(parents=True, exist_ok=True)
            (temp / name).write_bytes(self.grid)
            out["images"] = [{"filename": name, "subfolder": "", "type": "temp"}]
        return out

    def summary(self) -> dict:
        """The refiner metadata's validation figures (empty when off)."""
        s = self.validator.summary() if self.validator is not None else None
        return {"noisecraft.validation": json.dumps(s, sort_keys=True)} if s else {}
