"""Direct preference optimisation: TRL's ``DPOTrainer`` inside Ray Train workers, on DeepSpeed.

The data is a prepared preference mix (``prompt`` already chat-templated, ``chosen``,
``rejected``). ``beta`` and ``loss_type`` go to TRL. The reference model is ``ref_model``
(default: the policy's starting model) and comes in two ways:

- live (default): every worker holds it next to the policy; TRL wraps it in a DeepSpeed
  inference engine, so under ZeRO-3 it is sharded like the policy;
- ``precompute_ref_logps: true``: before training, a Ray Data batch-inference pass
  (:class:`RefLogpsPredictor` on an actor pool) computes each pair's summed completion
  log-probabilities under the reference once, tokenized and collated exactly as TRL does,
  and writes them to the run's storage keyed by a hash of the row. The workers join them
  to their rows and never load a reference model. A re-run reuses the stored pass.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from solar_ray import identity
from solar_ray.cluster import init_ray
from solar_ray.config import ConfigError
from solar_ray.data.contract import DataError
from solar_ray.fs import arrow_filesystem, parquet_files
from solar_ray.remote import is_remote, local_copy, read_json
from solar_ray.train.common import (
    TrainResult,
    finished_result,
    train_and_export,
    validate_common,
    validate_model,
)
from solar_ray.train.config import DPOConfig
from solar_ray.train.launch import StageInputs
from solar_ray.train.worker import WorkerEnv, run_worker

__all__ = [
    "RefLogpsPredictor",
    "dpo_worker",
    "pair_key",
    "precompute_ref_logps",
    "run_dpo",
    "tokenize_pair",
    "validate_dpo",
]

REF_DIR = "ref_logps"
REF_MARKER = "ref_logps.json"


def pair_key(prompt: str, chosen: str, rejected: str) -> str:
    """Content key of a preference row (joins precomputed log-probs to their rows)."""
    h = hashlib.blake2b(digest_size=12)
    for part in (prompt, chosen, rejected):
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def tokenize_pair(tokenizer: Any, prompt: str, chosen: str, rejected: str) -> dict[str, list[int]]:
    """Tokenize one preference row the way TRL's DPOTrainer does for text prompts.

    EOS is appended to each completion; the completion starts where the tokenized prompt
    and prompt+completion diverge.
    """
    from trl.data_utils import common_prefix_length

    eos = tokenizer.eos_token
    if not chosen.endswith(eos):
        chosen += eos
    if not rejected.endswith(eos):
        rejected += eos
    prompt_ids = tokenizer(text=prompt)["input_ids"]
    prompt_chosen = tokenizer(text=prompt + chosen)["input_ids"]
    prompt_rejected = tokenizer(text=prompt + rejected)["input_ids"]
    n = min(
        common_prefix_length(prompt_ids, prompt_chosen),
        common_prefix_length(prompt_ids, prompt_rejected),
    )
    return {
        "prompt_ids": prompt_ids[:n],
        "chosen_ids": prompt_chosen[n:],
        "rejected_ids": prompt_rejected[n:],
    }


class RefLogpsPredictor:
    """Ray Data actor: the reference model's summed completion log-probs per pair.

    Batches are collated with TRL's ``DataCollatorForPreference`` (same truncation), so
    the values equal what ``DPOTrainer`` computes with a live reference model.
    """

    def __init__(
        self, model_dir: str, max_length: int, use_gpu: bool, precision: str,
        model_uri: str | None = None,
        attn_implementation: str = "sdpa",
    ) -> None:  # fmt: skip
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        self.torch = torch
        self.device = torch.device("cuda" if use_gpu else "cpu")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        model_dir = local_copy(model_dir, model_uri)  # an actor on another node: its own copy
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=attn_implementation
        ).to(self.device)
        self.model.eval()
        self.collator = DataCollatorForPreference(
            pad_token_id=self.tokenizer.pad_token_id, max_length=max_length
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        rows = list(zip(batch["prompt"], batch["chosen"], batch["rejected"], strict=True))
        examples = [tokenize_pair(self.tokenizer, str(p), str(c), str(r)) for p, c, r in rows]
        padded = self.collator(examples)
        input_ids = padded["input_ids"].to(self.device)
        with torch.no_grad():
            logits = self.model(
                input_ids=input_ids, attention_mask=padded["attention_mask"].to(self.device)
            ).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1)
        token_logps = logps.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        mask = padded["completion_mask"][:, 1:].to(self.device).bool()
        summed = (token_logps * mask).sum(dim=1).cpu().numpy().astype(np.float64)
        chosen, rejected = np.split(summed, 2)
        return {
            "key": np.array([pair_key(str(p), str(c), str(r)) for p, c, r in rows]),
            "ref_chosen_logps": chosen,
            "ref_rejected_logps": rejected,
        }


def precompute_ref_logps(
    cfg: DPOConfig, inputs: StageInputs, ref_dir: Path
) -> tuple[list[str], str]:
    """Run (or reuse) the Ray Data reference pass; returns (its Parquet files, fingerprint).

    Output: ``<storage>/<name>/ref_logps/`` with ``key``, ``ref_chosen_logps`` and
    ``ref_rejected_logps``, plus ``ref_logps.json`` recording what it was computed from.
    """
    import ray
    import ray.data

    storage = cfg.resolved_storage_path.rstrip("/")
    out_uri = f"{storage}/{cfg.run_name}/{REF_DIR}"
    marker_uri = f"{storage}/{cfg.run_name}/{REF_MARKER}"
    fingerprint = identity.key(
        inputs.signature(), str(ref_dir), cfg.seq_len, cfg.precision_resolved
    )
    fs, marker_path = arrow_filesystem(marker_uri)
    _, out_path = arrow_filesystem(out_uri)
    done = read_json(marker_uri)
    if done is None or done.get("fingerprint") != fingerprint:
        init_ray()
        fs.delete_dir_contents(out_path, missing_dir_ok=True)
        files = list(inputs.data.files) + (list(inputs.val.files) if inputs.val else [])
        ds = ray.data.read_parquet(files, filesystem=inputs.data.filesystem).select_columns(
            ["prompt", "chosen", "rejected"]
        )
        ds = ds.map_batches(
            RefLogpsPredictor,
            fn_constructor_kwargs={
                "model_dir": str(ref_dir),
                "model_uri": _remote_source(cfg.ref_model or cfg.model),
                "max_length": cfg.seq_len,
                "use_gpu": cfg.use_gpu,
                "precision": cfg.precision_resolved,
                "attn_implementation": cfg.attn_implementation,
            },
            batch_size=cfg.ref_batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.ref_num_actors),
            num_gpus=1 if cfg.use_gpu else 0,
            num_cpus=1,
        )
        ds.write_parquet(out_path, filesystem=fs)
        with fs.open_output_stream(marker_path) as f:
            f.write(json.dumps({"fingerprint": fingerprint, "ref_model": str(ref_dir)}).encode())
    written = parquet_files(fs, out_path)
    if not written:
        raise RuntimeError(f"the reference pass wrote no Parquet files into {out_uri}")
    return written, fingerprint


def _attach_ref_logps(dataset: Any, table: Any) -> Any:
    """Add ``ref_chosen_logps`` / ``ref_rejected_logps`` to each row by its content key."""
    keys = table.column("key").to_pylist()
    chosen = table.column("ref_chosen_logps").to_pylist()
    rejected = table.column("ref_rejected_logps").to_pylist()
    lookup = {k: (c, r) for k, c, r in zip(keys, chosen, rejected, strict=True)}
    rows = zip(dataset["prompt"], dataset["chosen"], dataset["rejected"], strict=True)
    values = []
    for i, (p, c, r) in enumerate(rows):
        found = lookup.get(pair_key(p, c, r))
        if found is None:
            raise DataError(f"data: row {i} has no precomputed reference log-probs")
        values.append(found)
    dataset = dataset.add_column("ref_chosen_logps", [v[0] for v in values])
    return dataset.add_column("ref_rejected_logps", [v[1] for v in values])


def _dpo_datasets(env: WorkerEnv) -> tuple[Any, Any]:
    from solar_ray.train.hf import load_hf_dataset, load_hf_split

    cfg: DPOConfig = env.cfg  # type: ignore[assignment]
    data, val = load_hf_split(env, ["prompt", "chosen", "rejected"])
    ref_files = env.spec.ref_logps_files
    if ref_files:
        table = load_hf_dataset(ref_files, cfg.resolved_storage_path).data.table
        data = _attach_ref_logps(data, table)
        if val is not None:
            val = _attach_ref_logps(val, table)
    return data, val


def dpo_worker(config: dict[str, Any]) -> None:
    """The per-worker DPO loop (Ray Train worker or a plain process)."""
    run_worker(config, _dpo)


def _dpo(env: WorkerEnv, ckpt: Path | None) -> None:
    from transformers import AutoTokenizer
    from trl import DPOConfig as TrlDPOConfig
    from trl import DPOTrainer

    from solar_ray.train.hf import (
        DeepSpeedCheckpointMixin,
        hf_training_kwargs,
        train_with_hf,
        use_full_logits_head,
    )
    from solar_ray.train.lora import peft_config, quantization_config

    cfg: DPOConfig = env.cfg  # type: ignore[assignment]
    train_ds, eval_ds = _dpo_datasets(env)
    precomputed = bool(env.spec.ref_logps_files)
    ref_dir = env.spec.ref_model_dir and local_copy(env.spec.ref_model_dir, env.spec.ref_model_uri)

    class SolarDPOTrainer(DeepSpeedCheckpointMixin, DPOTrainer):
        """DPOTrainer that takes reference log-probs already in the dataset as they are."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if cfg.lm_head == "full":
                outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
                if self.use_weighting:
                    outputs += ("log_sum_sq_probs",)
                use_full_logits_head(self, outputs)

        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            if "ref_chosen_logps" in dataset.column_names:
                return dataset
            return super()._precompute_ref_logps(dataset, name, batch_size)

    def make_trainer(output_dir: str, callbacks: list[Any]) -> Any:
        kwargs = hf_training_kwargs(cfg, output_dir, eval_ds is not None)
        args = TrlDPOConfig(
            **kwargs,
            beta=cfg.beta,
            loss_type=[cfg.loss_type] if isinstance(cfg.loss_type, str) else list(cfg.loss_type),
            max_length=cfg.seq_len,
            precompute_ref_log_probs=precomputed,
            dataset_num_proc=None,
        )
        ref_model = None
        if ref_dir and not precomputed:
            from trl.trainer.utils import create_model_from_path

            # built after the args, so under ZeRO-3 it is partitioned as it loads
            ref_model = create_model_from_path(ref_dir, **kwargs["model_init_kwargs"])
        tokenizer = AutoTokenizer.from_pretrained(env.model_dir)
        # a LoRA policy without ref_model: TRL's reference is the policy with its adapters
        # disabled (ref_model=None), never a second copy
        return SolarDPOTrainer(
            model=env.model_dir,
            ref_model=ref_model,
            peft_config=peft_config(cfg.peft) if cfg.peft else None,
            quantization_config=quantization_config(cfg),
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            callbacks=callbacks,
        )

    train_with_hf(env, ckpt, make_trainer, lambda _: {"precomputed_ref_logps": precomputed})


