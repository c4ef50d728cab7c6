"""Typed configuration of the data stage: mixes, sources, filters, preparation, synthetic math.

The YAML (``solar-ray data --config FILE``) is one :class:`DataConfig`; every field is
documented on its class below, and the YAML with every field in docs/data.md.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from solar_ray.config import StageConfig

__all__ = [
    "FORMATS_BY_KIND",
    "DataConfig",
    "DecontamConfig",
    "MixConfig",
    "PrepareConfig",
    "RephraserConfig",
    "SeedsConfig",
    "SourceConfig",
    "SynthMathConfig",
    "config_hash",
]

Kind = Literal["pretrain", "sft", "preference"]
Format = Literal[
    "auto",
    "text",
    "alpaca",
    "openorca",
    "sharegpt",
    "messages",
    "gsm8k",
    "math",
    "preference",
    "ultrafeedback",
    "orca_dpo",
]
FileType = Literal["auto", "jsonl", "json", "parquet", "csv"]

#: which source formats can feed a mix of each kind ("auto" detects among these)
FORMATS_BY_KIND: dict[str, tuple[str, ...]] = {
    "pretrain": ("text",),
    "sft": ("messages", "sharegpt", "alpaca", "openorca", "gsm8k", "math"),
    "preference": ("ultrafeedback", "orca_dpo", "preference"),
}

#: the directory (under ``out``) that the ``synth_math`` block writes
SYNTH_MATH_DIR = "synth_math"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SourceConfig(StageConfig):
    """One input of a mix: files (``path``) or the generated synthetic math (``synth_math``).

    ``weight`` and ``max_samples`` are exclusive. ``max_samples: N`` takes ``N`` rows (all of
    them when fewer survive the filters); ``weight`` shares the mix's weighted part (see
    :attr:`MixConfig.num_samples`) in proportion to the weights; neither takes every row.
    """

    path: str | list[str] | None = None
    """a local path, a URI (s3://, gs://, hf://datasets/...) or a glob; a list for many"""
    synth_math: Literal["instruct", "alignment"] | None = None
    """use the rows the top-level ``synth_math`` block generates instead of files"""
    name: str | None = None
    """label of the source in the ``source`` column and the manifest (default: from path)"""
    format: Format = "auto"
    """row schema of the files; ``auto`` detects it per file among the mix kind's formats"""
    file_type: FileType = "auto"
    """file format; ``auto`` goes by the extension (.jsonl/.ndjson, .json, .parquet, .csv)"""
    weight: float | None = Field(default=None, gt=0)
    max_samples: int | None = Field(default=None, ge=1)
    text_field: str = "text"
    """pretrain: the column that holds the document text"""
    task_field: str | None = None
    """column holding a task tag matched against ``decontaminate.deny_tasks``
    (default ``id`` for ``openorca``, whose ids read like ``flan.1234``)"""

    @model_validator(mode="after")
    def _check(self) -> SourceConfig:
        if (self.path is None) == (self.synth_math is None):
            raise ValueError("give exactly one of 'path' (files) or 'synth_math' (generated)")
        if self.weight is not None and self.max_samples is not None:
            raise ValueError("give either 'weight' or 'max_samples', not both")
        if isinstance(self.path, list) and not self.path:
            raise ValueError("'path' is an empty list")
        if self.name is not None and not _NAME.match(self.name):
            raise ValueError(f"name {self.name!r}: use letters, digits, '_', '-', '.'")
        return self

    def paths(self) -> list[str]:
        """The path patterns as a list."""
        if self.path is None:
            return []
        return [self.path] if isinstance(self.path, str) else list(self.path)

    def label(self) -> str:
        """The source's name: ``name``, else ``synth_math_<which>``, else the first file stem."""
        if self.name:
            return self.name
        if self.synth_math:
            return f"synth_math_{self.synth_math}"
        first = self.paths()[0].rstrip("/")
        stem = re.split(r"[/\\]", first)[-1] or first
        for suffix in (".gz", ".zst", ".bz2", ".xz"):
            stem = stem.removesuffix(suffix)
        stem = stem.split(".")[0] if not stem.startswith(".") else stem
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_") or "source"
        return stem


class DecontamConfig(StageConfig):
    """Drop training rows that overlap evaluation sets or come from denied tasks."""

    eval_sets: list[str] = Field(default_factory=list)
    """files (any readable format, globs allowed) whose text must not appear in training, or
    ``offline`` / ``offline:<task>``: the real benchmark items the evaluation scores"""
    ngram: int = Field(default=13, ge=1)
    """a row sharing one word n-gram of this length with any eval text is dropped"""
    deny_tasks: list[str] = Field(default_factory=list)
    """fnmatch patterns on the source's task tag; a bare word also matches the tag's prefix
    before the first '.', so ``flan`` drops ``flan.2136716`` (OpenOrca's FLAN rows)"""


class PrepareConfig(StageConfig):
    """Preparation for training: pack (pretrain), tokenize + mask (sft), template (preference)."""

    tokenizer: str
    """a model source (HF dir, hub id, .gguf, ``smollm2-135m``) whose tokenizer is used"""
    seq_len: int = Field(ge=8, le=1 << 20)
    """pretrain: the packed block length; sft/preference: the longest row kept (at most
    1,048,576 tokens: longer than any model's context)"""
    chat_template: str | None = None
    """``chatml``, or a Jinja template; required when the tokenizer has none"""
    overflow: Literal["reject", "truncate"] = "reject"
    """sft/preference rows longer than ``seq_len``: quarantine them, or keep a truncation"""
    add_special_tokens: bool = True
    """pretrain: let the tokenizer add its special tokens (e.g. Llama's BOS) per document"""
    pad_last: bool = True
    """pretrain: pad the final partial block with EOS (false: drop it)"""
    batch_size: int = Field(default=1024, ge=1)
    """rows per tokenization batch"""


class MixConfig(StageConfig):
    """One data mix: its sources, filters, sampling and optional preparation."""

    name: str
    kind: Kind
    seed: int = 0
    """decides which rows a weight or max_samples keeps and the order of the mix"""
    dedup: bool = False
    """drop exact duplicates (hash of the whitespace-normalised content) across all sources"""
    decontaminate: DecontamConfig | None = None
    num_samples: int | None = Field(default=None, ge=1)
    """rows drawn from the weighted sources together; unset: as many as possible without
    repeating a row. When it asks for more than a source has, its rows repeat (counted)."""
    max_chars: int | None = Field(default=1_000_000, ge=1)
    """rows whose text is longer are quarantined as ``too_long``; null: no limit"""
    rows_per_file: int = Field(default=100_000, ge=1)
    """rows per output Parquet shard"""
    sources: list[SourceConfig] = Field(min_length=1)
    prepare: PrepareConfig | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r}: use letters, digits, '_', '-', '.' (it names a directory)")
        return v

    @model_validator(mode="after")
    def _check(self) -> MixConfig:
        allowed = FORMATS_BY_KIND[self.kind]
        seen: dict[str, int] = {}
        for i, src in enumerate(self.sources):
            if src.format != "auto" and src.format not in allowed:
                raise ValueError(
                    f"sources.{i}.format: {src.format!r} cannot feed a {self.kind} mix "
                    f"(use one of {', '.join(allowed)}, or auto)"
                )
            if src.synth_math == "instruct" and self.kind != "sft":
                raise ValueError(f"sources.{i}.synth_math: 'instruct' rows feed sft mixes")
            if src.synth_math == "alignment" and self.kind != "preference":
                raise ValueError(f"sources.{i}.synth_math: 'alignment' rows feed preference mixes")
            label = src.label()
            if label in seen:
                raise ValueError(
                    f"sources.{i}: name {label!r} is also source {seen[label]}'s; "
                    "set a distinct 'name'"
                )
            seen[label] = i
        if len(self.sources) > 0xFFFF:
            raise ValueError("sources: at most 65535 sources per mix")
        return self


