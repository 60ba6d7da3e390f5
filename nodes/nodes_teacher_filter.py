"""Filter Teacher Cache: keep the top-N samples of a TEACHER_CACHE by a scorer, before Train Refiner.

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895), App. D: the guided
teacher images are generated for all prompts and only the top-N by an aesthetic score are kept. The
filter is the core's (:func:`noisecraft.train.teacher_filter.filter_teacher_cache`): the output is a
view of the same in-memory store (nothing copied), a cache of N samples that Train Refiner reads, checks
and resumes like any other.

Choices where the issue was silent:

* Decoding: with a VAE the scorer gets images in [0, 1] ([n, 3, H, W]); the teacher's x0 is in the
  model's inner latent space (as Build Teacher Cache stores it), so the VAE needs the model's latent
  format: the optional ``model`` input (the model the cache was built with) gives it
  (``latent_format.process_out``, as ComfyUI's samplers do before VAE Decode). Without a VAE the
  scorer gets the latents themselves (only rough measures, such as sharpness, make sense there).
* Scorers: the combo lists the core's registered scorers (``sharpness``, ``colorfulness``: generic,
  no download, not aesthetic; see the core module); ``custom_scorer`` takes a
  ``package.module:function`` importable by ComfyUI's Python (e.g. an aesthetic predictor a user
  wrote, see the core module's docstring) and, when not empty, replaces the combo's choice.
* The filter record (scorer, kept N of M, threshold) goes into the cache's metadata and its teacher
  settings, so Train Refiner writes it into the refiner's ``noisecraft.training`` (``teacher.filter``).
"""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

import comfy.utils

from ..noisecraft.train.teacher_filter import filter_teacher_cache, keep_count, resolve_scorer, scorer_names
from .common import check_combo, check_int, node_id
from .nodes_train import CACHE_NAME, CATEGORY, NodeTeacherCache, TeacherCacheType

log = logging.getLogger(__name__)

FILTER_NAME = "Filter Teacher Cache"
DESCRIPTION = ("Scores every teacher sample (decoded with the VAE when one is connected) and keeps the best 'keep' "
               "of them for Train Refiner, as NoiseRefine (Ahn, Kang et al., arXiv:2412.03895) keeps the top-N guided "
               "images by an aesthetic score. The shipped scorers are generic (no download, not aesthetic); plug in "
               "your own with custom_scorer.")
DECODE_BATCH = 8  # latents per VAE decode call (ComfyUI splits it further by free memory)


def vae_decoder(vae, model, channels: int):
    """Inner latents [n, C, h, w] -> images [n, 3, H, W] in [0, 1] with ComfyUI's ``vae`` and the latent format
    of ``model``."""
    if model is None:
        raise ValueError(f"{FILTER_NAME}: decoding with the VAE needs the model input too (the model the cache was "
                         f"built with: its latent format turns the teacher's latents into the VAE's); connect it, or "
                         f"disconnect the VAE to score the latents")
    fmt = model.get_model_object("latent_format")
    want = getattr(vae, "latent_channels", None)
    if int(fmt.latent_channels) != channels or (want is not None and int(want) != channels):
        raise ValueError(f"{FILTER_NAME}: the teacher cache holds {channels}-channel latents, but the model's latent "
                         f"format has {fmt.latent_channels} and the VAE takes {want}: connect the model and VAE the "
                         f"cache was built with")

    def decode(x0: torch.Tensor) -> torch.Tensor:
        images = vae.decode(fmt.process_out(x0.to(torch.float32)))
        if images.ndim == 5:  # a video VAE: frames as images
            images = images.reshape(-1, *images.shape[-3:])
        return images.movedim(-1, 1).to("cpu", torch.float32)

    return decode


