"""A sweep's FLOPs budget for architectures whose attention width is not ``hidden_size``:
Qwen3 and Gemma set ``head_dim`` apart from ``hidden_size / num_attention_heads``. The
numbers below are worked out by hand from each tiny model's shapes."""

from __future__ import annotations

import pytest
from conftest import save_tiny_model

from solar_ray.tune.budget import trial_budget
from solar_ray.tune.config import BudgetConfig
from solar_ray.tune.trial import model_stats

SEQ_LEN = 256
#: hidden 64, 4 heads of head_dim 32 (not 64 / 4 = 16), MLP 96, vocab 128, 2 layers, tied
SHAPE = dict(hidden_size=64, num_attention_heads=4, head_dim=32, intermediate_size=96,
             vocab_size=128, num_hidden_layers=2, tie_word_embeddings=True)  # fmt: skip

# Qwen3, per layer: q 64x128 = 8192, k and v 64x(2x32) = 4096 each, o 128x64 = 8192,
# q_norm and k_norm 32 each, MLP 3 x 64x96 = 18432, two RMSNorms 64 each:
#   8192 + 4096 + 4096 + 8192 + 32 + 32 + 18432 + 64 + 64 = 43200; two layers 86400.
# Embedding 128x64 = 8192 (tied: counted once), final norm 64: 94656 parameters,
# 94656 - 8192 = 86464 of them not the embedding.
# FLOPs per token = 6 x 86464 + 12 x layers 2 x heads 4 x head_dim 32 x seq_len 256
#                 = 518784 + 786432 = 1305216
QWEN3 = (94656, 1305216.0)
# Gemma, one KV head: q 8192, k and v 64x32 = 2048 each, o 8192, MLP 18432, norms 64 + 64:
#   8192 + 2048 + 2048 + 8192 + 18432 + 128 = 39040; two layers 78080; + 8192 + 64 = 86336
#   parameters, 78144 not the embedding; 6 x 78144 + 786432 = 468864 + 786432 = 1255296
GEMMA = (86336, 1255296.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import GemmaConfig, Qwen3Config

    root = tmp_path_factory.mktemp("flops")
    return {
        "qwen3": save_tiny_model(Qwen3Config(**SHAPE, num_key_value_heads=2), root / "qwen3"),
        "gemma": save_tiny_model(GemmaConfig(**SHAPE, num_key_value_heads=1), root / "gemma"),
    }


@pytest.mark.parametrize(("arch", "expected"), [("qwen3", QWEN3), ("gemma", GEMMA)])
def test_flops_per_token_use_the_models_head_dim(models, arch, expected):
    num_params, flops_per_token = expected
    stats = model_stats(models[arch], SEQ_LEN)
    assert stats["num_layers"] == 2
    assert stats["num_params"] == num_params
    assert stats["flops_per_token"] == flops_per_token


@pytest.mark.parametrize(("arch", "expected"), [("qwen3", QWEN3), ("gemma", GEMMA)])
def test_a_flops_budget_gives_the_whole_steps_that_fit(models, arch, expected):
    """8 sequences of 256 tokens a step: 2048 tokens. Qwen3: 2048 x 1305216 = 2673082368
    FLOPs a step; a budget of 10.5 steps' FLOPs is 10 whole steps, 20480 tokens."""
    _, fpt = expected
    per_step = 2048 * fpt
    stats = model_stats(models[arch], SEQ_LEN)
    budget = trial_budget(BudgetConfig(flops=10.5 * per_step), stats, tokens_per_step=2048,
                          milestones=[2.5 * per_step, 5 * per_step], eval_every=2)  # fmt: skip
    assert budget.steps == 10 and budget.tokens == 20480
    assert budget.flops == 10 * per_step
    # rungs: the first report (every 2 steps) at or past 2.5 and 5 steps' FLOPs: 4 and 6
    assert budget.rung_steps == (4, 6)
    # exactly 10 steps' FLOPs is still 10 steps (float rounding does not cost one)
    assert trial_budget(BudgetConfig(flops=10 * per_step), stats, 2048).steps == 10
    assert trial_budget(BudgetConfig(tokens=20479), stats, 2048).steps == 9
