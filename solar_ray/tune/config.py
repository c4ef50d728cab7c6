"""The sweep recipe: what to search, how each trial trains, how trials are stopped.

A sweep recipe (``solar-ray sweep RECIPE.yaml``) is one :class:`SweepConfig`: the base
model, the ``stages`` run once before the trials, the ``search`` space (``m`` and method,
or mixes), the ``train`` stage every trial runs, an optional equal ``budget`` in tokens or
FLOPs, and the ``scheduler``. :func:`plan_trials` expands the space into trials with
deterministic names; nothing here needs Ray. The recipe: docs/sweep.md, "A sweep recipe".
"""

from __future__ import annotations

import random
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from solar_ray.config import StageConfig
from solar_ray.hub import refuse_tokens
from solar_ray.tracking import Backends

__all__ = [
    "BestRecipeConfig",
    "BudgetConfig",
    "MixChoice",
    "MRange",
    "SchedulerConfig",
    "SearchSpace",
    "SweepConfig",
    "TrialChoice",
    "TrialSpec",
    "plan_trials",
    "rung_milestones",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

#: training-stage fields a sweep owns (each trial's model, output and Ray Train run)
OWNED_TRAIN_FIELDS = ("model", "out", "storage_path", "name", "overwrite", "local")

#: the training kinds a trial can run
TRAIN_KINDS = ("pretrain", "sft")

#: upscale methods and the single parameter each one is searched over
METHOD_PARAM = {"solar": "m", "llama-pro": "expand_every", "stack": "repeat"}


class MRange(StageConfig):
    """``{start: 4, stop: 12, step: 1}``: every m from start to stop, both included."""

    start: int = Field(ge=0)
    stop: int = Field(ge=0)
    step: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> MRange:
        if self.stop < self.start:
            raise ValueError(f"stop ({self.stop}) must be >= start ({self.start})")
        return self

    def values(self) -> list[int]:
        """The m values of the range."""
        return list(range(self.start, self.stop + 1, self.step))


class MixChoice(StageConfig):
    """One data choice of a mix search: a prepared mix, or a mix for the sweep to build.

    ``data`` names a prepared mix (a path or ``"@stage/mix"``). ``mix`` is the mix itself
    (the fields of the data stage's ``MixConfig``: ``kind``, ``sources`` with their
    ``weight`` or ``max_samples``, ``prepare``, ...); the sweep adds it, named after the
    choice, to the data stage ``search.mix_stage``, which builds every choice once.
    """

    name: str
    data: str | None = None
    mix: dict[str, Any] | None = None
    val_data: str | None = Field(default=None, description="default: train.val_data")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r}: use letters, digits, '_', '-', '.' (it names a trial)")
        return v

    @model_validator(mode="after")
    def _check(self) -> MixChoice:
        if (self.data is None) == (self.mix is None):
            raise ValueError("give exactly one of 'data' (a prepared mix) or 'mix' (its config)")
        if self.mix is not None and "name" in self.mix:
            raise ValueError("mix.name: the choice's name names the mix; remove it")
        return self


class TrialChoice(StageConfig):
    """An explicit trial: any upscale and data choice plus training overrides.

    ``method: none`` trains the base model as is. ``train`` overrides fields of the shared
    training config for this trial only (e.g. a learning rate).
    """

    name: str
    method: Literal["solar", "llama-pro", "stack", "none"] = "solar"
    m: int | None = Field(default=None, ge=0)
    expand_every: int | None = Field(default=None, ge=1)
    repeat: int | None = Field(default=None, ge=1)
    data: str | None = None
    val_data: str | None = None
    train: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r}: use letters, digits, '_', '-', '.' (it names a trial)")
        return v

    @model_validator(mode="after")
    def _check(self) -> TrialChoice:
        if self.method == "solar" and self.m is None:
            raise ValueError("m is required for method 'solar'")
        return self


