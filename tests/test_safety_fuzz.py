"""Property-based: the loaders accept an input or refuse it with a UserError (issue 14).

Generated recipes (as YAML text and as data shaped like real stages) go through
:func:`solar_ray.pipeline.load_recipe` and :func:`solar_ray.pipeline.plan_recipe` (every
stage's config validated, references, sub-paths, prechecks); generated and corrupted
safetensors headers and index files go through the readers the upscale and merge stages
use. Nothing but a :class:`~solar_ray.errors.UserError` may escape.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from solar_ray.config import parse_yaml
from solar_ray.errors import UserError
from solar_ray.pipeline import load_recipe, plan_recipe
from solar_ray.stages import KINDS
from solar_ray.upscale import read_model_tensors, read_safetensors_header

FUZZ = settings(
    max_examples=120,
    deadline=None,
    database=None,  # leave nothing behind in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------- recipes

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["@a", "@b/x", "@a/cpt", "@nope", "smollm2-135m", "/", ".", "auto", "solar"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
#: field names the stage configs really have, so generated stages reach their validators
FIELDS = [
    "source", "m", "method", "repeat", "layers", "expand_every", "models", "weights", "t",
    "base_model", "model", "data", "steps", "epochs", "lr", "warmup_steps", "seq_len",
    "num_workers", "micro_batch_size", "global_batch_size", "mixes", "synth_math", "corpora",
    "random", "suite", "limit", "eval_sets", "train", "k_percent", "max_items", "num_samples",
    "out", "overwrite",
]  # fmt: skip
def _mostly(common: st.SearchStrategy, rare: st.SearchStrategy) -> st.SearchStrategy:
    """``common`` three times in four, ``rare`` otherwise."""
    return st.one_of(common, common, common, rare)


stage_bodies = st.builds(
    lambda kind, fields: {"kind": kind, **fields},
    _mostly(st.sampled_from(sorted(KINDS)), values),
    st.dictionaries(st.sampled_from(FIELDS), values, max_size=4),
)
stages = st.dictionaries(
    _mostly(st.sampled_from(["a", "b", "c"]), st.text(max_size=6)),
    _mostly(stage_bodies, values),
    min_size=1,
    max_size=3,
)
#: the recipe's own fields are plain (``Recipe`` validation is pydantic's); the stages vary
recipes = st.fixed_dictionaries({"name": st.just("r"), "stages": stages}, optional={"report": st.booleans()})


def _plan(recipe_path: Path, run_dir: Path) -> None:
    try:
        recipe = load_recipe(recipe_path)
        plan_recipe(recipe, run_dir)
    except UserError:
        pass


@FUZZ
@given(recipe=recipes)
def test_generated_recipes_are_accepted_or_refused_with_a_user_error(recipe):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "recipe.yaml"
        try:
            text = yaml.safe_dump(recipe, allow_unicode=True)
        except (yaml.YAMLError, ValueError):
            return
        path.write_text(text, encoding="utf-8")
        _plan(path, Path(d) / "run")


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_yaml_text_is_parsed_or_refused_with_a_user_error(text):
    try:
        parse_yaml(text, "fuzz.yaml")
    except UserError:
        pass
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.yaml"
        path.write_bytes(text.encode("utf-8", errors="surrogateescape") + b"\nstages: {}\n")
        _plan(path, Path(d) / "run")


# --------------------------------------------------------------------------- safetensors

dtypes = st.sampled_from(["F32", "F16", "BF16", "I64", "F8_E4M3", "F4", "Q7"])
offsets = st.tuples(st.integers(min_value=-4, max_value=400), st.integers(min_value=-4, max_value=400)).map(list)
odd_dims = st.sampled_from([-1, 2**63, 1.5, "3", None, True, [2]])
entries = st.one_of(
    # plausible entries: sizes and offsets that may or may not add up
    st.fixed_dictionaries(
        {"dtype": dtypes, "shape": st.lists(st.integers(0, 6), max_size=3), "data_offsets": offsets}
    ),
    # one field of the wrong type or value
    st.fixed_dictionaries(
        {
            "dtype": dtypes | values,
            "shape": st.lists(st.integers(0, 6) | odd_dims, max_size=3) | values,
            "data_offsets": offsets | st.lists(st.integers(-4, 400), max_size=3) | values,
        }
    ),
    values,
)
headers = st.dictionaries(
    st.sampled_from(["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "__metadata__"])
    | st.text(max_size=10),
    entries,
    max_size=4,
)


@st.composite
def safetensors_files(draw) -> bytes:
    """A header (valid, plausible or odd), a data section, then a corruption of the bytes."""
    if draw(st.booleans()):
        header = draw(headers)
        data = draw(st.binary(max_size=400))
    else:  # a valid file: consecutive tensors whose sizes match their shapes
        header, offset = {}, 0
        for name in draw(st.lists(st.text(min_size=1, max_size=8), max_size=4, unique=True)):
            shape = draw(st.lists(st.integers(0, 5), max_size=3))
            nbytes = 4 * math.prod(shape)
            header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        data = bytes(offset)
    body = json.dumps(header, allow_nan=True).encode()
    blob = bytearray(struct.pack("<Q", len(body)) + body + data)
    corruption = draw(st.sampled_from(["none", "none", "none", "truncate", "flip", "length"]))
    if corruption == "truncate" and blob:
        del blob[draw(st.integers(min_value=0, max_value=len(blob) - 1)) :]
    elif corruption == "flip" and blob:
        i = draw(st.integers(min_value=0, max_value=len(blob) - 1))
        blob[i] ^= draw(st.integers(min_value=1, max_value=255))
    elif corruption == "length" and len(blob) >= 8:
        blob[:8] = struct.pack("<Q", draw(st.integers(min_value=0, max_value=2**64 - 1)))
    return bytes(blob)


@FUZZ
@given(blob=safetensors_files(), index=st.none() | values | st.fixed_dictionaries({"weight_map": values}))
def test_safetensors_headers_are_read_or_refused_with_a_user_error(blob, index):
    with tempfile.TemporaryDirectory() as d:
        model = Path(d)
        (model / "model.safetensors").write_bytes(blob)
        try:
            refs = read_safetensors_header(model / "model.safetensors")
        except UserError:
            refs = None
        if refs is not None:  # what was accepted is consistent: every tensor inside the file
            size = len(blob)
            assert all(0 <= r.offset and r.offset + r.nbytes <= size for r in refs.values())
            assert all(isinstance(n, int) and n >= 0 for r in refs.values() for n in r.shape)
        if index is not None:
            text = json.dumps(index, allow_nan=True)
            if any(isinstance(x, float) and not math.isfinite(x) for x in [index]):
                return
            (model / "model.safetensors.index.json").write_text(text)
        try:
            read_model_tensors(model)
        except UserError:
            pass
