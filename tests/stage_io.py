"""What the tests feed the stages and read back from them, without the data stage.

Tiny prepared mixes from a tokenizer and a few synthetic or offline texts, tokenized and
packed with the data stage's own functions and written by :func:`write_mix` in the layout
and columns ``solar-ray data`` writes; every tensor of a model directory (read with
``safetensors``, not the package's reader, so the upscale and merge tests check the package
against another implementation); whether an exported model computes the probe its training
recorded. The bench scripts use the mix writers too (they put ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from solar_ray.checkpoint import write_json_atomic
from solar_ray.data.contract import DATA_MANIFEST, LAYOUT, TEXT_SPLIT, shard_name, write_shard
from solar_ray.data.pack import pack_documents
from solar_ray.data.templates import template_prompt, tokenize_sft

__all__ = [
    "arithmetic_mixes",
    "arithmetic_pairs",
    "export_matches_probe",
    "model_weights",
    "offline_prose",
    "pattern_documents",
    "write_preference_mix",
    "write_pretrain_mix",
    "write_mix",
    "write_sft_mix",
]

_WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def pattern_documents(num_docs: int, seed: int = 0) -> list[str]:
    """Short documents with a learnable structure (counting runs of a few words)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        start = rng.randrange(len(_WORDS))
        n = rng.randint(8, 24)
        docs.append(" ".join(_WORDS[(start + i) % len(_WORDS)] for i in range(n)) + ".")
    return docs


def offline_prose(max_docs: int | None = None, min_chars: int = 200) -> list[str]:
    """Real English prose that ships with CPython: the reference-manual topics in pydoc_data."""
    from pydoc_data.topics import topics

    docs = [t.strip() for _, t in sorted(topics.items()) if len(t.strip()) >= min_chars]
    return docs[:max_docs] if max_docs else docs