class SearchSpace(StageConfig):
    """The choices to try: upscale methods x m values, or prepared data mixes, or both."""

    method: (
        Literal["solar", "llama-pro", "stack", "none"]
        | list[Literal["solar", "llama-pro", "stack", "none"]]
    ) = "solar"
    m: list[int] | MRange | None = Field(
        default=None, description="layers removed per copy (solar): a list or {start, stop}"
    )
    expand_every: list[int] = Field(default_factory=lambda: [4], description="llama-pro values")
    repeat: list[int] = Field(default_factory=lambda: [2], description="stack values")
    mixes: list[MixChoice] | None = Field(
        default=None, description="data choices: each trial trains on one mix"
    )
    mix_stage: str = Field(
        default="data", description="the data stage that builds the mixes given inline"
    )
    trials: list[TrialChoice] = Field(
        default_factory=list, description="explicit extra trials (any choice + overrides)"
    )
    order: Literal["given", "shuffle"] = Field(
        default="given",
        description="the order trials start in: as listed, or shuffled with 'seed' (ASHA "
        "promotes the first trials to reach a rung, so a sorted list is its worst case when "
        "the metric improves along it)",
    )
    seed: int = 0

    @field_validator("m")
    @classmethod
    def _m(cls, v: list[int] | MRange | None) -> list[int] | MRange | None:
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty list; give at least one m")
            if any(x < 0 for x in v):
                raise ValueError(f"m values must be >= 0, got {v}")
            if len(set(v)) != len(v):
                raise ValueError(f"m values repeat: {v}")
        return v

    def methods(self) -> list[str]:
        """The upscale methods as a list."""
        return [self.method] if isinstance(self.method, str) else list(self.method)

    def m_values(self) -> list[int]:
        """The m values as a list (empty when not searched)."""
        if self.m is None:
            return []
        return self.m.values() if isinstance(self.m, MRange) else list(self.m)


def rung_milestones(grace_period: float, reduction_factor: float, max_t: float) -> list[int]:
    """Where trials are compared: ``grace * rf**k`` below ``max_t``, rounded (no duplicates).

    In steps, or in a budget's tokens or FLOPs (large numbers, so rounding is harmless)."""
    out: list[int] = []
    r = float(grace_period)
    while round(r) < max_t:
        if not out or round(r) > out[-1]:
            out.append(round(r))
        r *= reduction_factor
    return out


class BudgetConfig(StageConfig):
    """The training budget of every trial: ``{tokens: N}`` or ``{flops: X}`` (exactly one).

    A trial's steps are the whole steps that fit: ``floor(tokens / tokens_per_step)`` or
    ``floor(flops / (flops_per_token * tokens_per_step))`` with ``tokens_per_step = global
    batch x seq_len`` and the training stages' own FLOPs-per-token estimate
    (:func:`solar_ray.train.metrics.flops_per_token`, ``6N`` + attention) of the trial's
    model. Equal FLOPs give a larger upscaled model fewer steps.
    """

    tokens: float | None = Field(default=None, gt=0, description="training tokens per trial")
    flops: float | None = Field(
        default=None, gt=0, description="estimated training FLOPs per trial"
    )

    @model_validator(mode="after")
    def _one(self) -> BudgetConfig:
        if (self.tokens is None) == (self.flops is None):
            raise ValueError("give exactly one of 'tokens' or 'flops'")
        return self

    @property
    def unit(self) -> str:
        """``tokens`` or ``flops``."""
        return "tokens" if self.tokens is not None else "flops"

    @property
    def amount(self) -> float:
        """The budget in its unit."""
        return float(self.tokens if self.tokens is not None else self.flops)  # type: ignore[arg-type]

    @property
    def result_key(self) -> str:
        """The key of a trial's results that counts this unit (``tokens_seen``, ``flops``)."""
        return "tokens_seen" if self.unit == "tokens" else "flops"


class SchedulerConfig(StageConfig):
    """How trials are stopped over training steps.

    ``asha``: Ray's asynchronous successive halving; a trial reaching a rung goes on if it
    is in the best ``1/reduction_factor`` of those that reached it so far (so the first to
    arrive always does). ``sha``: synchronous successive halving; every trial waits, paused,
    at a rung until all have reached it, then the best ``1/reduction_factor`` go on (the
    trials checkpoint at the rungs and resume from there). ``grid``: every trial the full
    budget. Rungs are at ``grace_period_steps * reduction_factor**k`` steps.
    """

    kind: Literal["asha", "sha", "grid"] = "asha"
    metric: str = Field(default="eval_loss", description="a held-out metric the trials report")
    mode: Literal["min", "max"] = "min"
    grace_period_steps: int = Field(
        default=10, ge=1, description="steps every trial runs before it can be stopped"
    )
    grace_period_fraction: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="with a budget: the first rung as a fraction of it (rungs at "
        "fraction * reduction_factor**k of the budget, in its tokens or FLOPs)",
    )
    reduction_factor: float = Field(
        default=3.0, gt=1, description="keep the best 1/reduction_factor at each rung"
    )


