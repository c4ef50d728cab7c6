"""The Ray classes a sweep extends: the Train->Tune report callback and the schedulers.

Kept apart so that importing :mod:`solar_ray.tune` (configs, planning, the CLI's help)
does not import Ray.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

__all__ = [
    "PlacementGroupReaper",
    "ReferenceExemptASHA",
    "SuccessiveHalving",
    "SweepReportCallback",
    "get_registry",
    "registry_name",
    "score_at",
]

log = logging.getLogger(__name__)


class SweepReportCallback(TuneReportCallback):
    """Forward rank 0's held-out reports from a Ray Train run to its Tune trial.

    ``transform`` turns a worker report into the trial's result (adding step, tokens and
    FLOPs) or returns None to drop it: reports without the metric (training loss only)
    are dropped because Tune requires the metric in every result. A held-out report that
    does not carry ``tokens_seen`` (the TRL stages log evaluation apart from training)
    gets the count of the latest report that did. A forwarded result says whether its
    report carried a checkpoint (``checkpointed``): :class:`SuccessiveHalving` pauses a
    trial only there, so that it resumes from the step it was compared at. Built in the
    trial's driver (it needs the Tune session); runs in the Ray Train controller.
    """

    def __init__(self, transform: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
        super().__init__()
        self._transform = transform
        self._tokens_seen: int | None = None

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        """Called by the Ray Train controller after every ``ray.train.report``."""
        raw = dict(metrics[0])
        if raw.get("tokens_seen"):
            self._tokens_seen = int(raw["tokens_seen"])
        elif self._tokens_seen is not None:
            raw["tokens_seen"] = self._tokens_seen
        result = self._transform(raw)
        if result is not None:
            result["checkpointed"] = checkpoint is not None
            self._training_actor_item_queue.put(result)


class ReferenceExemptASHA(AsyncHyperBandScheduler):
    """ASHA that never stops, nor ranks against, the reference (baseline) trials.

    ``reference`` names the trials (``config["trial"]``) to exempt; the other arguments
    are ``AsyncHyperBandScheduler``'s.

    The baseline is trained the full budget as the plots' reference line; its results must
    not enter the rungs either, or they would move the cutoffs of the searched trials.
    """

    def __init__(
        self, *, reference: set[str] | frozenset[str] = frozenset(), **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._reference = frozenset(reference)

    def _is_reference(self, trial: Any) -> bool:
        return trial.config.get("trial") in self._reference

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        """CONTINUE for the reference trial, ASHA's decision for every other one."""
        if self._is_reference(trial):
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        """Record a finished searched trial in its rungs; forget the reference trial."""
        if self._is_reference(trial):
            self._trial_info.pop(trial.trial_id, None)
            return
        super().on_trial_complete(tune_controller, trial, result)


def score_at(
    milestone: float, before: tuple[float, float] | None, after: tuple[float, float]
) -> float:
    """The score at ``milestone`` between the reports ``before`` it and ``after`` (x, score).

    Linear between the two; ``after``'s own score without a report before the rung, or
    when either score is not finite (a diverged run stays the worst).
    """
    x1, y1 = after
    if before is None or not (math.isfinite(before[1]) and math.isfinite(y1)):
        return y1
    x0, y0 = before
    if not x0 < milestone < x1:
        return y1
    return float(np.interp(milestone, (x0, x1), (y0, y1)))


