"""Benchmark: training-stage throughput against plain PyTorch, and DPO's precomputed reference.

Measured on the tiny test model (4-layer Llama, hidden 64, SmolLM2's 49K vocabulary), fp32
on CPU, one torch thread per process so the figures are per core:

1. Framework overhead per worker. Each stage (continued pretraining on our DeepSpeed loop;
   SFT and DPO on TRL + DeepSpeed) runs its per-worker loop without Ray (world size 1) and
   on Ray Train with 2 workers (gloo); its steady-state tokens/s per worker is compared
   with a plain PyTorch loop (``torch.optim.AdamW``, no DeepSpeed, no Trainer) doing the
   same work on the same model, batches and sequence length. Overhead = 1 - stage / plain.
   The DPO loops both score a live reference model.
2. DPO step time on Ray Train (2 workers): reference log-probs precomputed by the Ray Data
   pass against TRL's default live reference model, under ZeRO-2 and ZeRO-3.

Every measurement runs in a fresh process; the figure is the median over ``--repeats`` runs
of each run's median over its logging intervals (the first interval, warm-up, excluded).

    .venv/bin/python bench/train.py [--repeats 3] [--out bench/results/train.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("SOLAR_RAY_CACHE", str(REPO / ".cache" / "solar-ray"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

SEQ_LEN = {"pretrain": 128, "sft": 128, "dpo": 128}
MICRO_BATCH = {"pretrain": 4, "sft": 4, "dpo": 2}
STEPS = {"pretrain": 40, "sft": 40, "dpo": 24}


# --------------------------------------------------------------------------- fixtures


def prepare(work: Path) -> dict[str, str]:
    """Tiny model + reference model + one mix of each kind (made once per work dir)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from solar_ray.models import resolve_model
    from solar_ray.train.testing import (
        arithmetic_pairs,
        pattern_documents,
        write_preference_mix,
        write_pretrain_mix,
        write_sft_mix,
    )

    paths = {k: str(work / k) for k in ("model", "ref_model", "pretrain", "sft", "dpo")}
    if (work / "ready").is_file():
        return paths
    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    for seed, key in ((0, "model"), (1, "ref_model")):
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(paths[key])
        tok.save_pretrained(paths[key])
    write_pretrain_mix(paths["pretrain"], tok, pattern_documents(2000), seq_len=SEQ_LEN["pretrain"])
    write_sft_mix(paths["sft"], tok, [(q, a) for q, a, _ in arithmetic_pairs(512)])
    write_preference_mix(paths["dpo"], tok, arithmetic_pairs(256, rejected="refusal"))
    (work / "ready").write_text("ok")
    return paths


# --------------------------------------------------------------------------- plain loops


def _plain_batches(stage: str, paths: dict[str, str], tok: Any) -> list[dict[str, Any]]:
    """The stage's micro-batches as the plain loop feeds them (padded like the Trainer)."""
    import pyarrow.parquet as pq
    import torch

    mb = MICRO_BATCH[stage]
    if stage == "pretrain":
        table = pq.read_table(Path(paths["pretrain"]) / "packed")
        ids = torch.tensor(table.column("input_ids").to_pylist())
        pos = torch.tensor(table.column("position_ids").to_pylist())
        return [
            {"input_ids": ids[i : i + mb], "position_ids": pos[i : i + mb], "labels": ids[i : i + mb]}
            for i in range(0, len(ids) - mb + 1, mb)
        ]
    if stage == "sft":
        table = pq.read_table(Path(paths["sft"]) / "tokenized")
        rows = list(zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist(), strict=True))
        out = []
        for i in range(0, len(rows) - mb + 1, mb):
            chunk = rows[i : i + mb]
            n = max(len(r[0]) for r in chunk)
            pad = tok.pad_token_id
            out.append({
                "input_ids": torch.tensor([r[0] + [pad] * (n - len(r[0])) for r in chunk]),
                "attention_mask": torch.tensor([[1] * len(r[0]) + [0] * (n - len(r[0])) for r in chunk]),
                "labels": torch.tensor([r[1] + [-100] * (n - len(r[1])) for r in chunk]),
            })  # fmt: skip
        return out
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from solar_ray.train.dpo import tokenize_pair

    table = pq.read_table(Path(paths["dpo"]) / "data")
    rows = list(zip(*(table.column(c).to_pylist() for c in ("prompt", "chosen", "rejected")), strict=True))
    collate = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=SEQ_LEN["dpo"])
    return [
        collate([tokenize_pair(tok, *r) for r in rows[i : i + mb]])
        for i in range(0, len(rows) - mb + 1, mb)
    ]


