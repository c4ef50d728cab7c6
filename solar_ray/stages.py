"""The stage registry: every kind of stage, its config class, its function, its workers.

One table, read by the recipe runner (:mod:`solar_ray.pipeline`), the stage commands
(``solar-ray pretrain|sft|dpo``) and Tune trials (which train with a stage's worker loop).
Each entry is built by a small function that imports its stage only when asked for, so
reading the registry imports neither torch nor TRL, and a reader or a type checker can
follow a recipe's ``kind`` straight into the code that runs it.

A training stage (``pretrain``, ``sft``, ``dpo``) also names its per-worker loop and its
``prepare`` function: the input checks and the driver-side values its workers need
(:class:`solar_ray.train.launch.WorkerSpec` fields), what Tune trials run before they
launch the same loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from solar_ray.config import StageConfig
    from solar_ray.train.launch import StageInputs

__all__ = ["KINDS", "TRAINING_KINDS", "Stage", "UnknownStageError", "stage"]


@dataclass(frozen=True)
class Stage:
    """One kind of stage."""

    kind: str
    #: the stage's config class (None: a ``model`` stage, handled by the runner itself)
    config: type[StageConfig] | None
    #: ``run_<kind>(cfg)``: makes the stage's output (None for ``model``)
    run: Callable[[Any], Any] | None
    #: training stages: the loop every Ray Train worker runs
    worker: Callable[[dict], None] | None = None
    #: training stages: ``prepare(cfg) -> (inputs, WorkerSpec fields)`` without launching
    prepare: Callable[[Any], tuple[StageInputs, dict[str, Any]]] | None = None


class UnknownStageError(KeyError):
    """No stage of that kind."""


def _model() -> Stage:
    return Stage("model", None, None)


def _corpus() -> Stage:
    from solar_ray.corpora import CorpusConfig, run_corpus

    return Stage("corpus", CorpusConfig, run_corpus)


def _upscale() -> Stage:
    from solar_ray.upscale import UpscaleConfig, run_upscale

    return Stage("upscale", UpscaleConfig, run_upscale)


def _data() -> Stage:
    from solar_ray.data import run_data
    from solar_ray.data.config import DataConfig

    return Stage("data", DataConfig, run_data)


def _pretrain() -> Stage:
    from solar_ray.train.config import PretrainConfig
    from solar_ray.train.pretrain import prepare_pretrain, pretrain_worker, run_pretrain

    return Stage("pretrain", PretrainConfig, run_pretrain, pretrain_worker, prepare_pretrain)


def _sft() -> Stage:
    from solar_ray.train.config import SFTConfig
    from solar_ray.train.sft import prepare_sft, run_sft, sft_worker

    return Stage("sft", SFTConfig, run_sft, sft_worker, prepare_sft)


def _dpo() -> Stage:
    from solar_ray.train.config import DPOConfig
    from solar_ray.train.dpo import dpo_worker, run_dpo

    # DPO's workers need the reference log-probs its driver computes on Ray Data first,
    # so it has no standalone prepare (Tune trials train pretrain and sft stages)
    return Stage("dpo", DPOConfig, run_dpo, dpo_worker)


def _merge() -> Stage:
    from solar_ray.merge import MergeConfig, run_merge

    return Stage("merge", MergeConfig, run_merge)


def _eval() -> Stage:
    from solar_ray.evaluate import EvalConfig, run_eval

    return Stage("eval", EvalConfig, run_eval)


def _contamination() -> Stage:
    from solar_ray.contamination import ContaminationConfig, run_contamination

    return Stage("contamination", ContaminationConfig, run_contamination)


_BUILDERS: dict[str, Callable[[], Stage]] = {
    "model": _model,
    "corpus": _corpus,
    "upscale": _upscale,
    "data": _data,
    "pretrain": _pretrain,
    "sft": _sft,
    "dpo": _dpo,
    "merge": _merge,
    "eval": _eval,
    "contamination": _contamination,
}

#: every kind of stage a recipe may use, in the recipe's usual order
KINDS: tuple[str, ...] = tuple(_BUILDERS)
#: the kinds that train on Ray Train workers
TRAINING_KINDS: tuple[str, ...] = ("pretrain", "sft", "dpo")


@functools.cache
def stage(kind: str) -> Stage:
    """The registry entry of ``kind`` (its modules imported on first use)."""
    try:
        builder = _BUILDERS[kind]
    except KeyError:
        raise UnknownStageError(f"unknown stage kind {kind!r} (one of {list(KINDS)})") from None
    return builder()
