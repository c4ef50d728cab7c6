"""The run report: ``RUN_DIR/report/`` with results.json, index.html, results.md and PNG plots.

``results.json`` lists every evaluated model with its ``name``, its ``stage`` (``base`` for
the model the run started from, else the kind of stage that made it), its per-task
``scores`` with their ``stderr`` and ``num_items``, their ``average`` and its held-out
perplexity ``ppl`` (with its 95% range over windows). ``results.md`` and ``index.html``
show each eval stage's table as :func:`solar_ray.compare.results_table` writes it: every
score with its standard error and item count, and the paired differences between
consecutive models with those within noise marked. The plots are the layer plan of each
upscale stage (which source layer each output layer came from), the training curves of
each training stage, held-out perplexity of base vs upscaled vs continued-pretrained (the
paper's drop and recovery) and the evaluation scores, both with error bars.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from solar_ray.checkpoint import atomic_output_dir, read_manifest, write_json_atomic
from solar_ray.stages import TRAINING_KINDS

__all__ = ["collect_results", "markdown_report", "write_report"]

log = logging.getLogger(__name__)


def _stage_of(run_dir: Path, model_path: str | None, stage_kinds: dict[str, str]) -> str:
    """``base`` for a ``model`` stage, else the kind of the stage whose output it is."""
    if not model_path:
        return "unknown"
    p = Path(model_path)
    try:
        name = p.relative_to(run_dir).parts[0]
    except ValueError:
        manifest = read_manifest(p)
        return manifest["stage"] if manifest else "base"
    kind = stage_kinds.get(name, "unknown")
    return "base" if kind == "model" else kind


def _eval_results(plans: Sequence[Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(stage name, results.json)`` of every finished eval stage."""
    out = []
    for p in plans:
        path = p.out / "results.json"
        if p.kind == "eval" and path.is_file():
            out.append((p.name, json.loads(path.read_text())))
    return out


def collect_results(run_dir: Path, plans: Sequence[Any]) -> list[dict]:
    """Every evaluated model of the run, from each eval stage's ``results.json``."""
    kinds = {p.name: p.kind for p in plans}
    rows: list[dict] = []
    for stage, data in _eval_results(plans):
        displays = {t["name"]: t.get("display", t["name"]) for t in data.get("tasks", [])}
        for model in data.get("models", []):
            scores = {k: float(v) for k, v in (model.get("scores") or {}).items()}
            rows.append(
                {
                    "name": model["name"],
                    "stage": _stage_of(run_dir, model.get("path"), kinds),
                    "path": model.get("path"),
                    "scores": scores,
                    "stderr": model.get("stderr") or {},
                    "num_items": model.get("num_items") or {},
                    "display": displays,
                    "average": model.get("average"),
                    "average_stderr": model.get("average_stderr"),
                    "ppl": model.get("ppl"),
                    "ppl_low": model.get("ppl_low"),
                    "ppl_high": model.get("ppl_high"),
                    "eval_stage": stage,
                }
            )
    return rows


def markdown_report(plans: Sequence[Any]) -> str:
    """Each eval stage's table (scores ± SE, item counts, differences within noise marked)."""
    from solar_ray.compare import results_table

    parts = [f"## {stage}\n\n{results_table(data)}" for stage, data in _eval_results(plans)]
    return "\n".join(parts) if parts else "(no evaluation results)\n"


def _markdown_to_html(text: str) -> str:
    """The tables and paragraphs :func:`markdown_report` writes, as HTML (no other markdown)."""
    out: list[str] = []
    table: list[list[str]] = []

    def cell(c: str) -> str:
        c = html.escape(c.strip())
        if c.startswith("**") and c.endswith("**"):
            return f"<b>{c[2:-2]}</b>"
        return f'<span class="noise">{c}</span>' if c.startswith("~ ") else c

    def flush() -> None:
        if table:
            head, body = table[0], table[2:] if len(table) > 1 else []
            out.append(
                "<table><tr>" + "".join(f"<th>{cell(c)}</th>" for c in head) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in body)
                + "</table>"
            )
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line.strip().strip("|").split("|"))
            continue
        flush()
        if line.startswith("## "):
            out.append(f"<h3>{html.escape(line[3:])}</h3>")
        elif line.strip():
            out.append(f"<p>{html.escape(line).replace('`', '')}</p>")
    flush()
    return "\n".join(out)


def _training_history(out: Path) -> list[dict]:
    """Per-step ``loss`` / ``val_loss`` points a training stage recorded in ``solar.json``.

    The training stages log ``metrics.loss_history`` and ``metrics.eval_history`` as
    ``[step, value]`` pairs (TensorBoard has every step; the manifest keeps the curve).
    """
    metrics = (read_manifest(out) or {}).get("metrics", {})
    points = [{"step": s, "loss": v} for s, v in metrics.get("loss_history") or []]
    points += [{"step": s, "val_loss": v} for s, v in metrics.get("eval_history") or []]
    return sorted(points, key=lambda p: p["step"])


