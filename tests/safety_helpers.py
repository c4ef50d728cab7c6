"""Helpers of the output-safety tests: tiny models, tree fingerprints, one-line refusals."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from conftest import save_tiny_model

from solar_ray.cli import main as cli_main

#: a 4-layer Mistral of ~100 KB: big enough for every tensor kind, small enough to write often
SMALL = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_model(out: Path, num_layers: int = 4, seed: int = 0) -> Path:
    """A random 4-layer Mistral saved as safetensors into ``out``."""
    from transformers import MistralConfig

    return save_tiny_model(MistralConfig(num_hidden_layers=num_layers, **SMALL), out, seed=seed)


def tree_state(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones too) -> its content hash, link target or 'dir'.

    Two equal states mean nothing under ``root`` was added, removed, changed or re-linked.
    """
    state: dict[str, str] = {}
    if not os.path.lexists(root):
        return state
    if root.is_file() and not root.is_symlink():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                state[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                state[rel] = "dir"
            else:
                state[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return state


def assert_refused(capsys, argv: list[str], expect: str, keep: list[Path]) -> str:
    """Run the CLI: exit 2, exactly one stderr line matching ``expect``, ``keep`` unchanged.

    Returns the error line.
    """
    before = {p: tree_state(p) for p in keep}
    capsys.readouterr()
    rc = cli_main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert re.search(expect, lines[0]), lines[0]
    for p in keep:
        assert tree_state(p) == before[p], f"{p} changed"
    return lines[0]


def assert_refused_before_output(capsys, argv: list[str], out: Path, expect: str) -> str:
    """:func:`assert_refused`, and nothing was made at ``out``."""
    line = assert_refused(capsys, argv, expect, keep=[])
    assert not os.path.lexists(out), f"{out} was made"
    return line


def siblings(out: Path) -> list[str]:
    """Hidden temporary siblings of ``out`` (``.NAME.tmp-*``, ``.NAME.old-*``)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))
