"""Training stages without Ray: configs, DeepSpeed config, validation, data order, export.

Everything here runs in-process in seconds; the distributed runs are in
``test_train_ray.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from stage_io import (
    arithmetic_pairs,
    pattern_documents,
    write_preference_mix,
    write_pretrain_mix,
    write_sft_mix,
)

from solar_ray.config import ConfigError, load_config
from solar_ray.data.contract import DataError, held_out_mask
from solar_ray.train.config import DPOConfig, PretrainConfig, SFTConfig
from solar_ray.train.ds_config import build_deepspeed_config

REPO = Path(__file__).resolve().parents[1]


def _base(tmp_path: Path, **kw) -> dict:
    return {"model": "m", "data": "d", "out": str(tmp_path / "out"), "steps": 10, **kw}


# --------------------------------------------------------------------------- configs


def test_config_requires_exactly_one_of_steps_and_epochs(tmp_path):
    with pytest.raises(ConfigError, match="steps / epochs"):
        load_config(PretrainConfig, data=_base(tmp_path, steps=None))
    with pytest.raises(ConfigError, match="steps / epochs"):
        load_config(PretrainConfig, data=_base(tmp_path, epochs=1))


def test_config_batch_not_divisible_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"global_batch_size: 10 is not divisible .* 4 x 2 = 8"):
        load_config(
            PretrainConfig,
            data=_base(tmp_path, micro_batch_size=4, num_workers=2, global_batch_size=10),
        )
    cfg = load_config(
        PretrainConfig, data=_base(tmp_path, micro_batch_size=2, num_workers=2),
        overrides=["global_batch_size=16"],
    )  # fmt: skip
    assert cfg.grad_accum_steps == 4 and cfg.effective_global_batch_size == 16


def test_config_rejects_bad_combinations(tmp_path):
    with pytest.raises(ConfigError, match="offload_params"):
        load_config(PretrainConfig, data=_base(tmp_path, offload_params=True, zero_stage=2))
    with pytest.raises(ConfigError, match="precision: bf16 needs use_gpu"):
        load_config(SFTConfig, data=_base(tmp_path, precision="bf16"))
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config(DPOConfig, data=_base(tmp_path, zero_stage=4))
    with pytest.raises(ConfigError, match="unknown field"):
        load_config(DPOConfig, data=_base(tmp_path, betta=0.1))


def test_config_defaults_and_fingerprint(tmp_path):
    cfg = load_config(PretrainConfig, data=_base(tmp_path))
    assert cfg.run_name == "out"
    assert cfg.resolved_storage_path == str(tmp_path / "ray_train")
    assert cfg.precision_resolved == "fp32" and cfg.export_dtype_resolved == "float32"
    gpu = load_config(PretrainConfig, data=_base(tmp_path, use_gpu=True))
    assert gpu.export_dtype_resolved == "bfloat16"
    # operational fields do not change what a run computes; the learning rate does
    same = load_config(PretrainConfig, data=_base(tmp_path, max_failures=9, log_every=3))
    other = load_config(PretrainConfig, data=_base(tmp_path, lr=1e-3))
    assert cfg.result_fingerprint() == same.result_fingerprint() != other.result_fingerprint()


# --------------------------------------------------------------------------- deepspeed


def test_deepspeed_config_from_stage_config(tmp_path):
    cfg = load_config(
        PretrainConfig,
        data=_base(tmp_path, zero_stage=3, offload_optimizer=True, offload_params=True,
                   micro_batch_size=2, global_batch_size=8, max_grad_norm=0.5),
    )  # fmt: skip
    ds = build_deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    hf = build_deepspeed_config(cfg, for_hf_trainer=True)
    # HF's Trainer refuses values that disagree with its arguments: let it fill them
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert hf[key] == "auto"
    assert hf["bf16"]["enabled"] == "auto"


def test_deepspeed_user_config_is_merged_over_the_built_one(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 7}}))
    cfg = load_config(PretrainConfig, data=_base(tmp_path, zero_stage=3, deepspeed=str(user)))
    ds = build_deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["zero_optimization"]["reduce_bucket_size"] == 7
    assert ds["zero_optimization"]["contiguous_gradients"] is True  # kept from the built one
    bad = load_config(PretrainConfig, data=_base(tmp_path, deepspeed=str(tmp_path / "nope.json")))
    with pytest.raises(ConfigError, match="deepspeed: DeepSpeed config file not found"):
        build_deepspeed_config(bad)


# --------------------------------------------------------------------------- validation


@pytest.fixture(scope="module")
def mixes(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("mixes")
    tok = smollm2_tokenizer
    return {
        "pretrain": write_pretrain_mix(root / "pre", tok, pattern_documents(60), seq_len=32),
        "sft": write_sft_mix(root / "sft", tok, [(q, a) for q, a, _ in arithmetic_pairs(8)]),
        "preference": write_preference_mix(root / "pref", tok, arithmetic_pairs(8)),
    }


def _pretrain_cfg(tmp_path, model, data, **kw) -> PretrainConfig:
    return load_config(
        PretrainConfig,
        data={"model": str(model), "data": str(data), "out": str(tmp_path / "o"),
              "steps": 2, "seq_len": 32, **kw},
    )  # fmt: skip


def test_validation_fails_before_any_worker_with_the_field_named(
    tmp_path, tiny_llama_dir, mixes, smollm2_tokenizer
):
    import ray

    from solar_ray.train.dpo import validate_dpo
    from solar_ray.train.pretrain import validate_pretrain
    from solar_ray.train.sft import validate_sft

    cases = [
        (dict(model=tmp_path / "missing"), r"^model: "),
        (dict(data=tmp_path / "missing"), r"^data: prepared mix not found"),
        (dict(data=mixes["sft"]), r"^data: .* is a 'sft' mix; this stage needs a 'pretrain' mix"),
        (dict(seq_len=48), r"^seq_len: 48 does not match the packed rows"),
        (dict(seq_len=1024), r"^seq_len: 1024 exceeds the model's max_position_embeddings"),
    ]
    for overrides, pattern in cases:
        kw = {"model": tiny_llama_dir, "data": mixes["pretrain"], **overrides}
        cfg = _pretrain_cfg(tmp_path, kw.pop("model"), kw.pop("data"), **kw)
        with pytest.raises((ConfigError, DataError), match=pattern):
            validate_pretrain(cfg)

    # a tokenizer with more tokens than the model's embedding rows
    small = tmp_path / "small_vocab"
    small.mkdir()
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config["vocab_size"] = 1000
    for f in tiny_llama_dir.iterdir():
        (small / f.name).write_bytes(f.read_bytes())
    (small / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"^model: the tokenizer has 49152 tokens .* is 1000"):
        validate_pretrain(_pretrain_cfg(tmp_path, small, mixes["pretrain"]))

    # no tokenizer files next to the weights
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_llama_dir.iterdir():
        if f.suffix == ".safetensors" or f.name == "config.json":
            (bare / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ConfigError, match=r"^model: .* has no tokenizer files"):
        validate_pretrain(_pretrain_cfg(tmp_path, bare, mixes["pretrain"]))

    sft = load_config(SFTConfig, data={"model": str(tiny_llama_dir), "data": str(mixes["preference"]),
                                       "out": str(tmp_path / "s"), "steps": 1, "seq_len": 64})  # fmt: skip
    with pytest.raises(DataError, match="'preference' mix; this stage needs a 'sft' mix"):
        validate_sft(sft)
    dpo = load_config(DPOConfig, data={"model": str(tiny_llama_dir), "data": str(mixes["preference"]),
                                       "out": str(tmp_path / "d"), "steps": 1, "seq_len": 64,
                                       "ref_model": str(small)})  # fmt: skip
    with pytest.raises(ConfigError, match=r"^ref_model: the tokenizer has"):
        validate_dpo(dpo)
    assert not ray.is_initialized()  # nothing above started Ray


def test_a_run_file_that_cannot_be_read_is_an_error_not_a_new_run(tmp_path):
    """The run file guards a run's checkpoints: absent or broken JSON is "no run yet", but a
    storage error must not be, or the run would be started over with another config."""
    from solar_ray.fs import StorageError
    from solar_ray.train.common import RUN_FILE, _read_run_file

    storage = str(tmp_path / "ray_train")
    assert _read_run_file(storage, "r") is None
    (tmp_path / "ray_train" / "r").mkdir(parents=True)
    (tmp_path / "ray_train" / "r" / RUN_FILE).write_text('{"fingerprint": "f"}')
    assert _read_run_file(storage + "/", "r") == {"fingerprint": "f"}
    (tmp_path / "ray_train" / "r" / RUN_FILE).write_text("{broken")
    assert _read_run_file(storage, "r") is None
    (tmp_path / "ray_train" / "r" / RUN_FILE).unlink()
    # a directory in its place: opening it fails, as an unreadable file or bucket does
    (tmp_path / "ray_train" / "r" / RUN_FILE).mkdir()
    with pytest.raises(StorageError, match=f"cannot read .*{RUN_FILE}"):
        _read_run_file(storage, "r")


# --------------------------------------------------------------------------- data order


def test_packed_batches_same_rows_for_any_world_size_and_resume():
    from solar_ray.train.pretrain import PackedBatches

    ids = np.arange(42 * 4).reshape(42, 4)  # 42 rows: no world size or batch divides it
    pos = np.zeros_like(ids)

    def take(world, micro, n, start=0, global_batch=4):
        its = [
            PackedBatches(ids, pos, rank=r, world_size=world, micro_batch_size=micro,
                          global_batch_size=global_batch, seed=3).iterate(start_step=start)
            for r in range(world)
        ]  # fmt: skip
        accum = -(-global_batch // (micro * world))
        steps = []
        for _ in range(n):
            rows = []
            for it in its:
                for _ in range(accum):
                    batch, _, weights = next(it)
                    rows += (batch[:, 0][weights > 0] // 4).tolist()
            steps.append(sorted(rows))
        return steps

    one = take(1, 4, 25)  # 25 steps of 4 rows cross two epoch boundaries mid-step
    assert take(2, 2, 25) == one  # 2 workers x 2 rows: the same rows in every step
    assert take(4, 1, 25) == one
    assert take(1, 1, 25) == one  # 1 worker accumulating 4 micro-batches
    assert take(3, 1, 25) == one  # 3 workers: 2 micro-batches of which 2 slots are filler
    assert take(3, 2, 25) == one
    # an elastic run: 2 workers for 7 steps, then 1 from step 7, then 3 from step 16
    resized = take(2, 1, 7) + take(1, 2, 9, start=7) + take(3, 1, 9, start=16)
    assert resized == one
    # the stream is whole epochs, each every row once, with nothing dropped at an epoch's
    # end: 21 steps of 4 rows are two epochs of 42, every row twice
    counts = np.bincount([r for s in one[:21] for r in s], minlength=42)
    assert counts.tolist() == [2] * 42
    assert one[:10] != one[10:20]  # a new order per epoch


def test_packed_batches_rows_of_step_match_what_it_yields():
    from solar_ray.data.contract import DataError
    from solar_ray.train.pretrain import PackedBatches

    ids = np.arange(10 * 2).reshape(10, 2)
    packed = PackedBatches(ids, ids, rank=1, world_size=2, micro_batch_size=2,
                           global_batch_size=10, seed=0)  # fmt: skip
    assert packed.grad_accum_steps == 3  # 12 slots for 10 rows
    it = packed.iterate(start_step=4)
    for step in (4, 5):
        rows, weights = packed.rows_of_step(step)
        assert weights.ravel().tolist() == [1, 1, 1, 1, 1, 0]  # offset 11 is past the batch
        for micro in rows:
            assert (next(it)[0][:, 0] // 2).tolist() == sorted(micro.tolist())
    with pytest.raises(DataError, match="^data: the mix has no training rows"):
        PackedBatches(ids[:0], ids[:0], rank=0, world_size=1, micro_batch_size=1,
                      global_batch_size=1, seed=0)  # fmt: skip


def test_elastic_worker_range_keeps_the_global_batch():
    from solar_ray.train.config import DPOConfig, PretrainConfig

    base = {"model": "m", "data": "d", "out": "/tmp/o", "steps": 4}
    cfg = PretrainConfig(**base, num_workers=[1, 4], micro_batch_size=1, global_batch_size=12)
    assert cfg.elastic and (cfg.min_workers, cfg.max_workers) == (1, 4)
    assert [cfg.grad_accum_for(w) for w in (1, 2, 3, 4)] == [12, 6, 4, 3]
    cfg = PretrainConfig(**base, num_workers=[1, 3], micro_batch_size=2, global_batch_size=8)
    assert [cfg.grad_accum_for(w) for w in (1, 2, 3)] == [4, 2, 2]  # 3: 12 slots, 4 filler
    assert cfg.effective_global_batch_size == 8
    # the worker count is not part of what the run computes; the global batch is
    fixed = PretrainConfig(**base, num_workers=2, micro_batch_size=2, global_batch_size=8)
    assert fixed.result_fingerprint() == cfg.result_fingerprint()
    other = PretrainConfig(**base, num_workers=2, micro_batch_size=2, global_batch_size=4)
    assert other.result_fingerprint() != cfg.result_fingerprint()
    assert PretrainConfig(**base, num_workers=[3, 3]).num_workers == 3  # not a range
    bad = [
        ({"num_workers": [2, 1]}, r"num_workers\n.*the range \[2, 1\] needs 1 <= min <= max"),
        ({"num_workers": [1, 2, 3]}, r"num_workers\n.*\[min, max\] range of two counts"),
        ({"num_workers": 3, "global_batch_size": 4},
         r"global_batch_size: 4 is not divisible by micro_batch_size x num_workers = 1 x 3 = 3"),
        ({"num_workers": [1, 2], "streaming": True}, r"streaming: an elastic run reads"),
    ]  # fmt: skip
    for extra, message in bad:
        with pytest.raises(ValueError, match=message):
            PretrainConfig(**base, **extra)
    with pytest.raises(ValueError, match=r"num_workers: an elastic range is supported by pretrain only; dpo"):
        DPOConfig(**base, num_workers=[1, 2])


def test_held_out_mask_is_content_based_and_deterministic():
    rows = [[i, i + 1, i + 2] for i in range(2000)]
    a = held_out_mask(pa.array(rows, type=pa.list_(pa.int32())), 0.1)
    b = held_out_mask(pa.chunked_array([pa.array(rows[:700], type=pa.list_(pa.int64())),
                                        pa.array(rows[700:], type=pa.list_(pa.int64()))]), 0.1)  # fmt: skip
    assert (a == b).all()  # independent of chunking and integer width
    assert 0.07 < a.mean() < 0.13
    assert not held_out_mask(pa.array(rows, type=pa.list_(pa.int32())), 0.0).any()


# --------------------------------------------------------------------------- export


def test_export_round_trip_sharded_tied_and_probe(tmp_path, tiny_llama_dir, smollm2_tokenizer):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from solar_ray.train.export import export_hf_model, probe_model

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():  # make it differ from the saved weights
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = tmp_path / "export"
    export_hf_model(model, out, tokenizer=smollm2_tokenizer, dtype="float32",
                    max_shard_bytes=1 << 20)  # fmt: skip
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and "lm_head.weight" not in index["weight_map"]  # tied: written once
    names = set()
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            names.update(f.keys())
    assert names == set(index["weight_map"])
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.float32
    assert probe_model(loaded, smollm2_tokenizer) == probe_model(model, smollm2_tokenizer)

    bf16 = tmp_path / "bf16"
    export_hf_model(model, bf16, tokenizer=smollm2_tokenizer, dtype="bfloat16")
    reloaded = AutoModelForCausalLM.from_pretrained(bf16)
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    w = reloaded.state_dict()["model.layers.0.mlp.down_proj.weight"]
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, model.state_dict()["model.layers.0.mlp.down_proj.weight"].bfloat16())


# --------------------------------------------------------------------------- cli, recipes


def test_cli_reports_a_bad_config_on_one_line(tmp_path, capsys):
    from solar_ray.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\ndata: d\nout: o\nsteps: 5\nmicro_batch_size: 3\nnum_workers: 2\n"
                      "global_batch_size: 8\n")  # fmt: skip
    assert main(["pretrain", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "global_batch_size: 8 is not divisible" in err[0]


@pytest.mark.parametrize("family", ["demo", "solar-10.7b"])
def test_train_recipes_in_jobs_chain_their_inputs(family):
    """Each family's recipes fit together: every training stage reads a mix of its kind that
    ``jobs/data-<family>.yaml`` writes, SFT starts from the pretrain output, and the
    hardware is the one the family promises (demo: CPU; SOLAR 10.7B: GPUs, bf16, 4K context).
    """
    from solar_ray.data.config import DataConfig

    jobs = REPO / "jobs"
    data = load_config(DataConfig, jobs / f"data-{family}.yaml")
    mixes = {f"{data.out.rstrip('/')}/{m.name}": m.kind for m in data.mixes}
    stages = {
        "pretrain": load_config(PretrainConfig, jobs / f"pretrain-{family}.yaml"),
        "sft": load_config(SFTConfig, jobs / f"sft-{family}.yaml"),
        "dpo": load_config(DPOConfig, jobs / f"dpo-{family}.yaml"),
    }
    needs = {"pretrain": "pretrain", "sft": "sft", "dpo": "preference"}
    for kind, cfg in stages.items():
        assert mixes.get(cfg.data) == needs[kind], f"{kind}-{family}.yaml: data {cfg.data} not in {mixes}"
        assert cfg.use_gpu is (family != "demo"), f"{kind}-{family}.yaml"
        if family != "demo":
            assert cfg.precision_resolved == "bf16" and cfg.zero_stage == 3
    assert stages["sft"].model == stages["pretrain"].out
    if family != "demo":
        assert stages["pretrain"].seq_len == stages["sft"].seq_len == 4096


# --------------------------------------------------------------------------- metrics


def test_mfu_estimate_and_throughput_summary():
    from types import SimpleNamespace

    from solar_ray.train.metrics import Throughput, flops_per_token, mfu

    config = SimpleNamespace(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                             vocab_size=32000, head_dim=None)  # fmt: skip
    per_token = flops_per_token(config, 7_000_000_000, seq_len=4096)
    # worked by hand (PaLM appendix B): 6 x (7e9 - 32000 x 4096 embedding) = 41,213,568,000
    # plus attention 12 x 32 layers x 32 heads x 128 head dim x 4096 tokens = 6,442,450,944
    assert per_token == 47_656_018_944
    # 3000 tokens/s on one H100 (989 TFLOP/s dense bf16): 1.4297e14 / 9.89e14
    assert mfu(3000.0, per_token, 989e12) == pytest.approx(0.144558, abs=1e-6)
    assert mfu(3000.0, per_token, None) is None and mfu(0.0, per_token, 989e12) is None
    # head_dim given explicitly (Gemma-style, not hidden / heads = 16): 6 x (10,000 - 100 x 64)
    # = 21,600, attention 12 x 2 layers x 4 heads x 32 x 8 tokens = 24,576
    small = SimpleNamespace(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=100, head_dim=32)  # fmt: skip
    assert flops_per_token(small, 10_000, seq_len=8) == 21_600 + 24_576

    timer = Throughput()
    for seconds, tokens, steps in [(5.0, 100, 1), (1.0, 100, 2), (2.0, 100, 2), (1.0, 100, 2)]:
        timer.intervals.append((seconds, tokens, steps))
    summary = timer.summary()  # the first (warm-up) interval is left out
    assert summary == {"tokens_per_s_per_worker": 100.0, "step_time_s": 0.5}


@pytest.mark.parametrize(
    ("device_name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),  # datasheet: 1,671 TFLOP/s with sparsity
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA GeForce RTX 4090", None),  # not in the table: no MFU rather than a wrong one
    ],
)
def test_device_peak_flops_by_device_name(monkeypatch, device_name, peak):
    import torch

    from solar_ray.train.metrics import device_peak_flops

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: device_name)
    assert device_peak_flops() == peak
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_peak_flops() is None  # MFU is not reported on CPU


@pytest.mark.gpu
def test_device_peak_flops_of_this_gpu():
    """The GPUs this project runs on report an MFU: their name is in the peak table."""
    import torch

    from solar_ray.train.metrics import device_peak_flops

    name = torch.cuda.get_device_name()
    peak = device_peak_flops()
    assert peak is not None and peak >= 100e12, f"{name!r}: add its dense bf16 peak to PEAK_BF16_FLOPS"


def test_metric_reports_are_coalesced_so_ray_train_never_blocks_the_loop():
    from solar_ray.train.session import ReportCoalescer

    now = [0.0]
    seen: list[float] = []

    def agree(elapsed: float) -> float:  # the ranks' maximum; here one rank
        seen.append(elapsed)
        return elapsed

    rc = ReportCoalescer(min_interval_s=2.0, clock=lambda: now[0], agree=agree)
    assert rc.offer({"step": 1, "loss": 5.0}) == {"step": 1, "loss": 5.0}  # the first goes out
    now[0] = 0.9
    assert rc.offer({"step": 2, "loss": 4.0, "lr": 1e-3}) is None  # held: 0.9 s < 2 s
    now[0] = 1.8
    assert rc.offer({"step": 3, "loss": 3.0}) is None
    assert seen == [0.9, 1.8]  # decided on the agreed elapsed time
    now[0] = 2.1
    # due again: the latest values, with the keys only held-back reports had
    assert rc.offer({"step": 4, "loss": 2.5}) == {"step": 4, "loss": 2.5, "lr": 1e-3}
    now[0] = 2.5
    assert rc.offer({"step": 5, "loss": 2.4}) is None
    # held-out metrics are compared at their step: they go out at once, with the held ones
    assert rc.offer({"step": 6, "eval_loss": 2.2}) == {"step": 6, "loss": 2.4, "eval_loss": 2.2}
    now[0] = 2.6
    assert rc.offer({"step": 7, "loss": 2.3}) is None
    # so does a checkpoint (the last report of a run is one: nothing stays behind)
    assert rc.offer({"step": 8, "final": 1}, checkpoint=True) == {
        "step": 8,
        "loss": 2.3,
        "final": 1,
    }
    # a rank whose own clock says "not yet" follows the agreed maximum
    rc = ReportCoalescer(min_interval_s=2.0, clock=lambda: now[0], agree=lambda e: e + 5.0)
    assert rc.offer({"step": 1}) is not None and rc.offer({"step": 2}) == {"step": 2}


def test_checkpoint_at_steps_besides_every_n():
    from types import SimpleNamespace

    from solar_ray.train.hf import SaveAtSteps

    cb = SaveAtSteps([2, 4])
    saves = []
    for step in range(1, 9):
        control = SimpleNamespace(should_save=False)
        cb.on_step_end(None, SimpleNamespace(global_step=step, max_steps=8), control)
        saves.append(control.should_save)
    assert [s for s, saved in zip(range(1, 9), saves, strict=True) if saved] == [2, 4]
    cfg = PretrainConfig(model="m", data="d", out="o", steps=8, checkpoint_at=[2, 4])
    plain = PretrainConfig(model="m", data="d", out="o", steps=8)
    assert cfg.result_fingerprint() == plain.result_fingerprint()  # operational
    with pytest.raises(ValueError, match="checkpoint_at"):
        PretrainConfig(model="m", data="d", out="o", steps=8, checkpoint_at=[0])


# --------------------------------------------------------------------------- attention kernels


def test_attention_kernels_compute_the_same_logits(tmp_path, tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(0))
    logits = {}
    for kernel in ("sdpa", "eager"):
        cfg = load_config(SFTConfig, data=_base(tmp_path, attn_implementation=kernel))
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, **cfg.model_kwargs()).eval()
        assert model.config._attn_implementation == kernel
        with torch.no_grad():
            logits[kernel] = model(input_ids=ids).logits
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-5, atol=1e-5)


def test_flash_attention_is_refused_on_cpu_and_without_flash_attn(tmp_path, capsys):
    from solar_ray.cli import main
    from solar_ray.errors import MissingDependencyError
    from solar_ray.train.common import validate_common

    with pytest.raises(ConfigError, match="attn_implementation: flash_attention_2 runs on CUDA"):
        load_config(PretrainConfig, data=_base(tmp_path, attn_implementation="flash_attention_2"))
    code = main(["pretrain", "--model", "m", "--data", "d", "--out", str(tmp_path / "o"),
                 "--steps", "1", "--attn-implementation", "flash_attention_2"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "attn_implementation" in err
    gpu = load_config(
        PretrainConfig, data=_base(tmp_path, attn_implementation="flash_attention_2", use_gpu=True)
    )
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(MissingDependencyError, match=r"solar-ray\[flash\]"):
            validate_common(gpu, data_kind="pretrain")

        with pytest.raises(MissingDependencyError, match=r"solar-ray\[flash\]"):
            validate_common(gpu, data_kind="pretrain")


@pytest.mark.parametrize("case", ["labels", "shift_labels", "a row all masked"])
def test_full_logits_head_matches_trls_chunked_kernel(tiny_llama_dir, case):
    """``lm_head: full`` gives TRL's trainers the same log-probs, metrics, loss and
    gradients as TRL's chunked LM-head kernel, from the model's logits at the scored
    positions (labels to shift, pre-shifted labels, a micro-batch row with no label)."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from solar_ray.train.hf import add_full_logits_head

    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    chunked = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    full = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    add_fused_lm_head(chunked, outputs=outputs)
    add_full_logits_head(full, outputs)
    torch.manual_seed(0)
    ids = torch.randint(0, chunked.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt
    labels[1, 9:] = -100  # padding
    if case == "a row all masked":
        labels[1] = -100
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    given = {"labels": labels}
    if case == "shift_labels":  # as TRL passes them under context parallelism
        given = {"shift_labels": torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)}
    got = {}
    for name, model in (("chunked", chunked), ("full", full)):
        out = model(input_ids=ids, attention_mask=mask, **given, fused_lm_head=True)
        out.loss.backward()
        got[name] = (
            out,
            model.model.layers[0].mlp.up_proj.weight.grad.clone(),
            model.lm_head.weight.grad.clone(),
        )
    (a, grad_a, head_a), (b, grad_b, head_b) = got["chunked"], got["full"]
    for field in (*outputs, "label_mask", "loss"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.shape == y.shape, field
        if x.dtype == torch.bool:
            assert torch.equal(x, y), field
        else:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=field)
    assert not torch.equal(grad_b, torch.zeros_like(grad_b))
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head_a, head_b, rtol=1e-4, atol=1e-6)
    # without fused_lm_head the model's own forward is unchanged (generation, evaluation)
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    torch.testing.assert_close(
        full(input_ids=ids, labels=ids).loss, plain(input_ids=ids, labels=ids).loss
    )