def _plots(run_dir: Path, plans: Sequence[Any], rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[str] = []
    for p in plans:
        if p.kind != "upscale":
            continue
        manifest = read_manifest(p.out)
        if not manifest or not manifest.get("plan"):
            continue
        plan = manifest["plan"]
        identity = set(manifest.get("identity_layers") or [])
        fig, ax = plt.subplots(figsize=(max(6, len(plan) * 0.18), 3.2))
        colors = ["tab:red" if j in identity else "tab:blue" for j in range(len(plan))]
        ax.bar(range(len(plan)), plan, color=colors)
        ax.set_xlabel("output layer")
        ax.set_ylabel("source layer")
        m = manifest.get("m")
        ax.set_title(
            f"{p.name}: {manifest.get('method')}"
            + (f" m={m}" if m is not None else "")
            + f", {manifest.get('num_layers_in')} -> {len(plan)} layers"
        )
        fig.tight_layout()
        name = f"plan_{p.name}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)

    curves = {p.name: _training_history(p.out) for p in plans if p.kind in TRAINING_KINDS}
    curves = {k: v for k, v in curves.items() if v}
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2), squeeze=False)
        for ax, (stage, hist) in zip(axes[0], curves.items(), strict=True):
            steps = [h.get("step", i) for i, h in enumerate(hist) if "loss" in h]
            ax.plot(steps, [h["loss"] for h in hist if "loss" in h], label="train loss")
            val = [(h.get("step"), h["val_loss"]) for h in hist if h.get("val_loss") is not None]
            if val:
                ax.plot(*zip(*val, strict=True), "o-", label="held-out loss")
            ax.set_title(stage)
            ax.set_xlabel("step")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "training_curves.png", dpi=110)
        plt.close(fig)
        made.append("training_curves.png")

    ppl_rows = [r for r in rows if r.get("ppl") is not None]
    if ppl_rows:
        fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(ppl_rows)), 3.2))
        low = [r["ppl"] - (r.get("ppl_low") or r["ppl"]) for r in ppl_rows]
        high = [(r.get("ppl_high") or r["ppl"]) - r["ppl"] for r in ppl_rows]
        ax.bar([r["name"] for r in ppl_rows], [r["ppl"] for r in ppl_rows], color="tab:purple",
               yerr=[low, high], capsize=4)  # fmt: skip
        ax.set_ylabel("held-out perplexity (95% range)")
        ax.set_title("drop and recovery: base -> upscaled -> continued pretraining -> ...")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        fig.savefig(out / "perplexity.png", dpi=110)
        plt.close(fig)
        made.append("perplexity.png")

    if rows and any(r["scores"] for r in rows):
        tasks = list(dict.fromkeys(t for r in rows for t in r["scores"]))
        labels = [next((r["display"][t] for r in rows if t in r.get("display", {})), t) for t in tasks]
        n = {t: next((r["num_items"][t] for r in rows if r["num_items"].get(t)), None) for t in tasks}
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) * len(tasks) / 3), 3.6))
        width = 0.8 / max(1, len(rows))
        for i, r in enumerate(rows):
            se = [r["stderr"].get(t) for t in tasks]
            ax.bar(
                [t + i * width for t in range(len(tasks))],
                [100 * r["scores"].get(t, 0.0) for t in tasks],
                width=width,
                label=r["name"],
                yerr=[200 * s if s is not None else 0.0 for s in se],  # 2 SE: ~95%
                capsize=2,
            )
        ticks = [f"{lab}\n(n={n[t]})" if n[t] else lab for lab, t in zip(labels, tasks, strict=True)]
        ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], ticks)
        ax.set_ylabel("score (%), bars: ±2 SE")
        ax.set_title("each score ±2 SE; differences on the same items: results.md (paired)", fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "evaluation.png", dpi=110)
        plt.close(fig)
        made.append("evaluation.png")
    return made


def write_report(run_dir: Path, plans: Sequence[Any]) -> Path:
    """Write ``RUN_DIR/report/`` (atomically) and return its path."""
    rows = collect_results(run_dir, plans)
    table = markdown_report(plans)
    with atomic_output_dir(run_dir / "report", overwrite=True) as tmp:
        write_json_atomic(tmp / "results.json", {"run_dir": str(run_dir), "models": rows})
        (tmp / "results.md").write_text(table)
        images = _plots(run_dir, plans, rows, tmp)
        stages = "".join(
            f"<tr><td>{html.escape(p.name)}</td><td>{p.kind}</td>"
            f"<td>{html.escape(', '.join(p.deps) or '-')}</td>"
            f"<td><code>{html.escape(str(p.out))}</code></td></tr>"
            for p in plans
        )
        imgs = "".join(f'<figure><img src="{n}" alt="{n}"><figcaption>{n}</figcaption></figure>' for n in images)
        (tmp / "index.html").write_text(
            "<!doctype html><meta charset='utf-8'><title>solar-ray report</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}"
            ".noise{color:#888}</style>"
            f"<h1>solar-ray run: {html.escape(run_dir.name)}</h1>"
            f"<h2>Evaluation</h2>{_markdown_to_html(table)}"
            f"<h2>Plots</h2>{imgs}<h2>Stages</h2><table><tr><th>stage</th><th>kind</th>"
            f"<th>after</th><th>output</th></tr>{stages}</table>"
        )
    return run_dir / "report"
