"""Supervised fine-tuning: TRL's ``SFTTrainer`` inside Ray Train workers, on DeepSpeed.

The data is a prepared SFT mix. Its ``tokenized`` part (``input_ids`` with ``labels`` that
are -100 outside assistant turns) trains with the assistant-only loss as is; with
``assistant_only_loss: false`` the labels are dropped and every token counts. A mix with
only ``messages`` is templated and tokenized by TRL. ``packing: true`` packs examples into
``seq_len`` with TRL's best-fit-decreasing packer (padding-free, ``position_ids`` keep the
examples apart). The held-out split is ``val_data`` or a hashed ``val_fraction`` of rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from solar_ray.config import ConfigError
from solar_ray.data.contract import DataError
from solar_ray.train.common import TrainResult, train_and_export, validate_common
from solar_ray.train.config import SFTConfig
from solar_ray.train.launch import StageInputs
from solar_ray.train.worker import WorkerEnv, run_worker

__all__ = ["run_sft", "sft_worker", "validate_sft"]


def _sft_datasets(env: WorkerEnv) -> tuple[Any, Any]:
    """(train, held-out or None) ``datasets.Dataset`` for the TRL trainer."""
    from solar_ray.train.hf import load_hf_split

    cfg: SFTConfig = env.cfg  # type: ignore[assignment]
    tokenized = env.spec.part == "tokenized"
    columns = ["input_ids", "labels"] if tokenized else ["messages"]
    if tokenized and not cfg.assistant_only_loss:
        columns = ["input_ids"]  # no labels, no masks: TRL trains on every token
    return load_hf_split(env, columns)


def sft_worker(config: dict[str, Any]) -> None:
    """The per-worker SFT loop (Ray Train worker or a plain process)."""
    run_worker(config, _sft)


def _sft(env: WorkerEnv, ckpt: Path | None) -> None:
    from transformers import AutoTokenizer
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    from solar_ray.train.hf import (
        DeepSpeedCheckpointMixin,
        HeldOutRowsMixin,
        hf_training_kwargs,
        train_with_hf,
        use_full_logits_head,
    )
    from solar_ray.train.lora import peft_config, quantization_config

    cfg: SFTConfig = env.cfg  # type: ignore[assignment]
    train_ds, eval_ds = _sft_datasets(env)
    tokenized = env.spec.part == "tokenized"

    class SolarSFTTrainer(HeldOutRowsMixin, DeepSpeedCheckpointMixin, SFTTrainer):
        """SFTTrainer whose checkpoints hold DeepSpeed's sharded state only and whose
        held-out loss carries its error (per-row losses)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if cfg.lm_head == "full":
                use_full_logits_head(self, ("log_probs", "entropy", "is_top1"))

    def make_trainer(output_dir: str, callbacks: list[Any]) -> Any:
        args = TrlSFTConfig(
            **hf_training_kwargs(cfg, output_dir, eval_ds is not None),
            max_length=cfg.seq_len,
            packing=cfg.packing,
            packing_strategy="bfd",
            assistant_only_loss=cfg.assistant_only_loss and not tokenized,
            dataset_num_proc=None,
        )
        tokenizer = AutoTokenizer.from_pretrained(env.model_dir)
        return SolarSFTTrainer(
            model=env.model_dir,
            peft_config=peft_config(cfg.peft) if cfg.peft else None,
            quantization_config=quantization_config(cfg),
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            callbacks=callbacks,
        )

    train_with_hf(env, ckpt, make_trainer)


def validate_sft(cfg: SFTConfig) -> tuple[StageInputs, str]:
    """Resolve and check model, tokenizer and data; returns the inputs and the data part."""
    if cfg.streaming:
        raise ConfigError(
            "streaming: SFT reads the prepared mix in each worker; streaming from Ray Data "
            "is for the pretrain stage"
        )
    try:
        inputs = validate_common(cfg, data_kind="sft")
        part = "tokenized"
    except DataError as e:
        if "tokenized" not in str(e):
            raise
        inputs = validate_common(cfg, data_kind="sft", data_part="data")
        part = "data"
        _check_messages(inputs.data)
    if part == "tokenized":
        _check_token_ids(inputs.data, inputs.vocab_size, "data")
        if inputs.val is not None:
            _check_token_ids(inputs.val, inputs.vocab_size, "val_data")
    return inputs, part


def _check_messages(mix: Any) -> None:
    import pyarrow.parquet as pq

    with mix.filesystem.open_input_file(mix.files[0]) as f:
        names = pq.ParquetFile(f).schema_arrow.names
    if "messages" not in names:
        raise DataError(
            f"data: {mix.path} has neither tokenized/ shards nor a messages column "
            "(make the mix with `solar-ray data`)"
        )


def _check_token_ids(mix: Any, vocab_size: int, field: str) -> None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with mix.filesystem.open_input_file(mix.files[0]) as f:
        table = pq.ParquetFile(f).read_row_group(0, columns=["input_ids"])
    top = pc.max(pc.list_flatten(table.column("input_ids"))).as_py()
    if top is not None and top >= vocab_size:
        raise DataError(
            f"{field}: token id {top} in {mix.files[0]} is outside the model's vocabulary "
            f"({vocab_size}); was the mix tokenized with another tokenizer?"
        )


def prepare_sft(cfg: SFTConfig) -> tuple[StageInputs, dict[str, Any]]:
    """The checked inputs and the workers' spec values (which part of the mix to read)."""
    inputs, part = validate_sft(cfg)
    return inputs, {"part": part}


def run_sft(cfg: SFTConfig) -> TrainResult:
    """Supervised fine-tuning of ``cfg.model`` on the SFT mix ``cfg.data`` into ``cfg.out``."""
    inputs, spec_values = prepare_sft(cfg)
    return train_and_export(cfg, sft_worker, inputs, spec_values=spec_values)
