"""Assemble bench/RESULTS.md from the per-benchmark sections in bench/results/*.md.

Each benchmark script's author records its figures (with the command) in its own section
file, so concurrent work never edits one file; this concatenates them in a fixed order.

    .venv/bin/python bench/assemble.py
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["dus", "data", "train-smollm2", "parity", "dpo", "train", "merge", "sweep", "sweep-m-8e12", "sweep-mix", "sweep-m-steps", "gpu"]


def main() -> None:
    sections = sorted((HERE / "results").glob("*.md"), key=lambda p: (
        ORDER.index(p.stem) if p.stem in ORDER else len(ORDER), p.stem))
    parts = [
        "# Benchmark results\n\n"
        "Figures measured by the scripts in `bench/`; each section names the command that "
        "reproduces it. Ratios are against a baseline in the same run; medians of several "
        "runs. Sources: `bench/results/*.md` (regenerate this file with "
        "`.venv/bin/python bench/assemble.py`).\n"
    ]
    parts += [p.read_text().strip() + "\n" for p in sections]
    (HERE / "RESULTS.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
