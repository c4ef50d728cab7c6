"""Hugging Face Trainer plumbing shared by the TRL stages (SFT, DPO) inside Ray Train workers.

:func:`train_with_hf` runs a TRL trainer the Ray Train way (``RayTrainReportCallback``,
``prepare_trainer``), resumes it with ``resume_from_checkpoint`` (DeepSpeed state,
scheduler, RNGs, data position) and exports the model into the final checkpoint;
:class:`MetricsCallback` logs through the stage's writer. Without Ray (``local: true``) the
Trainer's checkpoints live under the run directory and the newest is resumed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from solar_ray.data.contract import held_out_rows, read_files
from solar_ray.faults import hold_after_checkpoint
from solar_ray.train.config import TrainConfig
from solar_ray.train.ds_config import build_deepspeed_config
from solar_ray.train.metrics import Throughput, eval_metrics, row_nll
from solar_ray.train.session import LocalSession, read_run_state, write_run_state
from solar_ray.train.worker import WorkerEnv, finish_run

__all__ = [
    "DeepSpeedCheckpointMixin",
    "HeldOutRowsMixin",
    "MetricsCallback",
    "SaveAtSteps",
    "add_full_logits_head",
    "hf_training_kwargs",
    "load_hf_dataset",
    "load_hf_split",
    "train_with_hf",
    "use_full_logits_head",
]

log = logging.getLogger(__name__)


def load_hf_dataset(files: list[str], storage_hint: str, columns: list[str] | None = None) -> Any:
    """A ``datasets.Dataset`` over Parquet shards on a local path or URI."""
    import datasets
    from datasets.table import InMemoryTable

    return datasets.Dataset(InMemoryTable(read_files(files, storage_hint, columns)))


def load_hf_split(env: WorkerEnv, columns: list[str]) -> tuple[Any, Any]:
    """(train, held-out or None) ``datasets.Dataset`` of a worker's data: ``val_data``, or
    the hashed ``val_fraction`` of ``data``'s rows."""
    cfg = env.cfg
    data = load_hf_dataset(env.data_files, cfg.data, columns)
    if cfg.val_data:
        return data, load_hf_dataset(env.val_files, cfg.val_data, columns)
    if cfg.val_fraction <= 0:
        return data, None
    mask = held_out_rows(data.data.table, cfg.val_fraction, require=True)
    return data.select(np.flatnonzero(~mask).tolist()), data.select(np.flatnonzero(mask).tolist())


def hf_training_kwargs(cfg: TrainConfig, output_dir: str, has_eval: bool) -> dict[str, Any]:
    """``TrainingArguments`` fields every TRL stage shares, from the stage config."""
    precision = cfg.precision_resolved
    eval_every = cfg.eval_every
    kwargs: dict[str, Any] = {
        "output_dir": output_dir,
        "per_device_train_batch_size": cfg.micro_batch_size,
        "per_device_eval_batch_size": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "learning_rate": cfg.lr,
        "lr_scheduler_type": "cosine_with_min_lr",
        "lr_scheduler_kwargs": {"min_lr_rate": cfg.min_lr_ratio},
        "warmup_steps": cfg.warmup_steps,
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "adam_beta2": 0.95,
        "max_steps": cfg.steps if cfg.steps is not None else -1,
        "num_train_epochs": cfg.epochs if cfg.epochs is not None else 1.0,
        "logging_steps": cfg.log_every,
        "logging_first_step": False,
        "save_strategy": "steps",
        "save_steps": cfg.checkpoint_every,
        "save_total_limit": 1,
        "eval_strategy": "steps" if has_eval and eval_every else "no",
        "eval_steps": eval_every if has_eval and eval_every else None,
        "report_to": "none",
        "deepspeed": build_deepspeed_config(cfg, for_hf_trainer=True),
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "use_cpu": not cfg.use_gpu,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "include_num_input_tokens_seen": "all",
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "model_init_kwargs": cfg.model_kwargs(),
    }
    return kwargs


