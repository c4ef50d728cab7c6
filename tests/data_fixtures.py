"""Fixture files for the data tests: each real schema, with deliberately bad rows.

Every writer returns the expected outcome next to the path, so tests assert exact counts.
The texts are built so that no two rows share a 13-word run except the planted ones.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

#: 21 words: the planted contamination (a GSM8K-style test question)
EVAL_QUESTION = (
    "Natalia sold clips to forty eight of her friends in April and then she sold half as "
    "many clips in May"
)

_VOCAB = (
    "river mountain quiet lantern copper meadow orbit velvet harbor pepper galaxy timber "
    "canyon marble violet thunder saddle pixel glacier lemon falcon prism cedar ember "
    "tundra walnut comet basil quartz willow nebula cobalt fern magnet sparrow dune"
).split()


def write_jsonl(path: Path, rows: list, raw_lines: list[bytes] = ()) -> Path:
    """Rows as JSON lines, then ``raw_lines`` verbatim (for broken lines)."""
    with open(path, "wb") as f:
        for r in rows:
            f.write(json.dumps(r).encode() + b"\n")
        for line in raw_lines:
            f.write(line + b"\n")
    return path


def write_eval_set(d: Path) -> Path:
    """A GSM8K-format evaluation file holding :data:`EVAL_QUESTION`."""
    return write_jsonl(
        d / "gsm8k_test.jsonl",
        [
            {
                "question": EVAL_QUESTION + " How many clips did Natalia sell altogether?",
                "answer": "Natalia sold 48/2 = 24 clips in May.\n48 + 24 = 72\n#### 72",
            }
        ],
    )


def write_alpaca(d: Path) -> tuple[Path, dict]:
    """Alpaca JSON array: 20 good rows, 1 contaminated, 4 bad."""
    rows: list = [
        {
            "instruction": f"Write a short note about topic number {i}.",
            "input": "" if i % 2 else f"Context for item {i}.",
            "output": f"Here is note {i} about the topic.",
        }
        for i in range(20)
    ]
    rows.append(
        {
            "instruction": f"Solve this: {EVAL_QUESTION}. How many clips?",
            "input": "",
            "output": "72",
        }
    )
    rows += [
        {"instruction": "Missing the output field."},
        {"instruction": "   ", "output": "empty instruction"},
        {"instruction": "Output is a number.", "output": 5},
        "not an object",
    ]
    path = d / "alpaca.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    expected = {
        "records": 25,
        "valid": 21,
        "rejects": {
            "missing_field": 1,
            "empty_field": 1,
            "wrong_type": 1,
            "invalid_json": 1,
            "contaminated": 1,
        },
    }
    return path, expected


def write_openorca(d: Path) -> tuple[Path, dict]:
    """OpenOrca Parquet: 30 rows tagged flan/cot/niv, 1 contaminated, 1 missing response."""
    rows = [
        {
            "id": ["flan", "cot", "niv"][i % 3] + f".{i}",
            "system_prompt": "You are a helpful assistant." if i % 2 else "",
            "question": f"Question {i}: what is {i} plus {i}?",
            "response": f"The sum is {2 * i}.",
        }
        for i in range(30)
    ]
    rows.append({"id": "cot.100", "system_prompt": "", "question": EVAL_QUESTION, "response": "72"})
    rows.append(
        {"id": "niv.200", "system_prompt": "", "question": "No response here.", "response": None}
    )
    path = d / "openorca.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    expected = {
        "records": 32,
        "valid": 31,
        "rejects": {"missing_field": 1, "denied_task": 10, "contaminated": 1},
    }
    return path, expected


def long_answer(n_words: int = 120) -> str:
    """A long assistant answer (well over 64 tokens, well under max_chars)."""
    r = random.Random(7)
    return " ".join(r.choice(_VOCAB) for _ in range(n_words))


def write_sharegpt(d: Path) -> tuple[Path, dict]:
    """ShareGPT JSONL: 15 good (one over-long), 2 duplicates, 4 broken lines, 1 blank."""
    rows = []
    for i in range(15):
        answer = long_answer() if i == 14 else f"Fact {i} is interesting."
        rows.append(
            {
                "conversations": [
                    {"from": "human", "value": f"Tell me fact {i}."},
                    {"from": "gpt", "value": answer},
                ]
            }
        )
    # an exact duplicate of row 0 up to whitespace, and a duplicate of alpaca row 1
    rows.append(
        {
            "conversations": [
                {"from": "human", "value": "Tell me  fact 0. "},
                {"from": "gpt", "value": "Fact 0 is\ninteresting."},
            ]
        }
    )
    rows.append(
        {
            "conversations": [
                {"from": "human", "value": "Write a short note about topic number 1."},
                {"from": "gpt", "value": "Here is note 1 about the topic."},
            ]
        }
    )
    rows.append(
        {
            "conversations": [
                {"from": "narrator", "value": "Once upon a time."},
                {"from": "gpt", "value": "Yes."},
            ]
        }
    )
    rows.append(
        {
            "conversations": [
                {"from": "human", "value": "Hello?"},
                {"from": "gpt", "value": "Hi."},
                {"from": "human", "value": "Bye."},
            ]
        }
    )
    broken = [b"{not json", b'{"conversations": "\xff\xfe bad bytes"}', b"   "]
    path = write_jsonl(d / "sharegpt.jsonl", rows, broken)
    expected = {
        "records": 21,
        "valid": 17,
        "rejects": {
            "unknown_role": 1,
            "bad_conversation": 1,
            "invalid_json": 1,
            "undecodable_text": 1,
            "duplicate": 2,
        },
        "too_long_tokens": 1,
    }
    return path, expected


def write_messages(d: Path) -> Path:
    """``messages`` JSONL: 3 good rows (one with a system prompt), 2 bad."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Ping {i}"},
                {"role": "assistant", "content": f"Pong {i}"},
            ]
        }
        for i in range(2)
    ]
    rows.append(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "And?"},
                {"role": "assistant", "content": "Bye"},
            ]
        }
    )
    rows.append(
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "system", "content": "late"},
                {"role": "assistant", "content": "y"},
            ]
        }
    )
    rows.append({"messages": []})
    return write_jsonl(d / "messages.jsonl", rows)


