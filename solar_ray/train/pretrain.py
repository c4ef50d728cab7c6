"""Continued pretraining: causal-LM loss on packed blocks, on DeepSpeed, in Ray Train workers.

:func:`run_pretrain` is the stage (validate, launch, export, lineage); :func:`pretrain_worker`
is the per-worker loop, a plain function that also runs without Ray (world size 1). The loop
drives a DeepSpeed engine directly and resumes from the latest checkpoint at the exact data
position, also on another worker count (:class:`PackedBatches`,
:mod:`solar_ray.train.reshard`). What a run does: docs/train.md.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from solar_ray import faults
from solar_ray.config import ConfigError
from solar_ray.data.contract import (
    DataError,
    held_out_rows,
    ids_and_positions,
    positions_for,
    read_files,
)
from solar_ray.train.common import TrainResult, train_and_export, validate_common
from solar_ray.train.config import PretrainConfig, accumulation_steps
from solar_ray.train.ds_config import build_deepspeed_config, zero_stage_of
from solar_ray.train.launch import StageInputs
from solar_ray.train.metrics import eval_metrics, row_nll
from solar_ray.train.reshard import needs_universal
from solar_ray.train.session import STATE_FILE, read_run_state, write_run_state
from solar_ray.train.worker import WorkerEnv, finish_run, run_worker

__all__ = [
    "PackedBatches",
    "pretrain_worker",
    "run_pretrain",
    "validate_pretrain",
]

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------- data


def _read_packed(files: list[str], storage_hint: str) -> Any:
    table = read_files(files, storage_hint)
    return table.select([c for c in ("input_ids", "position_ids") if c in table.column_names])


class PackedBatches:
    """This rank's micro-batches of packed rows, the same global batches at any world size.

    The rows form one stream, epoch after epoch a seeded permutation (nothing dropped). Step
    ``s`` consumes positions ``[s * G, (s + 1) * G)``, dealt round-robin: rank ``r`` of
    ``world_size`` takes offsets ``r, r + world_size, ...`` in ``grad_accum_steps``
    micro-batches, so a resize resumes at the exact row. Slots past ``G`` (a worker count that
    does not divide it) repeat one of the step's rows with weight 0. ``iterate(start_step)``
    resumes after ``start_step`` steps.
    """

    def __init__(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        *,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        global_batch_size: int,
        seed: int,
    ) -> None:
        if len(input_ids) == 0:
            raise DataError("data: the mix has no training rows")
        self.input_ids = input_ids
        self.position_ids = position_ids
        self.rank = rank
        self.world_size = world_size
        self.micro_batch_size = micro_batch_size
        self.global_batch = global_batch_size
        self.grad_accum_steps = accumulation_steps(global_batch_size, micro_batch_size, world_size)
        self.seed = seed
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(
                len(self.input_ids)
            )
        return self._orders[epoch]

    def rows_of_step(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(row indices, weights) of this rank at step ``step`` (0-based), a line per
        micro-batch; weight 0 marks a filler slot past the step's global batch."""
        n = len(self.input_ids)
        offsets = self.rank + self.world_size * np.arange(
            self.grad_accum_steps * self.micro_batch_size
        )
        weights = (offsets < self.global_batch).astype(np.float64)
        epochs, index = np.divmod(step * self.global_batch + offsets % self.global_batch, n)
        rows = np.array([self._order(int(e))[i] for e, i in zip(epochs, index, strict=True)])
        shape = (self.grad_accum_steps, self.micro_batch_size)
        return rows.reshape(shape), weights.reshape(shape)

    def iterate(self, start_step: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Endless (input_ids, position_ids, row weights) micro-batches from ``start_step`` on."""
        step = start_step
        while True:
            rows, weights = self.rows_of_step(step)
            for micro_rows, micro_weights in zip(rows, weights, strict=True):
                order = np.argsort(micro_rows, kind="stable")
                idx = micro_rows[order]
                yield self.input_ids[idx], self.position_ids[idx], micro_weights[order]
            step += 1


def _stream_batches(
    shard: Any, micro_batch_size: int, seq_len: int, skip: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Micro-batches from a Ray Data shard, epoch after epoch; skips consumed ones."""
    seen = 0
    while True:
        produced = 0
        for batch in shard.iter_batches(
            batch_size=micro_batch_size, batch_format="numpy", drop_last=True
        ):
            produced += 1
            seen += 1
            if seen <= skip:
                continue
            ids = np.stack(batch["input_ids"]).astype(np.int64)
            pos = (
                np.stack(batch["position_ids"]).astype(np.int64)
                if "position_ids" in batch
                else positions_for(ids)
            )
            yield ids, pos, np.ones(len(ids))
        if produced == 0:
            raise DataError("data: this worker's stream shard is empty")


# --------------------------------------------------------------------------- worker


def _evaluate(
    engine: Any, env: WorkerEnv, batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> dict:
    """Held-out loss over all workers' rows (each row once), with its error and the rows."""
    import torch
    import torch.distributed as dist

    engine.eval()
    local = []
    with torch.no_grad():
        for ids, pos, rows in batches:
            input_ids = torch.from_numpy(ids).to(env.device)
            out = engine(input_ids=input_ids, position_ids=torch.from_numpy(pos).to(env.device))
            nll, count = row_nll(out.logits, input_ids)
            index = torch.from_numpy(rows).to(env.device).double()
            local.append(torch.stack([index, nll, count], dim=-1))
    mine = torch.cat(local) if local else torch.zeros((0, 3), dtype=torch.float64)
    gathered = [torch.zeros_like(mine) for _ in range(env.world_size)]
    dist.all_gather(gathered, mine)  # every rank holds the same number of rows
    engine.train()
    by_row = {int(r[0]): (float(r[1]), float(r[2])) for t in gathered for r in t.cpu().tolist()}
    order = sorted(by_row)  # rows wrap around when ranks outnumber them: count each once
    return eval_metrics([by_row[i][0] for i in order], [by_row[i][1] for i in order])


def _val_batches(
    env: WorkerEnv, input_ids: np.ndarray, position_ids: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """This rank's held-out micro-batches ``(ids, positions, row indices)``; every rank gets
    the same count (rows wrap around)."""
    cfg = env.cfg
    n = len(input_ids)
    if n == 0:
        return []
    per_rank = max(1, -(-n // env.world_size))
    num_batches = -(-per_rank // cfg.micro_batch_size)
    if cfg.eval_batches:
        num_batches = min(num_batches, cfg.eval_batches)
    rows = [(env.rank + env.world_size * i) % n for i in range(num_batches * cfg.micro_batch_size)]
    out = []
    for b in range(num_batches):
        idx = rows[b * cfg.micro_batch_size : (b + 1) * cfg.micro_batch_size]
        out.append((input_ids[idx], position_ids[idx], np.asarray(idx, dtype=np.int64)))
    return out


def _load_split(
    env: WorkerEnv, with_train: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train ids, train positions, held-out ids, held-out positions) from the shards.

    The held-out rows are ``val_data``'s, else the hashed ``val_fraction`` of ``data``'s.
    ``with_train=False`` (streaming: the training rows come from Ray Data) reads ``data``
    only for its held-out rows and leaves the training arrays empty.
    """
    cfg = env.cfg
    ids = pos = val_ids = val_pos = np.zeros((0, cfg.seq_len), dtype=np.int64)
    if cfg.val_data and env.val_files:
        val_ids, val_pos = ids_and_positions(_read_packed(env.val_files, cfg.val_data), cfg.seq_len)
    if env.data_files and (with_train or (not cfg.val_data and cfg.val_fraction > 0)):
        table = _read_packed(env.data_files, cfg.data)
        ids, pos = ids_and_positions(table, cfg.seq_len)
        if not cfg.val_data:
            mask = held_out_rows(table, cfg.val_fraction)
            ids, pos, val_ids, val_pos = ids[~mask], pos[~mask], ids[mask], pos[mask]
    return ids, pos, val_ids, val_pos


def total_steps_for(cfg: PretrainConfig, num_train_rows: int) -> int:
    """Optimizer steps of the run: ``steps``, or ``epochs`` over the training rows."""
    if cfg.steps is not None:
        return cfg.steps
    assert cfg.epochs is not None
    per_step = cfg.effective_global_batch_size
    return max(1, int(math.ceil(cfg.epochs * num_train_rows / per_step)))


def pretrain_worker(config: dict[str, Any]) -> None:
    """The per-worker continued-pretraining loop (Ray Train worker or a plain process)."""
    run_worker(config, _pretrain)


def _build_engine(
    env: WorkerEnv, total_steps: int, saved: dict[str, Any] | None
) -> tuple[Any, Any, Any, bool]:
    """(DeepSpeed engine, its LR scheduler, tokenizer, universal) for the model in
    ``env.model_dir``.

    ``saved``: the run state of the checkpoint to resume from; when it was saved at another
    world size under ZeRO, the engine is built to load a universal checkpoint
    (:mod:`.reshard`) and ``universal`` is True.
    """
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    cfg = env.cfg
    ds_config = build_deepspeed_config(cfg, world_size=env.world_size)
    universal = saved is not None and needs_universal(
        zero_stage_of(ds_config), saved.get("world_size"), env.world_size
    )
    if universal:
        ds_config = build_deepspeed_config(cfg, world_size=env.world_size, load_universal=True)
    # Under ZeRO-3 the weights are partitioned while they load (deepspeed.zero.Init), which
    # transformers does while an HfDeepSpeedConfig object is alive.
    hf_ds = HfDeepSpeedConfig(ds_config) if zero_stage_of(ds_config) == 3 else None
    model = AutoModelForCausalLM.from_pretrained(env.model_dir, **cfg.model_kwargs())
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    # fused: one kernel over all parameters instead of a loop of per-tensor ops (CPU and
    # CUDA, torch >= 2.4); what HF's Trainer uses by default (adamw_torch_fused), so
    # pretraining and the TRL stages step alike
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        betas=(0.9, 0.95),
        weight_decay=cfg.weight_decay,
        fused=True,
    )
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=total_steps,
        min_lr_rate=cfg.min_lr_ratio,
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    del hf_ds
    return engine, scheduler, AutoTokenizer.from_pretrained(env.model_dir), universal


def _saved_state(ckpt: Path | None) -> dict[str, Any] | None:
    """The run state of the checkpoint to resume from (None on a fresh start)."""
    if ckpt is None:
        return None
    saved = read_run_state(ckpt)
    if saved is None or "tag" not in saved:
        raise RuntimeError(f"{ckpt} holds no DeepSpeed run state ({STATE_FILE})")
    return saved


def _resume(
    engine: Any, env: WorkerEnv, ckpt: Path | None, saved: dict[str, Any] | None, universal: bool
) -> dict[str, Any]:
    """The run state: fresh, or loaded (with DeepSpeed's state) from a checkpoint.

    ``universal``: the checkpoint was saved at another world size; it is converted first
    (:func:`solar_ray.train.reshard.to_universal`) and the resize is recorded in
    ``state["resizes"]`` as ``[step, saved world size, world size]``.
    """
    state: dict[str, Any] = {
        "step": 0,
        "tokens_seen": 0,
        "loss_history": [],
        "eval_history": [],
        "resumed_from": [],
        "resizes": [],
    }
    if ckpt is None or saved is None:
        return state
    with tempfile.TemporaryDirectory(prefix="solar-universal-") as tmp:
        load_dir, tag = Path(ckpt), saved["tag"]
        if universal:
            from solar_ray.train.reshard import to_universal

            started = time.perf_counter()
            load_dir, tag = to_universal(Path(ckpt), tag, Path(tmp))
            if env.is_rank0:
                log.info(
                    "resuming the %d-worker checkpoint of step %d on %d workers (converted "
                    "to a universal checkpoint in %.1f s)", saved.get("world_size"),
                    saved["step"], env.world_size, time.perf_counter() - started,
                )  # fmt: skip
        load_path, _ = engine.load_checkpoint(str(load_dir), tag=tag)
    if load_path is None:
        raise RuntimeError(f"could not load the DeepSpeed checkpoint in {ckpt}")
    state.update(saved)
    state["resumed_from"] = [*saved["resumed_from"], saved["step"]]
    state["resizes"] = list(saved.get("resizes", []))
    if universal:
        state["resizes"].append([saved["step"], saved["world_size"], env.world_size])
    return state


def _pretrain(env: WorkerEnv, ckpt: Path | None) -> None:
    import torch
    import torch.distributed as dist

    from solar_ray.train.metrics import Throughput, device_peak_flops, flops_per_token, mfu

    cfg: PretrainConfig = env.cfg  # type: ignore[assignment]
    session = env.session
    if cfg.streaming:
        shard = session.dataset_shard("train")
        if shard is None:
            raise DataError("streaming: no 'train' Ray Dataset was passed to the trainer")
    ids, pos, val_ids, val_pos = _load_split(env, with_train=not cfg.streaming)
    num_train_rows = int(env.spec.num_train_rows or 0) if cfg.streaming else len(ids)
    total_steps = total_steps_for(cfg, num_train_rows)
    saved = _saved_state(ckpt)
    engine, scheduler, tokenizer, universal = _build_engine(env, total_steps, saved)
    state = _resume(engine, env, ckpt, saved, universal)

    accum = cfg.grad_accum_for(env.world_size)
    packed = None
    if cfg.streaming:
        consumed = state["step"] * accum
        batches = _stream_batches(shard, cfg.micro_batch_size, cfg.seq_len, consumed)
    else:
        packed = PackedBatches(
            ids, pos, rank=env.rank, world_size=env.world_size,
            micro_batch_size=cfg.micro_batch_size,
            global_batch_size=cfg.effective_global_batch_size, seed=cfg.seed,
        )  # fmt: skip
        batches = packed.iterate(start_step=state["step"])
    # a test hook (solar_ray.faults); a streaming run has no row numbers to log
    log_rows = faults.row_logger(env.rank, env.world_size, state["step"]) if packed else None
    val_batches = _val_batches(env, val_ids, val_pos)

    params = engine.module.parameters()
    num_params = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
    flops_token = flops_per_token(engine.module.config, num_params, cfg.seq_len)
    peak = device_peak_flops() if cfg.use_gpu else None

    def log_eval(step: int, alone: bool = True) -> dict:
        """Held-out metrics at ``step``; logged here unless the caller logs them with others."""
        result = _evaluate(engine, env, val_batches)
        state["eval_history"].append([step, result["eval_loss"]])
        if env.metrics and alone:
            env.metrics.scalars(step, result)
        return result

    if val_batches and state["step"] == 0:
        # the starting point of the held-out curve (a sweep's "tokens to recover" needs it)
        session.report({"step": 0, "tokens_seen": 0, **log_eval(0)})

    timer = Throughput()
    loss_sum = torch.zeros(2, dtype=torch.float64, device=env.device)  # NLL, tokens
    started = time.perf_counter()
    tokens_per_micro = cfg.micro_batch_size * cfg.seq_len
    checkpoint_at = set(cfg.checkpoint_at)
    # DeepSpeed averages the micro-batch losses over accum x world; each row's summed NLL is
    # scaled so that the step's gradient is that of the mean token loss over its global batch
    scale = accum * env.world_size / (cfg.effective_global_batch_size * (cfg.seq_len - 1))
    engine.train()
    noticed_preemption = False
    while state["step"] < total_steps:
        for _ in range(accum):
            ids_np, pos_np, weights_np = next(batches)
            input_ids = torch.from_numpy(ids_np).to(env.device)
            out = engine(
                input_ids=input_ids, position_ids=torch.from_numpy(pos_np).to(env.device)
            )
            nll, scored = row_nll(out.logits, input_ids)
            weights = torch.from_numpy(weights_np).to(env.device)
            engine.backward(((nll * weights).sum() * scale).float())
            engine.step()
            loss_sum[0] += (nll.detach() * weights).sum()
            loss_sum[1] += (scored * weights).sum()
            timer.add(tokens_per_micro)
        timer.add(0, steps=1)
        state["step"] += 1
        step = state["step"]
        state["tokens_seen"] += cfg.effective_global_batch_size * cfg.seq_len
        if log_rows is not None:
            step_rows, step_weights = packed.rows_of_step(step - 1)
            log_rows(step, step_rows[step_weights > 0].tolist())
        last = step == total_steps
        metrics: dict[str, Any] = {}
        if step % cfg.log_every == 0 or last:
            dist.all_reduce(loss_sum)
            rate, step_time = timer.lap()
            grad_norm = engine.get_global_grad_norm()
            metrics = {
                "step": step,
                "loss": (loss_sum[0] / loss_sum[1]).item(),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "tokens_per_s_per_worker": rate,
                "tokens_per_s": rate * env.world_size,
                "step_time_s": step_time,
                "tokens_seen": state["tokens_seen"],
            }
            utilisation = mfu(rate, flops_token, peak)
            if utilisation is not None:
                metrics["mfu"] = utilisation
            state["loss_history"].append([step, metrics["loss"]])
            loss_sum.zero_()
        if val_batches and cfg.eval_every and step % cfg.eval_every == 0 and not last:
            metrics.update(log_eval(step, alone=False))
        if metrics and env.metrics:
            env.metrics.scalars(step, metrics)
        # a node of this run is being drained (a spot VM's reclaim notice): checkpoint now,
        # once per notice, and go on; when the node goes, the run resumes from here
        preempted = session.preemption_notice() and not noticed_preemption
        noticed_preemption = noticed_preemption or preempted
        if (
            step % cfg.checkpoint_every == 0 or step in checkpoint_at or preempted
        ) and not last:
            if preempted and env.is_rank0:
                log.warning("a node of this run is being preempted: checkpoint at step %d", step)
            _save_checkpoint(engine, env, state, metrics or {"step": step})
        elif metrics:
            session.report(metrics)

    final: dict[str, Any] = {
        "steps": state["step"],
        "tokens_seen": state["tokens_seen"],
        "final_loss": state["loss_history"][-1][1] if state["loss_history"] else None,
        "train_runtime_s": time.perf_counter() - started,
        "resumed_from": state["resumed_from"],
        "resizes": state["resizes"],
        "world_size": env.world_size,
        "loss_history": state["loss_history"],
        **timer.summary(),
    }
    if val_batches:
        final.update(log_eval(state["step"]))
        final["initial_eval_loss"] = state["eval_history"][0][1]
        final["eval_history"] = state["eval_history"]
    finish_run(env, engine.module, tokenizer, final)


def _save_checkpoint(engine: Any, env: WorkerEnv, state: dict, metrics: dict) -> None:
    """DeepSpeed's sharded state (each rank its part) + the run state, reported to Ray."""
    tag = f"step_{state['step']:08d}"
    with tempfile.TemporaryDirectory(prefix="solar-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=tag, client_state={"solar_step": state["step"]})
        if env.is_rank0:
            write_run_state(Path(tmp), {**state, "tag": tag, "world_size": env.world_size})
        if env.metrics:
            env.metrics.sync()
        env.session.report(metrics, checkpoint_dir=Path(tmp), name=tag)


# --------------------------------------------------------------------------- stage


def validate_pretrain(cfg: PretrainConfig) -> StageInputs:
    """Resolve and check model, tokenizer and data before any worker starts."""
    inputs = validate_common(cfg, data_kind="pretrain")
    for mix, field in ((inputs.data, "data"), (inputs.val, "val_data")):
        if mix is None:
            continue
        _check_packed(mix, cfg, field, inputs.vocab_size)
    return inputs


def _check_packed(mix: Any, cfg: PretrainConfig, field: str, vocab_size: int) -> None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs = mix.filesystem
    with fs.open_input_file(mix.files[0]) as f:
        pf = pq.ParquetFile(f)
        table = pf.read_row_group(0, columns=["input_ids"])
    lengths = pc.list_value_length(table.column("input_ids"))
    bad = pc.not_equal(lengths, cfg.seq_len)
    if pc.any(bad).as_py():
        seen = pc.min_max(lengths).as_py()
        raise DataError(
            f"seq_len: {cfg.seq_len} does not match the packed rows of {field} {mix.path} "
            f"(rows of {seen['min']}..{seen['max']} tokens); re-pack the data or set seq_len"
        )
    top = pc.max(pc.list_flatten(table.column("input_ids"))).as_py()
    if top is not None and top >= vocab_size:
        raise DataError(
            f"{field}: token id {top} in {mix.files[0]} is outside the model's vocabulary "
            f"({vocab_size}); was the mix tokenized with another tokenizer?"
        )


def prepare_pretrain(cfg: PretrainConfig) -> tuple[StageInputs, dict[str, Any]]:
    """The checked inputs and the workers' spec values of a run that reads its mix itself.

    What a Tune trial launches the pretrain loop with (:mod:`solar_ray.stages`); a run
    that streams from Ray Data (``streaming: true``) is launched by :func:`run_pretrain`.
    """
    if cfg.streaming:
        raise ConfigError("streaming: a sweep trial reads the prepared mix in each worker; set streaming: false")
    return validate_pretrain(cfg), {}


def run_pretrain(cfg: PretrainConfig) -> TrainResult:
    """Continued pretraining of ``cfg.model`` on ``cfg.data`` into ``cfg.out``.

    Returns the finished output as is when ``cfg.out`` already holds this run's result.
    """
    inputs = validate_pretrain(cfg)
    datasets = None
    spec_values: dict[str, Any] = {}
    if cfg.streaming:
        datasets, spec_values = _streaming_datasets(cfg, inputs)
    return train_and_export(cfg, pretrain_worker, inputs, spec_values=spec_values, datasets=datasets)


def _streaming_datasets(cfg: PretrainConfig, inputs: StageInputs) -> tuple[dict, dict]:
    """The Ray Dataset of training rows (held-out rows filtered out) and its row count."""
    import ray.data

    ds = ray.data.read_parquet(
        list(inputs.data.files), filesystem=inputs.data.filesystem
    ).select_columns(["input_ids", "position_ids"])
    num_rows = inputs.data.num_rows
    if cfg.val_data is None and cfg.val_fraction > 0:
        fraction = cfg.val_fraction

        def drop_held_out(batch: Any) -> Any:
            return batch.filter(~held_out_rows(batch, fraction))

        ds = ds.map_batches(drop_held_out, batch_format="pyarrow")
        if cfg.epochs is not None:  # the schedule needs the exact count of training rows
            num_rows = ds.count()
    return {"train": ds}, {"num_train_rows": num_rows}
