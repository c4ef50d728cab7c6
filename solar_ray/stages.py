"""The stage registry: every kind of stage, its config class, its function, its workers.

One table, read by the recipe runner, the stage commands (:func:`solar_ray.cli.stage_command`)
and Tune trials. Each entry is built by a small function that imports its stage only when
asked for, so reading the registry imports neither torch nor TRL. A training stage also
names its per-worker loop and its ``prepare`` function (the input checks and the
:class:`solar_ray.train.launch.WorkerSpec` values its workers need).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
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
    #: ``solar-ray <kind>`` prints ``summary(cfg, result)`` after the stage ran
    summary: Callable[[Any, Any], str] | None = None
    #: the command's flags not made from a field as usual, as ``add_argument`` keywords by
    #: name: a field's replace its flag; another name is passed to ``run`` as a keyword
    #: (``dry_run``: checks, prints the plan and makes nothing, so no summary)
    flags: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: ``(config file, flag values) -> (config file, flag values)``: what the command line
    #: means, where that is not the config's own fields (shorthands, a foreign file format)
    command_input: Callable[[str | None, dict[str, Any]], tuple[str | None, dict[str, Any]]] | None = None
    #: the command needs ``--config`` (data: its mixes are written in a file)
    config_required: bool = False


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

    def summary(cfg: UpscaleConfig, r: Any) -> str:
        return f"upscaled {cfg.source} ({cfg.method}): {r.num_layers_in} -> {r.num_layers_out} layers -> {r.out}"

    return Stage(
        "upscale", UpscaleConfig, run_upscale, precheck=check_source_plan, summary=summary,
        command_input=_mergekit_input,
    )  # fmt: skip


def _mergekit_input(path: str | None, flags: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """``--config`` may be a mergekit passthrough YAML (with ``slices``): an explicit plan."""
    from solar_ray.config import load_yaml
    from solar_ray.upscale import UpscaleError, plan_from_mergekit

    spec = load_yaml(path) if path else {}
    if "slices" not in spec:
        return path, flags
    try:
        model, layers = plan_from_mergekit(spec)
    except UpscaleError as e:
        raise UpscaleError(f"{path}: {e}") from None
    return None, {"source": model, "method": "explicit", "layers": layers} | flags


def _data() -> Stage:
    from solar_ray.data import run_data
    from solar_ray.data.config import SYNTH_MATH_DIR, DataConfig

    def products(cfg: DataConfig) -> set[str]:
        return {m.name for m in cfg.mixes} | ({SYNTH_MATH_DIR} if cfg.synth_math is not None else set())

    return Stage(
        "data", DataConfig, run_data, finished=_mixes_finished, products=products,
        summary=_data_summary, flags={"only": {"nargs": "+", "metavar": "MIX", "help": "build only these mixes"}},
        config_required=True,
    )  # fmt: skip


def _data_summary(cfg: Any, result: Any) -> str:
    lines = []
    if (sm := result.synth_math) is not None:
        state = "reused" if sm.reused else "built"
        lines.append(f"synth_math ({state}): {sm.num_seeds} seeds -> {sm.num_kept} kept, dropped {sm.dropped}")
    for name, mix in result.mixes.items():
        m, prep = mix.manifest, mix.manifest.get("prepare") or {}
        extra = ""
        if prep.get("split") == "packed":
            extra = f", {prep['num_rows']} packed blocks ({prep['packing_efficiency']:.2%} non-padding)"
        elif prep:
            extra = f", {prep['num_rows']} tokenized rows"
        lines.append(f"{name} ({m['kind']}): {mix.num_rows} rows, {m['rejects']['total']} rejects{extra} -> {mix.out}")
    return "\n".join(lines)


def _pretrain() -> Stage:
    from solar_ray.train.config import PretrainConfig
    from solar_ray.train.pretrain import prepare_pretrain, pretrain_worker, run_pretrain

    return Stage("pretrain", PretrainConfig, run_pretrain, pretrain_worker, prepare_pretrain, summary=_trained)


def _sft() -> Stage:
    from solar_ray.train.config import SFTConfig
    from solar_ray.train.sft import prepare_sft, run_sft, sft_worker

    return Stage("sft", SFTConfig, run_sft, sft_worker, prepare_sft, summary=_trained)


def _dpo() -> Stage:
    from solar_ray.train.config import DPOConfig
    from solar_ray.train.dpo import dpo_worker, run_dpo

    # DPO's workers need the reference log-probs its driver computes on Ray Data first,
    # so it has no standalone prepare (Tune trials train pretrain and sft stages)
    return Stage("dpo", DPOConfig, run_dpo, dpo_worker, summary=_trained)


def _trained(cfg: Any, result: Any) -> str:
    m = result.metrics
    shown = ", ".join(
        f"{k}={m[k]:.4g}" if isinstance(m[k], float) else f"{k}={m[k]}"
        for k in ("steps", "final_loss", "eval_loss", "eval_ppl")
        if m.get(k) is not None
    )
    state = "already done, not retrained" if result.skipped else "trained"
    return f"{cfg.stage}: {state} -> {result.out} ({shown})"


def _merge() -> Stage:
    from solar_ray.merge import MergeConfig, run_merge

    def summary(cfg: MergeConfig, r: Any) -> str:
        return f"merged {len(cfg.models)} models ({cfg.method}, {r.num_tensors} tensors) -> {r.out}"

    return Stage("merge", MergeConfig, run_merge, summary=summary)


def _eval() -> Stage:
    from solar_ray.compare import results_table
    from solar_ray.evaluate import EvalConfig, run_eval

    def summary(cfg: EvalConfig, results: Any) -> str:
        where = f"\nresults -> {Path(cfg.out) / 'results.json'}" if cfg.out else ""
        return results_table(results).removesuffix("\n") + where

    flags = {
        "models": {"nargs": "+", "metavar": "[NAME=]PATH", "help": "models to evaluate"},
        "suite": {"help": "offline | h6 | none | comma-separated lm-eval task names"},
        "num_fewshot": {"action": "append", "metavar": "TASK=N", "help": "shot override"},
        "dry_run": {
            "action": "store_true",
            "help": "check the models, tasks, texts and output; print the plan; evaluate nothing",
        },
    }
    return Stage(
        "eval", EvalConfig, run_eval, finished=_has_file("results.json"), summary=summary,
        flags=flags, command_input=_eval_input,
    )  # fmt: skip


def _eval_input(path: str | None, flags: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """``--suite a,b`` names lm-eval tasks; each ``--num-fewshot TASK=N`` sets a task's shots."""
    from solar_ray.evaluate import EvalError

    suite = flags.get("suite")
    if suite and suite not in ("offline", "h6", "none"):
        flags["suite"] = [s.strip() for s in suite.split(",") if s.strip()]
    if "num_fewshot" in flags:
        shots = {}
        for item in flags["num_fewshot"]:
            task, sep, n = item.partition("=")
            if not sep or not n.strip().isdigit():
                raise EvalError(f"--num-fewshot {item!r}: expected TASK=N")
            shots[task] = int(n)
        flags["num_fewshot"] = shots
    return path, flags


def _contamination() -> Stage:
    from solar_ray.contamination import ContaminationConfig, report_table, run_contamination

    def summary(cfg: ContaminationConfig, report: Any) -> str:
        where = f"\nreport -> {Path(cfg.out) / 'contamination.json'}" if cfg.out else ""
        return report_table(report).removesuffix("\n") + where

    return Stage(
        "contamination", ContaminationConfig, run_contamination,
        finished=_has_file("contamination.json"), summary=summary,
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