def add_full_logits_head(model: Any, outputs: tuple[str, ...]) -> None:
    """Give ``model`` TRL's fused-LM-head interface computed from its full logits.

    TRL 1.16 always patches the policy (and a live reference) with ``add_fused_lm_head``, whose
    kernel recomputes the LM-head projection in the backward pass. Re-patched with this
    function after the trainer is built (``lm_head: full``), the same call runs the model's
    forward with ``logits_to_keep`` at the labelled positions, keeps those logits for the
    backward pass and derives the same :class:`FusedCausalLMOutput` fields (only those named
    in ``outputs``; the others stay None). Why and when: docs/train.md, "The LM head".
    """
    import types

    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    text_config = model.config.get_text_config()
    if getattr(text_config, "output_router_logits", False):
        raise ValueError(
            "lm_head: full does not compute a Mixture-of-Experts model's router loss; use "
            "lm_head: chunked"
        )
    own_forward = types.MethodType(type(model).forward, model)

    def forward(
        self: Any, *args: Any, fused_lm_head: bool = False, labels: Any = None,
        shift_labels: Any = None, num_items_in_batch: Any = None, **kwargs: Any,
    ) -> Any:  # fmt: skip
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels,
                     "num_items_in_batch": num_items_in_batch}  # fmt: skip
            return own_forward(*args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        kwargs["use_cache"] = False
        if shift_labels is None:
            labels = labels[:, 1:]
            mask = labels != -100
            keep = torch.nn.functional.pad(mask, (0, 1), value=False)  # position i scores i+1
        else:
            labels = shift_labels
            mask = keep = labels != -100
        # (scored positions, vocab), scaling and softcapping applied by the model's forward
        logits = own_forward(*args, logits_to_keep=keep.to(self.device), **kwargs).logits
        mask = mask.to(logits.device)
        target = labels.to(logits.device)[mask]
        if logits.shape != (len(target), logits.shape[-1]):
            raise RuntimeError(
                f"lm_head: full: {type(self).__name__} did not apply a boolean "
                "logits_to_keep; use lm_head: chunked"
            )
        logits = logits.float()  # a no-op in fp32
        scored = -torch.nn.functional.cross_entropy(logits, target, reduction="none")
        fields: dict[str, Any] = {"log_probs": scored}
        with torch.no_grad():
            if {"entropy", "log_sum_sq_probs"} & set(outputs):
                log_softmax = torch.log_softmax(logits.detach(), dim=-1)
            if "entropy" in outputs:
                fields["entropy"] = -(log_softmax.exp() * log_softmax).sum(-1)
            if "log_sum_sq_probs" in outputs:
                fields["log_sum_sq_probs"] = torch.logsumexp(2 * log_softmax, -1)
            if "mean_logits" in outputs:
                fields["mean_logits"] = logits.detach().mean(-1)
            if "is_top1" in outputs:
                fields["is_top1"] = logits.detach().argmax(-1) == target
        # back to (batch, positions), zero where nothing is scored; masked_scatter keeps an
        # all-masked micro-batch connected to the model (a differentiable zero)
        per_token = {k: v.new_zeros(mask.shape).masked_scatter(mask, v) for k, v in fields.items()}
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-per_token["log_probs"].sum() / count, label_mask=mask, **per_token
        )

    model.forward = types.MethodType(forward, model)


def use_full_logits_head(trainer: Any, outputs: tuple[str, ...]) -> None:
    """Re-patch a built TRL trainer's policy (and live reference) with
    :func:`add_full_logits_head` (``lm_head: full``)."""
    from peft import PeftModel

    model = trainer.model
    add_full_logits_head(model.get_base_model() if isinstance(model, PeftModel) else model, outputs)
    ref = getattr(trainer, "ref_model", None)
    if ref is not None:  # under DeepSpeed an inference engine around the model
        add_full_logits_head(getattr(ref, "module", ref), ("log_probs",))


class DeepSpeedCheckpointMixin:
    """Checkpoints hold DeepSpeed's sharded state only.

    Transformers' Trainer also writes the model into every checkpoint, which under ZeRO-3
    (without gathering to rank 0) means writing DeepSpeed's state twice. Resuming needs the
    sharded state alone and the model is exported once at the end, so skip that save.
    """

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if _internal_call and getattr(self, "is_deepspeed_enabled", False):
            return
        super().save_model(output_dir, _internal_call)  # type: ignore[misc]


