"""Contamination: Min-K% Prob flags an item the model was trained on; n-gram overlap finds
exactly the evaluation items planted in a training mix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from solar_ray.config import ConfigError, load_config
from solar_ray.contamination import (
    ContaminationConfig,
    load_eval_sets,
    min_k_prob,
    ngram_overlap,
    run_contamination,
    train_rows,
)
from solar_ray.data.decontam import EvalIndex, build_eval_index, words
from solar_ray.evalsets import item_texts

EVAL_TEXTS = [
    "The lighthouse keeper counted forty seven ships passing the northern cape that stormy night.",
    "A copper kettle whistled while the baker folded cinnamon into the second batch of dough.",
    "Seven violet kites drifted over the harbor as the fishermen mended their torn green nets.",
    "The museum guide explained how ancient potters fired clay jars in pits dug near the river.",
    "Orbiting satellites relay weather maps that farmers check before planting barley each spring.",
    "Two chess players argued for an hour about whether the rook sacrifice had been sound.",
    "The violinist tuned her instrument backstage while the orchestra rehearsed a quiet waltz.",
    "Glaciers carve deep valleys over thousands of years, leaving lakes and polished granite walls.",
    "A volunteer crew repaired the village bridge with oak planks donated by the sawmill owner.",
    "Moths gathered around the porch lamp as the grandmother told stories about the old mill.",
]
PLANTED = 4


def test_min_k_prob_is_the_mean_of_the_lowest_k_percent():
    lp = torch.tensor([-1.0, -5.0, -0.5, -3.0, -2.0, -0.1, -0.2, -4.0, -0.3, -0.4])
    assert min_k_prob(lp, 20) == pytest.approx((-5.0 - 4.0) / 2)
    assert min_k_prob(lp, 100) == pytest.approx(float(lp.mean()))
    assert min_k_prob(lp, 1) == -5.0  # at least one token
    assert min_k_prob(torch.tensor([]), 20) != min_k_prob(torch.tensor([]), 20)  # NaN


@pytest.fixture(scope="module")
def contaminated_model(tmp_path_factory, tiny_llama_dir: Path, smollm2_tokenizer) -> Path:
    """The tiny model fine-tuned on one planted evaluation text (12 steps of Adam)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = torch.tensor([smollm2_tokenizer(EVAL_TEXTS[PLANTED])["input_ids"]])
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(12):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("contaminated")
    model.save_pretrained(out)
    smollm2_tokenizer.save_pretrained(out)
    return out


def test_min_k_flags_the_planted_item(tmp_path, tiny_llama_dir, contaminated_model):
    eval_file = tmp_path / "evalset.jsonl"
    eval_file.write_text("\n".join(json.dumps({"text": t}) for t in EVAL_TEXTS))
    report = run_contamination(
        ContaminationConfig(
            model=str(contaminated_model),
            reference=str(tiny_llama_dir),
            eval_sets=[str(eval_file)],
            out=str(tmp_path / "report"),
        )
    )
    entry = report["sets"]["evalset"]
    items = entry["items"]
    diffs = [r["diff"] for r in items]
    best = max(range(len(diffs)), key=diffs.__getitem__)
    assert best == PLANTED
    others = [d for i, d in enumerate(diffs) if i != PLANTED]
    assert diffs[PLANTED] > max(others) + 1.0  # a large margin, not a coin flip
    assert entry["min_k"]["outliers"] == [items[PLANTED]["id"]]
    assert entry["min_k"]["diff_mean"] == pytest.approx(sum(diffs) / len(diffs))
    for r in items:
        assert r["diff"] == pytest.approx(r["model"] - r["reference"])
    # the planted item's scores, recomputed here from the models' logits: one plain forward
    # pass, log-softmax, the token's log-prob, the lowest 20 % (1 of the 5 .. 9 first) averaged
    for source, key in ((contaminated_model, "model"), (tiny_llama_dir, "reference")):
        assert items[PLANTED][key] == pytest.approx(_min_k_by_hand(source, EVAL_TEXTS[PLANTED]), abs=1e-5)
    saved = json.loads((tmp_path / "report" / "contamination.json").read_text())
    assert saved["sets"]["evalset"]["min_k"]["outliers"] == entry["min_k"]["outliers"]
    assert (tmp_path / "report" / "contamination.md").read_text().startswith("| Eval set |")