def _completion_logps(model: Any, batch: dict[str, Any]) -> Any:
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token = logps.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (token * batch["completion_mask"][:, 1:]).sum(1)


def plain_loop(stage: str, paths: dict[str, str], steps: int) -> dict[str, float]:
    """Steady-state tokens/s of a plain PyTorch loop doing the stage's work (1 process)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from solar_ray.train.metrics import Throughput

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(paths["model"])
    model = AutoModelForCausalLM.from_pretrained(paths["model"], attn_implementation="sdpa")
    model.train()
    ref = None
    if stage == "dpo":
        ref = AutoModelForCausalLM.from_pretrained(paths["ref_model"], attn_implementation="sdpa")
        ref.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    batches = _plain_batches(stage, paths, tok)
    timer = Throughput()
    log_every = 1 if stage == "dpo" else 5
    for step in range(steps):
        batch = batches[step % len(batches)]
        if stage == "dpo":
            with torch.no_grad():
                ref_c, ref_r = _completion_logps(ref, batch).chunk(2)
            pol_c, pol_r = _completion_logps(model, batch).chunk(2)
            loss = -F.logsigmoid(0.1 * ((pol_c - ref_c) - (pol_r - ref_r))).mean()
        else:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        timer.add(batch["input_ids"].numel(), steps=1)
        if (step + 1) % log_every == 0:
            timer.lap()
    return timer.summary()


# --------------------------------------------------------------------------- stages


def stage_run(
    stage: str, paths: dict[str, str], steps: int, workers: int, zero: int, precompute: bool
) -> dict[str, float]:
    """Run the stage (local if ``workers`` is 0, else on Ray); its throughput summary."""
    import torch

    from solar_ray.train.config import DPOConfig, PretrainConfig, SFTConfig

    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix=f"bench-{stage}-")) / "out"
    common = dict(
        model=paths["model"], data=paths[stage], out=str(out), steps=steps,
        micro_batch_size=MICRO_BATCH[stage], seq_len=SEQ_LEN[stage], lr=1e-4,
        checkpoint_every=10_000, log_every=1 if stage == "dpo" else 5, zero_stage=zero,
        local=workers == 0, num_workers=max(workers, 1), max_failures=0, tracking=["tensorboard"],
    )  # fmt: skip
    if stage == "pretrain":
        from solar_ray.train.pretrain import run_pretrain

        result = run_pretrain(PretrainConfig(**common))
    elif stage == "sft":
        from solar_ray.train.sft import run_sft

        result = run_sft(SFTConfig(**common))
    else:
        from solar_ray.train.dpo import run_dpo

        result = run_dpo(
            DPOConfig(**common, ref_model=paths["ref_model"], beta=0.1, precompute_ref_logps=precompute)
        )
    m = result.metrics
    return {"tokens_per_s_per_worker": m["tokens_per_s_per_worker"], "step_time_s": m["step_time_s"]}


def child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints its JSON result last."""
    paths = prepare(Path(args.work))
    if args.kind == "plain":
        result = plain_loop(args.stage, paths, STEPS[args.stage])
    else:
        if args.workers:
            import ray

            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        result = stage_run(args.stage, paths, STEPS[args.stage], args.workers, args.zero, args.precompute)
    print("RESULT " + json.dumps(result), flush=True)