class SuccessiveHalving(FIFOScheduler):
    """Synchronous successive halving over training steps; the reference trials exempt.

    Every searched trial trains to a rung (``milestones``) and waits there, paused, until all
    have arrived; then the best ``max(1, n // reduction_factor)`` go on and the rest stop. A
    trial is paused only on a result that carried a checkpoint (``result["checkpointed"]``;
    without one it trains on to the next that has), and a promoted trial's driver restarts
    from it. A score at a rung is interpolated between the reports either side of it
    (``time_attr``). ``trials`` names every searched trial (a rung is complete when each one
    still in the race reported; one that fails for good leaves it); ``reference`` trials are
    neither compared nor stopped. Why not ASHA: docs/sweep.md, "Scheduling and the
    comparison".
    """

    def __init__(
        self,
        *,
        trials: Iterable[str],
        metric: str,
        mode: str,
        milestones: list[int],
        reduction_factor: float,
        time_attr: str = "step",
        reference: Iterable[str] = (),
    ) -> None:
        super().__init__()
        if mode not in ("min", "max"):
            raise ValueError(f"mode: expected min or max, got {mode!r}")
        self._reference = frozenset(reference)
        self._searched = frozenset(trials) - self._reference
        # not TrialScheduler's _metric/_mode: Tune sets those from TuneConfig and refuses a
        # scheduler that has its own
        self._score_metric, self._score_mode, self._time_attr = metric, mode, time_attr
        self.milestones = sorted(milestones)
        self._rf = reduction_factor
        #: per rung: trial -> score (lower is better), and the trials it promoted once cut
        self._scores: list[dict[str, float]] = [{} for _ in self.milestones]
        self._kept: list[frozenset[str] | None] = [None for _ in self.milestones]
        self._left: set[str] = set()  # searched trials that ended (done, failed, stopped)
        self._resume: set[str] = set()  # paused trials a cut promoted
        self._trials: dict[str, Trial] = {}
        self._previous: dict[str, tuple[float, float]] = {}  # each trial's last (x, score)
        self._cutting = False

    # -- bookkeeping

    def _name(self, trial: Trial) -> str:
        name = str(trial.config.get("trial", trial.trial_id))
        self._trials[name] = trial
        return name

    def _score(self, result: dict) -> float | None:
        value = result.get(self._score_metric)
        if value is None or self._time_attr not in result:
            return None
        value = float(value)
        if math.isnan(value):
            return math.inf
        return value if self._score_mode == "min" else -value

    def _record(self, name: str, result: dict) -> None:
        score = self._score(result)
        if score is None:
            return
        x = float(result[self._time_attr])
        previous = self._previous.get(name)
        for k, milestone in enumerate(self.milestones):
            if x >= milestone * (1 - 1e-9) and name not in self._scores[k]:
                self._scores[k][name] = score_at(milestone, previous, (x, score))
        self._previous[name] = (x, score)

    def _eligible(self, k: int) -> frozenset[str] | None:
        """The trials racing at rung ``k`` (None while rung ``k - 1`` is not cut yet)."""
        return self._searched if k == 0 else self._kept[k - 1]

    def _cut(self, tune_controller: Any, current: str | None) -> None:
        """Cut every rung that is complete, in order; act on the paused trials."""
        if self._cutting:
            return
        self._cutting = True
        try:
            for k, milestone in enumerate(self.milestones):
                if self._kept[k] is not None:
                    continue
                eligible = self._eligible(k)
                if eligible is None:
                    return
                if any(n not in self._scores[k] and n not in self._left for n in eligible):
                    return
                arrived = sorted((self._scores[k][n], n) for n in eligible if n in self._scores[k])
                keep = max(1, int(len(arrived) / self._rf)) if arrived else 0
                kept = frozenset(n for _, n in arrived[:keep])
                self._kept[k] = kept
                log.info(
                    "successive halving: rung %d (step %d) of %d trials -> %s go on",
                    k,
                    milestone,
                    len(arrived),
                    ", ".join(sorted(kept)) or "none",
                )
                for _, name in arrived:
                    trial = self._trials.get(name)
                    if trial is None or name == current or name in self._left:
                        continue
                    waiting = trial.status == Trial.PAUSED or trial.is_saving
                    if name in kept:
                        if waiting:
                            self._resume.add(name)
                    elif waiting or trial.status in (Trial.RUNNING, Trial.PENDING):
                        tune_controller.stop_trial(trial)
        finally:
            self._cutting = False

    def _decision(self, name: str) -> str | None:
        """CONTINUE or STOP from the cuts made so far; None while a rung it reached is open."""
        for k in range(len(self.milestones)):
            if name not in self._scores[k]:
                return TrialScheduler.CONTINUE
            kept = self._kept[k]
            if kept is None:
                return None
            if name not in kept:
                return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    # -- TrialScheduler

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        """Know the trial by name (its status is read when a cut acts on it)."""
        self._name(trial)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        """Record the result at the rungs it reached; go on, stop, or wait paused."""
        name = self._name(trial)
        if name in self._reference or name not in self._searched:
            return TrialScheduler.CONTINUE
        self._resume.discard(name)
        self._record(name, result)
        self._cut(tune_controller, current=name)
        decision = self._decision(name)
        if decision is not None:
            return decision
        return TrialScheduler.PAUSE if result.get("checkpointed") else TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        """A trial ended (finished or stopped while running): record it, cut what is complete."""
        name = self._name(trial)
        if name not in self._searched:
            return
        if result:
            self._record(name, result)
        self._left.add(name)
        self._resume.discard(name)
        self._cut(tune_controller, current=None)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        """A trial failed for good: it leaves the race."""
        self.on_trial_remove(tune_controller, trial)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        """A paused or pending trial was stopped (by a cut or by the user)."""
        name = self._name(trial)
        if name not in self._searched:
            return
        self._left.add(name)
        self._resume.discard(name)
        self._cut(tune_controller, current=None)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        """Pending trials first, then paused ones a cut promoted (never one still waiting)."""
        trials = tune_controller.get_trials()
        for trial in trials:
            if trial.status == Trial.PENDING:
                return trial
        for trial in trials:
            if trial.status == Trial.PAUSED and self._name(trial) in self._resume:
                return trial
        return None

    def debug_string(self) -> str:
        """Rungs, how many trials reached each and how many each kept."""
        parts = []
        for k, milestone in enumerate(self.milestones):
            kept = self._kept[k]
            parts.append(
                f"step {milestone}: {len(self._scores[k])} in"
                + (f", {len(kept)} kept" if kept is not None else "")
            )
        return "Successive halving: " + "; ".join(parts)


