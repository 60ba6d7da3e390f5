"""Training: the NoiseRefine teacher cache and refiner trainer (MSD); NPNet pairs and trainer.

Paper: Ahn, Kang et al., "A Noise is Worth Diffusion Guidance" (arXiv:2412.03895), Sec. 3.3, App. D.
"""

from .refiner import (
    RefinerHost,
    RefinerTrainConfig,
    TrainResult,
    diffusers_host,
    plot_losses,
    save_refiner,
    toy_host,
    train_refiner,
    write_safetensors,
)
from .teacher_cache import TeacherBatch, TeacherCache, build_teacher_cache
from .npnet_pairs import PairBatch, PairStore, collect_pairs, re_denoise, toy_confidence_scorer
from .npnet_trainer import NPNetTrainConfig, NPNetTrainResult, init_npnet, npnet_config_for, train_npnet

__all__ = [
    "TeacherCache",
    "TeacherBatch",
    "build_teacher_cache",
    "RefinerHost",
    "RefinerTrainConfig",
    "TrainResult",
    "train_refiner",
    "toy_host",
    "diffusers_host",
    "save_refiner",
    "write_safetensors",
    "plot_losses",
    "PairStore",
    "PairBatch",
    "collect_pairs",
    "re_denoise",
    "toy_confidence_scorer",
    "NPNetTrainConfig",
    "NPNetTrainResult",
    "train_npnet",
    "init_npnet",
    "npnet_config_for",
]