def measure(work: Path, kind: str, stage: str, repeats: int, **kw: Any) -> list[dict[str, float]]:
    """``repeats`` fresh-process runs of one measurement."""
    results = []
    for _ in range(repeats):
        cmd = [sys.executable, __file__, "--child", "--work", str(work), "--kind", kind, "--stage", stage,
               "--workers", str(kw.get("workers", 0)), "--zero", str(kw.get("zero", 2))]  # fmt: skip
        if kw.get("precompute"):
            cmd.append("--precompute")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT ") :]))
        print(f"  {kind:6s} {stage:8s} {kw}: {results[-1]}", flush=True)
    return results


def med(results: list[dict[str, float]], key: str) -> float:
    """Median of one figure over repeated runs."""
    return statistics.median(r[key] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=str(REPO / "bench" / "_work" / "train"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train.md"))
    parser.add_argument("--stages", nargs="+", default=["pretrain", "sft", "dpo"])
    parser.add_argument("--skip-ray", action="store_true", help="only the world-size-1 runs")
    parser.add_argument("--dpo-zero3", action="store_true", help="also compare DPO under ZeRO-3")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--stage", default="pretrain", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--zero", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--precompute", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prepare(work)
    started = time.time()
    load_before = os.getloadavg()
    rows = []
    dpo_rows = []
    for stage in args.stages:
        plain = measure(work, "plain", stage, args.repeats)
        local = measure(work, "stage", stage, args.repeats, workers=0, zero=2)
        row = {"stage": stage, "plain": med(plain, "tokens_per_s_per_worker"),
               "local": med(local, "tokens_per_s_per_worker")}  # fmt: skip
        if not args.skip_ray:
            ray2 = measure(work, "stage", stage, args.repeats, workers=2, zero=2)
            row["ray"] = med(ray2, "tokens_per_s_per_worker")
            if stage == "dpo":  # the live-reference Ray runs double as the DPO comparison
                pre = measure(work, "stage", "dpo", args.repeats, workers=2, zero=2, precompute=True)
                dpo_rows.append((2, med(pre, "step_time_s"), med(ray2, "step_time_s")))
                for zero in args.dpo_zero3 and [3] or []:
                    pre = measure(work, "stage", "dpo", args.repeats, workers=2, zero=zero,
                                  precompute=True)  # fmt: skip
                    live = measure(work, "stage", "dpo", args.repeats, workers=2, zero=zero)
                    dpo_rows.append((zero, med(pre, "step_time_s"), med(live, "step_time_s")))
        row["measured"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        rows.append(row)
    rows, dpo_rows = _merge_saved(work / "rows.json", rows, dpo_rows, args)
    write_report(Path(args.out), rows, dpo_rows, args, started, load_before)


def _merge_saved(
    path: Path, rows: list[dict], dpo_rows: list[tuple], args: Any
) -> tuple[list[dict], list[tuple]]:
    """Keep each stage's latest figures in ``WORK/rows.json``: ``--stages dpo`` re-measures
    DPO and reports it beside the pretrain/SFT rows of an earlier run (each row says when)."""
    saved = json.loads(path.read_text()) if path.is_file() else {"stages": {}, "dpo": []}
    for row in rows:
        saved["stages"][row["stage"]] = row
    if "dpo" in args.stages and not args.skip_ray:
        saved["dpo"] = [list(r) for r in dpo_rows]
    path.write_text(json.dumps(saved, indent=2))
    order = ["pretrain", "sft", "dpo"]
    merged = sorted(saved["stages"].values(), key=lambda r: order.index(r["stage"]))
    return merged, [tuple(r) for r in saved["dpo"]]


def write_report(out: Path, rows: list[dict], dpo_rows: list[tuple], args: Any, started: float,
                 load_before: tuple) -> None:  # fmt: skip
    """bench/results/train.md: the tables, the command and the machine."""
    import torch

    lines = [
        "# Training stages: throughput vs plain PyTorch, DPO reference",
        "",
        f"Command: `.venv/bin/python bench/train.py --repeats {args.repeats}"
        + (" --skip-ray" if args.skip_ray else "") + (" --dpo-zero3" if args.dpo_zero3 else "")
        + (f" --stages {' '.join(args.stages)}" if args.stages != ["pretrain", "sft", "dpo"] else "")
        + "` (each stage's rows from its latest run, see the last column)  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"(CPU, fp32, 1 thread per process); load average before {load_before[0]:.1f}, "
        f"after {os.getloadavg()[0]:.1f} (a shared machine); {time.time() - started:.0f} s.  ",
        "Model: 4-layer Llama, hidden 64, vocab 49152 (the test model). Medians of "
        f"{args.repeats} fresh-process runs, each the median of its logging intervals.",
        "",
        "## Tokens/s per worker: stage vs a plain PyTorch loop (target: overhead <= 15%)",
        "",
        "| stage | seq len x micro-batch | plain PyTorch | stage, 1 worker (no Ray) | overhead "
        "| stage, Ray Train 2 workers | overhead | measured (UTC) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["stage"]
        ray_cells = (
            f"{r['ray']:.0f} | {1 - r['ray'] / r['plain']:+.1%}" if "ray" in r else "- | -"
        )
        lines.append(
            f"| {s} | {SEQ_LEN[s]} x {MICRO_BATCH[s]} | {r['plain']:.0f} | {r['local']:.0f} "
            f"| {1 - r['local'] / r['plain']:+.1%} | {ray_cells} | {r.get('measured', '-')} |"
        )
    lines += [
        "",
        "Overhead is 1 - stage/plain (negative: the stage is faster). pretrain = our DeepSpeed "
        "loop (ZeRO-2); sft/dpo = TRL's SFTTrainer/DPOTrainer on DeepSpeed ZeRO-2; the DPO "
        "rows score a live reference model in every column. The Ray rows include the gloo "
        "gradient all-reduce between the two workers and Ray Train's reports (coalesced to "
        "about one per controller poll, see docs/train.md: before that, DPO logging every "
        "step ran at 2.0 s/step on Ray against 0.87 s alone).",
        "",
        "Where the TRL stages' overhead goes (py-spy, `sft` stage, 1 worker, 2026-11-23): "
        "55% of the step is TRL 1.16's chunked LM-head kernel (`ChunkedLogProbFunction`: the "
        "log-probs, entropy and top-1 of the completion tokens computed in tiles, in fp32, with "
        "the logits recomputed in the backward pass, so that the (batch, seq, vocab) logits are "
        "never held). On the test model the LM head is over 90% of the FLOPs (hidden 64, vocab "
        "49152), so the recomputation shows at full size; on SmolLM2-135M it is about a fifth "
        "and on 7B-class models a few percent. The plain loop computes the full logits once. "
        "TRL applies the kernel unconditionally; it is its memory-for-compute trade, kept.",
        "",
    ]
    if dpo_rows:
        lines += [
            "## DPO step time, Ray Train 2 workers: precomputed reference vs live (target >= 1.4x)",
            "",
            "| ZeRO | precomputed ref log-probs (s/step) | TRL live reference (s/step) | speed-up |",
            "|---|---|---|---|",
        ]
        for zero, pre, live in dpo_rows:
            lines.append(f"| {zero} | {pre:.3f} | {live:.3f} | {live / pre:.2f}x |")
        lines += [
            "",
            "The precomputed runs exclude the one-off Ray Data reference pass (it runs before "
            "training, once per data/reference pair, and is reused by re-runs). On one device "
            "without memory pressure the live reference costs one no-grad forward against the "
            "policy's forward + backward (about 3 forwards), so precomputing saves at most about "
            "a quarter of the step (<= ~1.33x); larger gains come where the reference competes "
            "for memory (ZeRO-3 gathers its shards every step, a GPU fits a larger micro-batch "
            "without it).",
            "",
        ]
    lines += [
        "## GPU",
        "",
        "Not measured: this task had no GPU machine, so continued-pretraining tokens/s and MFU "
        "on a ~1B-parameter depth-upscaled model in bf16 (target MFU >= 45% on H100) remain "
        "to be recorded. The stages report `mfu` on GPU (6N + attention FLOPs per token over "
        "the device's dense bf16 peak).",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
