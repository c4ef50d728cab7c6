"""Training metrics: throughput, MFU, held-out loss per row, the logs in the tracking backends.

Every stage reports the same names to Ray Train and its ``tracking`` backends
(:class:`MetricsWriter`). MFU is the PaLM estimate (:func:`flops_per_token`: ``6·N`` plus
``12·L·H·Q·T`` for attention) over the devices' dense bf16 peak, so not on a CPU. Names and
where the logs go: docs/train.md, "Metrics".
"""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from solar_ray.fs import is_uri
from solar_ray.stats import ratio_estimate

if TYPE_CHECKING:
    from solar_ray.tracking import TrackedRun

__all__ = [
    "MetricsWriter",
    "Throughput",
    "device_peak_flops",
    "eval_metrics",
    "flops_per_token",
    "mfu",
    "row_nll",
]

log = logging.getLogger(__name__)

#: dense bf16 peak FLOP/s by device-name substring (NVIDIA datasheets, without sparsity)
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 125e12),
    ("A10", 125e12),
    ("V100", 125e12),
)


def device_peak_flops() -> float | None:
    """Dense bf16 peak of the current CUDA device, or None (CPU, unknown device)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    except Exception:  # no CUDA runtime
        return None
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def flops_per_token(model_config: Any, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token: ``6·N`` (non-embedding params) + ``12·L·H·Q·T`` attention."""
    hidden = int(model_config.hidden_size)
    layers = int(model_config.num_hidden_layers)
    heads = int(model_config.num_attention_heads)
    head_dim = int(getattr(model_config, "head_dim", None) or hidden // heads)
    embed = int(model_config.vocab_size) * hidden
    non_embedding = max(num_params - embed, 0)
    return 6.0 * non_embedding + 12.0 * layers * heads * head_dim * seq_len


def mfu(tokens_per_s_per_device: float, flops_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation, or None without a known peak."""
    if not peak or tokens_per_s_per_device <= 0:
        return None
    return tokens_per_s_per_device * flops_token / peak


class Throughput:
    """This worker's tokens/s and seconds per optimizer step, interval by interval.

    :meth:`lap` closes an interval (one per metrics report); :meth:`summary` is the median
    over the intervals after the first, which holds the warm-up (lazy initialisation).
    """

    def __init__(self) -> None:
        self._t = time.perf_counter()
        self._tokens = 0
        self._steps = 0
        self.intervals: list[tuple[float, int, int]] = []  # (seconds, tokens, steps)

    def add(self, tokens: int, steps: int = 0) -> None:
        """Count ``tokens`` processed by this worker and ``steps`` optimizer steps."""
        self._tokens += int(tokens)
        self._steps += int(steps)

    def lap(self) -> tuple[float, float]:
        """(tokens per second, seconds per step) since the previous lap; restarts the clock."""
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        self.intervals.append((dt, self._tokens, self._steps))
        rate = self._tokens / dt
        step_time = dt / self._steps if self._steps else float("nan")
        self._t, self._tokens, self._steps = now, 0, 0
        return rate, step_time

    def summary(self) -> dict[str, float]:
        """Steady-state ``tokens_per_s_per_worker`` and ``step_time_s`` (medians)."""
        steady = self.intervals[1:] or self.intervals
        steady = [(dt, tok, n) for dt, tok, n in steady if n > 0]
        if not steady:
            return {}
        return {
            "tokens_per_s_per_worker": statistics.median(tok / dt for dt, tok, _ in steady),
            "step_time_s": statistics.median(dt / n for dt, _, n in steady),
        }


def tensorboard_dir(storage_path: str, run_name: str) -> tuple[Path, str | None]:
    """(local directory to write event files into, remote URI to copy them to or None)."""
    if is_uri(storage_path):
        local = Path(tempfile.gettempdir()) / "solar-ray-tensorboard" / run_name
        return local, f"{storage_path.rstrip('/')}/{run_name}/tensorboard"
    return Path(storage_path) / run_name / "tensorboard", None


class MetricsWriter:
    """The run's metrics into its tracking backends, from rank 0 (a no-op elsewhere).

    TensorBoard scalars go under ``train/`` and ``eval/``; W&B and MLflow
    (:mod:`solar_ray.tracking`) get the same numbers under the names the stage's own
    history uses (``loss``, ``lr``, ``eval_loss``, ...). Backends are opened on first use,
    so a finished run never imports them.
    """

    def __init__(
        self,
        storage_path: str,
        run_name: str,
        enabled: bool,
        backends: Sequence[str] = ("tensorboard",),
        run: TrackedRun | None = None,
    ) -> None:
        self.enabled = enabled and bool(backends)
        self.backends = list(backends)
        self.run = run
        self._writer: Any = None
        self._trackers: list[Any] | None = None
        self.local_dir, self.remote = tensorboard_dir(storage_path, run_name)

    def _open(self) -> None:
        from solar_ray.tracking import open_tracker

        self._trackers = []
        if "tensorboard" in self.backends:
            from torch.utils.tensorboard import SummaryWriter

            self.local_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.local_dir))
        for backend in self.backends:
            if backend != "tensorboard":
                assert self.run is not None, "W&B and MLflow need the run's name and config"
                self._trackers.append(open_tracker(backend, self.run, self.local_dir.parent))

    def scalars(self, step: int, metrics: dict[str, Any], prefix: str = "train/") -> None:
        """Write every finite numeric value of ``metrics`` at ``step``."""
        if not self.enabled:
            return
        if self._trackers is None:
            self._open()
        from solar_ray.tracking import log_scalars

        log_scalars(self._trackers or [], step, metrics)
        if self._writer is None:
            return
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(float(value)):
                continue
            tag = key if "/" in key else f"{'eval/' if key.startswith('eval_') else prefix}{key}"
            self._writer.add_scalar(tag, float(value), global_step=step)

    def sync(self) -> None:
        """Flush, and copy the event files to remote storage when the run lives there."""
        for tracker in self._trackers or []:
            tracker.flush()
        if self._writer is None:
            return
        self._writer.flush()
        if self.remote:
            try:
                import pyarrow.fs as pafs

                pafs.copy_files(str(self.local_dir), self.remote)
            except Exception as e:  # metrics must never kill a training run
                log.warning("could not copy TensorBoard logs to %s: %s", self.remote, e)

    def close(self) -> None:
        """Flush, sync and close."""
        if self._trackers is None:
            return
        self.sync()
        for tracker in self._trackers:
            try:
                tracker.close()
            except Exception as e:  # metrics must never kill a training run
                log.warning("could not close the %s run: %s", type(tracker).__name__, e)
        self._trackers = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def row_nll(logits: Any, labels: Any) -> tuple[Any, Any]:
    """Per-row summed next-token NLL and scored-token count (labels -100 are not scored).

    The same loss as transformers' causal-LM loss (logits upcast to float32, labels shifted
    by one), kept per row so that held-out scores carry their error (:mod:`solar_ray.stats`).
    As transformers does, the labels are shifted (padded with -100 at the end), not the
    logits: slicing the (batch, seq, vocab) logits would copy them (200 MB per micro-batch
    of 8 x 128 tokens at SmolLM2's vocabulary) in the forward and again in the backward.
    """
    import torch

    logits = logits.float()  # a no-op in fp32
    target = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
        reduction="none",
    ).view(target.shape)  # fmt: skip
    scored = target != -100
    return (nll * scored).double().sum(-1), scored.double().sum(-1)


def eval_metrics(nll: Any, tokens: Any) -> dict[str, Any]:
    """Held-out metrics from per-row NLL sums and token counts (every row once).

    ``eval_loss`` is the token-weighted mean, ``eval_loss_se`` its standard error over the
    ``eval_n`` rows; ``eval_row_nll`` / ``eval_row_tokens`` keep the rows, in row order, for
    paired comparisons between models scored on them.
    """
    nll = [float(x) for x in nll]
    tokens = [float(x) for x in tokens]
    est = ratio_estimate(nll, tokens)
    return {
        "eval_loss": est.value,
        "eval_ppl": math.exp(min(est.value, 50.0)),
        "eval_loss_se": est.se,
        "eval_n": est.n,
        "eval_row_nll": nll,
        "eval_row_tokens": tokens,
    }
