"""Data stage without Ray: config errors, readers, normalizers, filters, planning, packing,
SFT masks, synthetic-math answers. Every count asserted here is planted by the fixtures."""

from __future__ import annotations

import copy
import gzip
import json
import random
import re
from collections import Counter
from pathlib import Path

import data_fixtures as fx
import numpy as np
import pyarrow as pa
import pytest

from solar_ray.config import ConfigError, load_config
from solar_ray.data.config import DataConfig, SynthMathConfig
from solar_ray.data.decontam import build_eval_index, deny_match, ngram_hashes
from solar_ray.data.keys import row_ref
from solar_ray.data.mix import SourcePlan, compute_quotas, plan_dedup, plan_selection
from solar_ray.data.normalize import FilterOptions, RowError, normalize_file, normalize_record
from solar_ray.data.pack import pack_documents, pack_span, stitch_fragments
from solar_ray.data.sources import SourceError, expand_paths, iter_records
from solar_ray.data.synth_math import (
    MathSeed,
    answers_match,
    check_rephrased,
    extract_final_answer,
    generate_arithmetic_problems,
    read_math_seeds,
)
from solar_ray.data.templates import (
    IGNORE_INDEX,
    ensure_chat_template,
    template_prompt,
    tokenize_sft,
)


def _normalize(path: Path, kind: str, **kw) -> pa.Table:
    return pa.concat_tables(
        list(normalize_file(str(path), kind=kind, source_idx=0, file_idx=0, source="s", **kw))
    )


def _reasons(t: pa.Table) -> Counter:
    return Counter(r for r in t.column("_reason").to_pylist() if r is not None)


# ---------------------------------------------------------------- config


def _data_cfg(**mix) -> dict:
    base = {"name": "m", "kind": "sft", "sources": [{"path": "a.jsonl"}]}
    return {"out": "o", "mixes": [{**base, **mix}]}


