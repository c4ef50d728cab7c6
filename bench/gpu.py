"""GPU check: the DUS recipe's training path on one GPU, in bf16, in one command.

On a GPU machine (an H200 lent for ~15 minutes, no network, Python 3.12 with torch and
transformers) this runs, in under 8 minutes:

1. install what the machine lacks from the wheels in ``.whl/`` (``bench/gpu-wheels.sh``
   fills it; ``carry: [".whl"]``) into a private site directory, and re-executes itself;
2. build a ~1.2B-parameter DUS model from a config (no download): a random bf16 Llama with
   SmolLM2's 49152-token vocabulary, ``n=16`` layers of hidden 2048, up-scaled by
   ``solar-ray upscale`` (SOLAR, ``m=4``) to ``s = 2(n-m) = 24`` layers;
3. continued pretraining (``run_pretrain``: our DeepSpeed loop, ZeRO-2, bf16, SDPA) on
   packed 2048-token rows: tokens/s and MFU against the device's dense bf16 peak
   (:data:`solar_ray.train.metrics.PEAK_BF16_FLOPS`: 989 TFLOP/s for an H200), peak memory;
   then the same with PyTorch's flash-attention SDPA kernel forced (on rows without
   per-document positions, so no mask stops it);
4. the export reloads to identical logits (the probe recorded at export against the
   reloaded model);
5. a few SFT and DPO steps (TRL on DeepSpeed ZeRO-2), when TRL is importable.

It writes ``gpu.json`` and ``gpu.md`` (a section for bench/RESULTS.md) into ``--out-dir``.

Decisions:

- **No Ray on the device.** Ray's wheel alone is over the 64 MiB that travels with the
  working tree, so every stage runs with ``local: true`` (the worker loop in this process,
  world size 1; :func:`solar_ray.train.common._launch_local`). ``ray`` is blocked from
  importing here in every mode, so the CPU dry mode proves the path needs none.
- **DeepSpeed is carried**, as a wheel built with ``DS_BUILD_OPS=0`` (pure Python, about
  1.5 MB): it is what the pretrain stage and the TRL stages run on, so measuring a plain
  torch loop instead would not check the project's GPU path. Its optimizer is torch's
  AdamW (``zero_force_ds_cpu_optimizer: false``), so no compiled op is needed.
- **Flash attention** means PyTorch's own SDPA flash kernel: the ``flash-attn`` package is
  not in the device image and its wheels (hundreds of MB) cannot travel. When it is
  importable, the report says so.
- A **time budget** (``--budget-s``, default 420 s) skips the optional parts (forced-flash
  pretrain, SFT, DPO) that would start after it, so the run ends inside its lease.

``--dry`` runs the same sequence on CPU in seconds: a tiny model (hidden 64, n=4, m=1),
a few fp32 steps. ``tests/test_gpu_bench.py`` runs it so that this script cannot rot.

    python3 bench/gpu.py --out-dir "$OUT"              # on the GPU machine (carry .whl)
    .venv/bin/python bench/gpu.py --dry                # here, on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
CARRIED_TOKENIZER = WHEELS / "smollm2-tokenizer"
SITE = Path(tempfile.gettempdir()) / "solar-gpu-site"
#: modules the check needs that a bare device image lacks (carried as wheels)
NEEDED = ("pydantic", "deepspeed", "hjson", "trl", "datasets")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SOLAR_RAY_CACHE", str(REPO / ".cache" / "solar-ray"))
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # solar_ray; tests/stage_io.py

#: the two sizes: the ~1.2B GPU model and the tiny CPU dry run
SHAPES: dict[str, dict[str, Any]] = {
    "gpu": dict(n=16, m=4, hidden=2048, intermediate=5632, heads=16, kv_heads=8,
                seq_len=2048, micro_batch=8, steps=30, log_every=5,
                sft_steps=8, dpo_steps=8, sft_micro_batch=16, dpo_micro_batch=8),
    "dry": dict(n=4, m=1, hidden=64, intermediate=128, heads=4, kv_heads=2,
                seq_len=64, micro_batch=2, steps=3, log_every=1,
                sft_steps=2, dpo_steps=2, sft_micro_batch=2, dpo_micro_batch=2),
}  # fmt: skip


class _NoRay(importlib.abc.MetaPathFinder):
    """Refuse ``import ray``: the device has none, so neither may this check."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r} (bench/gpu.py runs without Ray)")
        return None


