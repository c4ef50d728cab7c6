"""Run one solar-ray command with crash injection, for the crash and signal tests.

    python crash_driver.py [--slow S] [--fallback] [--die-after-renames K] -- ARGS...

runs ``solar-ray ARGS...`` in this process and exits with its exit code, after patching:

``--slow S``
    sleep ``S`` seconds before each tensor is written (upscale and merge), so a test can
    kill the process in the middle of a write; ``writing`` is printed (and flushed) when
    the first tensor is about to be written.
``--fallback``
    publish without ``renameat2`` (the two-rename fallback of
    :func:`solar_ray.checkpoint.atomic_output_dir`).
``--die-after-renames K``
    SIGKILL this process right after its ``K``-th ``os.rename`` (the fallback's steps).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--fallback", action="store_true")
    parser.add_argument("--die-after-renames", type=int, default=0)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    opts = parser.parse_args()
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args

    from solar_ray import checkpoint, merge, upscale
    from solar_ray.cli import main as cli_main

    announced = False

    def slowed(fn):
        def wrapper(*a, **kw):
            nonlocal announced
            if not announced:
                print("writing", flush=True)
                announced = True
            time.sleep(opts.slow)
            return fn(*a, **kw)

        return wrapper

    if opts.slow:
        upscale._copy_range = slowed(upscale._copy_range)
        merge._write_float_tensor = slowed(merge._write_float_tensor)
    if opts.fallback:
        checkpoint.USE_RENAMEAT2 = False
    if opts.die_after_renames:
        real_rename = os.rename
        count = 0

        def rename(src, dst, *a, **kw):
            nonlocal count
            real_rename(src, dst, *a, **kw)
            count += 1
            if count == opts.die_after_renames:
                os.kill(os.getpid(), signal.SIGKILL)

        os.rename = rename
    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