@pytest.mark.parametrize(
    ("mix", "needle"),
    [
        (
            {"sources": [{"path": "a", "weight": 1, "max_samples": 3}]},
            "mixes.0.sources.0: give either 'weight' or 'max_samples'",
        ),
        ({"sources": [{"path": "a", "wieght": 1}]}, "mixes.0.sources.0.wieght: unknown field"),
        (
            {"kind": "preference", "sources": [{"path": "a", "format": "alpaca"}]},
            "sources.0.format: 'alpaca' cannot feed a preference mix",
        ),
        (
            {"sources": [{"path": "a"}, {"path": "b/a.json"}]},
            "sources.1: name 'a' is also source 0's",
        ),
        (
            {"sources": [{"synth_math": "instruct"}]},
            "mixes.0.sources.0.synth_math: needs a top-level 'synth_math:' block",
        ),
        (
            {"sources": [{"path": "a", "weight": 0}]},
            "mixes.0.sources.0.weight: Input should be greater than 0",
        ),
        ({"name": "bad name"}, "mixes.0.name"),
        ({"prepare": {"tokenizer": "x"}}, "mixes.0.prepare.seq_len: field required"),
    ],
)
def test_config_errors_name_the_field(mix: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(DataConfig, data=_data_cfg(**mix))
    assert needle in str(e.value)


def test_config_yaml_and_overrides(tmp_path: Path) -> None:
    p = tmp_path / "d.yaml"
    p.write_text(
        "out: OUT\nmixes:\n  - name: sft_v4\n    kind: sft\n    seed: 0\n    dedup: true\n"
        "    decontaminate: {eval_sets: [e.jsonl], ngram: 13}\n    sources:\n"
        "      - {path: a.json, format: alpaca, max_samples: 52000}\n"
        "      - {path: b.parquet, format: openorca, weight: 0.5}\n"
    )
    cfg = load_config(DataConfig, p, ["mixes.0.sources.0.max_samples=10", "num_workers=2"])
    assert cfg.mixes[0].sources[0].max_samples == 10 and cfg.num_workers == 2
    assert cfg.mixes[0].decontaminate.ngram == 13 and cfg.mixes[0].sources[1].label() == "b"
    with pytest.raises(ConfigError, match="  seeds: no seeds"):
        load_config(SynthMathConfig, data={"seeds": {}})
    with pytest.raises(ConfigError, match="rephraser.answer_prompt: must contain {answer}"):
        load_config(
            SynthMathConfig,
            data={"seeds": {"generate": 1}, "rephraser": {"answer_prompt": "{question}"}},
        )


# ---------------------------------------------------------------- readers


def test_readers_paths_globs_uris_compression(tmp_path: Path) -> None:
    rows = [{"text": f"doc {i}"} for i in range(3)]
    fx.write_jsonl(tmp_path / "a.jsonl", rows)
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write(b"".join(json.dumps(r).encode() + b"\n" for r in rows))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.json").write_text(json.dumps({"data": rows}))
    files = expand_paths([str(tmp_path / "*.jsonl*"), f"file://{tmp_path}/sub"])
    assert [Path(f).name for f in files] == ["a.jsonl", "b.jsonl.gz", "c.json"]
    for f in files:
        assert [r.data for r in iter_records(f)] == rows
    with pytest.raises(
        SourceError, match=r"mixes\.0\.sources\.2\.path: '.*nope\*\.jsonl' matches no files"
    ):
        expand_paths([str(tmp_path / "nope*.jsonl")], "mixes.0.sources.2.path")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    recs = list(iter_records(str(tmp_path / "broken.parquet")))
    assert [(r.index, r.reason) for r in recs] == [(-1, "unreadable_file")]


def _compress(raw: bytes, suffix: str) -> bytes:
    """``raw`` compressed as a file ending in ``suffix`` is, by the format's own library."""
    if suffix == ".zst":  # two frames, as `zstd` writes a stream: both must be read
        import zstandard

        half = raw.index(b"\n", len(raw) // 2) + 1
        return b"".join(zstandard.ZstdCompressor().compress(part) for part in (raw[:half], raw[half:]))
    import bz2
    import lzma

    return {".bz2": bz2.compress, ".xz": lzma.compress, ".gz": gzip.compress}[suffix](raw)


@pytest.mark.parametrize("suffix", [".gz", ".zst", ".bz2", ".xz"])
def test_compressed_inputs_read_as_the_plain_file(tmp_path: Path, suffix: str) -> None:
    rows = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(5)]
    raw = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    path = tmp_path / f"a.jsonl{suffix}"
    path.write_bytes(_compress(raw, suffix))
    assert [r.data for r in iter_records(str(path))] == rows
    assert expand_paths([str(tmp_path / "*.jsonl*")]) == [str(path)]
    t = _normalize(path, "sft")  # and through a normalizer, format detected after decompression
    assert t.column("messages")[4].as_py() == [
        {"role": "user", "content": "Say 4."}, {"role": "assistant", "content": "4"},
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("fmt", "rows", "reject"),
    [
        # GSM8K's columns: question, answer (the worked solution ending in "#### 18")
        ("gsm8k", [{"question": "Janet has 16 eggs and buys 2 more. How many?",
                    "answer": "16 + 2 = <<16+2=18>>18\n#### 18"},
                   {"question": "What is 3 times 4?", "answer": "3 * 4 = 12\n#### 12"}],
         {"question": "no answer here"}),
        # MATH's columns: problem, solution (with the \\boxed{} answer), level, type
        ("math", [{"problem": "Compute $1+1$.", "solution": "$1+1=\\boxed{2}$.",
                   "level": "Level 1", "type": "Algebra"},
                  {"problem": "What is $2^3$?", "solution": "$2^3 = \\boxed{8}$."}],
         {"problem": "", "solution": "x"}),
    ],
)  # fmt: skip
def test_gsm8k_and_math_become_one_user_and_one_assistant_turn(tmp_path, fmt, rows, reject) -> None:
    path = tmp_path / f"{fmt}.jsonl"
    fx.write_jsonl(path, [*rows, reject])
    question, answer = ("question", "answer") if fmt == "gsm8k" else ("problem", "solution")
    expected = [
        [{"role": "user", "content": r[question]}, {"role": "assistant", "content": r[answer]}]
        for r in rows
    ]
    for given in (fmt, None):  # named, and detected from the columns
        t = _normalize(path, "sft", **({"fmt": given} if given else {}))
        assert t.column("messages").to_pylist()[: len(rows)] == expected, given
        assert t.column("_reason").to_pylist()[: len(rows)] == [None] * len(rows)
        assert t.column("_reason")[len(rows)].as_py() in ("missing_field", "empty_field")


# ---------------------------------------------------------------- normalizers


def test_normalized_output_per_format(tmp_path: Path) -> None:
    path, exp = fx.write_alpaca(tmp_path)
    t = _normalize(path, "sft", fmt="alpaca")
    assert t.num_rows == exp["records"] and t.schema.field("messages").type == pa.list_(
        pa.struct([("role", pa.string()), ("content", pa.string())])
    )
    assert t.slice(0, 2).column("messages").to_pylist() == [
        [
            {
                "role": "user",
                "content": "Write a short note about topic number 0.\n\nContext for item 0.",
            },
            {"role": "assistant", "content": "Here is note 0 about the topic."},
        ],
        [
            {"role": "user", "content": "Write a short note about topic number 1."},
            {"role": "assistant", "content": "Here is note 1 about the topic."},
        ],
    ]
    exp_no_filter = {k: v for k, v in exp["rejects"].items() if k != "contaminated"}
    assert _reasons(t) == exp_no_filter

    path, exp = fx.write_openorca(tmp_path)
    t = _normalize(path, "sft")  # auto-detected
    row = t.slice(1, 1).to_pylist()[0]
    assert row["messages"] == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Question 1: what is 1 plus 1?"},
        {"role": "assistant", "content": "The sum is 2."},
    ]
    assert _reasons(t) == {"missing_field": 1}

    path, exp = fx.write_sharegpt(tmp_path)
    t = _normalize(path, "sft")
    assert t.num_rows == exp["records"]
    assert _reasons(t) == {k: v for k, v in exp["rejects"].items() if k != "duplicate"}
    assert t.column("messages")[0].as_py() == [
        {"role": "user", "content": "Tell me fact 0."},
        {"role": "assistant", "content": "Fact 0 is interesting."},
    ]

    t = _normalize(fx.write_messages(tmp_path), "sft")
    assert t.column("messages")[2].as_py()[0] == {"role": "system", "content": "Be brief."}
    assert dict(
        zip(t.column("_reason").to_pylist(), t.column("_detail").to_pylist(), strict=True)
    ) == {
        None: None,
        "bad_conversation": "messages.1: system message after the first turn",
        "empty_field": "messages",
    }

    for name, (path, exp) in fx.write_preference(tmp_path).items():
        t = _normalize(path, "preference")
        assert t.num_rows - sum(_reasons(t).values()) == exp["valid"], name
        assert _reasons(t) == exp["rejects"], name
    t = _normalize(tmp_path / "ultrafeedback.parquet", "preference")
    assert t.select(["prompt", "chosen", "rejected", "system"]).slice(0, 1).to_pylist() == [
        {
            "prompt": "Explain idea 0.",
            "chosen": "Idea 0 explained well.",
            "rejected": "Idea 0? No.",
            "system": "",
        }
    ]
    t = _normalize(tmp_path / "orca_dpo.jsonl", "preference", fmt="orca_dpo")
    assert t.column("system").to_pylist()[:2] == ["", "You are an AI assistant."]

    pt = fx.write_pretrain(tmp_path)
    t = _normalize(pt["code"][0], "pretrain")
    assert t.column("text").drop_null().to_pylist() == pt["code"][1]
    assert _reasons(t) == {"malformed_csv_row": 1, "empty_field": 1}
    t = _normalize(pt["books"][0], "pretrain", text_field="content")
    assert t.column("text").to_pylist() == pt["books"][1]


