"""Resuming a DeepSpeed checkpoint at another data-parallel world size (an elastic resize).

DeepSpeed's ZeRO-1/2/3 partitions follow the world size and load only at the one they were
saved at; its *universal checkpoint* (``deepspeed.checkpoint.ds_to_universal``) rewrites
them as one file per parameter that an engine with ``checkpoint.load_universal`` slices
again. This module only decides when that converter is needed (ZeRO-1/2/3 saved at another
world size; ZeRO-0 loads as is) and runs it on each worker's local copy. See
docs/train.md, "Elastic pretraining".
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
from pathlib import Path

__all__ = ["needs_universal", "to_universal"]

log = logging.getLogger(__name__)

#: DeepSpeed's tag suffix for a converted checkpoint
UNIVERSAL_SUFFIX = "_universal"


def needs_universal(zero_stage: int, saved_world_size: int | None, world_size: int) -> bool:
    """Whether a checkpoint saved at ``saved_world_size`` must be converted to load here.

    ``saved_world_size`` None (a checkpoint from before it was recorded) counts as the same.
    """
    return zero_stage >= 1 and saved_world_size is not None and saved_world_size != world_size


def to_universal(checkpoint_dir: Path, tag: str, out_dir: Path) -> tuple[Path, str]:
    """Convert ``checkpoint_dir/tag`` into a universal checkpoint under ``out_dir``.

    Returns ``(load_dir, universal_tag)`` for ``engine.load_checkpoint``. The converter's
    progress lines go to this module's debug log; a failure raises with its output.
    """
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    universal_tag = tag + UNIVERSAL_SUFFIX
    args = argparse.Namespace(
        input_folder=str(Path(checkpoint_dir) / tag),
        output_folder=str(Path(out_dir) / universal_tag),
        # in-process: a worker does not fork a process pool (the pool re-imports torch)
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # checkpoints of a plain (non-Megatron) model carry no universal_checkpoint_info;
        # DeepSpeed's own flag adds its version key
        inject_missing_state=True,
    )
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            ds_to_universal(args)
    except Exception as e:
        raise RuntimeError(
            f"could not convert the DeepSpeed checkpoint {checkpoint_dir}/{tag} for another "
            f"world size: {e}\n{printed.getvalue()[-2000:]}"
        ) from e
    log.debug("ds_to_universal: %s", printed.getvalue())
    return Path(out_dir), universal_tag