class SeedsConfig(StageConfig):
    """Where the synthetic math seeds come from: generated problems and/or MATH/GSM8K files."""

    generate: int = Field(default=0, ge=0, le=1_000_000)
    """number of offline arithmetic word problems to generate (at most a million; they
    are held in memory)"""
    seed: int = 0
    files: list[str] = Field(default_factory=list)
    """GSM8K-format (question, answer '... #### N') or MATH-format (problem, solution with
    \\boxed{}) files; any readable file type, globs allowed"""
    format: Literal["auto", "gsm8k", "math"] = "auto"
    max_seeds: int | None = Field(default=None, ge=1)
    """keep only the first N seeds (after generation and files)"""

    @model_validator(mode="after")
    def _check(self) -> SeedsConfig:
        if self.generate == 0 and not self.files:
            raise ValueError("no seeds: set 'generate' > 0 and/or list seed 'files'")
        return self


_QUESTION_PROMPT = (
    "Rephrase the following math question in different words. Keep every number and the "
    "meaning exactly the same. Reply with the rephrased question only.\n\n"
    "Question: {question}"
)
_ANSWER_PROMPT = (
    "Rewrite the following solution step by step in your own words. Keep every number and "
    'the final result. End with a line "The answer is: <number>".\n\n'
    "Question: {question}\nSolution: {answer}"
)


