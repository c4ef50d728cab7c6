"""LoRA in the TRL stages: adapters train, and the output is a merged full model that differs
from its base only in the adapted modules (in-process runs, ``local: true``, tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from stage_io import arithmetic_mixes, export_matches_probe, model_weights

from solar_ray.config import ConfigError, load_config
from solar_ray.identity import content_hash
from solar_ray.train.config import DPOConfig, SFTConfig

pytestmark = pytest.mark.slow

ADAPTED = ("q_proj", "v_proj")


def _assert_only_adapted_modules_changed(out: Path, base: Path) -> None:
    merged, original = model_weights(out), model_weights(base)
    assert set(merged) == set(original)  # the base's names: no adapter weights left
    changed = {name for name in merged if not merged[name].equal(original[name])}
    adapted = {n for n in original if any(f"{m}.weight" in n for m in ADAPTED)}
    assert changed == adapted, sorted(changed ^ adapted)[:5]


def _losses(result) -> list[float]:
    return [loss for _, loss in result.metrics["loss_history"]]


@pytest.fixture(scope="module")
def mixes(tmp_path_factory, smollm2_tokenizer) -> dict[str, Path]:
    return arithmetic_mixes(tmp_path_factory.mktemp("lora"), smollm2_tokenizer)


def _peft(**kw) -> dict:
    return {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": list(ADAPTED), **kw}


def test_sft_lora_trains_and_merges_into_the_base(mixes, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from solar_ray.train.sft import run_sft

    cfg = SFTConfig(
        model=str(tiny_llama_dir), data=str(mixes["sft"]), out=str(mixes["root"] / "sft_out"),
        local=True, num_workers=1, zero_stage=3, steps=16, micro_batch_size=4, seq_len=128,
        lr=1e-2, log_every=4, checkpoint_every=100, peft=_peft(keep_adapter=True),
    )  # fmt: skip
    result = run_sft(cfg)
    losses = _losses(result)
    # rank-8 adapters on q/v of a random model cannot move its tied output head: the loss
    # falls steadily but slowly (10.61 -> 10.44 in 16 steps)
    assert len(losses) == 4 and losses == sorted(losses, reverse=True), losses
    assert losses[-1] < losses[0] - 0.1, losses
    _assert_only_adapted_modules_changed(result.out, tiny_llama_dir)
    # the one model format: loads unchanged, and computes what the trained adapters did
    model = AutoModelForCausalLM.from_pretrained(result.out)
    assert not hasattr(model, "peft_config")
    adapter = json.loads((result.out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and sorted(adapter["target_modules"]) == sorted(ADAPTED)
    assert "LoRA adapters (r=8" in (result.out / "README.md").read_text()
    assert export_matches_probe(result.out) == []
    # lineage: the base model's content hash, hashed while the run trained, then the data
    parents = json.loads((result.out / "solar.json").read_text())["parents"]
    assert [p["role"] for p in parents] == ["model", "data"]
    assert parents[0]["kind"] == "model" and parents[0]["source"] == str(tiny_llama_dir)
    assert parents[0]["sha256"] == content_hash(tiny_llama_dir)


def test_dpo_lora_uses_the_adapter_free_policy_as_reference(mixes, tiny_llama_dir):
    from solar_ray.train.dpo import run_dpo

    cfg = DPOConfig(
        model=str(tiny_llama_dir), data=str(mixes["pref"]), out=str(mixes["root"] / "dpo_out"),
        local=True, num_workers=1, zero_stage=2, steps=12, micro_batch_size=4, seq_len=128,
        lr=1e-2, beta=0.5, log_every=1, checkpoint_every=100, peft=_peft(),
    )  # fmt: skip
    result = run_dpo(cfg)
    losses = _losses(result)
    # the reference is the starting policy (adapters off, LoRA's B starts at zero): log(2)
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    _assert_only_adapted_modules_changed(result.out, tiny_llama_dir)
    assert not (result.out / "adapter").exists()


def test_lora_settings_are_checked_when_loaded(tmp_path):
    base = {"model": "m", "data": "d", "out": str(tmp_path / "o"), "steps": 1}
    with pytest.raises(ConfigError, match="peft.load_in_4bit: a 4-bit"):
        load_config(SFTConfig, data=base | {"peft": {"load_in_4bit": True}})
    with pytest.raises(ConfigError, match="peft.target_modules"):
        load_config(DPOConfig, data=base | {"peft": {"target_modules": []}})
    with pytest.raises(ConfigError, match="peft.rank: unknown field"):
        load_config(SFTConfig, data=base | {"peft": {"rank": 8}})
    cfg = load_config(SFTConfig, data=base, overrides=["peft.r=4"])
    assert cfg.peft is not None and cfg.peft.r == 4 and cfg.peft.target_modules == "all-linear"