@pytest.mark.parametrize(
    ("rec", "fmt", "reason"),
    [
        ({"instruction": "a", "output": "b\udc80"}, "alpaca", "undecodable_text"),
        (
            {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]},
            "sharegpt",
            "empty_field",
        ),
        ({"conversations": "x"}, "sharegpt", "wrong_type"),
        ({"messages": [{"role": "user", "content": "a"}]}, "messages", "bad_conversation"),
        (
            {
                "prompt": "p",
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                "rejected": [
                    {"role": "user", "content": "z"},
                    {"role": "assistant", "content": "c"},
                ],
            },
            "ultrafeedback",
            "prompt_mismatch",
        ),
        ({"text": 3}, "text", "wrong_type"),
    ],
)
def test_normalize_record_reasons(rec: dict, fmt: str, reason: str) -> None:
    with pytest.raises(RowError) as e:
        normalize_record(rec, fmt)
    assert e.value.reason == reason


def test_filters_max_chars_deny_and_decontam(tmp_path: Path) -> None:
    index = build_eval_index([str(fx.write_eval_set(tmp_path))], 13)
    path, _ = fx.write_openorca(tmp_path)
    # odd rows carry a system prompt (> 60 chars), checked before the deny list; the
    # planted eval question is long too
    t = _normalize(
        path,
        "sft",
        filters=FilterOptions(kind="sft", max_chars=60, deny_tasks=["flan"], eval_index=index),
    )
    assert _reasons(t) == {"too_long": 16, "denied_task": 5, "missing_field": 1}
    path, exp = fx.write_alpaca(tmp_path)
    t = _normalize(path, "sft", filters=FilterOptions(kind="sft", eval_index=index))
    assert _reasons(t) == exp["rejects"]
    assert (
        t.column("_detail").to_pylist()[20]
        == f"shares a 13-gram with {tmp_path / 'gsm8k_test.jsonl'}"
    )
    assert (
        deny_match("flan.1234", ["flan"]) == "flan"
        and deny_match("niv.3", ["flan", "niv.*"]) == "niv.*"
    )
    assert deny_match("cot.3", ["flan"]) is None and deny_match(None, ["flan"]) is None
    # punctuation, case and spacing do not hide a copy; 12 shared words are not enough
    words = fx.EVAL_QUESTION.split()
    assert index.match(["Q: " + " ".join(words[:13]).upper().replace(" ", " ,  ")])
    assert index.match([" ".join(words[:12]) + " zebra"]) is None
    assert len(ngram_hashes("one two three", 13)) == 0