class HeldOutRowsMixin:
    """Evaluation that keeps every held-out row's NLL and token count, for the error bar.

    ``prediction_step`` computes the causal-LM loss per row from the model's logits
    (:func:`solar_ray.train.metrics.row_nll`, transformers' own loss kept per row) and
    gathers the rows of all workers; ``evaluation_loop`` then reports ``eval_loss`` as their
    token-weighted mean with ``eval_loss_se`` and ``eval_n`` over rows, and the rows
    themselves (``eval_row_nll``, ``eval_row_tokens``) for paired comparisons. Evaluation
    with ``compute_metrics`` (which needs the predictions) keeps the Trainer's own step.
    """

    _held_out_rows: list[Any] | None = None

    def prediction_step(
        self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Any, Any, Any]:  # fmt: skip
        if self._held_out_rows is None or not prediction_loss_only or "labels" not in inputs:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)  # type: ignore[misc]
        import torch

        inputs = self._prepare_inputs(inputs)  # type: ignore[attr-defined]
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad(), self.compute_loss_context_manager():  # type: ignore[attr-defined]
            logits = model(**forward, use_cache=False).logits
        nll, count = row_nll(logits, inputs["labels"])
        rows = self.accelerator.gather_for_metrics(torch.stack([nll, count], dim=-1))  # type: ignore[attr-defined]
        self._held_out_rows.append(rows.cpu())
        return (nll.sum() / count.sum().clamp(min=1)).float(), None, None

    def evaluation_loop(
        self, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval",
    ) -> Any:  # fmt: skip
        import torch

        self._held_out_rows = []
        try:
            output = super().evaluation_loop(  # type: ignore[misc]
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
            rows = self._held_out_rows
        finally:
            self._held_out_rows = None
        if rows:
            table = torch.cat(rows).double()
            metrics = eval_metrics(table[:, 0].tolist(), table[:, 1].tolist())
            metrics.pop("eval_ppl")
            output.metrics.update(
                {f"{metric_key_prefix}_{k.removeprefix('eval_')}": v for k, v in metrics.items()}
            )
        return output


#: held-out keys that are lists (the rows), passed on beside the scalar metrics
ROW_KEYS = ("eval_row_nll", "eval_row_tokens")


class MetricsCallback(TrainerCallback):
    """Loss, lr, grad norm, tokens/s to Ray Train and TensorBoard at every logging step.

    Also keeps the run state (:func:`~solar_ray.train.session.write_run_state`: the loss
    history and the steps the run resumed from) inside each checkpoint (it runs before
    ``RayTrainReportCallback`` copies it).
    """

    def __init__(self, env: WorkerEnv, resumed_from: str | None) -> None:
        super().__init__()
        self.env = env
        previous: dict[str, Any] = {}
        if resumed_from:
            previous = read_run_state(Path(resumed_from)) or {}
        self.loss_history: list[list[float]] = previous.get("loss_history", [])
        self.eval_history: list[list[float]] = previous.get("eval_history", [])
        self.resumed_from: list[int] = previous.get("resumed_from", [])
        if resumed_from:
            self.resumed_from.append(_step_of(resumed_from))
        self.throughput = Throughput()
        self._tokens = 0
        self._step = 0

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any
    ) -> None:
        logs = dict(logs or {})
        step = int(state.global_step)
        metrics: dict[str, Any] = {"step": step}
        for key, value in logs.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics[key.replace("learning_rate", "lr")] = float(value)
            elif key in ROW_KEYS:
                metrics[key] = list(value)
        if "loss" in logs:
            # the Trainer counts the input tokens of all workers
            tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
            self.throughput.add((tokens - self._tokens) / self.env.world_size, step - self._step)
            self._tokens, self._step = tokens, step
            rate, step_time = self.throughput.lap()
            metrics["tokens_per_s_per_worker"] = rate
            metrics["tokens_per_s"] = rate * self.env.world_size
            metrics["step_time_s"] = step_time
            metrics["tokens_seen"] = tokens
            self.loss_history.append([step, float(logs["loss"])])
        if "eval_loss" in logs:
            metrics["eval_ppl"] = math.exp(min(float(logs["eval_loss"]), 50.0))
            self.eval_history.append([step, float(logs["eval_loss"])])
        if self.env.metrics is not None:
            self.env.metrics.scalars(
                step, {k: v for k, v in metrics.items() if k != "step"}
            )  # lists skipped
        self.env.session.report(metrics)

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(args.output_dir)
        if self.env.is_rank0 and last is not None:
            write_run_state(
                Path(last),
                {
                    "step": int(state.global_step),
                    "tokens_seen": int(getattr(state, "num_input_tokens_seen", 0) or 0),
                    "loss_history": self.loss_history,
                    "eval_history": self.eval_history,
                    "resumed_from": self.resumed_from,
                },
            )
        if self.env.metrics is not None:
            self.env.metrics.sync()


