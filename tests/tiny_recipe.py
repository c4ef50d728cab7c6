"""jobs/tiny.yaml as the tests run it: the shipped recipe, smaller where size proves nothing;
and the tiny SFT mix sweep the tune and object-storage tests run."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

#: ``--set`` overrides applied to jobs/tiny.yaml by the pipeline and cluster tests
SMALLER = (
    "stages.cpt.steps=8",
    "stages.cpt.checkpoint_every=4",
    "stages.cpt.eval_every=4",
    "stages.sft_v1.steps=3",
    "stages.sft_v2.steps=3",
    "stages.dpo.steps=2",
    "stages.eval.limit=4",
    "stages.eval.ppl_max_texts=4",
)

#: every stage of jobs/tiny.yaml
ALL = ("corpus", "base", "upscaled", "data", "cpt", "sft_v1", "sft_v2", "sft_merged", "dpo",
       "final", "eval", "contamination")  # fmt: skip

#: the kind of every stage of jobs/tiny.yaml, written out (not read from the recipe)
KINDS = {"corpus": "corpus", "base": "model", "upscaled": "upscale", "data": "data",
         "cpt": "pretrain", "sft_v1": "sft", "sft_v2": "sft", "sft_merged": "merge",
         "dpo": "dpo", "final": "merge", "eval": "eval",
         "contamination": "contamination"}  # fmt: skip

#: the stages that train on Ray Train workers
TRAINING = ("cpt", "sft_v1", "sft_v2", "dpo")

#: stages that write a model directory with a solar.json manifest
MODEL_STAGES = ("upscaled", "cpt", "sft_v1", "sft_v2", "sft_merged", "dpo", "final")


def sft_mix_sweep(
    name: str,
    base: str | os.PathLike[str],
    mixes: Mapping[str, str | os.PathLike[str]],
    yardstick: str | os.PathLike[str],
    *,
    steps: int,
    eval_every: int,
) -> dict[str, Any]:
    """A sweep config (as a dict) of one SFT run per mix on ``base`` (trials ``mix-<name>``),
    each scored on the held-out ``yardstick``: one CPU worker, no ZeRO, no tracking."""
    return {
        "name": name,
        "base": str(base),
        "search": {"method": "none", "mixes": [{"name": n, "data": str(d)} for n, d in mixes.items()]},
        "train": {"kind": "sft", "val_data": str(yardstick), "num_workers": 1,
                  "zero_stage": 0, "micro_batch_size": 2, "seq_len": 64, "steps": steps,
                  "eval_every": eval_every, "log_every": 1, "lr": 1e-3, "warmup_steps": 0,
                  "checkpoint_every": 100, "tracking": "none", "max_failures": 0},
        "scheduler": {"kind": "grid"},
    }  # fmt: skip