class BestRecipeConfig(StageConfig):
    """How ``best.yaml`` (the full run with the best choice) is written."""

    steps: int | None = Field(default=None, ge=1, description="training steps (default: train's)")
    train: dict[str, Any] = Field(
        default_factory=dict,
        description="training fields for the full run (e.g. eval_every, checkpoint_every)",
    )
    upscale_stage: str = "upscaled"
    train_stage: str = "cpt"
    then: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="stages appended after training (they may refer to '@<train_stage>')",
    )


class SweepConfig(StageConfig):
    """A sweep recipe; see docs/sweep.md, "A sweep recipe"."""

    @model_validator(mode="before")
    @classmethod
    def _no_tokens(cls, data: Any) -> Any:
        refuse_tokens(data)  # the recipe is copied into every trial's run directory
        return data

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    out: str | None = Field(default=None, description="sweep directory (default runs/<name>)")
    ray_address: str | None = None
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    base: str = Field(description="model source every trial starts from (or '@stage')")
    stages: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="stages run once before the trials (a recipe's stages)"
    )
    search: SearchSpace
    train: dict[str, Any] = Field(description="the training stage: {kind: pretrain|sft, ...}")
    budget: BudgetConfig | None = Field(
        default=None, description="equal tokens or FLOPs per trial, instead of train.steps"
    )
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    baseline: bool = Field(
        default=True,
        description="the base model trained with the same data and budget, the reference "
        "every upscaled trial is compared with: always on when trials upscale",
    )
    seam: bool = Field(
        default=True,
        description="score each searched m with the zero-training seam predictors "
        "(solar_ray.seam) on the held-out rows before the trials",
    )
    seam_sequences: int = Field(default=16, ge=2, description="held-out rows the seam scores use")
    max_concurrent_trials: int | None = Field(
        default=None, ge=1, description="default: as many trials as the cluster's resources fit"
    )
    trial_max_failures: int = Field(default=1, ge=0, description="Tune retries per trial")
    upscale_cache: str | None = Field(
        default=None, description="where upscaled models are cached (default OUT/upscales)"
    )
    best: BestRecipeConfig = Field(default_factory=BestRecipeConfig)
    tracking: Backends = Field(
        default_factory=list,
        description="wandb / mlflow: Ray Tune's logger callbacks, one tracked run per trial "
        "(a trial's own training logs follow train.tracking)",
    )

    @field_validator("tracking")
    @classmethod
    def _no_tensorboard(cls, v: list[str]) -> list[str]:
        if "tensorboard" in v:
            raise ValueError("tensorboard: Tune writes TensorBoard logs of every trial already")
        return v

    @field_validator("train")
    @classmethod
    def _train(cls, v: dict[str, Any]) -> dict[str, Any]:
        kind = v.get("kind")
        if kind not in TRAIN_KINDS:
            raise ValueError(f"kind: expected one of {list(TRAIN_KINDS)}, got {kind!r}")
        owned = [f for f in OWNED_TRAIN_FIELDS if f in v]
        if owned:
            raise ValueError(
                f"{owned[0]}: the sweep sets it for every trial (the model is 'base' or its "
                "upscale); remove it"
            )
        return v

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        train = self.train
        if "data" not in train and not self.search.mixes:
            raise ValueError("train.data: field required (or search over search.mixes)")
        has_val = (
            train.get("val_data")
            or train.get("val_fraction")
            or (self.search.mixes and all(c.val_data for c in self.search.mixes))
        )
        if not has_val:
            raise ValueError(
                "train.val_data: trials are scored on held-out data; set val_data (a prepared "
                "held-out mix) or val_fraction"
            )
        if self.budget is not None:
            if train.get("steps") is not None or train.get("epochs") is not None:
                key = "steps" if train.get("steps") is not None else "epochs"
                raise ValueError(
                    f"train.{key}: the budget sets every trial's steps; remove train.{key} "
                    "or the budget"
                )
        if not self.baseline and any(t.method != "none" for t in plan_trials(self, True)):
            raise ValueError(
                "baseline: the base model trained with the same budget is the reference every "
                "upscaled trial is compared with; it always runs (remove baseline: false)"
            )
        if self.scheduler.kind in ("asha", "sha"):
            kind = self.scheduler.kind.upper()
            if not train.get("eval_every"):
                raise ValueError(
                    f"train.eval_every: {kind} compares trials on held-out reports during "
                    "training; set eval_every (<= scheduler.grace_period_steps)"
                )
            if self.budget is not None:
                if self.scheduler.grace_period_fraction is None:
                    raise ValueError(
                        f"scheduler.grace_period_fraction: with a budget, {kind}'s first rung "
                        "is a fraction of it; set it (e.g. 0.125)"
                    )
            else:
                if train.get("steps") is None:
                    raise ValueError(f"train.steps: {kind} schedules over steps; set steps")
                if self.scheduler.grace_period_steps > int(train["steps"]):
                    raise ValueError(
                        f"scheduler.grace_period_steps: {self.scheduler.grace_period_steps} "
                        f"exceeds train.steps ({train['steps']})"
                    )
        if self.scheduler.kind == "sha" and self.budget is None:
            rungs = self.rungs()
            off = [r for r in rungs if r % int(train["eval_every"])]
            if off:
                raise ValueError(
                    f"train.eval_every: successive halving compares trials at steps {rungs}; "
                    f"eval_every ({train['eval_every']}) must divide each of them ({off} "
                    "do not): set eval_every to a divisor of scheduler.grace_period_steps "
                    "and an integer reduction_factor"
                )
        eval_every = train.get("eval_every")
        log_every = train.get("log_every", 10)
        if self.train_kind == "pretrain" and eval_every and eval_every % log_every:
            raise ValueError(
                f"train.eval_every: {eval_every} must be a multiple of train.log_every "
                f"({log_every}) so every held-out report carries its step"
            )
        if not (self.search.m_values() or self.search.mixes or self.search.trials) and (
            "solar" in self.search.methods()
        ):
            raise ValueError("search.m: field required for method 'solar' (e.g. m: [3, 5, 7])")
        inline = [c for c in self.search.mixes or [] if c.mix is not None]
        if inline:
            stage = self.stages.get(self.search.mix_stage)
            if not stage or stage.get("kind") != "data":
                raise ValueError(
                    f"search.mix_stage: mixes given inline are built by a 'data' stage; add "
                    f"stages.{self.search.mix_stage} (kind: data) or name yours"
                )
            existing = {m.get("name") for m in stage.get("mixes", []) if isinstance(m, dict)}
            clash = sorted(existing & {c.name for c in inline})
            if clash:
                raise ValueError(
                    f"search.mixes: {clash[0]!r} is also a mix of stages."
                    f"{self.search.mix_stage}; rename the choice"
                )
        names = [t.name for t in plan_trials(self)]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"search: trial name {dup[0]!r} appears twice; rename a trial")
        for stage in (self.best.upscale_stage, self.best.train_stage):
            if stage in self.stages:
                raise ValueError(
                    f"best: stage name {stage!r} is also one of 'stages'; choose another"
                )
        return self

    @property
    def train_kind(self) -> str:
        """``pretrain`` or ``sft``."""
        return str(self.train["kind"])

    def effective_stages(self, only: set[str] | None = None) -> dict[str, dict[str, Any]]:
        """``stages`` with the inline mix choices added to the mix stage.

        ``only`` keeps just the inline mixes of those choices (``best.yaml`` builds the
        best one only).
        """
        stages = {k: dict(v) for k, v in self.stages.items()}
        inline = [
            c for c in self.search.mixes or []
            if c.mix is not None and (only is None or c.name in only)
        ]  # fmt: skip
        if inline:
            stage = stages[self.search.mix_stage]
            stage["mixes"] = [*stage.get("mixes", []), *({"name": c.name, **c.mix} for c in inline)]
        return stages

    def rungs(self) -> list[int]:
        """Where the early-stopping scheduler compares trials (none for a grid): steps, or
        with a budget the amounts of its unit (tokens or FLOPs), see :attr:`time_attr`."""
        if self.scheduler.kind == "grid":
            return []
        if self.budget is not None:
            assert self.scheduler.grace_period_fraction is not None
            return rung_milestones(
                self.scheduler.grace_period_fraction * self.budget.amount,
                self.scheduler.reduction_factor,
                self.budget.amount,
            )
        return rung_milestones(
            self.scheduler.grace_period_steps,
            self.scheduler.reduction_factor,
            int(self.train["steps"]),
        )

    @property
    def time_attr(self) -> str:
        """The result key trials are scheduled over: ``step``, or the budget's unit."""
        return self.budget.result_key if self.budget is not None else "step"

    def train_fields(self) -> dict[str, Any]:
        """The shared training config without its ``kind``."""
        return {k: v for k, v in self.train.items() if k != "kind"}

    def fingerprint(self) -> str:
        """Hash of everything that changes what the trials compute (names the experiment).

        A rerun with the same fingerprint resumes the experiment; a changed recipe starts a
        new one beside it instead of mixing results. Values left at their defaults are not
        hashed, so a field added to the schema later does not orphan existing sweeps.
        """
        from solar_ray.identity import config_key

        operational = ("description", "out", "ray_address", "runtime_env", "max_concurrent_trials",
                       "trial_max_failures", "best", "upscale_cache", "seam", "seam_sequences")  # fmt: skip
        return config_key(self.model_dump(mode="json", exclude_defaults=True), operational, length=8)


