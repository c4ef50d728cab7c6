"""What the tests feed the stages and read back from them, without the data stage.

Tiny prepared mixes in the data contract's format, written with
:func:`solar_ray.data.contract.write_mix` (the same layout and columns ``solar-ray data``
writes) from a tokenizer and a few synthetic or offline texts; every tensor of a model
directory; whether an exported model computes the probe its training recorded. The bench
scripts use the mix writers too (they put ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from solar_ray.data.contract import write_mix

__all__ = [
    "arithmetic_mixes",
    "arithmetic_pairs",
    "export_matches_probe",
    "model_weights",
    "offline_prose",
    "pattern_documents",
    "write_preference_mix",
    "write_pretrain_mix",
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


def write_pretrain_mix(
    mix_dir: str | Path, tokenizer: Any, documents: Iterable[str], seq_len: int
) -> Path:
    """Tokenize, add EOS after each document and pack into rows of exactly ``seq_len``.

    ``position_ids`` restart at 0 at each document start; the tail that does not fill a
    row is dropped.
    """
    docs = list(documents)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    pos: list[int] = []
    for doc in docs:
        toks = tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
        ids.extend(toks)
        pos.extend(range(len(toks)))
    num_rows = len(ids) // seq_len
    if num_rows == 0:
        raise ValueError(f"{len(ids)} tokens do not fill one row of {seq_len}")
    rows_ids = [ids[i * seq_len : (i + 1) * seq_len] for i in range(num_rows)]
    rows_pos = [pos[i * seq_len : (i + 1) * seq_len] for i in range(num_rows)]
    splits = {
        "data": pa.table({"text": docs, "source": [_SOURCE] * len(docs)}),
        "packed": pa.table({"input_ids": rows_ids, "position_ids": rows_pos}),
    }
    return write_mix(mix_dir, "pretrain", splits, seq_len=seq_len, num_rows=num_rows,
                     num_tokens=num_rows * seq_len)  # fmt: skip


def write_sft_mix(mix_dir: str | Path, tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> Path:
    """Single-turn conversations: ``messages``, and ``tokenized`` ids / assistant masks / labels.

    The assistant mask covers the tokens after the templated prompt (the generation prompt
    included in the prompt), i.e. the answer and its end-of-turn tokens.
    """
    messages, input_ids, masks, labels = [], [], [], []
    for question, answer in pairs:
        conv = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        prompt = tokenizer.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(conv, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template does not render the prompt as a prefix")
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        ids = p_ids + a_ids
        mask = [0] * len(p_ids) + [1] * len(a_ids)
        messages.append(conv)
        input_ids.append(ids)
        masks.append(mask)
        labels.append([t if m else -100 for t, m in zip(ids, mask, strict=True)])
    source = [_SOURCE] * len(pairs)
    splits = {
        "data": pa.table({"messages": messages, "source": source}),
        "tokenized": pa.table(
            {"input_ids": input_ids, "assistant_masks": masks, "labels": labels, "source": source}
        ),
    }
    return write_mix(mix_dir, "sft", splits, num_rows=len(pairs))


def write_preference_mix(
    mix_dir: str | Path, tokenizer: Any, triples: Sequence[tuple[str, str, str]]
) -> Path:
    """``prompt`` (chat-templated with the generation prompt), ``chosen``, ``rejected``.

    Like ``solar-ray data``, ``data/`` keeps the question untemplated and ``tokenized/``
    holds the templated prompts training reads.
    """
    chosen, rejected = [c for _, c, _ in triples], [r for _, _, r in triples]
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q, _, _ in triples
    ]
    source = [_SOURCE] * len(triples)
    splits = {
        "data": pa.table({"prompt": [q for q, _, _ in triples], "chosen": chosen,
                          "rejected": rejected, "system": [""] * len(triples), "source": source}),
        "tokenized": pa.table(
            {"prompt": prompts, "chosen": chosen, "rejected": rejected, "source": source}
        ),
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
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from solar_ray.train.export import probe_model

    out = Path(out)
    expected = json.loads((out / "solar.json").read_text(encoding="utf-8"))["export_probe"]
    model = AutoModelForCausalLM.from_pretrained(out)
    got = probe_model(model, AutoTokenizer.from_pretrained(out))
    wrong = [k for k in ("input_ids", "argmax") if got[k] != expected[k]]
    for key in ("next_token_logps", "logsumexp"):
        if not torch.allclose(torch.tensor(got[key]), torch.tensor(expected[key]), atol=atol):
            wrong.append(key)
    return wrong
