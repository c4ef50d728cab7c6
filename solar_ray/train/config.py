"""Typed configs of the three training stages: ``pretrain``, ``sft`` and ``dpo``.

All three share :class:`TrainConfig` (model and data, the Ray Train run's storage, workers,
DeepSpeed, batch and schedule, checkpointing, export); a recipe is in docs/train.md.
Field-level mistakes fail when the config is loaded; those that need the model or the data
fail in the stage's ``validate_*`` (:func:`solar_ray.train.common.validate_common`) before
any worker starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from solar_ray.config import StageConfig
from solar_ray.fs import local_path
from solar_ray.tracking import Backends

if TYPE_CHECKING:
    from solar_ray.tracking import TrackedRun

__all__ = [
    "DPOConfig",
    "LoraSettings",
    "PretrainConfig",
    "SFTConfig",
    "TrainConfig",
]

#: fields that change how a run is operated but not what it computes; a run restarted with
#: different values of these still continues from its checkpoints
OPERATIONAL_FIELDS = frozenset(
    {
        "overwrite",
        "max_failures",
        "num_checkpoints_to_keep",
        "checkpoint_at",
        "log_every",
        "tracking",
        "tracking_project",
        "tracking_name",
        "cpus_per_worker",
        "resources_per_worker",
        "local",
        # the worker count changes only the order of float sums: the global batch (which is
        # in the fingerprint, see result_fingerprint) and the data order do not depend on it,
        # so a run resumes on fewer or more workers (an elastic range, or a resubmission)
        "num_workers",
        "elastic_resize_interval_s",
        "storage_path",
        "name",
        "out",
    }
)


def accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step on each of ``world_size`` workers for a global batch
    of ``global_batch_size`` rows: the ceiling, so a count that does not divide the global
    batch gets filler slots (weighted 0 by :class:`solar_ray.train.pretrain.PackedBatches`)."""
    return -(-global_batch_size // (micro_batch_size * world_size))


class TrainConfig(StageConfig):
    """Fields shared by every training stage (a recipe: docs/train.md)."""

    #: the stage name (``pretrain``, ``sft``, ``dpo``): solar.json's ``stage``, the run name
    stage: ClassVar[str] = "train"

    # -- what to train, on what, into where
    model: str = Field(description="model source: HF dir, hub id, .gguf file or 'smollm2-135m'")
    data: str = Field(description="prepared mix directory (local path or s3:// / gs:// URI)")
    out: str = Field(description="final Hugging Face model directory (written atomically)")
    val_data: str | None = Field(
        default=None, description="a second prepared mix used as the held-out split"
    )
    val_fraction: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="fraction of the data held out for evaluation"
    )
    streaming: bool = Field(
        default=False,
        description="stream the training data into the workers through Ray Data "
        "(get_dataset_shard) instead of reading the Parquet shards in each worker",
    )

    # -- Ray Train run state
    storage_path: str | None = Field(
        default=None,
        description="Ray Train storage for checkpoints and logs (local dir, s3://, gs://); "
        "default: a 'ray_train' directory next to out",
    )
    name: str | None = Field(
        default=None, description="run name; default: the out directory's name"
    )
    num_workers: int | tuple[int, int] = Field(
        default=2,
        description="training workers (one per GPU); [min, max] for an elastic run that "
        "goes on with fewer workers when nodes are lost and grows back when they return "
        "(pretrain)",
    )
    elastic_resize_interval_s: float = Field(
        default=60.0,
        ge=0,
        description="elastic runs: how often Ray Train looks for room to add workers",
    )
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    resources_per_worker: dict[str, float] | None = Field(
        default=None, description="Ray resources per worker; overrides cpus_per_worker"
    )
    max_failures: int = Field(
        default=3, ge=-1, description="worker-group restarts from the last checkpoint (-1: always)"
    )
    num_checkpoints_to_keep: int = Field(default=2, ge=1)
    local: bool = Field(
        default=False,
        description="run the worker loop in this process without Ray (one worker, for debugging)",
    )

    # -- DeepSpeed
    zero_stage: int = Field(default=2, ge=0, le=3, description="ZeRO stage 0-3")
    offload_optimizer: bool = Field(default=False, description="ZeRO-Offload optimizer to CPU")
    offload_params: bool = Field(default=False, description="ZeRO-3: offload parameters to CPU")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="auto: bf16 on GPU, fp32 on CPU"
    )
    gradient_checkpointing: bool = Field(default=False, description="activation checkpointing")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        default="sdpa",
        description="attention kernel: sdpa (PyTorch's fused attention), eager (plain "
        "matmuls), flash_attention_2 (GPU, needs flash-attn: pip install 'solar-ray[flash]')",
    )
    max_grad_norm: float = Field(default=1.0, ge=0.0, description="gradient clipping (0: off)")
    deepspeed: dict[str, Any] | str | None = Field(
        default=None,
        description="a DeepSpeed config (mapping or JSON file) merged over the built one",
    )

    # -- batch and schedule
    micro_batch_size: int = Field(default=1, ge=1, description="sequences per worker per step")
    global_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="sequences per optimizer step over all workers; "
        "default micro_batch_size x num_workers (no accumulation)",
    )
    steps: int | None = Field(default=None, ge=1, description="optimizer steps")
    epochs: float | None = Field(default=None, gt=0, description="passes over the data")
    seq_len: int = Field(default=2048, ge=8, description="tokens per sequence")
    lr: float = Field(default=5e-5, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0, description="cosine floor / lr")
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    seed: int = 0

    # -- checkpoints, metrics, export
    checkpoint_every: int = Field(default=100, ge=1, description="steps between checkpoints")
    checkpoint_at: list[PositiveInt] = Field(
        default_factory=list,
        description="further steps to checkpoint at (a sweep's successive-halving rungs)",
    )
    log_every: int = Field(default=10, ge=1, description="steps between metric reports")
    eval_every: int | None = Field(
        default=None, ge=1, description="steps between held-out evaluations (default: at the end)"
    )
    eval_batches: int | None = Field(
        default=None, ge=1, description="cap on held-out batches per worker per evaluation"
    )
    tracking: Backends = Field(
        default_factory=lambda: ["tensorboard"],
        description="where rank 0 logs the metrics: tensorboard, wandb, mlflow (one or "
        "several), or none",
    )
    tracking_project: str | None = Field(
        default=None,
        description="W&B project / MLflow experiment (default: the recipe's name, else "
        "solar-ray)",
    )
    tracking_name: str | None = Field(
        default=None, description="the run's name in W&B / MLflow (default: recipe-stage)"
    )
    export_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="auto: the training precision (bf16 on GPU, fp32 on CPU)"
    )
    max_shard_size_mb: int = Field(default=2048, ge=1)
    overwrite: bool = Field(
        default=False,
        description="replace an out directory made otherwise, and start over a run of the "
        "same name that another config started",
    )

    @field_validator("model", "data", "out")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not str(v).strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("num_workers", mode="before")
    @classmethod
    def _worker_range(cls, v: Any) -> Any:
        if isinstance(v, list | tuple) and len(v) == 1:  # the flag's one value: --num-workers 2
            v = v[0]
        if isinstance(v, list | tuple):
            if len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                raise ValueError("expected a count or a [min, max] range of two counts, e.g. [1, 4]")
            if not 1 <= v[0] <= v[1]:
                raise ValueError(f"the range [{v[0]}, {v[1]}] needs 1 <= min <= max")
            return v[0] if v[0] == v[1] else (v[0], v[1])
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError("must be at least 1")
        return v

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("steps / epochs: set exactly one of them (e.g. steps: 100)")
        if self.steps is not None and self.warmup_steps > self.steps:
            raise ValueError(
                f"warmup_steps: {self.warmup_steps} is more than steps ({self.steps}); the "
                "learning rate would never finish warming up"
            )
        per_step = self.micro_batch_size * self.max_workers
        if not self.elastic and self.effective_global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size: {self.global_batch_size} is not divisible by "
                f"micro_batch_size x num_workers = {self.micro_batch_size} x "
                f"{self.max_workers} = {per_step}"
            )
        if self.elastic and self.streaming:
            raise ValueError(
                "streaming: an elastic run reads its mix in the workers, so that it resumes at "
                "the exact row after a resize (set streaming: false, or a single num_workers)"
            )
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params: parameter offload needs zero_stage: 3")
        if self.val_data is not None and self.val_fraction > 0:
            raise ValueError("val_data / val_fraction: set at most one of them")
        if self.elastic and self.stage in ("sft", "dpo"):
            raise ValueError(
                f"num_workers: an elastic range is supported by pretrain only; {self.stage} "
                "resumes at the worker count it started with (set a single count)"
            )
        if self.local and self.num_workers != 1:
            raise ValueError("num_workers: local runs use exactly one worker (set num_workers: 1)")
        if self.attn_implementation == "flash_attention_2" and not self.use_gpu:
            raise ValueError(
                "attn_implementation: flash_attention_2 runs on CUDA GPUs only (set use_gpu: "
                "true, or attn_implementation: sdpa on CPU)"
            )
        if self.precision in ("bf16", "fp16") and not self.use_gpu:
            raise ValueError(
                f"precision: {self.precision} needs use_gpu: true (CPU trains in fp32)"
            )
        return self

    # -- derived values

    @property
    def elastic(self) -> bool:
        """True for a ``[min, max]`` worker range (Ray Train's elastic scaling)."""
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        """The fewest workers the run trains on (the count itself when not elastic)."""
        return 1 if self.local else (self.num_workers[0] if self.elastic else self.num_workers)

    @property
    def max_workers(self) -> int:
        """The most workers the run trains on (the count itself when not elastic)."""
        return 1 if self.local else (self.num_workers[1] if self.elastic else self.num_workers)

    @property
    def effective_num_workers(self) -> int:
        """Number of training processes planned (1 in local mode; an elastic run's max)."""
        return self.max_workers

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches accumulated per optimizer step on each of the planned workers."""
        return self.grad_accum_for(self.effective_num_workers)

    def grad_accum_for(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each of ``world_size`` workers.

        The global batch stays as configured whatever the count: an elastic run that lost
        a node accumulates more micro-batches per step on the workers left. On a count
        that does not divide the global batch the last micro-batches are partly filler,
        weighted 0 (:class:`solar_ray.train.pretrain.PackedBatches`).
        """
        return accumulation_steps(
            self.effective_global_batch_size, self.micro_batch_size, world_size
        )

    @property
    def effective_global_batch_size(self) -> int:
        """Sequences per optimizer step over all workers."""
        return self.global_batch_size or self.micro_batch_size * self.effective_num_workers

    @property
    def run_name(self) -> str:
        """The Ray Train run name."""
        return self.name or Path(self.out).expanduser().absolute().name

    @property
    def resolved_storage_path(self) -> str:
        """Where Ray Train keeps this run (an absolute local path or a URI)."""
        if self.storage_path:
            return local_path(self.storage_path) or self.storage_path  # file:// -> a local path
        return str(Path(self.out).expanduser().absolute().parent / "ray_train")

    @property
    def precision_resolved(self) -> str:
        """``bf16``, ``fp16`` or ``fp32``."""
        if self.precision == "auto":
            return "bf16" if self.use_gpu else "fp32"
        return self.precision

    @property
    def export_dtype_resolved(self) -> str:
        """The dtype name of the exported weights."""
        if self.export_dtype == "auto":
            return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[
                self.precision_resolved
            ]
        return self.export_dtype

    def tracked_run(self, run_id: str) -> TrackedRun:
        """How W&B and MLflow name and describe this run."""
        from solar_ray.tracking import TrackedRun

        return TrackedRun(
            project=self.tracking_project or "solar-ray",
            name=self.tracking_name or self.run_name,
            run_id=run_id,
            config={"stage": self.stage, **self.to_dict()},
        )

    def model_kwargs(self) -> dict[str, Any]:
        """``from_pretrained`` keyword arguments of the model being trained: the training
        dtype and the attention kernel."""
        import torch

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            self.precision_resolved, torch.float32
        )
        return {"dtype": dtype, "attn_implementation": self.attn_implementation}

    def result_fingerprint(self) -> str:
        """Hash of every field that changes what the run computes (not how it is operated).

        A run in storage started with another fingerprint is refused rather than resumed.
        """
        from solar_ray.identity import config_key

        return config_key(
            {**self.to_dict(), "global_batch": self.effective_global_batch_size},
            ignore=OPERATIONAL_FIELDS,
        )


