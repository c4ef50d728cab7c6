"""Typed configuration: YAML in, a validated pydantic model out, errors that name the field.

Every stage has one config class deriving from :class:`StageConfig` (unknown keys are an
error, so a typo never silently falls back to a default). Every entry point loads its
config through :func:`load_config`, which applies ``--set dotted.key=value`` overrides on
top of the YAML before validation, so a recipe can be tried smaller without editing it::

    cfg = load_config(UpscaleConfig, "jobs/demo.yaml", overrides=["m=5"])

A user mistake raises :class:`ConfigError` (a ``ValueError``) whose message names the
dotted path of every bad field and what was wrong with it.
"""

from __future__ import annotations

import argparse
import copy
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from solar_ray.errors import UserError

__all__ = [
    "ConfigError",
    "StageConfig",
    "add_config_args",
    "add_field_flags",
    "flag_values",
    "apply_overrides",
    "check_flags_agree",
    "load_config",
    "load_yaml",
    "parse_override",
    "parse_yaml",
]

T = TypeVar("T", bound=BaseModel)


class ConfigError(UserError):
    """A configuration the user wrote is invalid; the message names the field(s)."""


class StageConfig(BaseModel):
    """Base of every stage config: strict about unknown keys, validated on assignment."""

    # allow_inf_nan: every float field is finite (``lr: .inf`` is a typo, not a setting)
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False
    )

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON-able data (what lineage manifests record)."""
        return self.model_dump(mode="json")


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping names the same key twice (YAML would silently keep the last)."""

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"line {line}: duplicate key {key!r} (first on line {first_line})")
        self.key, self.line, self.first_line = key, line, first_line


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping.

    Keys merged in with ``<<: *anchor`` may be overridden, as YAML intends; two explicit
    keys may not.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise DuplicateKeyError(key, line, first)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, UniqueKeyLoader.construct_mapping
)


#: the most text and the most nodes (aliases counted as copies) a YAML document may hold:
#: a recipe is a few KiB; an "alias bomb" expands a few lines into billions of nodes
MAX_YAML_CHARS = 4 * 1024 * 1024
MAX_YAML_NODES = 1_000_000


class YAMLBoundError(yaml.YAMLError):
    """A YAML document over :data:`MAX_YAML_CHARS` or :data:`MAX_YAML_NODES`, or a cycle."""


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """Nodes in ``node`` with every alias expanded (memoized, so a bomb costs its text)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise YAMLBoundError("an alias refers to a node that contains it (a cycle)")
    open_.add(id(node))
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(n, sizes, open_) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes, open_) + _expanded_size(v, sizes, open_)
                    for k, v in node.value)  # fmt: skip
    open_.discard(id(node))
    sizes[id(node)] = size = min(size, MAX_YAML_NODES + 1)
    return size


def _load_bounded(text: str) -> Any:
    """``yaml.load`` with :class:`UniqueKeyLoader`, refusing huge or alias-bomb documents."""
    if len(text) > MAX_YAML_CHARS:
        raise YAMLBoundError(f"longer than {MAX_YAML_CHARS} characters")
    loader = UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, set()) > MAX_YAML_NODES:
            raise YAMLBoundError(
                f"more than {MAX_YAML_NODES} values once its aliases (*name) are expanded"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_yaml(text: str, origin: str) -> Any:
    """YAML text to data with :class:`UniqueKeyLoader`; any problem is one ConfigError line.

    A document over :data:`MAX_YAML_CHARS`, or over :data:`MAX_YAML_NODES` values with its
    aliases expanded (or with an alias inside itself), is refused before it is built.
    """
    try:
        return _load_bounded(text)
    except DuplicateKeyError as e:
        raise ConfigError(
            f"{origin}: line {e.line}: the key {e.key!r} is given twice (first on line "
            f"{e.first_line}); YAML would keep only the last, so remove one"
        ) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = " ".join(x for x in (e.context, e.problem) if x)
        raise ConfigError(f"{origin}: not valid YAML: {where}{what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{origin}: not valid YAML: nested too deeply") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping top level is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{p}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); "
            "save the file as UTF-8"
        ) from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read it ({e.strerror})") from None
    data = parse_yaml(text, str(p))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-parsed value (``3`` is an int)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"--set {item!r}: empty component in key {key!r}")
    try:
        value = _load_bounded(raw) if raw.strip() else ""
    except YAMLBoundError as e:
        raise ConfigError(f"--set {key}: the value is {e}") from None
    except (yaml.YAMLError, RecursionError):
        value = raw
    return parts, value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with every ``dotted.key=value`` override applied.

    Integer components index into lists (``sources.0.max_samples=10``); missing mapping
    keys are created, so an override can set a field the YAML left at its default.
    """
    out: dict[str, Any] = copy.deepcopy(dict(data))
    for item in overrides:
        parts, value = parse_override(item)
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                # digits only: a negative index (-1) would silently pick from the end
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"--set {item!r}: {where!r} is not a valid index into a list of "
                        f"{len(node)} (0 to {len(node) - 1})"
                    )
                idx = int(part)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(
                    f"--set {item!r}: cannot descend into {'.'.join(parts[:i])!r}, "
                    f"which is a {type(node).__name__}"
                )
    return out