# --------------------------------------------------------------------------- environment


def ensure_carried_packages() -> None:
    """Install the carried wheels and re-execute when a needed module is missing."""
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if not missing or os.environ.get("SOLAR_GPU_INSTALLED"):
        return
    wheels = sorted(str(p) for p in WHEELS.glob("*.whl"))
    if not wheels:
        print(f"missing {missing} and no wheels in {WHEELS}: run bench/gpu-wheels.sh", flush=True)
        return
    print(f"installing {len(wheels)} carried wheels (missing: {', '.join(missing)})", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
         "--no-cache-dir", "--upgrade", "--target", str(SITE), *wheels],
        check=True,
    )  # fmt: skip
    env = dict(os.environ, SOLAR_GPU_INSTALLED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), env.get("PYTHONPATH")]))
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def versions() -> dict[str, str | None]:
    """Versions of the libraries the check ran on."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "deepspeed", "trl", "datasets", "accelerate",
                 "pydantic", "flash-attn"):  # fmt: skip
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def load_tokenizer() -> Any:
    """SmolLM2's tokenizer: the carried copy on the device, the GGUF package's here."""
    from transformers import AutoTokenizer

    if CARRIED_TOKENIZER.is_dir():
        return AutoTokenizer.from_pretrained(CARRIED_TOKENIZER)
    from solar_ray.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


class Memory:
    """Peak GPU memory of one phase (None on CPU)."""

    def __init__(self, on_gpu: bool) -> None:
        self.on_gpu = on_gpu

    def reset(self) -> None:
        if self.on_gpu:
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        if not self.on_gpu:
            return None
        import torch

        return torch.cuda.max_memory_allocated() / 2**30


# --------------------------------------------------------------------------- fixtures


def build_dus_model(work: Path, shape: dict[str, Any], tokenizer: Any, on_gpu: bool) -> dict:
    """A random base Llama of ``n`` layers, up-scaled by ``solar-ray upscale`` (m)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from solar_ray.upscale import UpscaleConfig, run_upscale

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"], num_hidden_layers=shape["n"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=max(4096, shape["seq_len"]), tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    started = time.perf_counter()
    device = "cuda" if on_gpu else "cpu"
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16 if on_gpu else torch.float32
        )
    base.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    del base
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    run_upscale(UpscaleConfig(source=str(work / "base"), out=str(work / "dus"), method="solar",
                              m=shape["m"]))  # fmt: skip
    upscale_s = time.perf_counter() - started
    dus_config = LlamaConfig.from_pretrained(work / "dus")
    with torch.device("meta"):
        num_params = sum(
            p.numel() for p in AutoModelForCausalLM.from_config(dus_config).parameters()
        )
    return {
        "path": str(work / "dus"),
        "n": shape["n"], "m": shape["m"], "s": int(dus_config.num_hidden_layers),
        "hidden": shape["hidden"], "intermediate": shape["intermediate"],
        "heads": shape["heads"], "kv_heads": shape["kv_heads"], "vocab": len(tokenizer),
        "num_params": int(num_params), "build_base_s": build_s, "upscale_s": upscale_s,
    }  # fmt: skip


def write_mixes(work: Path, shape: dict[str, Any], tokenizer: Any) -> dict[str, str]:
    """Pretrain mixes (per-document positions, and plain 0..T-1 rows), SFT and DPO mixes."""
    import pyarrow as pa
    from stage_io import (
        arithmetic_pairs,
        offline_prose,
        write_mix,
        write_preference_mix,
        write_pretrain_mix,
        write_sft_mix,
    )

    seq_len = shape["seq_len"]
    rows_needed = shape["micro_batch"] * (shape["steps"] + 1)
    prose = offline_prose()
    docs: list[str] = []
    while sum(len(d) for d in docs) < rows_needed * seq_len * 3:  # ~3+ characters per token
        docs.extend(prose)
    paths = {k: str(work / k) for k in ("pretrain", "pretrain_plain", "sft", "dpo")}
    write_pretrain_mix(paths["pretrain"], tokenizer, docs, seq_len=seq_len)
    import pyarrow.parquet as pq

    packed = pq.read_table(Path(paths["pretrain"]) / "packed").select(["input_ids"])
    # 0..T-1 in every row: transformers sees no packed documents, builds no mask, and SDPA
    # may take its flash kernel
    plain_positions = [list(range(seq_len))] * packed.num_rows
    packed = packed.append_column(
        "position_ids", pa.array(plain_positions, packed.schema.field("input_ids").type)
    )
    write_mix(paths["pretrain_plain"], "pretrain",
              {"data": pa.table({"text": docs[:1], "source": ["testing"]}), "packed": packed},
              seq_len=seq_len, num_rows=packed.num_rows,
              num_tokens=packed.num_rows * seq_len)  # fmt: skip
    num_pairs = max(shape["sft_micro_batch"] * shape["sft_steps"], 64)
    write_sft_mix(paths["sft"], tokenizer, [(q, a) for q, a, _ in arithmetic_pairs(num_pairs)])
    num_prefs = max(shape["dpo_micro_batch"] * shape["dpo_steps"], 32)
    write_preference_mix(paths["dpo"], tokenizer, arithmetic_pairs(num_prefs, seed=1))
    return paths


