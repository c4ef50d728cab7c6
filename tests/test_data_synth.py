"""Synthetic math with the real embedded rephraser (SmolLM2-135M on CPU), a handful of seeds."""

from __future__ import annotations

from pathlib import Path

import data_fixtures as fx
import pytest

from solar_ray.config import validate
from solar_ray.data.config import SynthMathConfig
from solar_ray.data.synth_math import answers_match, build_synth_math, extract_final_answer


@pytest.mark.slow
def test_synth_math_real_model_rows_and_planted_mismatch(ray_local, tmp_path: Path) -> None:
    planted = fx.write_jsonl(
        tmp_path / "seeds.jsonl",
        # the recorded final answer disagrees with the worked answer: no rewrite can match it
        [
            {
                "question": "Sue has 4 pens and loses 1. How many pens does Sue have?",
                "answer": "4 - 1 = 3\n#### 3",
                "final_answer": "99991",
            }
        ],
    )
    cfg = validate(
        SynthMathConfig,
        {
            "seeds": {"generate": 3, "seed": 0, "files": [str(planted)]},
            "rephraser": {"model": "smollm2-135m", "max_new_tokens": 48, "batch_size": 4},
        },
    )
    res = build_synth_math(cfg)
    assert res.manifest["backend"] == "transformers" and res.num_seeds == 4
    rejects = res.rejects.to_pylist()
    assert res.num_kept + len(rejects) == 4 == res.manifest["num_rephrased"]
    assert res.num_kept >= 1  # greedy decoding keeps some of the generated seeds
    assert sum(res.dropped.values()) == len(rejects)
    planted_rows = [r for r in rejects if r["seed_id"].startswith(str(planted))]
    assert len(planted_rows) == 1 and planted_rows[0]["reason"] == "answer_mismatch"
    assert (
        planted_rows[0]["detail"].endswith("expected '99991'")
        and planted_rows[0]["rephrased_answer"]
    )
    seeds = {s.seed_id: s for s in res.seeds}
    for inst, align in zip(res.instruct.to_pylist(), res.alignment.to_pylist(), strict=True):
        seed = seeds[inst["seed_id"]]
        user, assistant = inst["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert user["content"].strip() and assistant["content"].strip()
        assert answers_match(extract_final_answer(assistant["content"]), seed.final_answer)
        assert (align["prompt"], align["chosen"], align["rejected"]) == (
            user["content"],
            assistant["content"],
            seed.answer,
        )