class TrialSpec(StageConfig):
    """One trial, fully determined: its name, upscale, data and training overrides."""

    name: str
    method: Literal["solar", "llama-pro", "stack", "none"]
    m: int | None = None
    expand_every: int | None = None
    repeat: int | None = None
    mix: str | None = None
    data: str | None = None
    val_data: str | None = None
    train: dict[str, Any] = Field(default_factory=dict)
    reference: bool = Field(default=False, description="the baseline: never early-stopped")

    def upscale_args(self) -> dict[str, Any] | None:
        """The upscale config fields of this trial (None: train the base model as is)."""
        if self.method == "none":
            return None
        param = METHOD_PARAM[self.method]
        value = getattr(self, param)
        return {"method": self.method, **({param: value} if value is not None else {})}

    def label(self) -> str:
        """A short label for tables and plots: ``m=7``, ``llama-pro k=4``, ``v3``, ``base``."""
        if self.reference:
            return "base"
        parts = []
        if self.method == "solar":
            parts.append(f"m={self.m}")
        elif self.method == "llama-pro":
            parts.append(f"llama-pro k={self.expand_every}")
        elif self.method == "stack":
            parts.append(f"stack x{self.repeat}")
        if self.mix:
            parts.append(self.mix)
        return " ".join(parts) or self.name


