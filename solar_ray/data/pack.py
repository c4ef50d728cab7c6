"""Packing for continued pretraining: documents -> fixed ``seq_len`` blocks (plain numpy).

:func:`pack_documents` is the reference (``run_clm``'s ``group_texts``: documents + EOS
concatenated and cut every ``seq_len``, ``position_ids`` restarting at each document and
block). The Ray pipeline packs runs of documents in parallel with :func:`pack_span` and
joins the blocks straddling two runs with :func:`stitch_fragments`, equal to
:func:`pack_documents` bit for bit. See docs/data.md, "Preparation for training".
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Fragment",
    "PackedBlocks",
    "pack_documents",
    "pack_span",
    "pack_span_flat",
    "stitch_fragments",
]


@dataclass
class Fragment:
    """Part of block ``block`` starting at token ``start`` of that block."""

    block: int
    start: int
    input_ids: np.ndarray
    position_ids: np.ndarray


@dataclass
class PackedBlocks:
    """Packed blocks: ``input_ids`` and ``position_ids`` of shape ``[num_blocks, seq_len]``."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    first_block: int
    """global index of row 0 (0 for :func:`pack_documents`)"""
    num_tokens: int
    """document tokens (EOS included) in these blocks"""
    num_padding: int

    @property
    def num_blocks(self) -> int:
        """Rows."""
        return int(self.input_ids.shape[0])

    @property
    def efficiency(self) -> float:
        """Share of non-padding tokens."""
        total = self.num_tokens + self.num_padding
        return self.num_tokens / total if total else 1.0


def _stream_flat(
    flat_ids: np.ndarray, doc_lengths: np.ndarray, eos_id: int, start: int, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ids (each document + EOS) and positions of a stream beginning at global ``start``."""
    lengths = np.asarray(doc_lengths, dtype=np.int64) + 1
    total = int(lengths.sum())
    ids = np.empty(total, dtype=np.int32)
    ends = np.cumsum(lengths) - 1
    is_doc = np.ones(total, dtype=bool)
    is_doc[ends] = False
    ids[is_doc] = flat_ids
    ids[ends] = eos_id
    doc_starts = ends + 1 - lengths + start
    g = np.arange(start, start + total, dtype=np.int64)
    block_start = (g // seq_len) * seq_len
    positions = (g - np.maximum(np.repeat(doc_starts, lengths), block_start)).astype(np.int32)
    return ids, positions


def pack_span(
    token_lists: Sequence[Sequence[int]],
    start: int,
    eos_id: int,
    seq_len: int,
) -> tuple[PackedBlocks, list[Fragment]]:
    """Pack documents whose stream begins at global token offset ``start``.

    Returns the blocks lying entirely inside this span and the pieces of the (at most two)
    blocks it shares with its neighbours.
    """
    arrays = [np.asarray(t, dtype=np.int32) for t in token_lists]
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    flat = np.concatenate(arrays) if arrays else np.empty(0, np.int32)
    return pack_span_flat(flat, lengths, start, eos_id, seq_len)


def pack_span_flat(
    flat_ids: np.ndarray,
    doc_lengths: np.ndarray,
    start: int,
    eos_id: int,
    seq_len: int,
) -> tuple[PackedBlocks, list[Fragment]]:
    """:func:`pack_span` on documents given as one flat id array and their lengths."""
    ids, pos = _stream_flat(flat_ids, doc_lengths, eos_id, start, seq_len)
    end = start + len(ids)
    first_full = -(-start // seq_len)  # ceil
    last_full = end // seq_len  # exclusive
    fragments: list[Fragment] = []
    if first_full >= last_full:  # no complete block inside the span
        if len(ids):
            fragments.append(Fragment(start // seq_len, start % seq_len, ids, pos))
        empty = np.empty((0, seq_len), dtype=np.int32)
        return PackedBlocks(empty, empty.copy(), first_full, 0, 0), fragments
    a = first_full * seq_len - start
    b = last_full * seq_len - start
    if a > 0:
        fragments.append(Fragment(start // seq_len, start % seq_len, ids[:a], pos[:a]))
    if b < len(ids):
        fragments.append(Fragment(last_full, 0, ids[b:], pos[b:]))
    blocks = PackedBlocks(
        ids[a:b].reshape(-1, seq_len),
        pos[a:b].reshape(-1, seq_len),
        first_full,
        b - a,
        0,
    )
    return blocks, fragments


def stitch_fragments(
    fragments: Sequence[Fragment],
    seq_len: int,
    total_tokens: int,
    pad_id: int,
    pad_last: bool = True,
) -> tuple[PackedBlocks, list[int]]:
    """Join fragments into whole blocks; pad (or drop) the final partial block.

    ``total_tokens`` is the length of the whole stream, which fixes which block is last.
    Returns the stitched blocks in block order and the global block index of each row
    (they need not be consecutive).
    """
    by_block: dict[int, list[Fragment]] = defaultdict(list)
    for f in fragments:
        by_block[f.block].append(f)
    last_block = (total_tokens - 1) // seq_len if total_tokens else -1
    rows_ids, rows_pos, blocks = [], [], []
    num_padding = 0
    for block in sorted(by_block):
        parts = sorted(by_block[block], key=lambda f: f.start)
        ids = np.concatenate([f.input_ids for f in parts])
        pos = np.concatenate([f.position_ids for f in parts])
        expected = np.cumsum([0] + [len(f.input_ids) for f in parts[:-1]])
        assert [f.start for f in parts] == expected.tolist(), (
            f"fragments of block {block} do not tile"
        )
        if len(ids) < seq_len:
            assert block == last_block, f"block {block} is incomplete but not the last"
            if not pad_last:
                continue
            pad = seq_len - len(ids)
            num_padding += pad
            ids = np.concatenate([ids, np.full(pad, pad_id, dtype=np.int32)])
            pos = np.concatenate([pos, np.arange(pad, dtype=np.int32)])
        rows_ids.append(ids)
        rows_pos.append(pos)
        blocks.append(block)
    num_tokens = sum(len(i) for i in rows_ids) - num_padding
    shape = (len(rows_ids), seq_len)
    out = PackedBlocks(
        np.stack(rows_ids) if rows_ids else np.empty(shape, np.int32),
        np.stack(rows_pos) if rows_pos else np.empty(shape, np.int32),
        blocks[0] if blocks else 0,
        num_tokens,
        num_padding,
    )
    return out, blocks


def pack_documents(
    token_lists: Sequence[Sequence[int]],
    eos_id: int,
    seq_len: int,
    pad_last: bool = True,
    pad_id: int | None = None,
) -> PackedBlocks:
    """Pack tokenized documents into ``[num_blocks, seq_len]`` blocks (reference, no Ray).

    Each document is followed by ``eos_id``; blocks are consecutive ``seq_len`` windows of
    that stream; ``position_ids`` restart at 0 at each document start and each block start;
    the final partial block is padded with ``pad_id`` (default ``eos_id``) or dropped.
    """
    if seq_len < 1:
        raise ValueError("seq_len must be >= 1")
    pad = eos_id if pad_id is None else pad_id
    full, fragments = pack_span(token_lists, 0, eos_id, seq_len)
    total = sum(len(t) + 1 for t in token_lists)
    tail, _ = stitch_fragments(fragments, seq_len, total, pad, pad_last)
    return PackedBlocks(
        np.concatenate([full.input_ids, tail.input_ids]),
        np.concatenate([full.position_ids, tail.position_ids]),
        0,
        full.num_tokens + tail.num_tokens,
        tail.num_padding,
    )