def _min_k_by_hand(model_dir: Path, text: str, k_percent: float = 20.0) -> float:
    """Min-K% Prob of ``text`` without the project's scoring code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].double()
    token_lps = logits.log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0].tolist()
    lowest = sorted(token_lps)[: max(1, int(len(token_lps) * k_percent / 100))]
    return sum(lowest) / len(lowest)


def _write_mix(mix: Path, planted: str | None) -> Path:
    """A data-mix directory as ``solar-ray data`` writes it: data/, rejects/, tokenized/."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for split in ("data", "rejects", "tokenized"):
        (mix / split).mkdir(parents=True)
    rows = [
        [{"role": "user", "content": f"Tell me fact number {i} about rivers."},
         {"role": "assistant", "content": f"River fact {i}: water flows downhill toward the sea."}]
        for i in range(50)
    ]  # fmt: skip
    if planted:
        rows[17][1]["content"] = f"Sure. {planted} Hope that helps!"
    pq.write_table(pa.table({"messages": rows}), mix / "data" / "part-000000000000.parquet")
    pq.write_table(pa.table({"messages": [rows[0]]}), mix / "data" / "part-000000000050.parquet")
    # neither a rejected row nor the tokenized split is training text
    other = item_texts("arc_challenge")[5][1]
    pq.write_table(pa.table({"text": [other], "reason": ["too_long"]}), mix / "rejects" / "part-000000000000.parquet")
    pq.write_table(pa.table({"input_ids": [[1, 2, 3]]}), mix / "tokenized" / "part-000000000000.parquet")
    (mix / "manifest.json").write_text(json.dumps({"name": "sft_v1", "splits": {"data": 51}}))
    return mix


def test_ngram_overlap_finds_exactly_the_planted_item(tmp_path):
    planted_id, planted_text = item_texts("arc_challenge")[7]
    mix = _write_mix(tmp_path / "mix", planted_text)
    report = run_contamination(
        ContaminationConfig(
            train=str(mix / "manifest.json"), eval_sets=["offline:winogrande", "offline:arc_challenge"]
        )
    )
    assert report["train"]["num_texts"] == 51
    assert report["train"]["num_texts_overlapping"] == 1
    for name, entry in report["sets"].items():
        expected = [planted_id] if name == "arc_challenge" else []
        assert entry["ngram"]["contaminated"] == expected, name
        assert entry["min_k"] is None
    hit = next(r for r in report["sets"]["arc_challenge"]["items"] if r["id"] == planted_id)
    assert hit["ngram"]["train_ref"].endswith("part-000000000000.parquet:17")
    assert len(hit["ngram"]["ngram"].split()) == 13


def test_ngram_overlap_rules():
    sets = {"s": [("long", " ".join(f"w{i}" for i in range(20))), ("short", "only five words here now"),
                  ("mid", "one two three four five six seven eight nine ten eleven twelve thirteen")]}  # fmt: skip
    train = [("t:0", "prefix w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 suffix"),
             ("t:1", "ONE two, three four five six seven eight nine ten eleven twelve thirteen!"),
             ("t:2", "only five words here now")]  # fmt: skip
    out = ngram_overlap(sets, train, n=13)
    s = out["sets"]["s"]
    assert s["num_checked"] == 2  # the 5-word item is shorter than n: not checked
    assert sorted(s["items"]) == ["long", "mid"]  # case and punctuation do not matter
    assert s["items"]["mid"]["train_ref"] == "t:1"
    assert s["items"]["long"]["ngram"] == " ".join(f"w{i}" for i in range(3, 16))
    assert out["num_train_texts_overlapping"] == 2  # t:2 copies the short item: not a 13-gram
    # 12 shared words are not a 13-gram
    out = ngram_overlap(sets, [("t", "w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14")], n=13)
    assert out["sets"]["s"]["num_contaminated"] == 0
    # n-grams never span two fields of a row
    split = [("t", ["w3 w4 w5 w6 w7 w8 w9", "w10 w11 w12 w13 w14 w15"])]
    assert ngram_overlap(sets, split, n=13)["sets"]["s"]["num_contaminated"] == 0
    assert words("Don't panic!") == ["don", "t", "panic"]