def _upscale_choices(space: SearchSpace) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for method in space.methods():
        if method == "solar":
            out += [
                {"name": f"solar-m{m:02d}", "method": "solar", "m": m} for m in space.m_values()
            ]
        elif method == "llama-pro":
            out += [
                {"name": f"llama-pro-k{k}", "method": method, "expand_every": k}
                for k in space.expand_every
            ]
        elif method == "stack":
            out += [{"name": f"stack-x{g}", "method": method, "repeat": g} for g in space.repeat]
        else:
            out.append({"name": "", "method": "none"})  # the base model as is
    return out


def _mix_data(cfg: SweepConfig, mix: MixChoice) -> str:
    return mix.data if mix.data is not None else f"@{cfg.search.mix_stage}/{mix.name}"


def plan_trials(cfg: SweepConfig, searched_only: bool = False) -> list[TrialSpec]:
    """Every trial of the sweep, in the order they start: the grid of choices and the
    explicit trials (as listed, or shuffled with ``search.seed``), then the baseline (the
    base model, same data and budget, never stopped early) when trials upscale.
    ``searched_only`` leaves the baseline out."""
    space = cfg.search
    upscales = (
        _upscale_choices(space) if (space.m_values() or "solar" not in space.methods()) else []
    )
    if space.mixes and not upscales:
        upscales = [{"name": "", "method": "none"}]
    trials: list[TrialSpec] = []
    for up in upscales:
        for mix in space.mixes or [None]:
            if mix is None:
                trials.append(TrialSpec(**{**up, "name": up["name"] or "none"}))
                continue
            name = f"{up['name']}-mix-{mix.name}" if up["name"] else f"mix-{mix.name}"
            trials.append(
                TrialSpec(
                    **{**up, "name": name},
                    mix=mix.name,
                    data=_mix_data(cfg, mix),
                    val_data=mix.val_data,
                )
            )
    for t in space.trials:
        trials.append(TrialSpec(**t.model_dump(), reference=False))
    if space.order == "shuffle":
        random.Random(space.seed).shuffle(trials)
    if not searched_only and any(t.method != "none" for t in trials):
        mix = space.mixes[0] if space.mixes else None
        trials.append(
            TrialSpec(
                name="base",
                method="none",
                reference=True,
                mix=mix.name if mix else None,
                data=_mix_data(cfg, mix) if mix else None,
                val_data=mix.val_data if mix else None,
            )
        )
    return trials
