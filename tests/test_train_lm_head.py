"""``lm_head: full`` through the real TRL trainers: SFT and DPO (with a live reference, which
the stage re-patches too) train the same as with TRL's chunked kernel (in-process runs,
``local: true``, tiny models, 2 micro-batches a step). The kernel-level equivalence is in
tests/test_train_unit.py; these catch the re-patched forward training differently inside the
real trainers: the positions it scores under TRL's label shifting, DPO's concatenated
chosen/rejected batch, the live reference, accumulation over micro-batches. TRL 1.16 takes the
loss from the per-token log-probs, so the output's own ``loss`` is not exercised here."""

from __future__ import annotations

from pathlib import Path

import pytest
from stage_io import arithmetic_mixes, model_weights

from solar_ray.train.config import DPOConfig, SFTConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mixes(tmp_path_factory, smollm2_tokenizer) -> dict[str, Path]:
    return arithmetic_mixes(tmp_path_factory.mktemp("lm-head"), smollm2_tokenizer)


def _run(stage: str, head: str, mixes: dict[str, Path], model: Path):
    common = dict(
        model=str(model), out=str(mixes["root"] / f"{stage}-{head}"), local=True,
        num_workers=1, zero_stage=2, steps=4, micro_batch_size=4, global_batch_size=8,
        seq_len=128, log_every=1, checkpoint_every=100, lm_head=head,
    )  # fmt: skip
    if stage == "sft":
        from solar_ray.train.sft import run_sft

        return run_sft(SFTConfig(**common, data=str(mixes["sft"]), lr=1e-2))
    from solar_ray.train.dpo import run_dpo

    # a live reference (a second copy of the start model), re-patched by lm_head: full too
    return run_dpo(DPOConfig(**common, data=str(mixes["pref"]), ref_model=str(model), lr=1e-3,
                             beta=0.1))  # fmt: skip


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_full_lm_head_trains_like_trls_chunked_kernel(stage, mixes, tiny_llama_dir):
    runs = {head: _run(stage, head, mixes, tiny_llama_dir) for head in ("chunked", "full")}
    losses = {h: [loss for _, loss in r.metrics["loss_history"]] for h, r in runs.items()}
    assert len(losses["full"]) == 4, losses
    # the same losses step by step (fp32 sums in another order: not bitwise)...
    assert losses["full"] == pytest.approx(losses["chunked"], rel=1e-4, abs=1e-5), losses
    # ...that moved (the run trained), and the same trained weights
    assert losses["full"][-1] != pytest.approx(losses["full"][0], abs=1e-3), losses
    a, b = model_weights(runs["chunked"].out), model_weights(runs["full"].out)
    assert set(a) == set(b)
    start = model_weights(tiny_llama_dir)
    # Adam divides each gradient by its running scale, so a 1e-7 difference in a small
    # gradient shows in the update: allow 2% of how far each tensor moved (a wrong gradient,
    # e.g. a position scored that should not be, moves it by its whole step)
    for name in a:
        moved = (a[name].float() - start[name].float()).abs().max().item()
        diff = (a[name].float() - b[name].float()).abs().max().item()
        assert diff <= 2e-2 * moved + 1e-7, (name, diff, moved)