class _PruneLocalCheckpoints(TrainerCallback):
    """After a checkpoint was reported, drop this worker's local copies of older ones."""

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        from transformers.trainer_utils import get_last_checkpoint

        root = Path(args.output_dir)
        last = get_last_checkpoint(str(root))
        for p in root.glob("checkpoint-*"):
            if p.is_dir() and str(p) != last:
                shutil.rmtree(p, ignore_errors=True)
        hold_after_checkpoint(int(args.process_index))  # a test hook (solar_ray.faults)


class SaveAtSteps(TrainerCallback):
    """Checkpoint at the given steps too (``checkpoint_at``), besides every ``save_steps``."""

    def __init__(self, steps: list[int]) -> None:
        super().__init__()
        self.steps = frozenset(steps)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step in self.steps and state.global_step < state.max_steps:
            control.should_save = True
        return control


def train_with_hf(
    env: WorkerEnv,
    ckpt: Path | None,
    make_trainer: Callable[[str, list[Any]], Any],
    final_extra: Callable[[Any], dict[str, Any]] | None = None,
) -> None:
    """Build the trainer (``make_trainer(output_dir, callbacks)``), train or resume, export.

    ``ckpt`` is the Ray Train checkpoint to resume from (its ``checkpoint/`` holds the
    Trainer's); ``final_extra(trainer)`` may add stage metrics to the final report.
    """
    local = isinstance(env.session, LocalSession)
    if local:
        output_dir = str(Path(env.session.run_dir) / "hf_output")  # type: ignore[attr-defined]
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        resume = _last_hf_checkpoint(output_dir)
        out_ctx: Any = contextlib.nullcontext(output_dir)
    else:
        resume = str(ckpt / "checkpoint") if ckpt is not None else None
        out_ctx = tempfile.TemporaryDirectory(prefix="solar-hf-")
    with out_ctx as output_dir:
        metrics_cb = MetricsCallback(env, resume)
        callbacks: list[Any] = [metrics_cb]
        if env.cfg.checkpoint_at:
            callbacks.append(SaveAtSteps(env.cfg.checkpoint_at))
        if not local:
            from ray.train.huggingface.transformers import RayTrainReportCallback

            callbacks += [RayTrainReportCallback(), _PruneLocalCheckpoints()]
        trainer = make_trainer(output_dir, callbacks)
        trainer.remove_callback(PrinterCallback)  # MetricsCallback logs instead
        if not local:
            from ray.train.huggingface.transformers import prepare_trainer

            trainer = prepare_trainer(trainer)
        started = time.perf_counter()
        trainer.train(resume_from_checkpoint=resume)
        final: dict[str, Any] = {
            "steps": int(trainer.state.global_step),
            "tokens_seen": int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0),
            "final_loss": metrics_cb.loss_history[-1][1] if metrics_cb.loss_history else None,
            "train_runtime_s": time.perf_counter() - started,
            "resumed_from": metrics_cb.resumed_from,
            "loss_history": metrics_cb.loss_history,
            **metrics_cb.throughput.summary(),
        }
        if trainer.eval_dataset is not None:
            result = trainer.evaluate()
            final["eval_loss"] = float(result["eval_loss"])
            final["eval_ppl"] = math.exp(min(final["eval_loss"], 50.0))
            for key in ("eval_loss_se", "eval_n", *ROW_KEYS):
                if key in result:
                    final[key] = result[key]
            final["eval_history"] = metrics_cb.eval_history
        if final_extra is not None:
            final.update(final_extra(trainer))
        finish_run(env, trainer.model, trainer.processing_class, final)


def _last_hf_checkpoint(output_dir: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    if not Path(output_dir).is_dir():
        return None
    return get_last_checkpoint(output_dir)


def _step_of(checkpoint_dir: str) -> int:
    """The global step recorded in a Trainer checkpoint (trainer_state.json)."""
    state = Path(checkpoint_dir) / "trainer_state.json"
    if state.is_file():
        return int(json.loads(state.read_text())["global_step"])
    return -1
