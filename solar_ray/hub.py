"""Publishing a finished model to the Hugging Face Hub: ``push_to_hub:`` and ``solar-ray push``.

:func:`push_model` uploads a finished output as it is (weights, config, tokenizer, model
card, ``solar.json``); the token comes only from ``HF_TOKEN`` or ``hf auth login``.
:func:`refuse_tokens` refuses a recipe holding a secret (:data:`TOKEN_KEYS`,
:data:`SECRET_ENV`, :data:`SECRET_VALUE`). See docs/pipeline.md, "Publishing".
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from solar_ray.config import ConfigError, StageConfig
from solar_ray.errors import UserError

__all__ = ["PushToHub", "push_model", "refuse_tokens"]

#: keys that would hold a secret: never in a recipe
TOKEN_KEYS = frozenset({"token", "hf_token", "hub_token", "api_token", "access_token"})
#: environment variable names that hold a secret (WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, ...)
SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL",
                        re.IGNORECASE)  # fmt: skip
#: values shaped like a known service's key: Hugging Face, AWS, OpenAI-style, GitHub, Slack
SECRET_VALUE = re.compile(r"^\s*(hf_[A-Za-z0-9]{30,}|A[KS]IA[0-9A-Z]{16}|sk-[\w-]{20,}"
                          r"|gh[pousr]_\w{30,}|github_pat_\w{30,}|xox[abpr]-[\w-]{10,})\s*$")
_WHERE_SECRETS_GO = ("pass it through the environment (export it where solar-ray or "
                     "`ray job submit` runs), never in a recipe")  # fmt: skip


class PushToHub(StageConfig):
    """Where a finished model stage is published."""

    repo_id: str = Field(
        pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", description="the Hub repository, owner/name"
    )
    private: bool = Field(default=False, description="create the repository private")


def refuse_tokens(data: Any, where: str = "") -> None:
    """Refuse a secret anywhere in a recipe's data: a token field, a secret-named environment
    variable (under ``env_vars``), a value shaped like a key. The line names the field."""
    if isinstance(data, Mapping):
        env = where.rsplit(".", 1)[-1] == "env_vars"
        for key, value in data.items():
            path = f"{where}.{key}" if where else str(key)
            if str(key).lower() in TOKEN_KEYS:
                raise ConfigError(
                    f"{path}: a recipe never holds a token; set HF_TOKEN in the environment "
                    "or run `hf auth login`"
                )
            if env and SECRET_ENV.search(str(key)):
                raise ConfigError(f"{path}: looks like a secret; {_WHERE_SECRETS_GO}")
            refuse_tokens(value, path)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            refuse_tokens(value, f"{where}.{i}")
    elif isinstance(data, str) and SECRET_VALUE.match(data):
        raise ConfigError(f"{where}: the value looks like an access key; {_WHERE_SECRETS_GO}")


def push_model(model_dir: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload a finished stage output to ``repo_id``; returns the commit URL.

    The directory must be a finished output (its ``solar.json`` is written last).
    """
    from huggingface_hub import HfApi

    from solar_ray.checkpoint import read_manifest

    model_dir = Path(model_dir).expanduser().absolute()
    if not model_dir.is_dir() or read_manifest(model_dir) is None:
        raise UserError(
            f"{model_dir}: not a finished solar-ray model (no solar.json); push a stage's output"
        )
    api = HfApi()  # the token: HF_TOKEN, else the hub's login
    stage = read_manifest(model_dir).get("stage", "model")  # type: ignore[union-attr]
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(model_dir),
            repo_id=repo_id,
            repo_type="model",
            commit_message=f"solar-ray: {stage} output {model_dir.name}",
            ignore_patterns=[".*"],
        )
    except Exception as e:
        if not _is_hub_error(e):
            raise
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise UserError(
            f"push to {repo_id}: the Hub refused or could not be reached "
            f"({type(e).__name__}: {first[:200]}); check the network and HF_TOKEN"
        ) from None
    return str(getattr(commit, "commit_url", commit))


def _is_hub_error(e: BaseException) -> bool:
    """A network or Hub (HTTP, auth) failure, not a bug: the HTTP clients' and the hub's errors."""
    root = type(e).__module__.split(".")[0]
    return isinstance(e, OSError) or root in ("huggingface_hub", "httpx", "httpx2", "httpcore",
                                              "requests", "urllib3")  # fmt: skip


def cli(command: str, parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """``solar-ray push MODEL_DIR REPO_ID [--private]``."""
    parser.add_argument("model_dir", help="a finished stage output (has solar.json)")
    parser.add_argument("repo_id", help="Hub repository, owner/name")
    parser.add_argument("--private", action="store_true", help="create the repository private")

    def run(args: argparse.Namespace) -> int:
        from solar_ray.config import validate

        target = validate(PushToHub, {"repo_id": args.repo_id, "private": args.private}, "<args>")
        url = push_model(args.model_dir, target.repo_id, target.private)
        print(f"pushed {args.model_dir} -> {url}")
        return 0

    return run