# ---------------------------------------------------------------- planning


def _plans(*specs: tuple[float | None, int | None]) -> list[SourcePlan]:
    return [
        SourcePlan(i, f"s{i}", [], "auto", "auto", "text", None, w, m)
        for i, (w, m) in enumerate(specs)
    ]


def test_quotas_weights_max_samples_and_repeats() -> None:
    q, warn = compute_quotas(
        _plans((0.5, None), (0.3, None), (0.2, None)), {0: 600, 1: 400, 2: 200}, None
    )
    assert q == {0: 500, 1: 300, 2: 200} and warn == []
    q, _ = compute_quotas(
        _plans((1, None), (2, None), (None, 7), (None, None)), {0: 1000, 1: 1000, 2: 5, 3: 11}, 100
    )
    assert q == {0: 33, 1: 67, 2: 5, 3: 11}
    q, warn = compute_quotas(_plans((1, None), (1, None)), {0: 10, 1: 3}, 30)
    assert q == {0: 15, 1: 15} and any("rows repeat" in w for w in warn)


def test_plan_selection_is_exact_seeded_and_order_free() -> None:
    pos = np.concatenate(
        [
            (np.uint64(s) << np.uint64(48)) + np.arange(n, dtype=np.uint64)
            for s, n in ((0, 100), (1, 10))
        ]
    )
    sel = plan_selection(pos, {0: 30, 1: 25}, seed=1)
    src = (sel.pos >> np.uint64(48)).astype(int)
    assert Counter(src.tolist()) == {0: 30, 1: 25}
    assert sorted(sel.rank.tolist()) == list(range(55))
    # source 1 repeats every row twice, plus 5 sampled rows a third time
    assert sorted(Counter(sel.pos[src == 1].tolist()).values()) == [2] * 5 + [3] * 5
    shuffled = pos.copy()
    np.random.default_rng(0).shuffle(shuffled)
    again = plan_selection(shuffled, {0: 30, 1: 25}, seed=1)
    assert np.array_equal(again.pos, sel.pos) and np.array_equal(again.rank, sel.rank)
    other = plan_selection(pos, {0: 30, 1: 25}, seed=2)
    assert not np.array_equal(other.pos, sel.pos)


def test_plan_dedup_keeps_first_position() -> None:
    pos = np.array([7, 3, 5, 9, 1], dtype=np.uint64)
    hashes = np.array([1, 2, 1, 3, 2], dtype=np.uint64)
    drop, kept = plan_dedup(pos, hashes)
    assert drop.tolist() == [3, 7] and kept.tolist() == [1, 5]


def test_row_refs() -> None:
    files, types = [["a.jsonl", "b.parquet"]], [["jsonl", "parquet"]]
    assert row_ref((1 << 32) | 4, files, types) == "b.parquet#4"
    assert row_ref(4, files, types) == "a.jsonl:5"
    assert row_ref(0xFFFFFFFF, files, types) == "a.jsonl"


# ---------------------------------------------------------------- packing


