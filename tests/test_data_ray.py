"""Data stage on a local Ray instance: whole mixes from fixture files with planted bad rows.

Each test builds real mixes through Ray Data and checks exact counts, exact removal of the
planted rows, proportions, determinism across runs and worker counts, and the prepared
splits against the plain reference functions.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import data_fixtures as fx
import numpy as np
import pytest
import yaml

from solar_ray.cli import main
from solar_ray.config import validate
from solar_ray.data.config import MixConfig
from solar_ray.data.contract import load_table
from solar_ray.data.mix import build_mix, build_mix_result, read_prepared
from solar_ray.data.pack import pack_documents
from solar_ray.data.templates import IGNORE_INDEX, template_prompt


@pytest.fixture
def quiet_ray(ray_local):
    """``ray_local`` without Ray Data progress bars."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    yield ray_local
    ctx.enable_progress_bars = before


def _sorted_rejects(path: Path) -> list[tuple]:
    t = load_table(path, "rejects")
    return sorted(
        zip(*(t.column(c).to_pylist() for c in ("source", "ref", "reason", "detail")), strict=True)
    )


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    out, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_sft_mix_exact_counts_rejects_and_worker_independence(
    quiet_ray, tmp_path: Path, smollm2_tokenizer
) -> None:
    d = tmp_path / "in"
    d.mkdir()
    eval_set = fx.write_eval_set(d)
    alpaca, e_alpaca = fx.write_alpaca(d)
    orca, e_orca = fx.write_openorca(d)
    share, e_share = fx.write_sharegpt(d)
    mix = validate(
        MixConfig,
        {
            "name": "sft_v4",
            "kind": "sft",
            "seed": 0,
            "dedup": True,
            "max_chars": 10_000,
            "decontaminate": {"eval_sets": [str(eval_set)], "ngram": 13, "deny_tasks": ["flan"]},
            "sources": [
                {"path": str(alpaca), "format": "alpaca", "max_samples": 12},
                {"path": str(orca), "format": "openorca", "weight": 1},
                {"path": str(share), "weight": 1},
            ],
            "rows_per_file": 10,
            "prepare": {"tokenizer": "smollm2-135m", "seq_len": 64},
        },
    )
    out = tmp_path / "out"
    first = build_mix(mix, out / "a", num_workers=2)
    build_mix(mix, out / "b", num_workers=2)
    build_mix(mix, out / "c", num_workers=1)

    # identical data, prepared rows and rejects across runs and worker counts
    for split in ("data", "tokenized"):
        ref = load_table(out / "a", split)
        assert ref.equals(load_table(out / "b", split)) and ref.equals(
            load_table(out / "c", split)
        ), split
    assert _sorted_rejects(out / "a") == _sorted_rejects(out / "b") == _sorted_rejects(out / "c")
    assert [Path(f).name for f in sorted((out / "a" / "data").iterdir())] == [
        f"part-{i:012d}.parquet" for i in (0, 10, 20, 30, 40)
    ]

    m = first.manifest
    assert json.loads((out / "a" / "manifest.json").read_text())["num_rows"] == m["num_rows"] == 42
    counts = {name: s["counts"] for name, s in m["sources"].items()}
    assert counts["alpaca"] == {
        "records": 25,
        "after_read": 24,
        "after_normalize": 21,
        "after_length": 21,
        "after_deny_tasks": 21,
        "after_decontaminate": 20,
        "after_dedup": 20,
        "selected": 12,
    }
    assert counts["openorca"] == {
        "records": 32,
        "after_read": 32,
        "after_normalize": 31,
        "after_length": 31,
        "after_deny_tasks": 21,
        "after_decontaminate": 20,
        "after_dedup": 20,
        "selected": 15,
    }
    assert counts["sharegpt"] == {
        "records": 21,
        "after_read": 19,
        "after_normalize": 17,
        "after_length": 17,
        "after_deny_tasks": 17,
        "after_decontaminate": 17,
        "after_dedup": 15,
        "selected": 15,
    }
    expected_rejects = Counter()
    for e in (e_alpaca, e_orca, e_share):
        expected_rejects.update(e["rejects"])
    expected_rejects["too_long_tokens"] = 1
    assert m["rejects"] == {"total": 24, "by_reason": dict(sorted(expected_rejects.items()))}
    assert m["sources"]["sharegpt"]["detected_formats"] == {"sharegpt": 21}

    rejects = {(r[1].rsplit("/", 1)[-1], r[2]): r[3] for r in _sorted_rejects(out / "a")}
    assert len(rejects) == 24
    assert rejects[("sharegpt.jsonl:16", "duplicate")] == f"duplicate of {share}:1"
    assert rejects[("sharegpt.jsonl:17", "duplicate")] == f"duplicate of {alpaca}#1"
    assert (
        rejects[("alpaca.json#20", "contaminated")]
        == rejects[("openorca.parquet#30", "contaminated")]
        == f"shares a 13-gram with {eval_set}"
    )
    assert rejects[("sharegpt.jsonl:15", "too_long_tokens")].endswith("tokens > seq_len 64")

    data = load_table(out / "a")
    assert Counter(data.column("source").to_pylist()) == {
        "alpaca": 12,
        "openorca": 15,
        "sharegpt": 15,
    }
    texts = [json.dumps(r) for r in data.column("messages").to_pylist()]
    assert not any("Natalia" in t for t in texts) and len(set(texts)) == len(texts)
    assert sum("Fact 0 is interesting" in t for t in texts) == 1

    # SFT preparation: one over-long row quarantined; labels -100 off the assistant turns
    tok = smollm2_tokenizer
    prepared = load_table(out / "a", "tokenized")
    conversations = [
        c for c in data.column("messages").to_pylist() if fx.long_answer() not in json.dumps(c)
    ]
    assert prepared.num_rows == len(conversations) == 41 == m["prepare"]["num_rows"]
    for conv, ids, mask, labels in zip(
        conversations,
        *(prepared.column(c).to_pylist() for c in ("input_ids", "assistant_masks", "labels")),
        strict=True,
    ):
        assert (
            len(ids) <= 64
            and ids
            == tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)[
                "input_ids"
            ]
        )
        assert [lab for lab, k in zip(labels, mask, strict=True) if not k] == [IGNORE_INDEX] * (
            len(mask) - sum(mask)
        )
        assert [lab for lab, k in zip(labels, mask, strict=True) if k] == [
            i for i, k in zip(ids, mask, strict=True) if k
        ]
        assert [tok.decode(ids[a:b]) for a, b in _runs(mask)] == [
            x["content"] + "<|im_end|>" for x in conv if x["role"] == "assistant"
        ]
    assert m["tokens"]["total"] == sum(len(x) for x in prepared.column("input_ids").to_pylist())


