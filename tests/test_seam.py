"""Zero-training seam predictors, budgets in tokens/FLOPs, errors and ranks: no Ray.

The predictors are checked on a planted model whose hidden states are known by construction
(identity layers around one layer that changes its input); budgets against numbers worked
out by hand from the tiny Llama's shapes; the sweep analysis on curves written by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from solar_ray.stats import interpolate_rows, paired_difference, ratio_estimate, spearman

# --------------------------------------------------------------------------- seam


@pytest.fixture(scope="module")
def planted_model():
    """A 6-layer Llama whose layers are the identity except layer 4, which is strong.

    Zeroing a layer's ``o_proj`` and ``down_proj`` makes it add nothing to the residual
    stream, so the hidden states are ``h[0] = ... = h[4] = e`` (the embeddings) and
    ``h[5] = h[6] = e + f(e)``: every seam and every block influence is known up to ``f``.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        # a final norm that turns vectors (transformers' last hidden state is after it; the
        # seam needs the raw output of the last layer)
        model.model.norm.weight.copy_(torch.linspace(0.1, 3.0, 32))
        for i, layer in enumerate(model.model.layers):
            if i == 4:
                layer.mlp.down_proj.weight.mul_(20.0)
            else:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    return model


def _planted_scores(model):
    from solar_ray.seam import score_model

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, size=(6, 16))
    pos = np.broadcast_to(np.arange(16), ids.shape).copy()
    return {s.m: s for s in score_model(model, ids, pos, ms=range(6), batch_size=4)}


def test_seam_predictors_on_a_planted_model(planted_model):
    scores = _planted_scores(planted_model)
    angular = {m: s.seam_angular for m, s in scores.items()}
    bi = {m: s.seam_bi for m, s in scores.items()}
    # the seam compares h[m] with h[6 - m]: equal (distance 0) when both are the embeddings
    # or the same state; e against e + f(e) otherwise (m = 0 needs the last layer's raw
    # output, before the final norm: it must equal m = 1's, which does not use it)
    for m in (2, 3, 4):
        assert angular[m] == pytest.approx(0.0, abs=1e-6)
    assert angular[0] > 0.05
    assert angular[0] == pytest.approx(angular[1], rel=1e-9) == pytest.approx(angular[5], rel=1e-9)
    # DUS drops layers 6-m..5 of copy A and 0..m-1 of copy B; only layer 4 has influence
    bi4 = bi[2]
    assert bi4 > 0.01
    assert bi[0] == pytest.approx(0.0, abs=1e-9) and bi[1] == pytest.approx(0.0, abs=1e-9)
    assert bi[3] == pytest.approx(bi4, rel=1e-9) and bi[4] == pytest.approx(bi4, rel=1e-9)
    assert bi[5] == pytest.approx(2 * bi4, rel=1e-9)  # layer 4 is missing from both copies
    assert all(s.num_sequences == 6 and s.num_layers == 2 * (6 - s.m) for s in scores.values())
    assert scores[0].seam_angular_se > 0 and scores[3].seam_angular_se == pytest.approx(0, abs=1e-6)


def test_removed_layers_and_the_default_m_range():
    from solar_ray.seam import SeamError, removed_layers, upscaling_m_values

    # SOLAR 10.7B: 32 layers, m = 8: copy A keeps 0..23 (drops 24..31), copy B keeps 8..31
    assert removed_layers(32, 8) == (tuple(range(24, 32)), tuple(range(8)))
    assert removed_layers(4, 0) == ((), ())
    # every m whose model is deeper than the base: 2(n - m) > n
    assert upscaling_m_values(30) == list(range(15))
    assert upscaling_m_values(5) == [0, 1, 2]
    with pytest.raises(SeamError, match="m: 6 must be in 0..5"):
        removed_layers(6, 6)