class PretrainConfig(TrainConfig):
    """Continued pretraining: causal-LM loss on packed blocks, warmup + cosine schedule."""

    stage: ClassVar[str] = "pretrain"


class LoraSettings(StageConfig):
    """LoRA adapters (QLoRA with ``load_in_4bit``) instead of training every weight.

    The stage's output is still a full model: the adapters are merged into the base weights
    at the end (``merge_and_unload``), so later stages take it unchanged.
    """

    r: int = Field(default=16, ge=1, description="adapter rank")
    alpha: float = Field(default=32.0, gt=0, description="LoRA scaling numerator (alpha / r)")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default="all-linear",
        description="module names to adapt (e.g. [q_proj, v_proj]); all-linear: every "
        "linear layer but the output head",
    )
    load_in_4bit: bool = Field(
        default=False, description="QLoRA: a 4-bit NF4 base (GPU, needs bitsandbytes)"
    )
    keep_adapter: bool = Field(
        default=False, description="also write the adapter (PEFT format) into out/adapter"
    )

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list) and not v:
            raise ValueError("name at least one module, or all-linear")
        return v


class TRLTrainConfig(TrainConfig):
    """The stages trained by a TRL trainer (SFT, DPO): these may train LoRA adapters."""

    peft: LoraSettings | None = Field(
        default=None, description="train LoRA adapters, merged into the model at the end"
    )
    lm_head: Literal["chunked", "full"] = Field(
        default="chunked",
        description="how the token log-probs are computed: chunked (TRL's kernel: the LM "
        "head in tiles, recomputed in the backward pass, the (batch, seq, vocab) logits never "
        "held) or full (the model's own LM head, its logits kept for the backward pass: one "
        "projection instead of two, faster where the head is a large share of the FLOPs, at "
        "the memory of the logits)",
    )

    @model_validator(mode="after")
    def _check_peft(self) -> TRLTrainConfig:
        if self.peft is not None and self.peft.load_in_4bit and not self.use_gpu:
            raise ValueError(
                "peft.load_in_4bit: a 4-bit (QLoRA) base needs use_gpu: true and bitsandbytes; "
                "on CPU train plain LoRA (load_in_4bit: false)"
            )
        return self


