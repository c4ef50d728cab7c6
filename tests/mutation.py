"""``make mutation``: mutmut over the core modules, each with its own fast tests.

mutmut takes one configuration per working directory, and the suite is too slow to run
whole for every mutant, so each module gets a scratch copy of the repository under
``.mutation/<module>/`` (``solar_ray/`` and ``tests/`` from the working tree) whose
``pyproject.toml`` names that module and the test files listed for it in
``[tool.solar-ray.mutation]``. Mutants that cannot change behaviour are listed, with the
reason, in ``tests/mutation-equivalent.txt`` and leave the score's denominator.

    python tests/mutation.py [MODULE ...]   # default: every module in the table
    python tests/mutation.py --survivors MODULE ...   # rerun the last run's survivors only

Prints one row per module (killed / survived / equivalent / timeout / no tests, score,
runtime) and the surviving mutants' names (``cd .mutation/<module> && mutmut show NAME``).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRATCH = REPO / ".mutation"
EQUIVALENT = REPO / "tests" / "mutation-equivalent.txt"


def _table() -> dict[str, list[str]]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return data["tool"]["solar-ray"]["mutation"]


def _equivalent() -> set[str]:
    """Mutant names listed as equivalent (``NAME  reason`` lines, ``#`` comments)."""
    if not EQUIVALENT.is_file():
        return set()
    lines = (ln.split("#", 1)[0].split() for ln in EQUIVALENT.read_text().splitlines())
    return {parts[0] for parts in lines if parts}


def _pyproject(module: str, tests: list[str]) -> str:
    base = (REPO / "pyproject.toml").read_text()
    options = {
        "source_paths": ["solar_ray"],
        "only_mutate": [module],
        "pytest_add_cli_args_test_selection": tests,
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-x", "-q"],
        # torch and Ray are not fork-safe once a test has used them
        "process_isolation": "forkserver",
    }
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    return f"{base}\n[tool.mutmut]\n{body}\n"


def _code(path: Path) -> str:
    """The module's code without docstrings (mutmut does not mutate them)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                body[0] = ast.Pass()
    return ast.dump(tree)


def _by_status(mutmut: str, work: Path, env: dict[str, str]) -> dict[str, list[str]]:
    listing = subprocess.run(
        [mutmut, "results", "--all", "true"], cwd=work, env=env, capture_output=True, text=True
    ).stdout
    by_status: dict[str, list[str]] = {}
    for line in listing.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name:
            by_status.setdefault(status, []).append(name)
    return by_status


def run_module(module: str, tests: list[str], survivors: bool = False) -> dict:
    """mutmut over one module in its scratch copy; the counts of its mutants by outcome.

    ``survivors``: keep the last run's results and rerun only its survivors (and mutants
    no test reached) against the current ``tests/``; refused when the module's code (its
    docstrings aside) changed since that run (then the whole module runs again).
    """
    work = SCRATCH / Path(module).stem
    env = {**os.environ, "PYTHONPATH": str(work / "mutants")}
    env.setdefault("SOLAR_RAY_CACHE", str(REPO / ".cache" / "solar-ray"))
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    started = time.monotonic()
    if survivors:
        copied = work / module
        if not copied.is_file() or _code(copied) != _code(REPO / module):
            raise SystemExit(f"mutation: {module} changed since its last run (or none): run it whole")
        shutil.rmtree(work / "tests")
        shutil.copytree(REPO / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        last = _by_status(mutmut, work, env)
        again = sorted({*last.get("survived", []), *last.get("no tests", [])} - _equivalent())
        if again:
            subprocess.run([mutmut, "run", *again], cwd=work, env=env, stdout=subprocess.DEVNULL, check=False)
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        for name in ("solar_ray", "tests"):
            shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        (work / "pyproject.toml").write_text(_pyproject(module, tests))
        # The tests' subprocesses (the CLI, Ray workers) import the mutated copy too. The
        # directory exists before Python starts: a sys.path entry missing at start-up is
        # cached as absent and the installed package would be imported instead.
        (work / "mutants").mkdir()
        subprocess.run([mutmut, "run"], cwd=work, env=env, stdout=subprocess.DEVNULL, check=False)
    subprocess.run([mutmut, "export-cicd-stats"], cwd=work, env=env, capture_output=True, check=False)
    seconds = time.monotonic() - started
    by_status = _by_status(mutmut, work, env)
    equivalent = _equivalent()
    survived = [n for n in by_status.get("survived", []) if n not in equivalent]
    killed = len(by_status.get("killed", []))
    timeout = len(by_status.get("timeout", []))
    counts = {
        "module": module,
        "killed": killed,
        "survived": len(survived),
        "equivalent": len(by_status.get("survived", [])) - len(survived),
        "timeout": timeout,
        "no_tests": len(by_status.get("no tests", [])),
        "seconds": round(seconds),
        "survivors": survived,
    }
    scored = killed + timeout + len(survived) + counts["no_tests"]
    counts["score"] = (killed + timeout) / scored if scored else float("nan")
    return counts


def main(argv: list[str]) -> int:
    table = _table()
    survivors = "--survivors" in argv
    argv = [a for a in argv if a != "--survivors"]
    unknown = [m for m in argv if m not in table]
    if unknown:
        print(f"mutation: not in [tool.solar-ray.mutation]: {', '.join(unknown)}", file=sys.stderr)
        return 2
    rows = [run_module(m, table[m], survivors) for m in (argv or table)]
    print("| module | killed | survived | equivalent | timeout | no tests | score | runtime |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| `{r['module']}` | {r['killed']} | {r['survived']} | {r['equivalent']} | "
            f"{r['timeout']} | {r['no_tests']} | {100 * r['score']:.1f}% | {r['seconds']} s |"
        )
    for r in rows:
        for name in r["survivors"]:
            print(f"survived: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
