"""The stage registry: every kind of stage, its config class, its function, its workers.

One table, read by the recipe runner (:mod:`solar_ray.pipeline`), the stage commands
(``solar-ray pretrain|sft|dpo``) and Tune trials (which train with a stage's worker loop).
Each entry is built by a small function that imports its stage only when asked for, so
reading the registry imports neither torch nor TRL, and a reader or a type checker can
follow a recipe's ``kind`` straight into the code that runs it.

A training stage (``pretrain``, ``sft``, ``dpo``) also names its per-worker loop and its
``prepare`` function: the input checks and the driver-side values its workers need
(:class:`solar_ray.train.launch.WorkerSpec` fields), what Tune trials run before they
launch the same loop. The recipe runner reads what it needs from the same entry: when an
output is finished, the paths it writes, the checks ``--dry-run`` can make.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from solar_ray.checkpoint import read_manifest

if TYPE_CHECKING:
    from solar_ray.config import StageConfig
    from solar_ray.train.launch import StageInputs

__all__ = [
    "KINDS",
    "MODEL_KINDS",
    "RAY_KINDS",
    "TRAINING_KINDS",
    "Stage",
    "UnknownStageError",
    "stage",
]


def _has_manifest(out: Path) -> bool:
    return read_manifest(out) is not None


def _has_file(name: str) -> Callable[[Path], bool]:
    return lambda out: (out / name).is_file()


def _mixes_finished(out: Path) -> bool:
    from solar_ray.data.contract import is_finished  # pyarrow only when a data output is checked

    outputs = [p for p in out.iterdir() if p.is_dir()] if out.is_dir() else []
    return bool(outputs) and all(is_finished(p) for p in outputs)


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
    #: is ``out`` a finished output of this kind (default: a model with its ``solar.json``)
    finished: Callable[[Path], bool] = _has_manifest
    #: the paths inside ``out`` the stage will write (what ``@stage/sub`` may name), from
    #: its validated config; None: not known in advance (any sub-path is accepted)
    products: Callable[[Any], set[str]] | None = None
    #: run on the validated config at planning time (also by --dry-run) for checks that
    #: need files already on disk
    precheck: Callable[[Any], None] | None = None
    #: ``models: [path, ...]`` in a recipe is shorthand for ``[{name: <its last part>, path}]``
    models_by_path: bool = False


class UnknownStageError(KeyError):
    """No stage of that kind."""


def _model() -> Stage:
    # the runner links or builds the model itself and records where it came from
    return Stage("model", None, None, finished=_has_file("source.json"))


def _corpus() -> Stage:
    from solar_ray.corpora import CorpusConfig, run_corpus

    def products(cfg: CorpusConfig) -> set[str]:
        return {f"{c}/{f}" for c in cfg.corpora for f in ("train.jsonl", "heldout.jsonl", "manifest.json")}

    return Stage("corpus", CorpusConfig, run_corpus, finished=_mixes_finished, products=products)


def _upscale() -> Stage:
    from solar_ray.upscale import UpscaleConfig, check_source_plan, run_upscale

    return Stage("upscale", UpscaleConfig, run_upscale, precheck=check_source_plan)


def _data() -> Stage:
    from solar_ray.data import run_data
    from solar_ray.data.config import SYNTH_MATH_DIR, DataConfig

    def products(cfg: DataConfig) -> set[str]:
        return {m.name for m in cfg.mixes} | ({SYNTH_MATH_DIR} if cfg.synth_math is not None else set())

    return Stage("data", DataConfig, run_data, finished=_mixes_finished, products=products)


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

    return Stage("eval", EvalConfig, run_eval, finished=_has_file("results.json"), models_by_path=True)


def _contamination() -> Stage:
    from solar_ray.contamination import ContaminationConfig, run_contamination

    return Stage(
        "contamination", ContaminationConfig, run_contamination,
        finished=_has_file("contamination.json"), models_by_path=True,
    )  # fmt: skip


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
#: the kinds whose output is a model (one a recipe may ``push_to_hub``)
MODEL_KINDS: tuple[str, ...] = ("upscale", *TRAINING_KINDS, "merge")
#: the kinds that run on Ray (a recipe with one starts Ray once, before its first stage)
RAY_KINDS: tuple[str, ...] = ("data", *TRAINING_KINDS)


@functools.cache
def stage(kind: str) -> Stage:
    """The registry entry of ``kind`` (its modules imported on first use)."""
    try:
        builder = _BUILDERS[kind]
    except KeyError:
        raise UnknownStageError(f"unknown stage kind {kind!r} (one of {list(KINDS)})") from None
    return builder()
