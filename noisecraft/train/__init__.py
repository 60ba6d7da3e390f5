"""Training: the one loop (:mod:`~noisecraft.train.loop`) and its two methods: the NoiseRefine refiner
(MSD, on a teacher cache) and NPNet (on re-denoise pairs).

The model a trainer works on comes from :mod:`noisecraft.hosts` (:func:`~noisecraft.hosts.diffusers.diffusers_host`,
:func:`~noisecraft.hosts.toy.toy_host`); the trainers never depend on the toy model.

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895), Sec. 3.3, App. D.
"""

from .refiner import (
    RefinerTrainConfig,
    TrainResult,
    plot_losses,
    save_refiner,
    train_refiner,
    write_safetensors,
)
from .loop import DataSource, LoopConfig, LoopResult, Method, run
from .teacher_cache import TeacherBatch, TeacherCache, build_teacher_cache
from .npnet_pairs import PairBatch, PairStore, collect_pairs, re_denoise
from .npnet import NPNetTrainConfig, NPNetTrainResult, init_npnet, npnet_config_for, train_npnet

__all__ = [
    "LoopConfig",
    "LoopResult",
    "Method",
    "DataSource",
    "run",
    "TeacherCache",
    "TeacherBatch",
    "build_teacher_cache",
    "RefinerTrainConfig",
    "TrainResult",
    "train_refiner",
    "save_refiner",
    "write_safetensors",
    "plot_losses",
    "PairStore",
    "PairBatch",
    "collect_pairs",
    "re_denoise",
    "NPNetTrainConfig",
    "NPNetTrainResult",
    "train_npnet",
    "init_npnet",
    "npnet_config_for",
]