def arithmetic_pairs(
    num: int, seed: int = 0, rejected: str = "wrong_number"
) -> list[tuple[str, str, str]]:
    """(question, correct answer, rejected answer) triples of small additions.

    ``rejected="wrong_number"`` gives the same sentence with a wrong sum (like the paper's
    Synth. Math-Alignment pairs); ``"refusal"`` gives an unhelpful reply, an easy contrast.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        good = f"{a} plus {b} is {a + b}."
        if rejected == "refusal":
            bad = "I do not know, sorry."
        else:
            bad = f"{a} plus {b} is {a + b + rng.choice([-3, -2, -1, 1, 2, 3])}."
        out.append((f"What is {a} plus {b}?", good, bad))
    return out


_SOURCE = "testing"


def write_mix(mix_dir: str | Path, kind: str, splits: dict[str, pa.Table], **manifest: Any) -> Path:
    """Write a small mix directly (no Ray): each split one shard, cast to the contract's
    layout (:data:`~solar_ray.data.contract.LAYOUT`); the manifest last. ``splits`` maps
    ``data`` and the kind's prepared split to tables with (at least) the layout's columns."""
    mix_dir, layout = Path(mix_dir), LAYOUT[kind]
    for split, table in splits.items():
        schema = {TEXT_SPLIT: layout.data, layout.prepared_split: layout.prepared}[split]
        write_shard(table.select(schema.names).cast(schema), mix_dir / split, shard_name(0))
    write_json_atomic(mix_dir / DATA_MANIFEST, {"kind": kind, "name": mix_dir.name, **manifest})
    return mix_dir


def write_pretrain_mix(
    mix_dir: str | Path, tokenizer: Any, documents: Iterable[str], seq_len: int
) -> Path:
    """Tokenize and pack as the data stage does (:func:`~solar_ray.data.pack.pack_documents`:
    EOS after each document, ``position_ids`` restarting at each document and row start);
    the tail that does not fill a row is dropped."""
    docs = list(documents)
    tokens = [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in docs]
    packed = pack_documents(tokens, tokenizer.eos_token_id, seq_len, pad_last=False)
    if packed.num_blocks == 0:
        num_tokens = sum(len(t) + 1 for t in tokens)
        raise ValueError(f"{num_tokens} tokens do not fill one row of {seq_len}")
    splits = {
        "data": pa.table({"text": docs, "source": [_SOURCE] * len(docs)}),
        "packed": pa.table({"input_ids": packed.input_ids.tolist(),
                            "position_ids": packed.position_ids.tolist()}),
    }  # fmt: skip
    return write_mix(mix_dir, "pretrain", splits, seq_len=seq_len, num_rows=packed.num_blocks,
                     num_tokens=packed.num_blocks * seq_len)  # fmt: skip


def write_sft_mix(mix_dir: str | Path, tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> Path:
    """Single-turn conversations: ``messages``, and ``tokenized`` ids / assistant masks /
    labels as the data stage writes them (:func:`~solar_ray.data.templates.tokenize_sft`)."""
    messages = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs
    ]
    tokenized = [
        {**tokenize_sft(conv, tokenizer, seq_len=sys.maxsize), "source": _SOURCE} for conv in messages
    ]
    splits = {
        "data": pa.table({"messages": messages, "source": [_SOURCE] * len(pairs)}),
        "tokenized": pa.Table.from_pylist(tokenized),
    }
    return write_mix(mix_dir, "sft", splits, num_rows=len(pairs))


def write_preference_mix(
    mix_dir: str | Path, tokenizer: Any, triples: Sequence[tuple[str, str, str]]
) -> Path:
    """``prompt``, ``chosen``, ``rejected``; like ``solar-ray data``, ``data/`` keeps the
    question untemplated and ``tokenized/`` holds the templated prompts training reads
    (:func:`~solar_ray.data.templates.template_prompt`)."""
    questions = [q for q, _, _ in triples]
    chosen, rejected = [c for _, c, _ in triples], [r for _, _, r in triples]
    source = [_SOURCE] * len(triples)
    splits = {
        "data": pa.table({"prompt": questions, "chosen": chosen, "rejected": rejected,
                          "system": [""] * len(triples), "source": source}),
        "tokenized": pa.table({"prompt": [template_prompt(q, tokenizer) for q in questions],
                               "chosen": chosen, "rejected": rejected, "source": source}),
    }  # fmt: skip
    return write_mix(mix_dir, "preference", splits, num_rows=len(triples))


def arithmetic_mixes(root: str | Path, tokenizer: Any, n: int = 48) -> dict[str, Path]:
    """An SFT mix and a preference mix (refusals rejected) of ``n`` arithmetic questions
    under ``root``: ``{"root", "sft", "pref"}``, what the in-process stage tests train on."""
    root = Path(root)
    return {
        "root": root,
        "sft": write_sft_mix(root / "sft", tokenizer, [(q, a) for q, a, _ in arithmetic_pairs(n)]),
        "pref": write_preference_mix(
            root / "pref", tokenizer, arithmetic_pairs(n, seed=1, rejected="refusal")
        ),
    }


def model_weights(model_dir: str | Path) -> dict[str, Any]:
    """Every tensor of a safetensors model directory, all shards, by name."""
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def export_matches_probe(out: str | Path, atol: float = 1e-4) -> list[str]:
    """What differs between a stage output and the probe its training recorded (``[]``: none).

    The output must load with ``AutoModelForCausalLM`` and compute, on the probe text,
    the next-token statistics the trained model computed (``solar.json``'s ``export_probe``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from solar_ray.checkpoint import read_manifest
    from solar_ray.train.export import probe_model

    expected = read_manifest(out)["export_probe"]
    model = AutoModelForCausalLM.from_pretrained(out)
    got = probe_model(model, AutoTokenizer.from_pretrained(out))
    wrong = [k for k in ("input_ids", "argmax") if got[k] != expected[k]]
    for key in ("next_token_logps", "logsumexp"):
        if not torch.allclose(torch.tensor(got[key]), torch.tensor(expected[key]), atol=atol):
            wrong.append(key)
    return wrong
