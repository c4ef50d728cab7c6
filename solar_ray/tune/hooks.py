"""The two Ray classes a sweep extends: the Train->Tune report callback and ASHA.

Kept apart so that importing :mod:`solar_ray.tune` (configs, planning, the CLI's help)
does not import Ray.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

__all__ = [
    "PlacementGroupReaper",
    "ReferenceExemptASHA",
    "SweepReportCallback",
    "get_registry",
    "registry_name",
]


class SweepReportCallback(TuneReportCallback):
    """Forward rank 0's held-out reports from a Ray Train run to its Tune trial.

    ``transform`` turns a worker report into the trial's result (adding step, tokens and
    FLOPs) or returns None to drop it: reports without the metric (training loss only)
    are dropped because Tune requires the metric in every result. A held-out report that
    does not carry ``tokens_seen`` (the TRL stages log evaluation apart from training)
    gets the count of the latest report that did. Built in the trial's driver (it needs
    the Tune session); runs in the Ray Train controller.
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
        """Once a second: remove the due groups that still exist."""
        now = time.monotonic()
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
