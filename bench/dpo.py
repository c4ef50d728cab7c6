"""Benchmark: DPO with the reference log-probs precomputed against a live reference model.

The DPO stage (TRL on DeepSpeed ZeRO-2, Ray Train with 2 workers) runs on SmolLM2-135M's
shape (bench/train.py's ``smollm2`` model and reference) over a preference mix of
``--pairs`` pairs, for 1 and for 2 epochs, in two modes: ``precompute_ref_logps: true``
(a Ray Data pass computes the reference log-probs before training; the workers hold no
reference) and the default live reference (every worker holds it and runs its forward each
step). Per run: the steady-state step time (the stage's own metric: median of its logging
intervals after the first), the end-to-end wall time of ``run_dpo`` (reference pass,
worker group, training, export; Ray itself already started), and the peak resident memory
of the Ray processes doing the work, sampled every 0.1 s (training workers summed; the
reference pass's actor separately). Every run is a fresh process; medians of
``--repeats``, modes interleaved.

    flock /tmp/solar-heavy.lock .venv/bin/python bench/dpo.py --epochs 1 [--repeats 3]
    flock /tmp/solar-heavy.lock .venv/bin/python bench/dpo.py --epochs 2 [--repeats 3]

``--profile``: where a live-reference step's time goes. The DPO stage runs in one process
(world size 1, no Ray; bench/train.py's SmolLM2-shape DPO mix, the step of
:data:`PROFILE_STEP`) under py-spy (sampling at 20 Hz, ``--format raw``); each sample inside
the Trainer's ``training_step`` is put in the first of these that its stack holds: the
reference's forward (``self.ref_model(...)`` in TRL's ``_compute_loss``), the policy's
forward, DeepSpeed's ZeRO-2 gradient hooks, the rest of the autograd backward, the
optimizer step. What precomputing can save is the reference's share, so its ceiling for
this step is 1 / (1 - share); with the optimizer step amortized over ever more
micro-batches it tends to 1 / (1 - reference / (step - optimizer)). py-spy is not a
dependency of solar-ray: ``.venv/bin/pip install py-spy`` first.

    flock /tmp/solar-heavy.lock .venv/bin/python bench/dpo.py --profile [--lm-head full] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _env import REPO  # first: this checkout's solar_ray, offline, 1 thread

MICRO_BATCH = 2
SEQ_LEN = 128
WORKERS = 2  #: Ray Train workers unless --workers says otherwise


class PeakRSS:
    """Peak summed RSS (MiB) of this process's descendants, by what they run."""

    def __init__(self) -> None:
        self.peak = {"train_workers": 0.0, "ref_pass": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.1):
            sums = {"train_workers": 0.0, "ref_pass": 0.0}
            for p in me.children(recursive=True):
                try:
                    name = " ".join(p.cmdline())[:200]
                    rss = p.memory_info().rss / 2**20
                except (psutil.Error, OSError):
                    continue
                if "RayTrainWorker" in name:
                    sums["train_workers"] += rss
                elif "MapWorker" in name or "RefLogps" in name:
                    sums["ref_pass"] += rss
            for k, v in sums.items():
                self.peak[k] = max(self.peak[k], v)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return self.peak


def child(args: argparse.Namespace) -> None:
    """One DPO run in this fresh process; prints its JSON result last."""
    import ray
    import train as bench_train  # bench/train.py: the models

    from solar_ray.train.config import DPOConfig
    from solar_ray.train.dpo import run_dpo

    bench_train.use_shape("smollm2")
    paths = bench_train.prepare(REPO / "bench" / "_work" / "train-smollm2")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    try:
        cfg = DPOConfig(
            model=paths["model"], ref_model=paths["ref_model"], data=args.data,
            out=str(tmp / "out"), epochs=args.epochs, micro_batch_size=MICRO_BATCH,
            seq_len=SEQ_LEN, lr=1e-6, beta=0.1, num_workers=args.workers, zero_stage=2,
            checkpoint_every=10_000, log_every=2 if args.accum == 1 else 1, max_failures=0,
            tracking=["none"], precompute_ref_logps=args.precompute, lm_head=args.lm_head,
            global_batch_size=MICRO_BATCH * args.workers * args.accum,
        )  # fmt: skip
        peak = PeakRSS()
        t0 = time.perf_counter()
        result = run_dpo(cfg)
        wall = time.perf_counter() - t0
        memory = peak.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    m = result.metrics
    print("RESULT " + json.dumps({
        "step_time_s": m["step_time_s"], "steps": m.get("steps") or m.get("global_step"),
        "wall_s": wall, "peak_train_mib": memory["train_workers"],
        "peak_ref_pass_mib": memory["ref_pass"],
    }), flush=True)  # fmt: skip


