"""The run report: ``RUN_DIR/report/`` with results.json, index.html, results.md and PNG plots.

``results.json`` lists every evaluated model with its ``name``, its ``stage`` (``base`` for
the model the run started from, else the kind of stage that made it), its per-task
``scores``, their ``average`` and its held-out perplexity ``ppl``. The plots are the layer
plan of each upscale stage (which source layer each output layer came from), the training
curves of each training stage, held-out perplexity of base vs upscaled vs continued-
pretrained (the paper's drop and recovery), and the evaluation table per model.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from solar_ray.checkpoint import atomic_output_dir, read_manifest, write_json_atomic

__all__ = ["collect_results", "markdown_table", "write_report"]

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


def collect_results(run_dir: Path, plans: Sequence[Any]) -> list[dict]:
    """Every evaluated model of the run, from each eval stage's ``results.json``."""
    kinds = {p.name: p.kind.name for p in plans}
    rows: list[dict] = []
    for p in plans:
        if p.kind.name != "eval":
            continue
        path = p.out / "results.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        for model in data.get("models", []):
            scores = {k: float(v) for k, v in (model.get("scores") or {}).items()}
            rows.append(
                {
                    "name": model["name"],
                    "stage": _stage_of(run_dir, model.get("path"), kinds),
                    "path": model.get("path"),
                    "scores": scores,
                    "average": model.get("average"),
                    "ppl": model.get("ppl"),
                    "eval_stage": p.name,
                }
            )
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The paper's layout: one row per model, one column per task, then the average."""
    tasks: list[str] = []
    for r in rows:
        tasks.extend(t for t in r["scores"] if t not in tasks)
    head = ["model", "stage", *tasks, "average", "ppl"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], r["stage"]]
        cells += [f"{100 * r['scores'][t]:.2f}" if t in r["scores"] else "-" for t in tasks]
        cells.append(f"{100 * r['average']:.2f}" if r.get("average") is not None else "-")
        cells.append(f"{r['ppl']:.2f}" if r.get("ppl") is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
        if p.kind.name != "upscale":
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

    curves = {p.name: _training_history(p.out) for p in plans if p.kind.name in ("pretrain", "sft", "dpo")}
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
        ax.bar([r["name"] for r in ppl_rows], [r["ppl"] for r in ppl_rows], color="tab:purple")
        ax.set_ylabel("held-out perplexity")
        ax.set_title("drop and recovery: base -> upscaled -> continued pretraining -> ...")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        fig.savefig(out / "perplexity.png", dpi=110)
        plt.close(fig)
        made.append("perplexity.png")

    if rows and any(r["scores"] for r in rows):
        tasks = sorted({t for r in rows for t in r["scores"]})
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) * len(tasks) / 3), 3.4))
        width = 0.8 / max(1, len(rows))
        for i, r in enumerate(rows):
            ax.bar(
                [t + i * width for t in range(len(tasks))],
                [100 * r["scores"].get(t, 0.0) for t in tasks],
                width=width,
                label=r["name"],
            )
        ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks, rotation=20)
        ax.set_ylabel("score (%)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "evaluation.png", dpi=110)
        plt.close(fig)
        made.append("evaluation.png")
    return made


def write_report(run_dir: Path, plans: Sequence[Any]) -> Path:
    """Write ``RUN_DIR/report/`` (atomically) and return its path."""
    rows = collect_results(run_dir, plans)
    table = markdown_table(rows) if rows else "(no evaluation results)\n"
    with atomic_output_dir(run_dir / "report", overwrite=True) as tmp:
        write_json_atomic(tmp / "results.json", {"run_dir": str(run_dir), "models": rows})
        (tmp / "results.md").write_text(table)
        images = _plots(run_dir, plans, rows, tmp)
        stages = "".join(
            f"<tr><td>{html.escape(p.name)}</td><td>{p.kind.name}</td>"
            f"<td>{html.escape(', '.join(p.deps) or '-')}</td>"
            f"<td><code>{html.escape(str(p.out))}</code></td></tr>"
            for p in plans
        )
        header = "".join(f"<th>{html.escape(c.strip())}</th>" for c in table.splitlines()[0].strip("|").split("|"))
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|")) + "</tr>"
            for line in table.splitlines()[2:]
        )
        imgs = "".join(f'<figure><img src="{n}" alt="{n}"><figcaption>{n}</figcaption></figure>' for n in images)
        (tmp / "index.html").write_text(
            "<!doctype html><meta charset='utf-8'><title>solar-ray report</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}</style>"
            f"<h1>solar-ray run: {html.escape(run_dir.name)}</h1>"
            f"<h2>Evaluation</h2><table><tr>{header}</tr>{body}</table>"
            f"<h2>Plots</h2>{imgs}<h2>Stages</h2><table><tr><th>stage</th><th>kind</th>"
            f"<th>after</th><th>output</th></tr>{stages}</table>"
        )
    return run_dir / "report"
