"""Benchmark: `solar-ray upscale` vs mergekit passthrough vs `cp -r` (the I/O limit).

A ~0.43B-parameter bf16 Mistral-shaped model (32 layers, hidden 1024) is saved as sharded
safetensors; each tool builds the SOLAR m=8 model (48 layers) from it. Every run is a fresh
process; wall time and peak RSS (``ru_maxrss`` of the child, via ``/usr/bin/time``) are
taken as the median of ``--runs`` runs. The page cache is warm for every tool (the source
was just written, and this sandbox cannot drop caches), so all three read from memory.

    .venv/bin/python bench/dus.py [--runs 3] [--work bench/_work]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def make_model(path: Path) -> int:
    """A random bf16 Mistral-shaped model (32 layers), sharded at 200 MB; returns params."""
    if (path / "config.json").is_file():
        return json.loads((path / "params.json").read_text())["params"]
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=32,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=4096,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, max_shard_size="200MB")
    (path / "params.json").write_text(json.dumps({"params": params}))
    return params


def timed(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` under /usr/bin/time -v; return (wall seconds, peak RSS MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return wall, rss_kb / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "_work")
    args = ap.parse_args()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    src = work / "mistral-0.4b"
    params = make_model(src)
    src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    mk_cfg = work / "passthrough.yaml"
    mk_cfg.write_text(
        yaml.safe_dump(
            {
                "slices": [
                    {"sources": [{"model": str(src), "layer_range": [0, 24]}]},
                    {"sources": [{"model": str(src), "layer_range": [8, 32]}]},
                ],
                "merge_method": "passthrough",
                "dtype": "bfloat16",
            }
        )
    )
    out = {name: work / f"out-{name}" for name in ("solar", "solar_nohash", "solar_durable", "mergekit", "cp")}
    commands = {
        "solar": [str(BIN / "solar-ray"), "upscale", "--source", str(src), "--out", str(out["solar"]),
                  "--m", "8", "--overwrite"],
        "solar_nohash": [str(BIN / "solar-ray"), "upscale", "--source", str(src), "--out",
                         str(out["solar_nohash"]), "--m", "8", "--overwrite", "--set", "hash_inputs=false"],
        "solar_durable": [str(BIN / "solar-ray"), "upscale", "--source", str(src), "--out",
                          str(out["solar_durable"]), "--m", "8", "--overwrite", "--set", "durable=true"],
        "mergekit": [str(BIN / "mergekit-yaml"), str(mk_cfg), str(out["mergekit"]), "--copy-tokenizer",
                     "--allow-crimes", "--out-shard-size", "2B"],
        # the I/O limit: copying the finished output once
        "cp": ["cp", "-r", str(out["solar"]), str(out["cp"])],
    }
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in commands}
    for _ in range(args.runs):
        for name, cmd in commands.items():
            if name in ("mergekit", "cp"):
                shutil.rmtree(out[name], ignore_errors=True)
            results[name].append(timed(cmd))
    out_bytes = sum(p.stat().st_size for p in out["solar"].glob("*.safetensors"))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(r for _, r in v)) for k, v in results.items()}
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"source: {params / 1e9:.3f}B params, {src_bytes / 2**30:.2f} GiB bf16; "
          f"output 48 layers, {out_bytes / 2**30:.2f} GiB; median of {args.runs} runs")
    print(f"{'tool':<14}{'wall s':>9}{'peak RSS MiB':>15}{'vs mergekit':>13}{'vs cp':>8}")
    for k, (w, r) in med.items():
        print(f"{k:<14}{w:>9.2f}{r:>15.0f}{w / med['mergekit'][0]:>12.3f}x{w / med['cp'][0]:>7.2f}x")
    print(json.dumps({k: {"wall_s": v[0], "peak_rss_mib": v[1]} for k, v in med.items()}))


if __name__ == "__main__":
    main()