def test_pack_documents_exact() -> None:
    p = pack_documents([[5, 6, 7], [8], [9, 10, 11, 12, 13], [14]], eos_id=0, seq_len=4)
    assert p.input_ids.tolist() == [[5, 6, 7, 0], [8, 0, 9, 10], [11, 12, 13, 0], [14, 0, 0, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 1], [0, 1, 2, 3], [0, 1, 0, 1]]
    assert (p.num_tokens, p.num_padding) == (14, 2)
    dropped = pack_documents(
        [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14]], eos_id=0, seq_len=4, pad_last=False
    )
    assert dropped.input_ids.shape == (3, 4) and dropped.efficiency == 1.0


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_pack_span_in_pieces_equals_reference(seq_len: int) -> None:
    r = random.Random(seq_len)
    docs = [[r.randrange(3, 1000) for _ in range(r.randint(0, 150))] for _ in range(60)]
    ref = pack_documents(docs, eos_id=2, seq_len=seq_len)
    stream = np.concatenate([np.array(d + [2], np.int32) for d in docs])
    assert np.array_equal(ref.input_ids.reshape(-1)[: len(stream)], stream)
    assert (ref.input_ids.shape[1], ref.num_tokens) == (seq_len, len(stream))
    # what the Ray path does: arbitrary runs of documents packed at their global offsets
    cuts = sorted(r.sample(range(1, len(docs)), 9))
    full_rows, fragments, offset = {}, [], 0
    for a, b in zip([0, *cuts], [*cuts, len(docs)], strict=True):
        blocks, frags = pack_span(docs[a:b], offset, 2, seq_len)
        for k in range(blocks.num_blocks):
            full_rows[blocks.first_block + k] = (blocks.input_ids[k], blocks.position_ids[k])
        fragments += frags
        offset += sum(len(d) + 1 for d in docs[a:b])
    stitched, idx = stitch_fragments(fragments, seq_len, offset, 2)
    for k, blk in enumerate(idx):
        full_rows[blk] = (stitched.input_ids[k], stitched.position_ids[k])
    got = np.stack([full_rows[k][0] for k in sorted(full_rows)])
    pos = np.stack([full_rows[k][1] for k in sorted(full_rows)])
    assert np.array_equal(got, ref.input_ids) and np.array_equal(pos, ref.position_ids)


# ---------------------------------------------------------------- SFT and DPO templating


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    out, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_tokenize_sft_labels_mask_everything_but_assistant_turns(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "It is 6."},
    ]
    out = tokenize_sft(messages, tok, seq_len=256)
    ids, mask, labels = out["input_ids"], out["assistant_masks"], out["labels"]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert all((lab == IGNORE_INDEX) == (m == 0) for lab, m in zip(labels, mask, strict=True))
    assert all(lab == i for lab, i, m in zip(labels, ids, mask, strict=True) if m)
    spans = [tok.decode(ids[a:b]) for a, b in _runs(mask)]
    assert spans == ["2 + 2 = 4.<|im_end|>", "It is 6.<|im_end|>"]
    assert "What is 2 + 2?" in tok.decode([i for i, m in zip(ids, mask, strict=True) if not m])

    truncated = tokenize_sft(messages, tok, seq_len=len(ids) - 3, overflow="truncate")
    assert len(truncated["input_ids"]) == len(ids) - 3
    with pytest.raises(RowError, match="too_long_tokens"):
        tokenize_sft(messages, tok, seq_len=len(ids) - 3)
    with pytest.raises(RowError, match="no_assistant_tokens"):
        tokenize_sft(messages, tok, seq_len=20, overflow="truncate")


def test_chat_template_required_or_configured(smollm2_tokenizer) -> None:
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = None
    with pytest.raises(
        ConfigError, match=r"mixes\.0\.prepare\.chat_template: the tokenizer has no chat template"
    ):
        ensure_chat_template(tok, None, "mixes.0.prepare.chat_template")
    ensure_chat_template(tok, "chatml")
    assert (
        template_prompt("Hi", tok, system="Sys")
        == "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    out = tokenize_sft(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tok, 64
    )
    assert (
        tok.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m])
        == "b<|im_end|>"
    )


# ---------------------------------------------------------------- synthetic math (no model)

_STEP = re.compile(r"\$?(\d+) ([-+x/]) \$?(\d+)(?: / 100)? = \$?(\d+)")