def docs(n: int, seed: int, prefix: str) -> list[str]:
    """``n`` varied documents (5 to 60 words) tagged with ``prefix`` and their index."""
    r = random.Random(seed)
    return [
        f"{prefix} {i}: " + " ".join(r.choice(_VOCAB) for _ in range(r.randint(5, 60)))
        for i in range(n)
    ]


def write_pretrain(d: Path) -> dict[str, tuple[Path, list[str]]]:
    """Three pretraining sources in three file types: web (JSONL), books (Parquet), code (CSV).

    web: 600 docs; books: 400 docs; code: 200 docs plus one malformed CSV row and one
    empty text (2 rejects).
    """
    web = docs(600, 1, "web")
    books = docs(400, 2, "book")
    code = docs(200, 3, "code")
    write_jsonl(
        d / "web.jsonl", [{"text": t, "url": f"https://example.com/{i}"} for i, t in enumerate(web)]
    )
    pq.write_table(pa.table({"content": books}), d / "books.parquet")
    with open(d / "code.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "lang"])
        for t in code[:100]:
            w.writerow([t, "py"])
        w.writerow(["too", "many", "fields"])
        w.writerow(["", "py"])
        for t in code[100:]:
            w.writerow([t, "py"])
    return {
        "web": (d / "web.jsonl", web),
        "books": (d / "books.parquet", books),
        "code": (d / "code.csv", code),
    }


def write_preference(d: Path) -> dict[str, tuple[Path, dict]]:
    """UltraFeedback-binarized (Parquet), Orca DPO pairs (JSONL), plain pairs (CSV)."""
    uf = [
        {
            "prompt": f"Explain idea {i}.",
            "chosen": [
                {"role": "user", "content": f"Explain idea {i}."},
                {"role": "assistant", "content": f"Idea {i} explained well."},
            ],
            "rejected": [
                {"role": "user", "content": f"Explain idea {i}."},
                {"role": "assistant", "content": f"Idea {i}? No."},
            ],
            "score_chosen": 8.0,
            "score_rejected": 3.0,
        }
        for i in range(10)
    ]
    uf.append(
        {
            "prompt": "Multi turn",
            "chosen": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"},
            ],
            "rejected": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "e"},
            ],
            "score_chosen": 1.0,
            "score_rejected": 0.0,
        }
    )
    pq.write_table(pa.Table.from_pylist(uf), d / "ultrafeedback.parquet")
    orca = [
        {
            "system": "You are an AI assistant." if i % 2 else "",
            "question": f"Orca question {i}?",
            "chosen": f"Good answer {i}.",
            "rejected": f"Bad answer {i}.",
        }
        for i in range(8)
    ]
    orca.append({"system": "", "question": "Same?", "chosen": "same", "rejected": "same"})
    write_jsonl(d / "orca_dpo.jsonl", orca)
    with open(d / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "chosen", "rejected"])
        for i in range(6):
            w.writerow([f"Pair prompt {i}", f"Chosen {i}", f"Rejected {i}"])
        w.writerow(["", "x", "y"])
    return {
        "ultrafeedback": (
            d / "ultrafeedback.parquet",
            {"valid": 10, "rejects": {"multi_turn_prompt": 1}},
        ),
        "orca_dpo": (d / "orca_dpo.jsonl", {"valid": 8, "rejects": {"identical_pair": 1}}),
        "pairs": (d / "pairs.csv", {"valid": 6, "rejects": {"empty_field": 1}}),
    }