def test_pretrain_weights_packing_and_dataset_api(
    quiet_ray, tmp_path: Path, smollm2_tokenizer
) -> None:
    src = fx.write_pretrain(tmp_path)
    cfg = {
        "name": "cpt",
        "kind": "pretrain",
        "seed": 3,
        "rows_per_file": 300,
        "sources": [
            {"path": str(src["web"][0]), "weight": 0.5},
            {"path": str(src["books"][0]), "text_field": "content", "weight": 0.3},
            {"path": str(src["code"][0]), "weight": 0.2},
        ],
        "prepare": {"tokenizer": "smollm2-135m", "seq_len": 128},
    }
    mix = validate(MixConfig, cfg)
    res = build_mix(mix, tmp_path / "cpt", num_workers=2)
    data = load_table(tmp_path / "cpt")
    shares = Counter(data.column("source").to_pylist())
    for name, weight in (("web", 0.5), ("books", 0.3), ("code", 0.2)):
        assert abs(shares[name] / data.num_rows - weight) <= 0.01
    assert shares == {"web": 500, "books": 300, "code": 200}
    all_docs = {t for _, docs in src.values() for t in docs}
    assert set(data.column("text").to_pylist()) <= all_docs
    assert res.manifest["rejects"]["by_reason"] == {"empty_field": 1, "malformed_csv_row": 1}

    # packed blocks: the reference packing of the mix's documents, in mix order
    tok = smollm2_tokenizer
    texts = data.column("text").to_pylist()
    ids = tok(texts, add_special_tokens=True)["input_ids"]
    ref = pack_documents(ids, tok.eos_token_id, 128)
    packed = load_table(tmp_path / "cpt", "packed")
    got = np.array(packed.column("input_ids").to_pylist(), dtype=np.int32)
    pos = np.array(packed.column("position_ids").to_pylist(), dtype=np.int32)
    assert (
        got.shape == (packed.num_rows, 128)
        and np.array_equal(got, ref.input_ids)
        and np.array_equal(pos, ref.position_ids)
    )
    stream = got.reshape(-1)
    eos_at = np.nonzero(stream == tok.eos_token_id)[0]
    decoded = [
        tok.decode(stream[a + 1 : b]) for a, b in zip([-1, *eos_at[:-1]], eos_at, strict=True)
    ][: len(texts)]
    assert decoded == texts
    starts = np.concatenate([[0], eos_at[:-1] + 1])[: len(texts)]
    assert all(pos.reshape(-1)[s] == 0 for s in starts)  # positions restart at every document
    prep = res.manifest["prepare"]
    assert prep["num_tokens"] == sum(len(x) + 1 for x in ids) and prep["packing_efficiency"] >= 0.99
    assert prep["packing_efficiency"] == pytest.approx(prep["num_tokens"] / got.size)

    # streaming the written split, and the same mix built in-process
    streamed = read_prepared(tmp_path / "cpt")
    assert np.array_equal(np.array([r["input_ids"] for r in streamed.take_all()]), ref.input_ids)
    in_process = build_mix_result(mix, num_workers=1, prepared=True)
    assert np.array_equal(
        np.array([r["input_ids"] for r in in_process.dataset.take_all()]), ref.input_ids
    )

    # num_samples above what a source holds repeats its rows (counted); another seed reorders
    bigger = validate(MixConfig, {**cfg, "seed": 4, "num_samples": 1500, "prepare": None})
    res2 = build_mix_result(bigger, num_workers=2)
    rows = res2.dataset.take_all()
    assert Counter(r["source"] for r in rows) == {"web": 750, "books": 450, "code": 300}
    assert (
        res2.manifest["sources"]["code"]["repeats"] == 100
        and res2.manifest["sources"]["web"]["repeats"] == 150
    )
    assert [r["text"] for r in rows[:20]] != texts[:20]