class RephraserConfig(StageConfig):
    """The LLM that rewrites every question and answer (MetaMath-style), and how it runs."""

    model: str = "smollm2-135m"
    """any model source :func:`solar_ray.models.resolve_model` accepts"""
    backend: Literal["auto", "transformers", "vllm", "template", "identity"] = "auto"
    """auto: vLLM when it is installed and the cluster has a GPU, else transformers on CPU;
    template: no model, a fixed rewrite (question kept, ``#### N`` -> ``The answer is: N``),
    a dry run of the pipeline whose alignment pairs still differ; identity: an alias of
    template (a plain copy would make every chosen answer equal its rejected one)"""
    max_new_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    """0 is greedy decoding (reproducible)"""
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int = 0
    batch_size: int = Field(default=8, ge=1)
    """seeds per generate call (each gives two prompts: question and answer)"""
    num_actors: int = Field(default=1, ge=1)
    """size of the Ray actor pool holding the model"""
    num_cpus_per_actor: float = Field(default=1, gt=0)
    num_gpus_per_actor: float | None = Field(default=None, ge=0)
    """default: 1 with vLLM, 0 with transformers"""
    question_prompt: str = _QUESTION_PROMPT
    answer_prompt: str = _ANSWER_PROMPT

    @field_validator("backend")
    @classmethod
    def _alias(cls, v: str) -> str:
        return "template" if v == "identity" else v

    @field_validator("question_prompt", "answer_prompt")
    @classmethod
    def _placeholders(cls, v: str, info) -> str:
        need = ["{question}"] + (["{answer}"] if info.field_name == "answer_prompt" else [])
        missing = [p for p in need if p not in v]
        if missing:
            raise ValueError(f"must contain {', '.join(missing)}")
        return v


class SynthMathConfig(StageConfig):
    """Synth. Math-Instruct and Synth. Math-Alignment, generated once per data config."""

    seeds: SeedsConfig
    rephraser: RephraserConfig = Field(default_factory=RephraserConfig)


class DataConfig(StageConfig):
    """The ``solar-ray data`` config: where to write, and the mixes to build."""

    out: str
    """output directory; each mix is written to ``out/<name>/``"""
    mixes: list[MixConfig] = Field(default_factory=list)
    synth_math: SynthMathConfig | None = None
    num_workers: int | None = Field(default=None, ge=1)
    """Ray Data tasks per operator (null: as many as the cluster allows); the output does
    not depend on it"""
    overwrite: bool = False
    """replace existing mix directories (otherwise an existing non-empty one is an error)"""

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        names: dict[str, int] = {}
        for i, mix in enumerate(self.mixes):
            if mix.name in names:
                raise ValueError(f"mixes.{i}.name: {mix.name!r} is also mixes.{names[mix.name]}")
            if mix.name == SYNTH_MATH_DIR and self.synth_math is not None:
                raise ValueError(f"mixes.{i}.name: {SYNTH_MATH_DIR!r} is where synth_math writes")
            names[mix.name] = i
            for j, src in enumerate(mix.sources):
                if src.synth_math and self.synth_math is None:
                    raise ValueError(
                        f"mixes.{i}.sources.{j}.synth_math: needs a top-level 'synth_math:' block"
                    )
        if not self.mixes and self.synth_math is None:
            raise ValueError("nothing to build: add 'mixes' and/or a 'synth_math' block")
        return self


def config_hash(cfg: StageConfig) -> str:
    """The key of a config's resolved JSON (skip-if-done keys on it; :mod:`solar_ray.identity`)."""
    from solar_ray.identity import config_key

    return config_key(cfg.to_dict())