def test_generated_problems_are_verifiable_and_deterministic() -> None:
    seeds = generate_arithmetic_problems(60, seed=5)
    assert seeds == generate_arithmetic_problems(
        60, seed=5
    ) and seeds != generate_arithmetic_problems(60, seed=6)
    ops = {
        "+": lambda a, b: a + b,
        "-": lambda a, b: a - b,
        "x": lambda a, b: a * b,
        "/": lambda a, b: a // b,
    }
    for s in seeds:
        assert s.answer.endswith(f"#### {s.final_answer}")
        steps = _STEP.findall(s.answer)
        assert steps, s.answer
        for a, op, b, c in steps:
            val = ops[op](int(a), int(b))
            assert val == int(c) or (op == "x" and "/ 100" in s.answer and val // 100 == int(c)), (
                s.answer
            )
        assert extract_final_answer(s.answer) == s.final_answer


@pytest.mark.parametrize(
    ("text", "final"),
    [
        ("so 3 + 4 = 7.\nThe answer is: 7", "7"),
        ("blah\n#### 1,250", "1,250"),
        ("thus $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("I think 3 then 12 apples", "12"),
        ("The answer is $42.", "42"),
        ("no numbers here", None),
    ],
)
def test_extract_final_answer(text: str, final: str | None) -> None:
    assert extract_final_answer(text) == final


def test_answers_match_and_check() -> None:
    assert (
        answers_match("1,250", "1250")
        and answers_match("\\frac{1}{2}", "0.5")
        and answers_match("$5.00", "5")
    )
    assert not answers_match("12", "13") and answers_match("x+1", "x + 1")
    seed = MathSeed("s", "Ava has 3 apples. How many?", "3\n#### 3", "3")
    assert check_rephrased(
        seed, "Question: How many apples does Ava own if she has 3?", "She has 3.\nThe answer is: 3"
    ) == (None, "How many apples does Ava own if she has 3?")
    assert check_rephrased(seed, "q?", "The answer is: 4")[0] == "answer_mismatch"
    assert check_rephrased(seed, "  ", "The answer is: 3")[0] == "empty_rephrase"
    assert (
        check_rephrased(seed, "The answer is 3.", "The answer is: 3")[0] == "question_states_answer"
    )


def test_read_math_seeds(tmp_path: Path) -> None:
    fx.write_jsonl(
        tmp_path / "gsm8k.jsonl",
        [
            {"question": "q1?", "answer": "1 + 1 = 2\n#### 2"},
            {"question": "q2?", "answer": "no marker"},
            {"question": "q3?", "answer": "2\n#### 2", "final_answer": "99"},
        ],
    )
    fx.write_jsonl(
        tmp_path / "math.jsonl",
        [
            {
                "problem": "p?",
                "solution": "so $\\boxed{\\frac{3}{4}}$",
                "level": "Level 2",
                "type": "Algebra",
            }
        ],
    )
    seeds, rejects = read_math_seeds([str(tmp_path / "*.jsonl")])
    assert [(s.question, s.final_answer) for s in seeds] == [
        ("q1?", "2"),
        ("q3?", "99"),
        ("p?", "\\frac{3}{4}"),
    ]
    assert [r["reason"] for r in rejects] == ["no_final_answer"]


@pytest.mark.parametrize(
    "recipe",
    sorted((Path(__file__).resolve().parents[1] / "jobs").glob("data-*.yaml")),
    ids=lambda p: p.name,
)
def test_data_recipes_validate(recipe: Path) -> None:
    # every mix has sources (the validator guarantees it), but a recipe may have no mix;
    # what the training recipes read from these mixes: test_train_unit's recipe-chain test
    assert load_config(DataConfig, recipe).mixes


def test_decontamination_filters_the_offline_benchmark_items_themselves() -> None:
    """``offline:<task>`` in eval_sets: a training row quoting a scored item is dropped."""
    from solar_ray.errors import UserError
    from solar_ray.evalsets.benchmarks import item_texts

    index = build_eval_index(["offline:arc_challenge", "offline:piqa"], 13)
    assert set(index.sets) == {"offline:arc_challenge", "offline:piqa"}
    _, arc = item_texts("arc_challenge")[3]
    _, piqa = item_texts("piqa")[10]
    assert index.match([f"As the textbook puts it: {arc} That settles it."]) == "offline:arc_challenge"
    assert index.match(["unrelated", piqa.lower().replace("\n", " ")]) == "offline:piqa"
    assert index.match(["The merged model keeps the tokenizer of its parents, as before."]) is None
    with pytest.raises(UserError, match=r"eval_sets\.0: no offline benchmark 'arc'"):
        build_eval_index(["offline:arc"], 13)