def validate_dpo(cfg: DPOConfig) -> StageInputs:
    """Resolve and check policy, reference and data before any worker starts."""
    if cfg.streaming:
        raise ConfigError(
            "streaming: DPO reads the prepared mix in each worker; streaming from Ray Data "
            "is for the pretrain stage"
        )
    if cfg.precompute_ref_logps and cfg.local:
        raise ConfigError("precompute_ref_logps: the reference pass runs on Ray (set local: false)")
    inputs = validate_common(cfg, data_kind="preference")
    if cfg.ref_model:
        ref_dir, _, ref_vocab = validate_model(cfg.ref_model, "ref_model", cfg.seq_len)
        if ref_vocab != inputs.vocab_size:
            raise ConfigError(
                f"ref_model: vocab_size {ref_vocab} differs from the policy's {inputs.vocab_size}"
            )
        inputs.ref_model_dir = ref_dir
    return inputs


def _remote_source(source: str | None) -> str | None:
    """``source`` when it is on object storage (workers elsewhere download it), else None."""
    return source if source and is_remote(source) else None


def run_dpo(cfg: DPOConfig) -> TrainResult:
    """DPO of ``cfg.model`` on the preference mix ``cfg.data`` into ``cfg.out``."""
    inputs = validate_dpo(cfg)
    done = finished_result(cfg, inputs)
    if done is not None:
        return done
    ref_dir = inputs.ref_model_dir or inputs.model_dir
    spec_values: dict[str, Any] = {
        "ref_model_dir": str(inputs.ref_model_dir) if inputs.ref_model_dir else None,
        "ref_model_uri": _remote_source(cfg.ref_model) if inputs.ref_model_dir else None,
    }
    if cfg.precompute_ref_logps:
        files, fingerprint = precompute_ref_logps(cfg, inputs, ref_dir)
        spec_values["ref_logps_files"] = files
        inputs.extra_parents.append(
            {"kind": "ref_logps", "role": "ref_logps", "sha256": fingerprint,
             "path": f"{cfg.resolved_storage_path.rstrip('/')}/{cfg.run_name}/{REF_DIR}"}
        )  # fmt: skip
    lines = [f"DPO: beta={cfg.beta}, loss_type={cfg.loss_type}, reference "
             f"{'precomputed (Ray Data)' if cfg.precompute_ref_logps else 'live'}."]  # fmt: skip
    if cfg.peft is not None and cfg.ref_model is None and not cfg.precompute_ref_logps:
        lines[0] += " The reference is the LoRA policy with its adapters disabled."
    return train_and_export(cfg, dpo_worker, inputs, spec_values=spec_values, card_lines=lines)