class SFTConfig(TRLTrainConfig):
    """Supervised fine-tuning with TRL's SFTTrainer inside the Ray Train workers."""

    stage: ClassVar[str] = "sft"

    lr: float = Field(default=2e-5, gt=0)
    packing: bool = Field(default=False, description="pack examples into seq_len (TRL bfd)")
    assistant_only_loss: bool = Field(
        default=True, description="loss on assistant tokens only (the mix's labels/masks)"
    )


class DPOConfig(TRLTrainConfig):
    """Direct preference optimisation with TRL's DPOTrainer inside the Ray Train workers.

    The reference model is ``ref_model`` (default: the policy's starting model). By default
    it lives in the workers, sharded like the policy under ZeRO-3; a LoRA policy (``peft``)
    without a ``ref_model`` is its own reference with the adapters disabled; with
    ``precompute_ref_logps`` its log-probabilities are computed once by a Ray Data
    batch-inference pass and the workers never hold it.
    """

    stage: ClassVar[str] = "dpo"

    lr: float = Field(default=5e-7, gt=0)
    beta: float = Field(default=0.1, gt=0)
    loss_type: str | list[str] = Field(default="sigmoid", description="TRL DPO loss type(s)")
    ref_model: str | None = Field(default=None, description="reference model source")
    precompute_ref_logps: bool = Field(
        default=False, description="reference log-probs from a Ray Data pass before training"
    )
    ref_batch_size: int = Field(default=8, ge=1, description="pairs per reference batch")
    ref_num_actors: int = Field(default=1, ge=1, description="Ray Data actors for the pass")
