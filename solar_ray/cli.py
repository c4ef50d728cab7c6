"""``solar-ray <command>``: one subcommand per stage, each a thin shell over one function.

A stage's command is built from the registry (:func:`stage_command`). The other commands
live in the modules named in :data:`COMMANDS`, imported only when invoked, each exposing
``cli(command: str, parser: argparse.ArgumentParser) -> Callable[[Namespace], int]``, which
adds the command's arguments and returns the function to run. A
:class:`~solar_ray.errors.UserError` or an OS error on a path is one line and exit 2;
SIGTERM and SIGINT, from the moment :func:`main` starts, exit 128 + signal (README.md, "CLI").
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import signal
import sys
import traceback
import typing
from collections.abc import Callable, Sequence

from solar_ray.errors import UserError, user_os_error

#: command -> (module implementing it, or None for a stage of the registry; one-line help)
COMMANDS: dict[str, tuple[str | None, str]] = {
    "upscale": (None, "depth up-scale a model (SOLAR DUS, LLaMA-Pro, stack)"),
    "data": (None, "build data mixes (pretrain, SFT, preference) with Ray Data"),
    "pretrain": (None, "continued pretraining on Ray Train + DeepSpeed"),
    "sft": (None, "supervised fine-tuning (TRL SFTTrainer) on Ray Train"),
    "dpo": (None, "direct preference optimisation (TRL DPOTrainer) on Ray Train"),
    "merge": (None, "merge models (linear, slerp, ties, dare_ties)"),
    "eval": (None, "evaluate models (H6 preset, offline suite, perplexity)"),
    "benchmarks": ("solar_ray.evalsets.benchmarks", "fetch or list the offline benchmark data"),
    "contamination": (None, "Min-K%% Prob and n-gram contamination checks"),
    "run": ("solar_ray.pipeline", "run a recipe: the whole stage graph into a run directory"),
    "sweep": ("solar_ray.tune", "Ray Tune sweep over m and data-mix choices"),
    "score-plans": ("solar_ray.seam", "score every m of a model without training (seam predictors)"),
    "demo": ("solar_ray.pipeline", "run jobs/demo.yaml on the embedded SmolLM2-135M"),
    "push": ("solar_ray.hub", "upload a finished model to the Hugging Face Hub"),
}

ExitCode = int


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived; raised in the main thread so that cleanups run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: the signals received during this call of :func:`main`: an ``Interrupted`` raised inside
#: a library's code may come back wrapped in another error (pydantic's SchemaError)
_received: list[int] = []


def _raise_interrupted(signum: int, frame: object) -> None:
    _received.append(signum)
    raise Interrupted(signum)


def _stopped_by(e: BaseException, installed: bool) -> int | None:
    """The signal that stopped the command, or None when ``e`` is an ordinary exit."""
    if isinstance(e, Interrupted):
        return e.signum
    if isinstance(e, KeyboardInterrupt):
        return signal.SIGINT
    # ray.init() replaces our SIGTERM handler with one that calls sys.exit(SIGTERM)
    replaced = signal.getsignal(signal.SIGTERM) is not _raise_interrupted
    if installed and replaced and isinstance(e, SystemExit) and e.code == signal.SIGTERM:
        return signal.SIGTERM
    return None


def _one_line(msg: str) -> str:
    parts = [s.strip() for s in str(msg).splitlines() if s.strip()]
    if len(parts) > 1 and parts[0].endswith(":"):
        return parts[0] + " " + "; ".join(parts[1:])
    return "; ".join(parts)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (and ``see --help``), exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> ExitCode:
    """Entry point of the ``solar-ray`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    verbose = any(a in ("-v", "--verbose") for a in argv)
    # first thing: a signal during start-up (importing torch takes seconds) stops cleanly too
    _received.clear()
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for s in previous:
            signal.signal(s, _raise_interrupted)
    except ValueError:  # not the main thread (an embedding application): leave them
        previous = {}
    try:
        return _main(argv, command, verbose)
    except BaseException as e:
        signum = _stopped_by(e, installed=bool(previous)) or next(iter(_received), None)
        if signum is None:
            raise
        for s in previous:  # stopping anyway: a second signal must not interrupt the message
            signal.signal(s, signal.SIG_IGN)
        if verbose:
            traceback.print_exc()
        name = signal.Signals(signum).name
        prog = f"solar-ray {command}" if command else "solar-ray"
        print(f"{prog}: stopped by {name}; partial outputs were removed", file=sys.stderr)
        return 128 + signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _main(argv: list[str], command: str | None, verbose: bool) -> ExitCode:
    top = _Parser(
        prog="solar-ray",
        description="Depth up-scaling (SOLAR 10.7B recipe) of open LLMs, trained on Ray.",
    )
    top.add_argument("-v", "--verbose", action="store_true", help="debug logs, tracebacks")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)

    # Find the command without importing every module: only the one invoked is imported.
    if command is None:
        top.parse_args(argv or ["--help"])
        return 2
    idx = argv.index(command)
    if any(not a.startswith("-") for a in argv[:idx]):
        top.parse_args(argv)  # an unknown word before the command: let argparse report it
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    module_name, help_ = COMMANDS[command]
    # help strings are %-formatted by argparse, descriptions are not
    parser = _Parser(prog=f"solar-ray {command}", description=help_.replace("%%", "%"))
    parser.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)
    if module_name is None:
        runner = stage_command(command, parser)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                print(f"solar-ray {command}: not available in this version", file=sys.stderr)
                return 2
            raise
        runner = module.cli(command, parser)
    args = parser.parse_args(argv[:idx] + argv[idx + 1 :])
    try:
        return int(runner(args) or 0)
    except UserError as e:
        if _received:  # the error is the signal's, wrapped
            raise Interrupted(_received[0]) from e
        if verbose:
            traceback.print_exc()
        print(f"solar-ray {command}: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:
        line = user_os_error(e)
        if line is None or _received:
            raise
        if verbose:
            traceback.print_exc()
        print(f"solar-ray {command}: error: {line}", file=sys.stderr)
        return 2


def stage_command(kind: str, parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], ExitCode]:
    """Add ``solar-ray <kind>``'s arguments to ``parser``: ``--config``, ``--set``, a flag per
    field of the stage's config class, the stage's own flags; return the runner."""
    from solar_ray.config import add_config_args, add_field_flags
    from solar_ray.stages import stage

    entry = stage(kind)
    assert entry.config is not None
    add_config_args(parser, entry.config_required)
    add_field_flags(parser, entry.config, entry.flags)
    return lambda args: run_stage_command(kind, args)


def run_stage_command(kind: str, args: argparse.Namespace) -> ExitCode:
    """Load the stage's config from ``args``, run the stage, print its summary."""
    from solar_ray.config import flag_values, load_config
    from solar_ray.remote import run_to_out
    from solar_ray.stages import stage

    entry = stage(kind)
    assert entry.config is not None and entry.run is not None and entry.summary is not None
    path, flags = args.config, flag_values(args, entry.config)
    if entry.command_input:
        path, flags = entry.command_input(path, flags)
    cfg = load_config(entry.config, path, args.overrides, data=flags)
    # the stage's own flags that are not fields are the run's keywords (data's --only)
    own = {n: getattr(args, n) for n in entry.flags if n not in entry.config.model_fields}
    run = functools.partial(entry.run, **own)
    if own.get("dry_run"):  # checks and prints the plan: nothing is made, nothing published
        run(cfg)
        return 0
    if summary := entry.summary(cfg, run_to_out(run, cfg)):
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