def format_validation_error(err: ValidationError, origin: str, prefix: str = "") -> str:
    """One line per bad field, each naming the dotted path, e.g. ``sources.1.weight``.

    ``prefix`` is prepended to every path (``stages.cpt`` for a stage inside a recipe).
    """
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        loc = ".".join([prefix] * bool(prefix) + [str(x) for x in e["loc"]])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see the stage's config class)"
        elif e["type"] == "missing":
            msg = "field required"
        lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")
    return "\n".join(lines)


def validate(cls: type[T], data: Mapping[str, Any], origin: str = "<dict>", prefix: str = "") -> T:
    """Validate plain data into ``cls``; a failure is a ConfigError naming every bad field."""
    try:
        return cls.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, origin, prefix)) from None


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    data: Mapping[str, Any] | None = None,
) -> T:
    """Load ``cls`` from a YAML file and/or a mapping, then apply ``--set`` overrides.

    ``data`` entries win over the file's (the CLI passes its flags this way); a ``--set``
    that changes a field ``data`` gives is refused, naming both.
    """
    merged: dict[str, Any] = {}
    origin = "<args>"
    if path is not None:
        merged.update(load_yaml(path))
        origin = str(path)
    flags = {k: v for k, v in (data or {}).items() if v is not None}
    merged.update(flags)
    overrides = list(overrides)
    check_flags_agree(flags, overrides)
    merged = apply_overrides(merged, overrides)
    return validate(cls, merged, origin)


def check_flags_agree(flags: Mapping[str, Any], overrides: Iterable[str]) -> None:
    """Refuse a ``--set`` that changes a field also given as the flag ``--name``."""
    for item in overrides:
        top = parse_override(item)[0][0]
        if top in flags:
            given = {top: flags[top]}
            if apply_overrides(given, [item]) != given:
                flag = "--" + top.replace("_", "-")
                raise ConfigError(
                    f"{flag} {flags[top]!r} and --set {item!r} disagree; give the field once"
                )


# --------------------------------------------------------------------------- command-line flags


def add_config_args(parser: argparse.ArgumentParser, config_required: bool = False) -> None:
    """``--config FILE`` and ``--set dotted.key=value`` (repeatable), shared by all commands."""
    parser.add_argument("--config", "-c", required=config_required, help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set m=5 --set sources.0.max_samples=100",
    )


def _flag_kind(annotation: Any) -> tuple[str, Any] | None:
    """How a field's type becomes a flag: (``bool``|``scalar``|``list``, type or choices)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _flag_kind(args[0])
        if int in args and any(typing.get_origin(a) is tuple for a in args):
            return "list", int  # a count or a range: --num-workers 2, --num-workers 1 4
        return ("scalar", str) if str in args else None  # e.g. a path or a list: the path
    if annotation is bool:
        return "bool", None
    if annotation in (int, float, str):
        return "scalar", annotation
    if origin is typing.Literal:
        values = typing.get_args(annotation)
        return ("choices", [str(v) for v in values]) if all(isinstance(v, str) for v in values) else None
    if origin is list:
        (item,) = typing.get_args(annotation) or (None,)
        return ("list", item) if item in (int, float, str) else None
    return None


def add_field_flags(
    parser: argparse.ArgumentParser,
    cls: type[BaseModel],
    own: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """One ``--field-name`` flag per top-level field of ``cls`` that a flag can carry.

    Built from the pydantic model, so a new config field is a new flag with no extra
    code (as mergekit builds its options from its model): ``bool`` fields get
    ``--x/--no-x``, numbers and strings a typed value, string ``Literal``s their choices,
    lists of scalars several values. Fields of other types (mappings, nested configs) are
    set with ``--set`` or the YAML. The field's description is the help. ``own`` maps a
    name to ``add_argument`` keywords: a field's replace its flag, other names are flags
    of their own, after the fields' (:func:`flag_values` reads the fields' back).
    """
    own = own or {}
    flags: dict[str, Mapping[str, Any]] = {}  # name -> add_argument keywords
    for name, field in cls.model_fields.items():
        kind = _flag_kind(field.annotation)
        if name in own:
            flags[name] = own[name]
        elif kind is not None:
            what, arg = kind
            flags[name] = {
                "default": None,
                "help": field.description.replace("%", "%%") if field.description else None,
                **{
                    "bool": {"action": argparse.BooleanOptionalAction},
                    "choices": {"choices": arg},
                    "list": {"type": arg, "nargs": "+"},
                    "scalar": {"type": arg},
                }[what],
            }
    for name, kwargs in {**flags, **own}.items():  # own names that are not fields come last
        parser.add_argument("--" + name.replace("_", "-"), dest=name, **kwargs)


def flag_values(args: argparse.Namespace, cls: type[BaseModel]) -> dict[str, Any]:
    """The config fields given as flags (those left unset are absent, so YAML values stay)."""
    return {
        name: getattr(args, name)
        for name in cls.model_fields
        if getattr(args, name, None) is not None
    }