# --------------------------------------------------------------------------- phases


def _common(work: Path, name: str, model: str, data: str, on_gpu: bool) -> dict[str, Any]:
    return {
        "model": model, "data": data, "out": str(work / "out" / name),
        "storage_path": str(work / "runs"), "local": True, "num_workers": 1,
        "use_gpu": on_gpu, "zero_stage": 2, "tracking": "none", "checkpoint_every": 10_000,
    }  # fmt: skip


def run_pretrain_phase(
    work: Path,
    name: str,
    model: dict,
    data: str,
    shape: dict,
    on_gpu: bool,
    memory: Memory,
    force_flash: bool = False,
) -> dict[str, Any]:
    """Continued pretraining; tokens/s, MFU against the device peak, peak memory."""
    import torch

    from solar_ray.train.config import PretrainConfig
    from solar_ray.train.metrics import device_peak_flops, flops_per_token, mfu
    from solar_ray.train.pretrain import run_pretrain

    cfg = PretrainConfig(
        **_common(work, name, model["path"], data, on_gpu), steps=shape["steps"],
        micro_batch_size=shape["micro_batch"], seq_len=shape["seq_len"],
        log_every=shape["log_every"], warmup_steps=2 if shape["steps"] > 2 else 0, lr=1e-4,
    )  # fmt: skip
    memory.reset()
    context: Any = contextlib.nullcontext()
    if force_flash:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        context = sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    started = time.perf_counter()
    with context:
        result = run_pretrain(cfg)
    wall_s = time.perf_counter() - started
    m = result.metrics
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(model["path"])
    flops_token = flops_per_token(model_config, model["num_params"], shape["seq_len"])
    peak = device_peak_flops() if on_gpu else None
    rate = float(m.get("tokens_per_s_per_worker") or 0.0)
    utilisation = mfu(rate, flops_token, peak)
    return {
        "phase": name, "attention": "sdpa (flash kernel forced)" if force_flash else "sdpa",
        "out": str(result.out), "steps": m.get("steps"), "seq_len": shape["seq_len"],
        "micro_batch": shape["micro_batch"], "final_loss": m.get("final_loss"),
        "loss_finite": bool(m.get("final_loss") is not None
                            and torch.isfinite(torch.tensor(m["final_loss"]))),
        "tokens_per_s": rate, "step_time_s": m.get("step_time_s"),
        "flops_per_token": flops_token, "peak_flops": peak, "mfu": utilisation,
        "peak_mem_gib": memory.peak_gib(), "wall_s": wall_s,
    }  # fmt: skip


