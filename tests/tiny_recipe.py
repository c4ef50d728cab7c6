"""jobs/tiny.yaml as the tests run it: the shipped recipe, smaller where size proves nothing."""

from __future__ import annotations

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