def test_report_and_filter_agree_on_the_same_texts(tmp_path):
    """The report flags an item exactly when the decontamination filter, given that item,
    drops a training text holding it: same n-grams, same short-text rule, same fields."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from solar_ray.data.normalize import FilterOptions, normalize_file

    rng = random.Random(0)
    vocab = [f"v{i}" for i in range(40)]
    items = [(f"e{i}", " ".join(rng.choices(vocab, k=rng.choice([3, 7, 12, 13, 14, 30]))))
             for i in range(40)]  # fmt: skip
    train = []
    for _ in range(200):
        item = rng.choice(items)[1].split()
        cut = rng.randint(0, len(item))  # a copy, a part of one, or one split across fields
        fields = [" ".join(rng.choices(vocab, k=4) + item[:cut]), " ".join(item[cut:])]
        train.append({"messages": [{"role": "user", "content": fields[0] or "hi"},
                                   {"role": "assistant", "content": fields[1] or "ok"}]})  # fmt: skip
    mix = tmp_path / "mix"
    (mix / "data").mkdir(parents=True)
    shard = mix / "data" / "part-000000000000.parquet"
    pq.write_table(pa.Table.from_pylist(train), shard)
    (mix / "manifest.json").write_text(json.dumps({"kind": "sft"}))
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"text": t}) + "\n" for _, t in items))

    for n in (5, 13):
        out = ngram_overlap({"e": items}, train_rows(str(mix)), n=n)
        report = out["sets"]["e"]
        # the filter, indexing the same items, drops exactly the rows the report finds
        index = build_eval_index([str(eval_file)], n)
        filtered = normalize_file(str(shard), kind="sft", source_idx=0, file_idx=0, source="s",
                                  filters=FilterOptions(kind="sft", eval_index=index))  # fmt: skip
        reasons = [r for t in filtered for r in t.column("_reason").to_pylist()]
        dropped = {i for i, r in enumerate(reasons) if r == "contaminated"}
        assert out["num_train_texts_overlapping"] == len(dropped) > 10, n
        assert {int(hit["train_ref"].rsplit(":", 1)[1]) for hit in report["items"].values()} <= dropped
        # an item is flagged iff the filter built on that item alone drops some row
        for item_id, text in items:
            alone = EvalIndex.build({"one": [(item_id, text)]}, n)
            drops = any(alone.match(texts) for _, texts in train_rows(str(mix)))
            assert (item_id in report["items"]) == drops, (n, item_id, text)
        short = [i for i, t in items if len(t.split()) < n]
        assert short and report["num_checked"] == len(items) - len(short)
        assert not set(short) & set(report["items"])  # the short-text rule, on both sides


def test_cli_ngram_only(tmp_path, capsys):
    from solar_ray.cli import main

    mix = _write_mix(tmp_path / "mix", None)
    rc = main(["contamination", "--train", str(mix), "--eval-sets", "offline:arc_challenge", "--out", str(tmp_path / "r")])
    assert rc == 0
    assert "| arc_challenge |" in capsys.readouterr().out
    report = json.loads((tmp_path / "r" / "contamination.json").read_text())
    assert report["sets"]["arc_challenge"]["ngram"]["num_contaminated"] == 0


def test_config_and_eval_set_errors(tmp_path):
    with pytest.raises(ConfigError, match="model or train is required"):
        load_config(ContaminationConfig, data={"eval_sets": ["offline"]})
    with pytest.raises(ConfigError, match="k_percent"):
        load_config(ContaminationConfig, data={"model": "m", "k_percent": 0})
    with pytest.raises(ValueError, match="no offline benchmark"):
        load_eval_sets(["offline:arc"])
    with pytest.raises(ValueError, match="neither 'offline' nor an existing path"):
        load_eval_sets([str(tmp_path / "nope.jsonl")])
    sets = load_eval_sets(["offline"], max_items=3)
    assert all(len(v) == 3 for v in sets.values())
    assert sorted(sets) == ["arc_challenge", "hellaswag", "mmlu", "winogrande"]
