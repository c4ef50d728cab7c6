"""Progress of long work: a tqdm bar in a terminal, plain periodic log lines otherwise.

One helper for every stage that works for a while without saying anything: upscale and
merge (bytes or tensors written), data (rows), training (steps, with an ETA; reported from
the Ray Train driver). A bar is drawn only when stderr is a terminal; in a job log, a
pipe or a file, tqdm's line without the bar (``merge:  41% 120/291 [00:10<00:14,
12.00tensors/s]``) is logged at most every ``interval_s`` seconds and once at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = ["Progress"]

log = logging.getLogger("solar_ray.progress")

#: seconds between plain log lines when not in a terminal
DEFAULT_INTERVAL_S = 30.0


class Progress:
    """Count work done towards ``total`` (None: unknown); show it as a bar or log lines.

    Use as a context manager, or call :meth:`close`. ``terminal`` overrides the detection
    (stderr is a TTY); ``emit`` writes a plain line (default: the log at INFO).
    """

    def __init__(
        self,
        what: str,
        total: float | None,
        unit: str,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        terminal: bool | None = None,
        initial: float = 0,
        emit: Callable[[str], None] | None = None,
    ) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.done = float(initial)
        self.interval_s = interval_s
        self._start = self._last_line = time.monotonic()
        self._initial = float(initial)
        self._bar: Any = None
        self._emit = emit or (lambda text: log.info("%s", text))
        self._format = dict(unit=unit, unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000)
        terminal = sys.stderr.isatty() if terminal is None else terminal
        if terminal:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=what, initial=initial, dynamic_ncols=True, **self._format)

    def update(self, amount: float = 1) -> None:
        """Add ``amount`` done."""
        self.set(self.done + amount)

    def set(self, done: float) -> None:
        """Set the amount done (e.g. the step a report names)."""
        step = done - self.done
        self.done = float(done)
        if self._bar is not None:
            self._bar.update(int(step) if float(step).is_integer() else step)
            return
        now = time.monotonic()
        if now - self._last_line >= self.interval_s:
            self._last_line = now
            self._emit(self.line(now))

    def line(self, now: float | None = None) -> str:
        """The plain-text status: tqdm's (done/total, percentage, elapsed, ETA, rate)."""
        from tqdm import tqdm

        elapsed = (time.monotonic() if now is None else now) - self._start
        done = int(self.done) if self.done.is_integer() else self.done
        return tqdm.format_meter(
            done, self.total, elapsed, ncols=0, prefix=self.what, initial=self._initial, **self._format
        )

    def close(self, failed: bool | None = None) -> None:
        """Finish the bar, or log the last line (not for work that failed: a failed
        command says one line, its error). ``failed=None``: failed when an exception is
        propagating through the caller (``close()`` in a ``finally:``)."""
        if failed is None:
            failed = sys.exc_info()[0] is not None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.done > self._initial and not failed:
            self._emit(self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(failed=exc_type is not None)