def test_cli_synth_math_and_preference_mix(
    quiet_ray, tmp_path: Path, capsys, smollm2_tokenizer
) -> None:
    seeds = fx.write_jsonl(
        tmp_path / "gsm8k_train.jsonl",
        [
            {
                "question": "Tom has 2 cats and gets 3 more. How many cats?",
                "answer": "2 + 3 = 5\n#### 5",
            },
            # planted mismatch: the recorded final answer disagrees with the worked answer
            {
                "question": "Sue has 4 pens and loses 1. How many pens?",
                "answer": "4 - 1 = 3\n#### 3",
                "final_answer": "99991",
            },
        ],
    )
    alpaca, _ = fx.write_alpaca(tmp_path)
    pref = fx.write_preference(tmp_path)
    config = {
        "out": str(tmp_path / "runs"),
        "synth_math": {
            "seeds": {"generate": 10, "seed": 1, "files": [str(seeds)]},
            "rephraser": {"backend": "template"},
        },
        "mixes": [
            {
                "name": "sft_v3",
                "kind": "sft",
                "sources": [{"path": str(alpaca), "max_samples": 5}, {"synth_math": "instruct"}],
            },
            {
                "name": "dpo",
                "kind": "preference",
                "sources": [{"path": str(p)} for p, _ in pref.values()]
                + [{"synth_math": "alignment", "name": "math"}],
                "prepare": {"tokenizer": "smollm2-135m", "seq_len": 40},
            },
        ],
    }
    # mixes whose every row is bad still finish: empty shards, rejects, a manifest
    bad = fx.write_jsonl(tmp_path / "bad.jsonl", [{"text": ""}, {"text": 3}], [b"not json"])
    config["mixes"] += [
        {
            "name": "empty_cpt",
            "kind": "pretrain",
            "sources": [{"path": str(bad)}],
            "prepare": {"tokenizer": "smollm2-135m", "seq_len": 16},
        },
        {
            "name": "empty_sft",
            "kind": "sft",
            "sources": [{"path": str(bad), "format": "messages"}],
            "prepare": {"tokenizer": "smollm2-135m", "seq_len": 16},
        },
    ]
    cfg_path = tmp_path / "data.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    assert main(["data", "--config", str(cfg_path)]) == 0
    printed = capsys.readouterr().out
    assert "synth_math (built): 12 seeds -> 11 kept, dropped {'answer_mismatch': 1}" in printed

    runs = tmp_path / "runs"
    synth = json.loads((runs / "synth_math" / "manifest.json").read_text())
    assert synth["dropped"] == {"answer_mismatch": 1} and synth["num_kept"] == 11
    sft = load_table(runs / "sft_v3")
    assert Counter(sft.column("source").to_pylist()) == {"alpaca": 5, "synth_math_instruct": 11}
    synth_rows = [r for r in sft.to_pylist() if r["source"] == "synth_math_instruct"]
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in synth_rows)
    assert not any("Sue has 4 pens" in json.dumps(r) for r in synth_rows)

    dpo_manifest = json.loads((runs / "dpo" / "manifest.json").read_text())
    data = load_table(runs / "dpo")
    by_source = Counter(data.column("source").to_pylist())
    assert by_source == {"ultrafeedback": 10, "orca_dpo": 8, "pairs": 6, "math": 11}
    assert dpo_manifest["rejects"]["by_reason"]["multi_turn_prompt"] == 1
    assert (
        dpo_manifest["rejects"]["by_reason"]["identical_pair"] == 1
        and dpo_manifest["rejects"]["by_reason"]["empty_field"] == 1
    )
    math_rows = [r for r in data.to_pylist() if r["source"] == "math"]
    alignment = {r["prompt"]: r for r in load_table(runs / "synth_math", "alignment").to_pylist()}
    for r in math_rows:  # chosen: the rephrased answer; rejected: the seed's original answer
        assert r["rejected"] == alignment[r["prompt"]]["rejected"] and "\n#### " in r["rejected"]
        assert r["chosen"].endswith("The answer is: " + alignment[r["prompt"]]["final_answer"])
    prepared = load_table(runs / "dpo", "tokenized")
    kept = {r["chosen"]: r for r in prepared.to_pylist()}
    tok = smollm2_tokenizer
    for row in data.to_pylist():
        if row["chosen"] not in kept:
            continue
        assert kept[row["chosen"]]["prompt"] == template_prompt(row["prompt"], tok, row["system"])
        assert kept[row["chosen"]]["prompt"].endswith("<|im_start|>assistant\n")
    too_long = dpo_manifest["prepare"]["rejects"].get("too_long_tokens", {})
    assert prepared.num_rows + sum(too_long.values()) == data.num_rows == dpo_manifest["num_rows"]
    assert sum(too_long.values()) > 0  # the math answers are longer than 40 tokens

    for name, split in (("empty_cpt", "packed"), ("empty_sft", "tokenized")):
        m = json.loads((runs / name / "manifest.json").read_text())
        assert m["num_rows"] == 0 and m["prepare"]["num_rows"] == 0 and m["rejects"]["total"] == 3
        assert load_table(runs / name).num_rows == load_table(runs / name, split).num_rows == 0
        assert load_table(runs / name, "rejects").num_rows == 3
    assert json.loads((runs / "empty_cpt" / "manifest.json").read_text())["rejects"][
        "by_reason"
    ] == {"empty_field": 1, "invalid_json": 1, "wrong_type": 1}

    # a second run reuses the synthetic set; an existing mix needs --overwrite
    assert main(["data", "--config", str(cfg_path), "--only", "sft_v3", "--overwrite"]) == 0
    assert "synth_math (reused)" in capsys.readouterr().out
    assert main(["data", "--config", str(cfg_path), "--only", "sft_v3"]) == 2
    err = capsys.readouterr().err
    assert (
        "solar-ray data: error: mixes.0 (sft_v3): output directory exists and is not empty" in err
        and err.count("\n") == 1
    )


def test_cli_bad_config_is_one_line(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "out": "x",
                "mixes": [
                    {
                        "name": "m",
                        "kind": "sft",
                        "sources": [
                            {"path": str(tmp_path / "none*.json"), "weight": 2, "max_samples": 1}
                        ],
                    }
                ],
            }
        )
    )
    assert main(["data", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("solar-ray data: error: invalid config")
        and "mixes.0.sources.0: give either 'weight' or 'max_samples'" in err
    )
    assert "\n" not in err