def filter_cache(cache, keep, scorer: str, vae=None, model=None, custom_scorer: str = "",
                 node_id=None) -> NodeTeacherCache:
    """The top ``keep`` samples of ``cache`` by ``scorer`` (or ``custom_scorer``) as a new TEACHER_CACHE."""
    if not isinstance(cache, NodeTeacherCache):
        raise ValueError(f"{FILTER_NAME}: expected a TEACHER_CACHE from {CACHE_NAME}, got {type(cache).__name__}")
    total = len(cache)
    keep = check_int(FILTER_NAME, "keep", keep, 1, None, f"keep 1..{total} of the cache's samples")
    try:
        keep = keep_count(keep, total)
    except ValueError as e:
        raise ValueError(f"{FILTER_NAME}: {e}") from None
    custom = (custom_scorer or "").strip() if isinstance(custom_scorer, str) else custom_scorer
    if not custom:
        check_combo(FILTER_NAME, "scorer", scorer, scorer_names())
    decode = None if vae is None else vae_decoder(vae, model, cache.channels)
    bar = comfy.utils.ProgressBar(total, node_id=node_id)
    try:
        named = resolve_scorer(custom or scorer)
        data = filter_teacher_cache(cache.data, named, keep, decode=decode,
                                    decode_name="comfyui vae" if decode is not None else None, batch_size=DECODE_BATCH,
                                    progress=lambda done, _: bar.update_absolute(done, total))
    except ValueError as e:
        raise ValueError(f"{FILTER_NAME}: {e}") from None
    out = cache.with_data(data)
    out.settings["filter"] = data.filter  # Train Refiner writes the teacher settings into the refiner
    return out


class FilterTeacherCache(io.ComfyNode):
    """Keep the best ``keep`` samples of a teacher cache by a scorer (the paper keeps the top-N by aesthetics)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        names = scorer_names()
        return io.Schema(
            node_id="NC_FilterTeacherCache",
            display_name=FILTER_NAME,
            category=CATEGORY,
            description=DESCRIPTION,
            inputs=[
                TeacherCacheType.Input("teacher_cache", tooltip="From Build Teacher Cache. Always used."),
                io.Int.Input("keep", default=8, min=1, max=1000000,
                             tooltip="How many samples to keep: the ones with the highest scores (ties: the earlier "
                             "sample). At most the cache's sample count; equal to it keeps every sample."),
                io.Combo.Input("scorer", options=names, default="sharpness" if "sharpness" in names else names[0],
                               tooltip="What ranks the samples. sharpness: variance of the Laplacian (detail / "
                               "focus; also rewards noise). colorfulness: Hasler-Suesstrunk colour spread (also "
                               "rewards over-saturation; RGB, needs the VAE). Neither is an aesthetic model. aesthetic: the "
                               "LAION aesthetic score the paper filters by (needs the VAE, transformers and its weights "
                               "in $NOISECRAFT_AESTHETIC). Ignored when custom_scorer is set."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Decodes the teacher's latents so the scorer sees images in [0, 1] (connect the "
                             "model too). Not connected: the scorer gets the latents themselves."),
                io.Model.Input("model", optional=True,
                               tooltip="The model the cache was built with: its latent format is needed to decode "
                               "with the VAE. Only used with the VAE; not modified."),
                io.String.Input("custom_scorer", default="", optional=True,
                                tooltip="Your own scorer as package.module:function, importable by ComfyUI's Python: "
                                "score(images [n,3,H,W] in [0,1], cond_ids [n]) -> [n] scores, higher is better "
                                "(e.g. an aesthetic predictor). Empty turns it off (the scorer combo is used)."),
            ],
            outputs=[TeacherCacheType.Output(display_name="teacher_cache",
                                             tooltip="The kept samples, for Train Refiner (same prompts and model).")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, teacher_cache, keep, scorer, vae=None, model=None, custom_scorer=""):
        out = filter_cache(teacher_cache, keep, scorer, vae=vae, model=model, custom_scorer=custom_scorer,
                           node_id=node_id(cls))
        f = out.data.filter
        text = (f"kept {f['kept']} of {f['of']} teacher samples by {f['scorer']} (score >= {f['threshold']:.5g}; "
                f"mean {f['score_mean_all']:.5g} -> {f['score_mean_kept']:.5g})")
        log.info("%s: %s", FILTER_NAME, text)
        return io.NodeOutput(out, ui={"text": [text]})


NODES = [FilterTeacherCache]
