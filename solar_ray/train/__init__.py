"""Training stages on Ray Train + DeepSpeed: continued pretraining, SFT (TRL), DPO (TRL).

Each stage is a plain function from its validated config to a :class:`TrainResult` (the
exported Hugging Face model directory with ``solar.json`` lineage); see ``docs/train.md``.
Heavy libraries (torch, DeepSpeed, TRL) are imported inside the functions that need them.
"""

from solar_ray.train.common import TrainResult
from solar_ray.train.config import DPOConfig, PretrainConfig, SFTConfig, TrainConfig
from solar_ray.train.dpo import run_dpo
from solar_ray.train.pretrain import run_pretrain
from solar_ray.train.sft import run_sft

__all__ = [
    "DPOConfig",
    "PretrainConfig",
    "SFTConfig",
    "TrainConfig",
    "TrainResult",
    "run_dpo",
    "run_pretrain",
    "run_sft",
]