def check_export(out: str, on_gpu: bool) -> dict[str, Any]:
    """Reload the exported model and compare its probe with the one recorded at export."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from solar_ray.checkpoint import read_manifest
    from solar_ray.train.export import probe_model

    manifest = read_manifest(Path(out)) or {}
    recorded = manifest.get("export_probe")
    if recorded is None:
        return {"identical": False, "error": "solar.json records no export probe"}
    device = "cuda" if on_gpu else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.bfloat16 if on_gpu else torch.float32, attn_implementation="sdpa"
    ).to(device)
    probe = probe_model(model, AutoTokenizer.from_pretrained(out), device)
    diffs = [
        float((torch.tensor(probe[k]) - torch.tensor(recorded[k])).abs().max())
        for k in ("next_token_logps", "logsumexp")
    ]
    return {
        "identical": probe == recorded,
        "argmax_equal": probe["argmax"] == recorded["argmax"],
        "max_abs_diff": max(diffs),
        "positions": len(probe["argmax"]),
    }


def run_trl_phase(
    work: Path, stage: str, model: dict, data: str, shape: dict, on_gpu: bool, memory: Memory
) -> dict[str, Any]:
    """A few SFT or DPO steps (TRL on DeepSpeed ZeRO-2, no Ray)."""
    from solar_ray.train.config import DPOConfig, SFTConfig

    steps, micro = shape[f"{stage}_steps"], shape[f"{stage}_micro_batch"]
    common = _common(work, stage, model["path"], data, on_gpu)
    memory.reset()
    started = time.perf_counter()
    if stage == "sft":
        from solar_ray.train.sft import run_sft

        result = run_sft(SFTConfig(**common, steps=steps, micro_batch_size=micro, seq_len=512,
                                   log_every=1))  # fmt: skip
    else:
        from solar_ray.train.dpo import run_dpo

        result = run_dpo(DPOConfig(**common, steps=steps, micro_batch_size=micro, seq_len=512,
                                   log_every=1))  # fmt: skip
    m = result.metrics
    return {
        "phase": stage, "steps": m.get("steps"), "micro_batch": micro,
        "final_loss": m.get("final_loss", m.get("train_loss")),
        "step_time_s": m.get("step_time_s"), "tokens_per_s": m.get("tokens_per_s_per_worker"),
        "peak_mem_gib": memory.peak_gib(), "wall_s": time.perf_counter() - started,
    }  # fmt: skip


# --------------------------------------------------------------------------- report


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    """The section for bench/RESULTS.md."""
    model, env = report["model"], report["environment"]
    lines = [
        "# GPU check (`bench/gpu.py`)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {env['device']}; {env['cpus']} CPUs; Python {env['versions']['python']}, "
        f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}, "
        f"deepspeed {env['versions']['deepspeed']}, trl {env['versions']['trl']}; "
        f"{'dry run (CPU, fp32, tiny model)' if report['dry'] else 'bf16'}; "
        f"no Ray (`local: true`); {report['total_s']:.0f} s in all.  ",
        f"Model: random Llama, vocab {model['vocab']}, hidden {model['hidden']}, "
        f"{model['heads']} heads ({model['kv_heads']} KV), MLP {model['intermediate']}; base "
        f"n={model['n']} up-scaled with SOLAR m={model['m']} to s={model['s']} layers: "
        f"{model['num_params'] / 1e9:.3f}B parameters (upscale {model['upscale_s']:.1f} s).",
        "",
        "| phase | attention | seq x micro-batch | steps | tokens/s | step s | MFU | peak GiB | loss |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["phases"]:
        if "skipped" in row or "error" in row:
            lines.append(f"| {row['phase']} | {row.get('skipped') or 'error: ' + row['error']} "
                         "| | | | | | | |")  # fmt: skip
            continue
        mfu = row.get("mfu")
        lines.append(
            f"| {row['phase']} | {row.get('attention', 'sdpa')} | "
            f"{row.get('seq_len', '-')} x {row['micro_batch']} | {row['steps']} | "
            f"{_fmt(row.get('tokens_per_s'), ',.0f')} | {_fmt(row.get('step_time_s'))} | "
            f"{'-' if mfu is None else f'{mfu:.1%}'} | {_fmt(row.get('peak_mem_gib'), '.1f')} | "
            f"{_fmt(row.get('final_loss'), '.3f')} |"
        )
    export = report.get("export") or {}
    lines += [
        "",
        f"MFU: tokens/s x training FLOPs per token (6N + 12·L·H·Q·T, "
        f"`solar_ray.train.metrics.flops_per_token`) over the dense bf16 peak "
        f"({_fmt(report.get('peak_flops'), '.3g')} FLOP/s); target >= 40% on the ~1B model. "
        "Tokens/s are the median of the logging intervals after the first.  ",
        f"Export reload: identical probe logits: {export.get('identical')} "
        f"(argmax equal: {export.get('argmax_equal')}, max |diff| "
        f"{_fmt(export.get('max_abs_diff'))} over {export.get('positions')} positions).",
    ]
    if report.get("notes"):
        lines += ["", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="tiny model on CPU, a few steps")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where gpu.json and gpu.md go (default: bench/results, "
                        "or bench/_work/gpu-dry with --dry)")  # fmt: skip
    parser.add_argument("--work-dir", type=Path, default=None, help="models, mixes and runs")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="skip optional phases that would start after this many seconds",
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["flash", "sft", "dpo"])
    args = parser.parse_args(argv)
    started = time.perf_counter()
    sys.meta_path.insert(0, _NoRay())
    if not args.dry:
        ensure_carried_packages()

    import torch

    on_gpu = not args.dry
    if on_gpu and not torch.cuda.is_available():
        parser.error("no CUDA device is visible; use --dry on a CPU machine")
    shape = SHAPES["dry" if args.dry else "gpu"]
    out_dir = args.out_dir or (REPO / "bench" / ("_work/gpu-dry" if args.dry else "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    work_ctx: Any = (
        contextlib.nullcontext(args.work_dir) if args.work_dir
        else tempfile.TemporaryDirectory(prefix="solar-gpu-")
    )  # fmt: skip
    memory = Memory(on_gpu)
    notes: list[str] = []
    report: dict[str, Any] = {
        "dry": args.dry,
        "command": "python3 bench/gpu.py" + (" --dry" if args.dry else " --out-dir $OUT"),
        "environment": {
            "device": torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.machine()})",
            "cpus": os.cpu_count(),
            "versions": versions(),
        },
        "phases": [],
    }

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {msg}", flush=True)

    def over_budget(phase: str) -> bool:
        if time.perf_counter() - started > args.budget_s:
            report["phases"].append({"phase": phase, "skipped": "skipped: over --budget-s"})
            return True
        return False

    with work_ctx as work_name:
        work = Path(work_name)
        tokenizer = load_tokenizer()
        model = build_dus_model(work, shape, tokenizer, on_gpu)
        report["model"] = model
        log(f"DUS model: {model['num_params'] / 1e9:.3f}B parameters, s={model['s']} layers")
        mixes = write_mixes(work, shape, tokenizer)
        log("mixes written")
        pretrain = run_pretrain_phase(work, "pretrain", model, mixes["pretrain"], shape,
                                      on_gpu, memory)  # fmt: skip
        report["phases"].append(pretrain)
        report["peak_flops"] = pretrain["peak_flops"]
        log(f"pretrain: {pretrain['tokens_per_s']:.0f} tokens/s, MFU {pretrain['mfu']}")
        report["export"] = check_export(pretrain["out"], on_gpu)
        log(f"export reload: {report['export']}")
        if importlib.util.find_spec("flash_attn") is None:
            notes.append("flash-attn (the package) is not installed: flash attention is "
                         "PyTorch SDPA's own flash kernel.")  # fmt: skip
        if "flash" not in args.skip and on_gpu and not over_budget("pretrain (flash)"):
            try:
                row = run_pretrain_phase(work, "pretrain-flash", model, mixes["pretrain_plain"],
                                         shape, on_gpu, memory, force_flash=True)  # fmt: skip
                report["phases"].append(row)
                log(f"pretrain, flash kernel: {row['tokens_per_s']:.0f} tokens/s")
            except Exception as e:  # a kernel the device lacks is a finding, not a crash
                report["phases"].append({"phase": "pretrain-flash", "error": repr(e)[:300]})
        has_trl = importlib.util.find_spec("trl") is not None
        for stage in ("sft", "dpo"):
            if stage in args.skip:
                continue
            if not has_trl:
                report["phases"].append({"phase": stage, "skipped": "TRL not available"})
                continue
            if over_budget(stage):
                continue
            try:
                row = run_trl_phase(work, stage, model, mixes[stage], shape, on_gpu, memory)
                report["phases"].append(row)
                log(f"{stage}: {row['steps']} steps, {row['step_time_s']} s/step")
            except Exception as e:
                if args.dry:
                    raise
                report["phases"].append({"phase": stage, "error": repr(e)[:300]})
    report["notes"] = notes
    report["total_s"] = time.perf_counter() - started
    (out_dir / "gpu.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / "gpu.md").write_text(markdown(report))
    log(f"wrote {out_dir / 'gpu.json'} and {out_dir / 'gpu.md'}")
    return report


if __name__ == "__main__":
    main()