#: the step --profile measures (bench/train.py's BENCH_<FLAG> size flags): pairs a
#: micro-batch, micro-batches a step, steps
PROFILE_STEP = {"micro_batch": 4, "accum": 2, "steps": 6}

#: sample categories of --profile, first match wins: (name, a frame its stack holds)
PROFILE_CATEGORIES = (
    ("reference forward", "_compute_loss (trl/trainer/dpo_trainer.py:1338)"),
    ("policy forward", "_compute_loss (trl/trainer/dpo_trainer.py:1299)"),
    ("ZeRO-2 gradient hooks (in the backward)", "grad_handling_hook"),
    ("autograd backward", "_engine_run_backward"),
    ("optimizer step (ZeRO-2 + fused AdamW)", "DeepSpeedEngine.step"),
)


def classify(raw: str) -> dict[str, int]:
    """py-spy ``--format raw`` lines (``frame;frame;... count``) -> samples per category."""
    counts = dict.fromkeys([name for name, _ in PROFILE_CATEGORIES] + ["other"], 0)
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if "Trainer.training_step (" not in stack:
            continue  # set-up, the export, checkpoint writes: not a step
        name = next((name for name, frame in PROFILE_CATEGORIES if frame in stack), "other")
        counts[name] += int(n)
    return counts


