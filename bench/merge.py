"""Benchmark: `solar-ray merge` (linear, slerp) vs mergekit on the same two models.

Two ~0.43B-parameter bf16 Mistral-shaped models (bench/dus.py's model and a perturbed copy,
sharded at 200 MB) are merged 0.5/0.5 linearly and by SLERP at t=0.5 by each tool, in a
fresh process per run; wall time and peak RSS (``ru_maxrss`` via ``/usr/bin/time``) are the
median of ``--runs`` runs, next to ``cp -r`` of one input (the I/O floor). The page cache is
warm for every tool. The linear outputs are then compared tensor by tensor (both compute in
float32 and round to bf16, so they should agree to the last bit or within one bf16 ulp).
mergekit's SLERP works per row (leading axis) since 0.1.x, ours per tensor as in the issue,
so the SLERP outputs are expected to differ slightly; the difference is reported.

    .venv/bin/python bench/merge.py [--runs 3] [--work bench/_work]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dus import BIN, REPO, make_model, timed  # noqa: E402


def perturbed_copy(src: Path, dst: Path, seed: int = 1, scale: float = 0.5) -> None:
    """``dst`` = ``src`` with every float tensor moved by ``scale`` times its own std of noise."""
    if (dst / "config.json").is_file():
        return
    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    for f in sorted(src.iterdir()):
        if f.suffix != ".safetensors":
            shutil.copyfile(f, dst / f.name)
            continue
        tensors = load_file(f)
        out = {}
        for name, t in tensors.items():
            x = t.float()
            noise = torch.randn(x.shape, generator=gen) * (x.std() if x.numel() > 1 else 1.0)
            out[name] = (x + scale * noise).to(t.dtype)
        save_file(out, dst / f.name, metadata={"format": "pt"})


def compare(a: Path, b: Path) -> dict[str, float]:
    """Largest absolute difference and fraction of differing elements between two models."""
    from safetensors import safe_open

    def tensors(d: Path) -> dict[str, tuple[Path, str]]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                out.update({k: (f, k) for k in h.keys()})  # noqa: SIM118 - safe_open has no __iter__
        return out

    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys(), sorted(set(ta) ^ set(tb))[:5]
    max_abs = 0.0
    differ = total = 0
    for name in sorted(ta):
        with safe_open(ta[name][0], "pt") as ha, safe_open(tb[name][0], "pt") as hb:
            x, y = ha.get_tensor(name).float(), hb.get_tensor(name).float()
        d = (x - y).abs()
        max_abs = max(max_abs, float(d.max()))
        differ += int((d > 0).sum())
        total += d.numel()
    return {"max_abs_diff": max_abs, "fraction_differing": differ / total}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "_work")
    ap.add_argument("--tools", nargs="+", help="run only these (default: all)")
    args = ap.parse_args()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    a = work / "mistral-0.4b"
    params = make_model(a)
    b = work / "mistral-0.4b-perturbed"
    perturbed_copy(a, b)
    in_bytes = sum(p.stat().st_size for p in a.glob("*.safetensors"))

    mk_linear, mk_slerp = work / "merge-linear.yaml", work / "merge-slerp.yaml"
    mk_linear.write_text(yaml.safe_dump({
        "merge_method": "linear", "dtype": "float32", "out_dtype": "bfloat16",
        "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                   {"model": str(b), "parameters": {"weight": 0.5}}],
    }))  # fmt: skip
    mk_slerp.write_text(yaml.safe_dump({
        "merge_method": "slerp", "dtype": "float32", "out_dtype": "bfloat16", "base_model": str(a),
        "models": [{"model": str(a)}, {"model": str(b)}], "parameters": {"t": 0.5},
    }))  # fmt: skip
    names = ("solar_linear", "solar_linear_nohash", "mergekit_linear", "solar_slerp", "mergekit_slerp", "cp")
    out = {n: work / f"merge-out-{n}" for n in names}
    solar = [str(BIN / "solar-ray"), "merge", "--models", str(a), str(b), "--overwrite"]
    mergekit = [str(BIN / "mergekit-yaml"), "--copy-tokenizer", "--out-shard-size", "2B"]
    commands = {
        "solar_linear": [*solar, "--weights", "0.5", "0.5", "--out", str(out["solar_linear"])],
        "solar_linear_nohash": [*solar, "--weights", "0.5", "0.5", "--out", str(out["solar_linear_nohash"]),
                                "--set", "hash_inputs=false"],
        "mergekit_linear": [*mergekit, str(mk_linear), str(out["mergekit_linear"])],
        "solar_slerp": [*solar, "--method", "slerp", "--t", "0.5", "--out", str(out["solar_slerp"])],
        "mergekit_slerp": [*mergekit, str(mk_slerp), str(out["mergekit_slerp"])],
        "cp": ["cp", "-r", str(a), str(out["cp"])],
    }  # fmt: skip
    if args.tools:
        commands = {k: v for k, v in commands.items() if k in args.tools or k == "cp"}
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in commands}
    for _ in range(args.runs):
        for name, cmd in commands.items():
            if name.startswith("mergekit") or name == "cp":
                shutil.rmtree(out[name], ignore_errors=True)
            results[name].append(timed(cmd))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(r for _, r in v)) for k, v in results.items()}
    parity = {
        kind: compare(out[f"solar_{kind}"], out[f"mergekit_{kind}"])
        for kind in ("linear", "slerp")
        if (out[f"solar_{kind}"] / "solar.json").is_file() and (out[f"mergekit_{kind}"] / "config.json").is_file()
    }
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"inputs: 2 x {params / 1e9:.3f}B params, {in_bytes / 2**30:.2f} GiB bf16 each; "
          f"median of {args.runs} runs")  # fmt: skip
    print(f"{'tool':<22}{'wall s':>9}{'peak RSS MiB':>15}{'vs mergekit':>13}{'vs cp':>8}")
    for k, (w, r) in med.items():
        ref = med.get("mergekit_slerp" if "slerp" in k else "mergekit_linear", (float("nan"),))[0]
        print(f"{k:<22}{w:>9.2f}{r:>15.0f}{w / ref:>12.3f}x{w / med['cp'][0]:>7.2f}x")
    for k, v in parity.items():
        print(f"{k}: solar-ray vs mergekit max |diff| {v['max_abs_diff']:.3g}, "
              f"{100 * v['fraction_differing']:.4f}% of elements differ")  # fmt: skip
    print(json.dumps({"timings": {k: {"wall_s": v[0], "peak_rss_mib": v[1]} for k, v in med.items()},
                      "parity": parity}))  # fmt: skip


if __name__ == "__main__":
    main()