def test_score_plans_command_prints_every_m(tmp_path, tiny_llama_dir, capsys):
    import json

    from solar_ray.cli import main

    text = tmp_path / "held.jsonl"
    docs = [f"The value of item {i} is {i * 7} and it is stored in a list." * 4 for i in range(8)]
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "scores.json"
    argv = ["score-plans", "--source", str(tiny_llama_dir), "--data", str(text),
            "--num-sequences", "4", "--seq-len", "32", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["0", "1"]
    saved = json.loads(out.read_text())
    assert [s["m"] for s in saved["scores"]] == [0, 1] and saved["scores"][0]["num_sequences"] == 4
    # a bad m is one line and exit 2
    assert main(["score-plans", "--source", str(tiny_llama_dir), "--m", "9"]) == 2
    assert "m: 9 must be in 0..3" in capsys.readouterr().err


# --------------------------------------------------------------------------- stats


def test_errors_are_over_rows_and_paired_differences_share_them():
    # three rows of one token each: the mean and SE of 2, 4, 6 (std 2 over sqrt 3)
    est = ratio_estimate([2.0, 4.0, 6.0], [1.0, 1.0, 1.0])
    assert (est.value, est.n) == (4.0, 3) and est.se == pytest.approx(2 / math.sqrt(3))
    # unequal rows: token-weighted mean (2 + 4) / (1 + 3) = 1.5
    assert ratio_estimate([2.0, 4.0], [1.0, 3.0]).value == pytest.approx(1.5)
    # a paired difference: per-row differences 1, 0.5, 1 over 2 tokens each = 0.5, .25, .5
    diff = paired_difference([10.0, 12.0, 14.0], [9.0, 11.5, 13.0], [2.0, 2.0, 2.0])
    assert diff.value == pytest.approx(2.5 / 6)
    assert diff.se == pytest.approx(np.std([0.5, 0.25, 0.5], ddof=1) / math.sqrt(3))
    # far smaller than the two losses' own SEs (the spread between rows is shared)
    assert diff.se < ratio_estimate([10.0, 12.0, 14.0], [2.0, 2.0, 2.0]).se / 5
    assert diff.within_noise() is False and ratio_estimate([1, -1], [1, 1]).within_noise()
    rows = interpolate_rows([(0.0, np.array([4.0, 2.0])), (10.0, np.array([2.0, 1.0]))], 2.5)
    assert rows.tolist() == pytest.approx([3.5, 1.75])
    assert interpolate_rows([(0.0, np.array([1.0]))], 1.0) is None  # never extrapolated


def test_spearman_on_known_rankings():
    same = spearman([1, 2, 3, 4, 5], [10, 20, 30, 40, 50])
    assert same.rho == pytest.approx(1.0) and same.exact
    # exact: 2 of the 120 orderings are as extreme (the identity and its reverse)
    assert same.p_value == pytest.approx(2 / 120)
    assert spearman([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]).rho == pytest.approx(-1.0)
    # two adjacent swaps: sum of d^2 = 4, rho = 1 - 6 * 4 / (5 * 24) = 0.8; as extreme in
    # 8 orderings each way (sum d^2 <= 4: 1 + 4 single swaps + 3 double swaps): p = 16/120
    two = spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    assert two.rho == pytest.approx(0.8) and two.p_value == pytest.approx(16 / 120)
    assert math.isnan(spearman([1, 2, 3], [7, 7, 7]).rho)  # a constant side
    assert math.isnan(spearman([1, 2], [1, 2]).rho)  # too few pairs


# --------------------------------------------------------------------------- budgets


#: one layer of the tiny Llama (hidden 64, MLP 128, 4 heads of 16, 2 KV heads): q 64x64,
#: k and v 64x32, o 64x64, gate/up/down 64x128 each, two norms of 64
LAYER_PARAMS = 4096 + 2048 + 2048 + 4096 + 3 * 8192 + 2 * 64
#: training FLOPs per token at seq_len 64 with L layers: 6 x (L layers + final norm) +
#: 12 x L x 4 heads x 16 x 64 tokens (the tied embedding is not counted)
FPT = {L: 6 * (L * LAYER_PARAMS + 64) + 12 * L * 4 * 16 * 64 for L in (2, 4, 6, 8)}


def test_model_stats_of_a_planned_upscale_by_hand(tiny_llama_dir):
    from solar_ray.tune.trial import model_stats

    assert LAYER_PARAMS == 36992 and FPT[6] == 1_627_008 and FPT[4] == 1_084_800
    vocab = 49152 * 64
    for m, layers in ((0, 8), (1, 6), (2, 4)):
        stats = model_stats(tiny_llama_dir, 64, {"method": "solar", "m": m})
        assert stats == {
            "num_layers": layers,
            "num_params": vocab + layers * LAYER_PARAMS + 64,
            "flops_per_token": FPT[layers],
        }
    assert model_stats(tiny_llama_dir, 64) == model_stats(tiny_llama_dir, 64, {"method": "solar", "m": 2})


def test_budgets_convert_to_steps_by_hand():
    from solar_ray.config import ConfigError
    from solar_ray.tune.budget import rung_steps, steps_within, trial_budget
    from solar_ray.tune.config import BudgetConfig

    flops = BudgetConfig(flops=2.0e9)
    # 2 rows x 64 tokens = 128 tokens a step; 2e9 / (128 x FLOPs per token), whole steps
    assert steps_within(flops, 128, FPT[6]) == 9  # 2e9 / 208,257,024 = 9.60
    assert steps_within(flops, 128, FPT[4]) == 14  # 2e9 / 138,854,400 = 14.40
    assert steps_within(flops, 128, FPT[2]) == 28  # 2e9 / 69,451,776 = 28.80
    assert steps_within(BudgetConfig(tokens=1000), 128, FPT[6]) == 7  # 1000 / 128 = 7.8
    assert steps_within(BudgetConfig(tokens=1280), 128, FPT[6]) == 10  # exactly 10, not 9
    with pytest.raises(ConfigError, match="budget.flops: 1e\\+08 is less than one training step"):
        steps_within(BudgetConfig(flops=1e8), 128, FPT[6])
    # rungs at 5e8 and 1e9 FLOPs, reports every 2 steps: 5e8 / 208,257,024 = 2.4 -> step 3,
    # the first report at or past it is step 4; 1e9 -> 4.8 -> step 6
    assert rung_steps([5e8, 1e9], 128 * FPT[6], 2, 9) == (4, 6)
    assert rung_steps([5e8, 1e9], 128 * FPT[6], 2, 6) == (4,)  # never at the last step
    b = trial_budget(flops, {"flops_per_token": FPT[6], "num_layers": 6, "num_params": 1},
                     128, milestones=[5e8, 1e9], eval_every=2)  # fmt: skip
    assert (b.steps, b.tokens, b.rung_steps) == (9, 9 * 128, (4, 6))
    assert b.flops == 9 * 128 * FPT[6] <= 2.0e9


def test_budget_recipe_mistakes_name_the_field():
    from solar_ray.tune.config import SweepConfig

    base = {
        "name": "t", "base": "b", "search": {"m": [1, 2]},
        "train": {"kind": "pretrain", "data": "/d", "val_data": "/v", "eval_every": 2,
                  "log_every": 2},
        "budget": {"flops": 1e12},
        "scheduler": {"kind": "sha", "grace_period_fraction": 0.25, "reduction_factor": 2},
    }  # fmt: skip
    cfg = SweepConfig.model_validate(base)
    assert cfg.rungs() == [250_000_000_000, 500_000_000_000] and cfg.time_attr == "flops"
    cases = [
        ({"budget": {"flops": 1e12, "tokens": 5}}, "exactly one of 'tokens' or 'flops'"),
        ({"train": {**base["train"], "steps": 8}}, r"train\.steps: the budget sets"),
        ({"scheduler": {"kind": "sha"}}, "scheduler.grace_period_fraction"),
        ({"baseline": False}, "baseline: the base model .* always runs"),
    ]
    for over, match in cases:
        with pytest.raises(ValueError, match=match):
            SweepConfig.model_validate({**base, **over})


# --------------------------------------------------------------------------- analysis


def _point(tokens, fpt, losses, step):
    """A curve point: 4 held-out rows of 10 tokens with the given per-row mean losses."""
    nll = [10.0 * x for x in losses]
    return {
        "step": float(step), "tokens_seen": float(tokens), "flops": float(tokens * fpt),
        "eval_loss": float(np.mean(losses)), "eval_row_nll": nll, "eval_row_tokens": [10.0] * 4,
    }  # fmt: skip


def _row(trial, curve, status="done", reference=False, m=None):
    return {"trial": trial, "label": trial, "method": "none" if reference else "solar", "m": m,
            "reference": reference, "status": status, "stopped_early": status == "stopped",
            "curve": curve}  # fmt: skip


def test_sweep_analysis_on_hand_written_curves():
    from solar_ray.tune.analysis import analyse

    spread = np.array([-0.1, 0.1, -0.05, 0.05])  # the same rows are easier/harder for all
    base = _row("base", [_point(t, 10, y + spread, s) for s, t, y in
                         ((0, 0, 3.0), (1, 100, 2.8), (2, 200, 2.6))], reference=True)  # fmt: skip
    # A: twice the FLOPs per token, 100 tokens in its budget; comes back to the base model's
    # starting loss (3.0) between 50 and 100 tokens: 50 + 50 * (3.2 - 3.0) / (3.2 - 2.9)
    a = _row("a", [_point(t, 20, y + spread, s) for s, t, y in
                   ((0, 0, 4.0), (1, 50, 3.2), (2, 100, 2.9))], m=1)  # fmt: skip
    # B: never gets back to 3.0; C: stopped early, but starts below the base
    b = _row("b", [_point(t, 20, y + spread, s) for s, t, y in
                   ((0, 0, 4.0), (1, 50, 3.6), (2, 100, 3.4))], m=2)  # fmt: skip
    c = _row("c", [_point(t, 20, y + spread, s) for s, t, y in ((0, 0, 2.95), (1, 50, 2.7))],
             status="stopped", m=3)  # fmt: skip
    seam = {"scores": [{"m": 1, "seam_angular": 0.2, "seam_bi": 1.0},
                       {"m": 2, "seam_angular": 0.3, "seam_bi": 2.0},
                       {"m": 3, "seam_angular": 0.1, "seam_bi": 3.0}]}  # fmt: skip
    rows = [a, b, c, base]
    summary = analyse(rows, seam=seam)
    # equal tokens: the fewest any finisher reached (A, B: 100); equal FLOPs: 2000 for all
    assert summary["equal_tokens"] == 100 and summary["equal_flops"] == 2000
    assert summary["base_start"]["value"] == pytest.approx(3.0) and summary["base_start"]["n"] == 4
    assert base["loss_eq_tokens"] == pytest.approx(2.8) and a["loss_eq_tokens"] == pytest.approx(2.9)
    assert base["loss_eq_flops"] == pytest.approx(2.6) and a["loss_eq_flops"] == pytest.approx(2.9)
    # gain over base at 2000 FLOPs: 2.6 - 2.9, paired: every row differs by exactly 0.3
    assert a["gain"] == pytest.approx(-0.3) and a["gain_se"] == pytest.approx(0.0, abs=1e-12)
    assert a["gain_tokens"] == pytest.approx(-0.1) and a["gain_within_noise"] is False
    assert a["recover_tokens"] == pytest.approx(50 + 50 * 0.2 / 0.3)
    assert a["recover_flops"] == pytest.approx(20 * (50 + 50 * 0.2 / 0.3))
    assert b["recover"] == "not within budget" and b["recover_tokens"] is None
    # C stopped at 1000 FLOPs: compared with the base at 1000 FLOPs (tokens 100: 2.8)
    assert c["gain_at_flops"] == 1000 and c["gain"] == pytest.approx(2.8 - 2.7)
    assert c["recover_tokens"] == 0 and c["loss_eq_flops"] is None
    # every searched trial reached 1000 FLOPs: the predictors' outcome is the loss there
    assert summary["all_trials_flops"] == 1000
    assert [r["loss_all"] for r in (a, b, c)] == pytest.approx([3.2, 3.6, 2.7])
    # loss order c < a < b; seam_bi order a < b < c (rho -0.5), angular c < a < b (rho 1)
    assert summary["predictors"]["seam_angular"]["rho"] == pytest.approx(1.0)
    assert summary["predictors"]["seam_bi"]["rho"] == pytest.approx(-0.5)
    assert summary["predictors"]["seam_bi"]["n"] == 3 and base["gain"] is None


# --------------------------------------------------------------------------- seam: details


def test_packed_rows_are_scored_as_their_documents_alone(planted_model):
    """The predictors' forward over a packed row (positions restarting per document) gives
    each document the hidden states it has alone: no attention across documents."""
    import torch

    from solar_ray.seam import _layer_states

    model = planted_model
    with torch.no_grad():  # every layer active, so attention across documents would show
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.normal_(0, 0.2)
            layer.mlp.down_proj.weight.normal_(0, 0.2)
    try:
        rng = np.random.default_rng(1)
        doc_a, doc_b = rng.integers(0, 64, size=5), rng.integers(0, 64, size=7)
        ids = torch.as_tensor(np.concatenate([doc_a, doc_b]))[None]
        pos = torch.as_tensor(np.concatenate([np.arange(5), np.arange(7)]))[None]
        packed = _layer_states(model, ids, pos)
        alone_a = _layer_states(model, torch.as_tensor(doc_a)[None], torch.arange(5)[None])
        alone_b = _layer_states(model, torch.as_tensor(doc_b)[None], torch.arange(7)[None])
        assert len(packed) == 7
        for h, a, b in zip(packed, alone_a, alone_b, strict=True):
            torch.testing.assert_close(h[0, :5], a[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(h[0, 5:], b[0], atol=1e-5, rtol=0)
    finally:  # the module-scoped planted model back as it was
        with torch.no_grad():
            for i, layer in enumerate(model.model.layers):
                if i != 4:
                    layer.self_attn.o_proj.weight.zero_()
                    layer.mlp.down_proj.weight.zero_()


def test_predictors_skip_each_documents_first_token_and_err_over_rows(monkeypatch):
    """Hand-made hidden states of a 2-layer model: h[0] = h[1] = (1, 0) everywhere, h[2]
    at angle theta per token, so seam_angular(m=0) = theta/pi and seam_bi(m=1) = 1 - cos
    theta per scored token; the first token of each document (position 0) is not scored."""
    import torch
    from transformers import LlamaConfig

    from solar_ray import seam

    pi = math.pi
    thetas = [
        [pi, pi / 2, pi, 0.0, pi / 3],  # two documents: positions 0 1 2 0 1
        [pi, 0.0, pi / 2, pi / 2, 2 * pi / 3],
        [0.0, pi, pi, pi, pi],
    ]
    positions = [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    theta = torch.tensor(thetas, dtype=torch.float64)
    flat = torch.stack([torch.ones_like(theta), torch.zeros_like(theta)], dim=-1)
    turned = torch.stack([torch.cos(theta), torch.sin(theta)], dim=-1)

    class Fake(torch.nn.Linear):
        config = LlamaConfig(num_hidden_layers=2)

    def states(_model, input_ids, _positions):
        rows = input_ids[:, 0]
        return [flat[rows], flat[rows], turned[rows]]

    monkeypatch.setattr(seam, "_layer_states", states)
    ids = np.repeat(np.arange(3)[:, None], 5, axis=1)
    scores = {s.m: s for s in seam.score_model(Fake(1, 1), ids, np.array(positions), ms=[0, 1], batch_size=2)}
    # per row, scored tokens only: angular 11/18, 5/12, 1; 1 - cos: 7/6, 7/8, 2
    assert scores[0].seam_angular == pytest.approx(73 / 108, abs=1e-12)
    assert scores[0].seam_angular_se == pytest.approx(7 * math.sqrt(7) / 108, abs=1e-12)
    assert scores[1].seam_bi == pytest.approx(97 / 72, abs=1e-12)
    assert scores[1].seam_bi_se == pytest.approx(math.sqrt(589) / 72, abs=1e-12)
    assert scores[1].seam_angular == pytest.approx(0.0, abs=1e-12) and scores[0].seam_bi == 0.0
    assert scores[0].num_sequences == 3 and scores[1].removed_a == (1,) and scores[1].removed_b == (0,)


def _held_out_jsonl(tmp_path):
    import json

    text = tmp_path / "held.jsonl"
    docs = [f"The value of item {i} is {i * 7} and it is stored in a list." * 4 for i in range(8)]
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return text


def _tree(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_score_plans_out_is_checked_before_any_work(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    import json
    import shutil

    from solar_ray import seam
    from solar_ray.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    data = _held_out_jsonl(tmp_path)
    before = _tree(model)
    user_file = tmp_path / "notes.json"
    user_file.write_text('{"mine": 1}\n')
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "elsewhere.json")
    base = ["score-plans", "--source", str(model), "--data", str(data), "--num-sequences", "2",
            "--seq-len", "16"]  # fmt: skip

    def refused(out, *extra):
        rc = main([*base, "--out", str(out), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "out: " in err[0], (out, rc, err)
        return err[0]

    monkeypatch.setattr(seam, "load_model", lambda *a: pytest.fail("loaded the model anyway"))
    assert "lies inside the input" in refused(model / "config.json", "--overwrite")
    assert "lies inside the input" in refused(model / "scores.json")
    assert "exists" in refused(user_file)
    assert "not a score-plans output" in refused(user_file, "--overwrite")
    assert "symbolic link" in refused(link)
    assert "local path" in refused("s3://bucket/scores.json")
    assert "is a directory" in refused(tmp_path)
    assert _tree(model) == before and user_file.read_text() == '{"mine": 1}\n'
    assert not (tmp_path / "elsewhere.json").exists()
    monkeypatch.undo()
    # its own output is replaced with --overwrite, and only then
    out = tmp_path / "out" / "scores.json"
    assert main([*base, "--out", str(out)]) == 0
    capsys.readouterr()
    assert json.loads(out.read_text())["format"] == "solar-ray-scores/1"
    assert "exists" in refused(out)
    assert main([*base, "--out", str(out), "--overwrite"]) == 0


def _errors(capsys) -> list[str]:
    """stderr without transformers' weight-loading progress bar."""
    return [line for line in capsys.readouterr().err.strip().splitlines() if "Loading weights" not in line]


def test_score_plans_bad_inputs_are_one_line(tmp_path, tiny_llama_dir, capsys):
    import shutil

    from solar_ray.cli import main

    binary = tmp_path / "held.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    rc = main(["score-plans", "--source", str(tiny_llama_dir), "--data", str(binary)])
    err = _errors(capsys)
    assert rc == 2 and len(err) == 1 and "not UTF-8 text" in err[0], err
    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    for f in tiny_llama_dir.iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, bare / f.name)
    rc = main(["score-plans", "--source", str(bare), "--data", str(_held_out_jsonl(tmp_path))])
    err = _errors(capsys)
    assert rc == 2 and len(err) == 1 and "has no tokenizer" in err[0], err


def test_sweep_seam_scores_use_the_trials_own_held_out_rows(tmp_path, tiny_llama_dir, smollm2_tokenizer):
    """The sweep's seam task scores the rows the trials hold out (``val_fraction`` of the
    mix, or ``val_data``), else the offline held-out documents in rows of 128 tokens."""
    from dataclasses import asdict

    from stage_io import offline_prose, write_pretrain_mix

    from solar_ray.data.contract import held_out_rows, ids_and_positions, open_mix
    from solar_ray.evaluate import load_model
    from solar_ray.seam import heldout_rows, score_model, seam_scores

    mix = write_pretrain_mix(tmp_path / "mix", smollm2_tokenizer, offline_prose(12), seq_len=32)
    table = open_mix(str(mix), "pretrain", "data").read(["input_ids", "position_ids"])
    held = table.filter(held_out_rows(table, 0.25))
    assert 3 <= held.num_rows < table.num_rows
    model, tokenizer, _ = load_model(str(tiny_llama_dir))

    def want(ids_pos):
        return [asdict(s) for s in score_model(model, *ids_pos, [1])]

    got = seam_scores(str(tiny_llama_dir), [1], {"seq_len": 32, "data": str(mix), "val_fraction": 0.25}, "pretrain", 3)
    assert (got["num_sequences"], got["tokens_per_sequence"]) == (3, 32)
    assert got["scores"] == want(ids_and_positions(held.slice(0, 3), 32))
    assert got["scores"] != want(ids_and_positions(table.slice(0, 3), 32))  # not the training rows
    got = seam_scores(str(tiny_llama_dir), [1], {"seq_len": 32, "data": "unused", "val_data": str(mix)}, "pretrain", 2)
    assert got["scores"] == want(ids_and_positions(table.slice(0, 2), 32)) and got["num_sequences"] == 2
    got = seam_scores(str(tiny_llama_dir), [1], {}, "sft", 2)
    assert (got["num_sequences"], got["tokens_per_sequence"]) == (2, 128)
    assert got["scores"] == want(heldout_rows(None, tokenizer, 2, 128)) and "offline" in got["held_out"]
    assert got["source"] == str(tiny_llama_dir)



class _WordTokenizer:
    """One id per word (its length + 10); a BOS (1) only when special tokens are asked for."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        ids = [len(w) + 10 for w in text.split()]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_heldout_rows_from_text_files_a_prepared_mix_and_the_offline_documents(tmp_path, smollm2_tokenizer):
    import json

    from stage_io import offline_prose, write_pretrain_mix

    from solar_ray.corpora import python_docs_documents
    from solar_ray.seam import SeamError, heldout_rows

    tok = _WordTokenizer()
    docs = tmp_path / "held.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a bb ccc", "dddd e"]))
    # by hand: documents joined with EOS only, positions restarting per document, cut into
    # rows of 3: [a bb ccc EOS dddd e EOS] -> 7 tokens, 2 full rows (the last token dropped)
    ids, pos = heldout_rows(str(docs), tok, 5, 3)
    assert ids.tolist() == [[11, 12, 13], [2, 14, 11]] and pos.tolist() == [[0, 1, 2], [3, 0, 1]]
    text = tmp_path / "held.txt"  # a text file: a document per blank-line-separated paragraph
    text.write_text("a bb ccc\ndddd e\n\nff")
    ids, pos = heldout_rows(str(text), tok, 5, 4)
    assert ids.tolist() == [[11, 12, 13, 14], [11, 2, 12, 2]] and pos.tolist() == [[0, 1, 2, 3], [4, 5, 0, 1]]
    # a prepared mix: its first rows as they are packed (their own width, not seq_len)
    mix = write_pretrain_mix(tmp_path / "mix", smollm2_tokenizer, offline_prose(8), seq_len=32)
    from solar_ray.data.contract import open_mix

    table = open_mix(str(mix), "pretrain", "data").read(["input_ids", "position_ids"])
    ids, pos = heldout_rows(str(mix), tok, 3, 999)
    assert ids.tolist() == table.column("input_ids").to_pylist()[:3]
    assert pos.tolist() == table.column("position_ids").to_pylist()[:3]
    # no data: the corpus stage's held-out python-docs documents, first one first
    first = next(t for _, t in python_docs_documents("heldout")).split()
    assert len(first) >= 8
    ids, _ = heldout_rows(None, tok, 2, 4)
    assert ids.tolist() == [[len(w) + 10 for w in first[:4]], [len(w) + 10 for w in first[4:8]]]
    with pytest.raises(SeamError, match=r"^data: \S*nope\.txt is neither a prepared mix nor a text file$"):
        heldout_rows(str(tmp_path / "nope.txt"), tok, 2, 4)


def test_score_table_ranks_each_predictor_from_one():
    from solar_ray.seam import PlanScore, format_scores

    scores = [
        PlanScore(2, 12, 0.30, 0.01, 0.10, 0.02, 7, (5, 6), (0, 1)),
        PlanScore(1, 14, 0.20, 0.01, 0.40, 0.02, 7, (6,), (0,)),
        PlanScore(3, 10, 0.25, 0.01, 0.05, 0.02, 7, (4, 5, 6), (0, 1, 2)),
    ]
    assert format_scores(scores).splitlines() == [
        "| m | layers | seam angular distance (± SE, n=7) | rank | block influence removed (± SE) | rank |",
        "|---|---|---|---|---|---|",
        "| 2 | 12 | 0.3000 ± 0.0100 | 3 | 0.1000 ± 0.0200 | 2 |",
        "| 1 | 14 | 0.2000 ± 0.0100 | 1 | 0.4000 ± 0.0200 | 3 |",
        "| 3 | 10 | 0.2500 ± 0.0100 | 2 | 0.0500 ± 0.0200 | 1 |",
    ]
    assert format_scores([]).splitlines()[0].startswith("| m | layers | seam angular distance (± SE, n=0)")


def test_scores_out_refuses_unreadable_files_and_places_nothing_can_be_written(tmp_path):
    from solar_ray.checkpoint import OutputWriteError, UnsafeOutputError
    from solar_ray.seam import check_scores_out

    garbage = tmp_path / "scores.json"
    garbage.write_bytes(b"\xff not json")  # neither JSON nor UTF-8: not ours, kept
    with pytest.raises(UnsafeOutputError, match=r"not a score-plans output.*--overwrite replaces only what solar-ray wrote"):
        check_scores_out(str(garbage), True, [])
    assert garbage.read_bytes() == b"\xff not json"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, parent in [(a_file / "s.json", a_file), ("/proc/sys/s.json", "/proc/sys"),
                        ("/proc/sys/new/dir/s.json", "/proc/sys")]:  # fmt: skip
        with pytest.raises(OutputWriteError, match=rf"^out: cannot write under {parent}$"):
            check_scores_out(str(out), False, [])
