"""Evaluation: the offline suite scores for real and deterministically, H6 is the
leaderboard's, perplexity is the model's loss, results come out in the paper's layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from solar_ray.config import ConfigError, load_config
from solar_ray.evalsets import OFFLINE_TASKS, item_texts, offline_items, suite_fingerprint
from solar_ray.evaluate import (
    H6_TASKS,
    EvalConfig,
    EvalError,
    _windows,
    check_tasks,
    evaluate_lm,
    iter_texts,
    perplexity,
    plan_tasks,
    results_table,
    run_eval,
    token_logprobs,
)

# --------------------------------------------------------------------------- offline suite


class _Oracle:
    """An lm-eval LM that knows (or, ``wrong=True``, avoids) every answer of the offline suite.

    It reads the answer from the request's document, so a perfect score checks the task
    configs end to end: choice order, labels, mc2, Winogrande's partial scoring and the
    GSM8K answer extraction.
    """

    def __new__(cls, wrong: bool = False):
        from lm_eval.api.model import LM

        class Oracle(LM):
            def loglikelihood(self, requests, disable_tqdm: bool = False):
                out = []
                for r in requests:
                    doc, i = r.doc, r.idx
                    if "labels" in doc:  # mc2: true answers are likely
                        good = doc["labels"][i] == 1
                    elif "answer" in doc and "option1" in doc:  # winogrande: context i
                        good = i == int(doc["answer"]) - 1
                    else:
                        good = i == doc["label"]
                    out.append((0.0 if good != wrong else -20.0, good))
                return out

            def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
                return [0.0 for _ in requests]

            def generate_until(self, requests, disable_tqdm: bool = False):
                return [
                    f"Some steps.\n#### {r.doc['number'] + (1 if wrong else 0)}" for r in requests
                ]

        return Oracle()


def test_offline_tasks_score_an_oracle_perfectly_and_an_anti_oracle_zero():
    specs = plan_tasks(EvalConfig(models=["x"], suite="offline"))
    assert [s.name for s in specs] == list(OFFLINE_TASKS)
    right = evaluate_lm(_Oracle(), specs, limit=12)
    wrong = evaluate_lm(_Oracle(wrong=True), specs, limit=12)
    for name in OFFLINE_TASKS:
        assert right[name]["num_items"] == 12
        assert right[name]["score"] == pytest.approx(1.0), name
        assert wrong[name]["score"] == pytest.approx(0.0, abs=1e-6), name
    assert right["solar_arith"]["metrics"]["exact_match,strict-match"] == 1.0


def test_offline_items_are_deterministic_and_well_formed():
    fp = suite_fingerprint()
    assert fp == suite_fingerprint()
    for name in OFFLINE_TASKS:
        splits = offline_items(name)
        assert len(splits["test"]) >= 20, name
        assert len(splits["train"]) >= OFFLINE_TASKS[name].num_fewshot, name
        ids = [d["id"] for d in splits["test"]]
        assert len(set(ids)) == len(ids)
        for doc in splits["test"]:
            if "choices" in doc and "label" in doc:
                assert len(set(doc["choices"])) == len(doc["choices"]), doc
        assert all(t for _, t in item_texts(name))
    # the answer position is not a constant (shuffled choices)
    assert len({d["label"] for d in offline_items("solar_sci")["test"]}) == 4
    for doc in offline_items("solar_arith")["test"]:
        assert doc["answer"].endswith(f"#### {doc['number']}")


def test_offline_suite_scores_a_tiny_model_deterministically(tiny_llama_dir: Path, tmp_path):
    from solar_ray.cli import main

    texts = tmp_path / "heldout.jsonl"
    texts.write_text(
        "\n".join(json.dumps({"text": f"Held-out sentence number {i} about layers and merges."}) for i in range(5))
    )
    out = tmp_path / "eval"
    rc = main(
        ["eval", "--models", f"tiny={tiny_llama_dir}", "--limit", "2", "--ppl-data", str(texts),
         "--out", str(out), "--set", "hash_models=false"]
    )  # fmt: skip
    assert rc == 0
    first = json.loads((out / "results.json").read_text())
    second = run_eval(
        EvalConfig(models=[{"name": "tiny", "path": str(tiny_llama_dir)}], limit=2, ppl_data=str(texts), hash_models=False)
    )
    (m1,), (m2,) = first["models"], second["models"]
    assert set(m1["scores"]) == set(OFFLINE_TASKS)
    assert m1["scores"] == m2["scores"]
    assert m1["ppl"] == m2["ppl"]
    assert math.isfinite(m1["ppl"]) and m1["ppl"] > 1
    assert m1["average"] == pytest.approx(sum(m1["scores"].values()) / len(OFFLINE_TASKS))
    assert all(0.0 <= v <= 1.0 for v in m1["scores"].values())
    assert m1["num_items"] == {name: 2 for name in OFFLINE_TASKS}
    assert m1["name"] == "tiny" and "stage" in m1
    assert first["suite_fingerprint"] == suite_fingerprint()
    table = (out / "results.md").read_text()
    assert table.splitlines()[0].startswith("| Model | Avg | Sci (ARC) |")
    assert table.splitlines()[2].startswith("| tiny |")
    assert (out / "solar.json").is_file()


# --------------------------------------------------------------------------- H6


def test_h6_preset_is_the_open_llm_leaderboard():
    specs = {s.name: (s.num_fewshot, s.metric) for s in plan_tasks(EvalConfig(models=["x"], suite="h6"))}
    assert specs == {
        "arc_challenge": (25, "acc_norm,none"),
        "hellaswag": (10, "acc_norm,none"),
        "mmlu": (5, "acc,none"),
        "truthfulqa_mc2": (0, "acc,none"),
        "winogrande": (5, "acc,none"),
        "gsm8k": (5, "exact_match,strict-match"),
    }
    assert [s.display for s in H6_TASKS] == ["ARC", "HellaSwag", "MMLU", "TruthfulQA", "Winogrande", "GSM8K"]


def test_h6_tasks_exist_in_lm_eval_and_fail_clearly_offline(tmp_path, monkeypatch):
    from solar_ray.evaluate import _task_manager

    specs = plan_tasks(EvalConfig(models=["x"], suite="h6"))
    tm = _task_manager(specs)
    assert {s.name for s in specs} <= set(tm.all_tasks)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EvalError, match="Hugging Face hub.*suite: offline"):
        check_tasks(specs, tm)
    # run_eval stops before it touches the (nonexistent) model
    with pytest.raises(EvalError, match="hub"):
        run_eval(EvalConfig(models=[str(tmp_path / "no-such-model")], suite="h6"))


def test_h6_dry_run(capsys):
    from solar_ray.cli import main

    assert main(["eval", "--models", "smollm2-135m", "--suite", "h6", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "arc_challenge" in out and "25-shot" in out and "exact_match,strict-match" in out


# --------------------------------------------------------------------------- perplexity


def test_windows_score_every_token_once_with_context():
    for num_tokens in (1, 2, 5, 16, 17, 40, 101):
        for seq_len, stride in ((16, 8), (16, 16), (8, 3), (4, 10)):
            scored = []
            for begin, end, first in _windows(num_tokens, seq_len, stride):
                assert end - begin <= seq_len and begin < first <= end
                scored += list(range(first, end))
            assert scored == list(range(1, num_tokens)), (num_tokens, seq_len, stride)


def test_perplexity_is_the_model_loss(tiny_llama_dir: Path, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = smollm2_tokenizer
    texts = ["The merged model keeps the tokenizer of its parents.", "Short one.", "x"]
    result = perplexity(model, tok, texts, seq_len=64, batch_size=2)
    nll, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"]])
            if ids.shape[1] < 2:
                continue
            loss = model(ids, labels=ids).loss
            nll += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert result["num_tokens"] == count
    assert result["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    # sliding windows: same tokens scored; the first window's scores do not change
    long = " ".join(f"word{i}" for i in range(60))
    full = token_logprobs(model, tok, [long], seq_len=512)[0]
    windowed = token_logprobs(model, tok, [long], seq_len=32, stride=16)[0]
    assert full.shape == windowed.shape
    torch.testing.assert_close(full[:31], windowed[:31], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(full[40:], windowed[40:])  # less context later on
    # disjoint blocks (stride = window): every token still scored once, with less context
    blocks = perplexity(model, tok, [long], seq_len=32, stride=32)
    halves = perplexity(model, tok, [long], seq_len=32)
    assert blocks["num_tokens"] == halves["num_tokens"] == full.numel()
    assert blocks["ppl"] != halves["ppl"]


# --------------------------------------------------------------------------- data and config


def test_iter_texts_reads_every_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    plain = tmp_path / "plain"
    (plain / "rejects").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["plain text"]}), plain / "a.parquet")
    pq.write_table(
        pa.table({"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]}),
        plain / "b.parquet",
    )
    pq.write_table(pa.table({"prompt": ["q?"], "chosen": ["good"], "rejected": ["bad"]}), plain / "c.parquet")
    pq.write_table(pa.table({"text": ["a rejected row"]}), plain / "rejects" / "a.parquet")
    (plain / "d.jsonl").write_text(json.dumps({"instruction": "Add", "input": "1 and 2", "output": "3"}) + "\n")
    texts = [t for _, t in iter_texts(plain)]
    assert texts == ["plain text", "hi\nhello", "q?\ngood", "Add\n1 and 2\n3"]
    # a data mix: only its data split, found from the directory or the manifest
    mix = tmp_path / "mix"
    for split in ("data", "packed"):
        (mix / split).mkdir(parents=True)
    pq.write_table(pa.table({"text": ["doc one", "doc two"]}), mix / "data" / "part-000000000000.parquet")
    pq.write_table(pa.table({"input_ids": [[1, 2]]}), mix / "packed" / "part-000000000000.parquet")
    (mix / "manifest.json").write_text(json.dumps({"splits": {"data": 2, "packed": 1}}))
    assert [t for _, t in iter_texts(mix)] == ["doc one", "doc two"]
    assert [t for _, t in iter_texts(mix / "manifest.json")] == ["doc one", "doc two"]
    txt = tmp_path / "a.txt"
    txt.write_text("para one\nstill one\n\npara two\n")
    assert [t for _, t in iter_texts(txt)] == ["para one\nstill one", "para two"]
    with pytest.raises(EvalError, match="not found"):
        list(iter_texts(tmp_path / "missing.jsonl"))
    pq.write_table(pa.table({"input_ids": [[1, 2]]}), tmp_path / "tok.parquet")
    with pytest.raises(EvalError, match="no text column"):
        list(iter_texts(tmp_path / "tok.parquet"))


def test_config_errors_name_the_field():
    cfg = EvalConfig(models=["base=/m/a", "/m/b"])
    assert [(m.name, m.path) for m in cfg.models] == [("base", "/m/a"), ("b", "/m/b")]
    with pytest.raises(ConfigError, match="names must be unique"):
        load_config(EvalConfig, data={"models": ["a=/x", "a=/y"]})
    with pytest.raises(ConfigError, match="suite"):
        load_config(EvalConfig, data={"models": ["/x"], "suite": "h7"})
    with pytest.raises(EvalError, match="not tasks of this suite"):
        plan_tasks(EvalConfig(models=["/x"], num_fewshot={"arc": 3}))
    with pytest.raises(EvalError, match="few-shot examples"):
        plan_tasks(EvalConfig(models=["/x"], num_fewshot={"solar_sci": 50}))
    custom = plan_tasks(EvalConfig(models=["/x"], suite=["solar_arith", {"task": "arc_easy", "num_fewshot": 2}]))
    assert [(s.name, s.num_fewshot, s.metric) for s in custom] == [
        ("solar_arith", 2, "exact_match,flexible-extract"),
        ("arc_easy", 2, None),
    ]


def test_results_table_layout():
    results = {
        "suite": "h6",
        "limit": None,
        "tasks": [{"name": s.name, "display": s.display, "metric": s.metric, "num_fewshot": s.num_fewshot} for s in H6_TASKS],
        "models": [
            {"name": "SOLAR", "scores": {s.name: 0.5 for s in H6_TASKS}, "average": 0.5, "ppl": 3.21},
            {"name": "base", "scores": {}, "average": None, "ppl": None},
        ],
    }
    lines = results_table(results).splitlines()
    assert lines[0] == "| Model | Avg | ARC | HellaSwag | MMLU | TruthfulQA | Winogrande | GSM8K | PPL |"
    assert lines[2] == "| SOLAR | 50.00 | 50.00 | 50.00 | 50.00 | 50.00 | 50.00 | 50.00 | 3.21 |"
    assert lines[3].startswith("| base | – |")
