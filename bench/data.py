"""Benchmark: Ray Data tokenize+pack vs a raw ``tokenizers`` batch encode, same corpus, same run.

The corpus is real English prose: the paragraphs of CPython's reference manual
(``pydoc_data.topics``, shipped with every Python), repeated ``--copies`` times. The
tokenizer is the embedded SmolLM2-135M's (``smollm2-135m``).

* **raw**: ``tokenizers.Tokenizer.encode_batch_fast`` over all documents (Rust, every core)
  and the ids pulled out of the encodings; no packing.
* **ray**: :func:`solar_ray.data.prepare.pack_pretrain` on the corpus already in the Ray
  object store: tokenize in Ray Data tasks, global offsets on the driver, pack in parallel,
  stitch the boundary blocks, sort the blocks; materialized in the object store.

Runs alternate (raw, ray, raw, ray, ...); each figure is the median of ``--runs``. Ray's
workers run at the driver's niceness here (``RAY_worker_niceness=0``), not Ray's default 15,
so both paths compete for the CPUs alike on a shared machine. The
result also has the packing efficiency (non-padding share) and, once, the end-to-end
``build_mix`` time from JSONL files (read, normalize, select, sort, write ``data/``,
pack, write ``packed/``). Writes ``bench/results/data.md``.

    .venv/bin/python bench/data.py [--runs 5] [--copies 40] [--seq-len 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("SOLAR_RAY_CACHE", str(REPO / ".cache" / "solar-ray"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["TOKENIZERS_PARALLELISM"] = "true"  # the raw baseline uses every core
# Ray starts its workers at niceness 15; on a busy machine that alone would slow the Ray
# path against the raw baseline, which runs in this (niceness 0) process
os.environ.setdefault("RAY_worker_niceness", "0")


def corpus(copies: int) -> list[str]:
    """Reference-manual paragraphs (>= 80 chars), repeated ``copies`` times."""
    import pydoc_data.topics

    paras = []
    for _, text in sorted(pydoc_data.topics.topics.items()):
        paras += [p.strip() for p in text.split("\n\n") if len(p.strip()) >= 80]
    return [f"{p}" for _ in range(copies) for p in paras]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write bench/results/data.md."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--copies", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--num-workers", type=int, default=None)
    ap.add_argument("--work", default=str(REPO / "bench" / "_work" / "data"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "data.md"))
    args = ap.parse_args(argv)

    import numpy as np
    import pyarrow as pa
    import ray
    import ray.data

    from solar_ray.config import validate
    from solar_ray.data._ray import ordered_context
    from solar_ray.data.config import MixConfig, PrepareConfig
    from solar_ray.data.mix import build_mix
    from solar_ray.data.prepare import load_tokenizer, pack_pretrain

    texts = corpus(args.copies)
    num_chars = sum(map(len, texts))
    cfg = PrepareConfig(tokenizer="smollm2-135m", seq_len=args.seq_len, batch_size=args.batch_size)
    tokenizer, _ = load_tokenizer(cfg, "pretrain")
    backend = tokenizer.backend_tokenizer

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    chunk = 8192
    tables = [
        pa.table(
            {
                "text": texts[i : i + chunk],
                "source": ["docs"] * len(texts[i : i + chunk]),
                "_rank": pa.array(np.arange(i, i + len(texts[i : i + chunk])), pa.int64()),
            }
        )
        for i in range(0, len(texts), chunk)
    ]
    with ordered_context():
        ds = ray.data.from_arrow(tables).materialize()

    def raw() -> tuple[float, int]:
        t0 = time.perf_counter()
        ids = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=True)]
        return time.perf_counter() - t0, sum(len(x) + 1 for x in ids)

    def via_ray() -> tuple[float, dict]:
        t0 = time.perf_counter()
        packed, info = pack_pretrain(ds, cfg, tokenizer, None, args.num_workers)
        packed.materialize()
        return time.perf_counter() - t0, info

    via_ray()  # warm the workers (tokenizer shipped, modules imported)
    raw_s, ray_s = [], []
    info: dict = {}
    tokens = 0
    for _ in range(args.runs):
        s, tokens = raw()
        raw_s.append(s)
        s, info = via_ray()
        ray_s.append(s)
    assert info["num_tokens"] == tokens, (info["num_tokens"], tokens)
    raw_tps = tokens / statistics.median(raw_s)
    ray_tps = tokens / statistics.median(ray_s)

    # once: the whole mix from JSONL files
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "in").mkdir(parents=True)
    n_files = 8
    per = -(-len(texts) // n_files)
    for k in range(n_files):
        with open(work / "in" / f"docs-{k:02d}.jsonl", "w", encoding="utf-8") as f:
            for t in texts[k * per : (k + 1) * per]:
                f.write(json.dumps({"text": t}) + "\n")
    mix = validate(
        MixConfig,
        {
            "name": "bench",
            "kind": "pretrain",
            "sources": [{"path": str(work / "in" / "*.jsonl")}],
            "prepare": cfg.to_dict(),
        },
    )
    t0 = time.perf_counter()
    res = build_mix(mix, work / "out", num_workers=args.num_workers, overwrite=True)
    e2e = time.perf_counter() - t0
    prep = res.manifest["prepare"]
    ray.shutdown()

    rows = [
        ("documents", f"{len(texts):,}"),
        ("characters", f"{num_chars:,}"),
        ("tokens (incl. one EOS per document)", f"{tokens:,}"),
        (
            "raw `tokenizers` encode_batch_fast, median s",
            f"{statistics.median(raw_s):.2f} ({raw_tps:,.0f} tok/s)",
        ),
        (
            "Ray Data tokenize+pack, median s",
            f"{statistics.median(ray_s):.2f} ({ray_tps:,.0f} tok/s)",
        ),
        ("**Ray / raw throughput**", f"**{ray_tps / raw_tps:.2f}x**"),
        (f"packed blocks of {args.seq_len}", f"{info['num_rows']:,}"),
        ("**packing efficiency (non-padding)**", f"**{info['packing_efficiency']:.4%}**"),
        (
            "end-to-end `build_mix` from JSONL (read..write packed), s",
            f"{e2e:.1f} ({prep['num_tokens'] / e2e:,.0f} tok/s)",
        ),
    ]
    runs = f"raw {', '.join(f'{s:.2f}' for s in raw_s)}; ray {', '.join(f'{s:.2f}' for s in ray_s)}"
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average before/after "
        f"{load_before} / {os.getloadavg()[0]:.1f}; Python {platform.python_version()}, ray "
        f"{ray.__version__}"
    )
    table = "\n".join(
        ["| measure | value |", "| --- | --- |", *(f"| {a} | {b} |" for a, b in rows)]
    )
    text = (
        "# Data: tokenize + pack throughput\n\n"
        f"`{' '.join(['.venv/bin/python', 'bench/data.py', *sys.argv[1:]])}` "
        f"(runs: {args.runs}, corpus: CPython reference-manual paragraphs x {args.copies}, "
        f"tokenizer: smollm2-135m, seq_len {args.seq_len}, batch {args.batch_size}).\n\n"
        f"{table}\n\nPer-run seconds: {runs}.\n\nMachine: {machine}. The two paths ran "
        "alternately, so they shared whatever else loaded the machine; absolute tokens/s "
        "follow the load, the ratio much less.\n"
    )
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    return 0


load_before = f"{os.getloadavg()[0]:.1f}"

if __name__ == "__main__":
    sys.exit(main())
