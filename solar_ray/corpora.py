"""Offline corpora built from what every CPython ships, for the demo and the tests.

The ``corpus`` stage (:func:`run_corpus`) writes ``python-docs`` (pretraining text from the
reference manual and stdlib docstrings), the ``python-docs-qa`` instruction corpora and
``arith-heldout`` (AI2 arithmetic questions no training data shares) as train/held-out
JSONL, split by a hash of each document. The corpora: docs/data.md, "Offline corpora".
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import Field

from solar_ray.checkpoint import atomic_output_dir, write_json_atomic
from solar_ray.config import StageConfig

__all__ = [
    "CorpusConfig",
    "python_doc_sections",
    "python_docs_documents",
    "run_corpus",
    "stdlib_docstrings",
]

#: stdlib modules whose public functions/classes have substantial docstrings
STDLIB_MODULES = (
    "os.path", "json", "re", "itertools", "functools", "collections", "pathlib", "shutil",
    "textwrap", "string", "statistics", "math", "random", "datetime", "heapq", "bisect",
    "csv", "argparse", "logging", "subprocess", "threading", "queue", "hashlib", "base64",
    "difflib", "fractions", "decimal", "calendar", "fnmatch", "glob", "tempfile", "zipfile",
    "tarfile", "gzip", "struct", "copy", "pprint", "enum", "dataclasses", "typing",
    "contextlib", "abc", "operator", "inspect", "traceback", "warnings", "uuid", "html",
    "urllib.parse", "email.utils", "shlex", "secrets", "sqlite3", "unittest", "doctest",
)  # fmt: skip


def _split(key: str, heldout_fraction: float) -> str:
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "heldout" if h < heldout_fraction else "train"


def python_doc_sections(min_chars: int = 200) -> Iterator[tuple[str, str]]:
    """(key, text) per section of the reference manual topics (``pydoc_data.topics``)."""
    import pydoc_data.topics

    for topic, text in sorted(pydoc_data.topics.topics.items()):
        # sections are separated by underlined headings; keep each with its heading
        parts = re.split(r"\n(?=[^\n]+\n[=*\-]{4,}\n)", text)
        for i, part in enumerate(parts):
            part = part.strip()
            if len(part) >= min_chars:
                yield f"topic:{topic}:{i}", part


def stdlib_docstrings(min_chars: int = 200) -> Iterator[tuple[str, str, str]]:
    """(key, qualified name, docstring) of documented public stdlib functions and classes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mod_name in STDLIB_MODULES:
            try:
                mod = importlib.import_module(mod_name)
            except ImportError:
                continue
            for name, obj in sorted(vars(mod).items()):
                if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                    continue
                if (getattr(obj, "__module__", None) or "").split(".")[0] != mod_name.split(".")[0]:
                    continue
                doc = inspect.getdoc(obj) or ""
                if len(doc) >= min_chars:
                    yield f"doc:{mod_name}.{name}", f"{mod_name}.{name}", doc


def python_docs_documents(
    split: str | None = None, heldout_fraction: float = 0.1
) -> Iterator[tuple[str, str]]:
    """(key, text) of the ``python-docs`` corpus: manual sections, then stdlib docstrings.

    ``split`` (``train`` or ``heldout``) keeps the documents the corpus stage puts there.
    """
    docs = [*python_doc_sections()]
    docs += [(key, f"{qual}\n\n{doc}") for key, qual, doc in stdlib_docstrings()]
    for key, text in docs:
        if split is None or _split(key, heldout_fraction) == split:
            yield key, text


def _first_paragraphs(text: str, max_chars: int = 1200) -> str:
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text.strip()):
        if out and sum(len(p) for p in out) + len(para) > max_chars:
            break
        out.append(para.strip())
    return "\n\n".join(out)


class CorpusConfig(StageConfig):
    """The ``corpus`` stage: write offline corpora as JSONL files into ``out``."""

    out: str
    corpora: list[
        Literal[
            "python-docs", "python-docs-qa", "python-docs-qa-api", "python-docs-qa-lang",
            "arith-heldout",
        ]
    ] = Field(
        default_factory=lambda: ["python-docs", "python-docs-qa"], min_length=1
    )
    heldout_fraction: float = Field(default=0.1, gt=0, lt=1)
    arith_heldout_items: int = Field(default=64, ge=1, description="rows of arith-heldout")
    overwrite: bool = False


def run_corpus(cfg: CorpusConfig) -> Path:
    """Write ``OUT/<corpus>/{train,heldout}.jsonl`` and ``OUT/<corpus>/manifest.json``."""
    out = Path(cfg.out)
    with atomic_output_dir(out, overwrite=cfg.overwrite) as tmp:
        for corpus in cfg.corpora:
            rows: dict[str, list[dict]] = {"train": [], "heldout": []}
            if corpus == "python-docs":
                for key, text in python_docs_documents():
                    rows[_split(key, cfg.heldout_fraction)].append({"text": text, "id": key})
            elif corpus == "arith-heldout":
                from solar_ray.evalsets.benchmarks import scored_rows

                items = scored_rows("basic_arithmetic")[-cfg.arith_heldout_items :]
                for item in items:
                    answer = item["choices"]["text"][item["choices"]["label"].index(item["answerKey"])]
                    rows["heldout"].append(
                        {"question": item["question"], "answer": answer, "id": f"{corpus}/{item['id']}"}
                    )
            else:
                lang = corpus in ("python-docs-qa", "python-docs-qa-lang")
                api = corpus in ("python-docs-qa", "python-docs-qa-api")
                for key, text in python_doc_sections() if lang else ():
                    title = text.splitlines()[0].strip().strip('"')
                    body = _first_paragraphs("\n".join(text.splitlines()[2:]))
                    rows[_split(key, cfg.heldout_fraction)].append(
                        {"instruction": f"Explain this part of the Python language: {title}.",
                         "input": "", "output": body, "id": key}
                    )
                for key, qual, doc in stdlib_docstrings() if api else ():
                    rows[_split(key, cfg.heldout_fraction)].append(
                        {"instruction": f"What does `{qual}` do in Python?", "input": "",
                         "output": _first_paragraphs(doc), "id": key}
                    )
            d = tmp / corpus
            d.mkdir()
            for split, items in rows.items():
                with open(d / f"{split}.jsonl", "w", encoding="utf-8") as f:
                    for row in items:
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
            write_json_atomic(
                d / "manifest.json",
                {
                    "corpus": corpus,
                    "rows": {k: len(v) for k, v in rows.items()},
                    "chars": {k: sum(len(json.dumps(r)) for r in v) for k, v in rows.items()},
                    "heldout_fraction": cfg.heldout_fraction,
                },
            )
    return out