def profile(args: argparse.Namespace) -> None:
    """``--profile``: py-spy samples of live-reference DPO steps, by category."""
    import trl

    spy = Path(sys.executable).with_name("py-spy")
    if not spy.is_file():
        print("bench/dpo.py --profile: py-spy is not installed (.venv/bin/pip install py-spy)",
              file=sys.stderr)
        sys.exit(2)
    # the frame lines above are TRL 1.16's: a step without them is a version that moved them
    env = {**os.environ, "BENCH_LOG_EVERY": "1",
           **{f"BENCH_{k.upper()}": str(v) for k, v in PROFILE_STEP.items()}}  # fmt: skip
    work = REPO / "bench" / "_work" / "train-smollm2"
    load = os.getloadavg()
    runs = []
    for _ in range(args.repeats):
        with tempfile.NamedTemporaryFile(suffix=".raw") as out:
            cmd = [str(spy), "record", "--rate", "20", "--format", "raw", "-o", out.name, "--",
                   sys.executable, str(REPO / "bench" / "train.py"), "--child", "--work",
                   str(work), "--kind", "stage", "--stage", "dpo", "--workers", "0",
                   "--shape", "smollm2", "--lm-head", args.lm_head]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"{cmd} failed:\n{proc.stderr[-3000:]}")
            counts = classify(Path(out.name).read_text())
        if not counts["reference forward"] or not counts["policy forward"]:
            raise RuntimeError(f"trl {trl.__version__}: the forward calls are no longer at the "
                               "lines PROFILE_CATEGORIES names; update them")  # fmt: skip
        runs.append(counts)
        print(f"  profile lm_head={args.lm_head}: {counts}", flush=True)
    saved_path = REPO / "bench" / "_work" / "dpo-profile.json"
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
    saved[args.lm_head] = {
        "runs": runs, "load": [round(x, 2) for x in load],
        "load_after": round(os.getloadavg()[0], 2), "trl": trl.__version__,
        "measured": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }  # fmt: skip
    saved_path.write_text(json.dumps(saved, indent=2))
    rows_path = REPO / "bench" / "_work" / "dpo-rows.json"
    write_report(REPO / "bench" / "results" / "dpo.md",
                 json.loads(rows_path.read_text()) if rows_path.is_file() else {})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--accum", type=int, default=1,
                        help="micro-batches per step on each worker (gradient accumulation): "
                        "a step of MICRO_BATCH x workers x accum pairs")
    parser.add_argument("--workers", type=int, default=WORKERS,
                        help="Ray Train workers (1: no gradient exchange between workers)")
    parser.add_argument("--lm-head", choices=("chunked", "full"), default="chunked",
                        help="the DPO stage's lm_head option (both modes; the reference "
                        "pass and a live reference score through the same head)")
    parser.add_argument("--more", action="store_true",
                        help="add these runs to the saved ones of the same --epochs (a "
                        "median over several invocations, each within the 10-minute slot)")
    parser.add_argument("--profile", action="store_true",
                        help="where a live-reference step's time goes (py-spy; see above)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precompute", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.profile:
        profile(args)
        return

    from stage_io import arithmetic_pairs, write_preference_mix
    from transformers import AutoTokenizer

    work = REPO / "bench" / "_work" / "train-smollm2"
    data = work / f"dpo-{args.pairs}"
    if not (data / "ready").is_file():
        tok = AutoTokenizer.from_pretrained(work / "model")
        write_preference_mix(data, tok, arithmetic_pairs(args.pairs, seed=3, rejected="refusal"))
        (data / "ready").write_text("ok")
    load = os.getloadavg()
    started = time.time()
    runs: dict[str, list[dict[str, Any]]] = {"precomputed": [], "live": []}
    for _ in range(args.repeats):
        for mode in runs:
            cmd = [sys.executable, __file__, "--child", "--epochs", str(args.epochs), "--data",
                   str(data), "--accum", str(args.accum), "--lm-head", args.lm_head, "--workers", str(args.workers)] + (
                       ["--precompute"] if mode == "precomputed" else [])  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            runs[mode].append(json.loads(line[len("RESULT ") :]))
            print(f"  {mode:11s} epochs={args.epochs}: {runs[mode][-1]}", flush=True)
    saved_path = REPO / "bench" / "_work" / "dpo-rows.json"
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
    key = f"{args.epochs}" + (f"@acc{args.accum}" if args.accum > 1 else "") + (
        "@full" if args.lm_head == "full" else "") + (
        f"@w{args.workers}" if args.workers != WORKERS else "")
    if args.more and key in saved:  # runs of earlier invocations count too
        for mode, earlier in saved[key]["raw"].items():
            runs[mode] = earlier + runs[mode]
        load = tuple(saved[key]["load"])
    fields = ("step_time_s", "wall_s", "peak_train_mib", "peak_ref_pass_mib", "steps")
    med = {k: {f: statistics.median(r[f] for r in v) for f in fields} for k, v in runs.items()}
    row = {
        "epochs": args.epochs, "pairs": args.pairs, "accum": args.accum, "lm_head": args.lm_head,
        "workers": args.workers,
        "repeats": len(runs["live"]), "raw": runs, **{
            f"{mode}_{f}": med[mode][f] for mode in med for f in fields},
        "step_runs": {k: [round(r["step_time_s"], 3) for r in v] for k, v in runs.items()},
        "wall_runs": {k: [round(r["wall_s"], 1) for r in v] for k, v in runs.items()},
        "load": [round(x, 2) for x in load], "load_after": round(os.getloadavg()[0], 2),
        "seconds": round(time.time() - started),
        "measured": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }  # fmt: skip
    saved[key] = row
    saved_path.write_text(json.dumps(saved, indent=2))
    write_report(REPO / "bench" / "results" / "dpo.md", saved)


def write_report(out: Path, saved: dict[str, dict]) -> None:
    """bench/results/dpo.md from the rows measured so far."""
    lines = [
        "# DPO: precomputed reference log-probs against a live reference",
        "",
        "Command: `flock /tmp/solar-heavy.lock .venv/bin/python bench/dpo.py --epochs E "
        "--repeats R [--pairs P --accum A --lm-head H --workers W] [--more]` (one run of both modes takes about 3.5 minutes here, so the "
        "runs of one row come from invocations of at most 2 repeats each).  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), CPU fp32, 1 torch "
        "thread per process. Model and reference: SmolLM2-135M's shape (30 layers, hidden "
        "576, vocab 49152; random weights, two seeds). DPO stage: TRL DPOTrainer on "
        f"DeepSpeed ZeRO-2, Ray Train {WORKERS} workers (or as the row says), micro-batches of {MICRO_BATCH} pairs (a step: "
        "one per worker, or `--accum A` each), "
        f"seq len {SEQ_LEN}; the reference pass: one Ray Data actor, 8 pairs per batch. "
        "Medians of the fresh-process runs per mode (their number in the first column), "
        "modes interleaved; `--more` adds an invocation's runs to the earlier ones.",
        "",
        "| epochs (pairs, pairs a step, steps; runs; LM head; workers) | step s precomputed | step s live | per-step speed-up | "
        "end to end s precomputed (incl. reference pass) | end to end s live | end-to-end "
        "speed-up | peak RSS MiB, the training workers summed: precomputed / live | peak RSS MiB, "
        "reference pass actor | load before (1/5/15), after | measured (UTC) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---|---|",
    ]
    def order(key: str) -> tuple:
        r = saved[key]
        return (-r.get("workers", WORKERS), r.get("lm_head", "chunked"), r.get("accum", 1),
                r["epochs"], r["measured"])

    for key in sorted(saved, key=order):
        r = saved[key]
        workers = r.get("workers", WORKERS)
        pairs_per_step = MICRO_BATCH * workers * r.get("accum", 1)
        speed = r["live_step_time_s"] / r["precomputed_step_time_s"]
        e2e = r["live_wall_s"] / r["precomputed_wall_s"]
        lines.append(
            f"| {r['epochs']:g} ({r['pairs']} pairs, {pairs_per_step} a step, "
            f"{r['live_steps']:.0f} steps; {r['repeats']} runs each; "
            f"`lm_head: {r.get('lm_head', 'chunked')}`; "
            f"{workers} worker{'s' if workers > 1 else ''}) | "
            f"{r['precomputed_step_time_s']:.3f} | {r['live_step_time_s']:.3f} | **{speed:.2f}x** | "
            f"{r['precomputed_wall_s']:.1f} | {r['live_wall_s']:.1f} | {e2e:.2f}x | "
            f"{r['precomputed_peak_train_mib']:.0f} / {r['live_peak_train_mib']:.0f} | "
            f"{r['precomputed_peak_ref_pass_mib']:.0f} | "
            f"{'/'.join(f'{x:.2f}' for x in r['load'])}, {r['load_after']:.2f} | {r['measured']} |"
        )
    lines += [
        "",
        "Target: per-step speed-up >= 1.25x. Ceiling: a live reference costs one no-grad "
        "forward against the policy's forward and backward (about 3 forwards), so precomputing "
        "saves at most about a quarter of the step (<= ~1.33x). End to end, the reference pass "
        "is paid once per data/reference pair (a re-run reuses it), so its share falls with "
        "every further epoch. Peak RSS: the two training workers' resident memory summed, the "
        "most it reached during the run; the live reference adds its weights (135M fp32, "
        "0.5 GB) to each worker.",
        "",
        "What the rows say: precomputing saves 3-13% of a step here (1.03-1.15x), short of "
        "1.25x, and the profile below shows why: on this CPU the step is not the 3-forward "
        "step of the FLOP estimate. The policy's backward (with ZeRO-2's gradient hooks) "
        "costs 2.2-2.4 of its forwards, the optimizer step (ZeRO-2 + AdamW) 8-10% of the "
        "step, and the reference's forward (0.85 of the policy's) about 18% of a live step: "
        "this machine's ceiling for that step is 1.22-1.23x, and 1.24-1.26x with the "
        "optimizer step amortized over many micro-batches. The target sits at the ceiling, "
        "which no implementation reaches. On "
        "the Ray rows the gloo gradient exchange between the two workers adds a further cost "
        "the reference does not cause (one worker, the same 4 pairs a step in 2 "
        "micro-batches of 2: 1.15x, against 1.11x with two workers; the profile's 1.22x is "
        "for micro-batches of 4 pairs, where the per-micro-batch costs weigh less). What precomputing buys on CPU is memory (about 1 GB "
        "less over the two workers: no reference weights); end to end it gains time only "
        "after several epochs (0.95x at 2: the reference pass costs more than 2 epochs of "
        "savings). A GPU, where the backward is nearer 2 forwards, has not been measured.",
        "",
    ]
    lines += profile_lines()
    out.write_text("\n".join(lines))
    print("\n".join(lines))


def profile_lines() -> list[str]:
    """The --profile section of the report (none before the first --profile run)."""
    path = REPO / "bench" / "_work" / "dpo-profile.json"
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    names = [name for name, _ in PROFILE_CATEGORIES] + ["other"]
    lines = [
        "## Where a live-reference step goes (py-spy)",
        "",
        "Command: `flock /tmp/solar-heavy.lock .venv/bin/python bench/dpo.py --profile "
        "--lm-head HEAD --repeats 2` (py-spy installed in the venv). The DPO stage in one "
        "process (world size 1, no Ray, ZeRO-2, a live reference), bench/train.py's "
        f"SmolLM2-shape preference mix, {PROFILE_STEP['micro_batch']} pairs a micro-batch, "
        f"{PROFILE_STEP['accum']} micro-batches a step, {PROFILE_STEP['steps']} steps; "
        "py-spy samples at 20 Hz inside `training_step`, pooled over the runs (each run's "
        "share in brackets), each sample in the first category its stack holds.",
        "",
        "| LM head | samples (runs) | " + " | ".join(names) + " | ceiling: 1 / (1 - reference) "
        "| optimizer amortized | load before (1/5/15), after | trl | measured (UTC) |",
        "|---|---:|" + "---:|" * len(names) + "---:|---:|---|---|---|",
    ]
    for head, r in sorted(saved.items()):
        total = {n: sum(run[n] for run in r["runs"]) for n in names}
        n_all = sum(total.values())
        share = {n: total[n] / n_all for n in names}
        per_run = {n: [run[n] / sum(run.values()) for run in r["runs"]] for n in names}
        ref, opt = share["reference forward"], share["optimizer step (ZeRO-2 + fused AdamW)"]
        lines.append(
            f"| `{head}` | {n_all} ({len(r['runs'])}) | "
            + " | ".join(f"{share[n]:.1%} ({', '.join(f'{x:.1%}' for x in per_run[n])})"
                         for n in names)  # fmt: skip
            + f" | {1 / (1 - ref):.2f}x | {1 / (1 - ref / (1 - opt)):.2f}x | "
            f"{'/'.join(f'{x:.2f}' for x in r['load'])}, {r['load_after']:.2f} | {r['trl']} | "
            f"{r['measured']} |"
        )
    lines += [
        "",
        "Sampling error: a share p from n samples carries about sqrt(p(1-p)/n) (0.9 points "
        "at p = 0.17, n = 2000; samples 50 ms apart are not independent, so read it as a "
        "floor), and the per-run shares in brackets show the spread between runs. The "
        "reference's forward costs about 0.85 of the policy's (same model, same tokens, no "
        "autograd graph kept); the backward 2.2-2.4 policy forwards. Precomputing cannot "
        "save more than the reference's share.",
        "",
    ]
    return lines


if __name__ == "__main__":
    main()