# --------------------------------------------------------------------------- placement groups
#
# A trial stopped by ASHA is killed with its driver; the TorchTrainer's controller dies with
# it (an owned actor), but the placement group holding the training workers' CPUs/GPUs
# belongs to the job and outlives them. Ray Train's own PlacementGroupCleaner frees it
# through the State API, which needs the dashboard and a single Ray instance per host;
# where either is missing the resources leak and the next trials wait forever. So the
# sweep keeps its own account: rank 0 of every Train run registers its placement group
# (``PlacementGroupRegistry``) and ``PlacementGroupReaper`` removes the groups of trials
# that ended, once their driver had time to exit (groups already removed are skipped).


def registry_name(experiment: str) -> str:
    """The named registry actor of one experiment (stable across a resumed sweep)."""
    return f"solar-sweep-pgs-{experiment}"


class _Registry:
    """Placement groups of every Train run of the sweep, by trial and driver attempt."""

    def __init__(self) -> None:
        self._groups: dict[str, dict[str, list[Any]]] = {}

    def add(self, trial: str, attempt: str, placement_group: Any) -> None:
        """Record a placement group a training worker group of ``trial`` runs in."""
        self._groups.setdefault(trial, {}).setdefault(attempt, []).append(placement_group)

    def attempts(self, trial: str) -> list[str]:
        """The driver attempts of ``trial`` that registered a group so far."""
        return list(self._groups.get(trial, {}))

    def groups(self, trial: str, attempts: list[str]) -> list[Any]:
        """The placement groups ``attempts`` of ``trial`` registered."""
        found = self._groups.get(trial, {})
        return [pg for a in attempts for pg in found.get(a, [])]


def get_registry(experiment: str, create: bool = False) -> Any:
    """The experiment's registry actor (created by the sweep driver), or None."""
    import ray

    name = registry_name(experiment)
    if create:
        return (
            ray.remote(_Registry)
            .options(name=name, get_if_exists=True, num_cpus=0, max_concurrency=4)
            .remote()
        )
    try:
        return ray.get_actor(name)
    except ValueError:
        return None


class PlacementGroupReaper(Callback):
    """A Tune callback removing the placement groups of trials that ended mid-training."""

    def __init__(self, experiment: str, delay_s: float = 3.0, watch_s: float = 60.0) -> None:
        self.experiment = experiment
        self.delay_s = delay_s
        self.watch_s = watch_s
        self._pending: list[tuple[float, str, list[str]]] = []
        self._paused: set[str] = set()
        self._last_pass = 0.0

    def _ended(self, trial: Any) -> None:
        registry = get_registry(self.experiment)
        if registry is None:
            return
        import ray

        name = str(trial.config["trial"])
        attempts = ray.get(registry.attempts.remote(name))
        if attempts:
            self._pending.append((time.monotonic(), name, attempts))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A trial finished or was stopped: reap its groups after ``delay_s``."""
        self._ended(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A trial failed for good: reap its groups after ``delay_s``."""
        self._ended(trial)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A trial failed and will be retried: reap the failed attempt's groups."""
        self._ended(trial)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        """Once a second: remove the due groups that still exist.

        A trial paused by successive halving has no Tune hook of its own: its groups are
        reaped when it is first seen paused (the attempts registered until then; the
        attempt that resumes it registers anew).
        """
        now = time.monotonic()
        for trial in trials:
            if trial.status == Trial.PAUSED and trial.trial_id not in self._paused:
                self._paused.add(trial.trial_id)
                self._ended(trial)
            elif trial.status != Trial.PAUSED:
                self._paused.discard(trial.trial_id)
        if self._pending and now - self._last_pass >= 1.0:
            self._last_pass = now
            self.reap(now)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Every trial is over: remove what is left, without waiting further."""
        self.reap(math.inf)

    def reap(self, now: float) -> int:
        """Remove the existing groups of every ended attempt older than ``delay_s``."""
        import ray
        from ray.util.placement_group import placement_group_table, remove_placement_group

        registry = get_registry(self.experiment)
        if registry is None:
            self._pending.clear()
            return 0
        removed = 0
        keep = []
        for started, name, attempts in self._pending:
            if now - started < self.delay_s:
                keep.append((started, name, attempts))
                continue
            for pg in ray.get(registry.groups.remote(name, attempts)):
                if placement_group_table(pg).get("state") not in (None, "REMOVED"):
                    remove_placement_group(pg)
                    removed += 1
            if now - started < self.watch_s:
                keep.append((started, name, attempts))
        self._pending = keep
        return removed
