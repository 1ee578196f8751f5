"""One path from YAML + ``--key value`` overrides to typed, self-validating dataclasses.

Nested dataclasses are addressed with dots: ``--train.lr 1e-4`` or, when the name is unique,
``--lr 1e-4``. Unknown keys are errors that list what exists.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from lmsmith.errors import UserError


def _leaf_fields(cls, prefix="") -> dict[str, tuple[type, str]]:
    """Map dotted names → (type, help) for every leaf field of a dataclass tree."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out.update(_leaf_fields(t, prefix + f.name + "."))
        else:
            out[prefix + f.name] = (t, f.metadata.get("help", ""))
    return out


def _coerce(value: Any, t, name: str):
    origin = get_origin(t)
    if origin is Literal:
        allowed = get_args(t)
        if value not in allowed:
            raise UserError(f"config '{name}': {value!r} is not one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(t) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], name)
    if origin is list:
        (inner,) = get_args(t) or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(f"config '{name}': expected a list, got {value!r}")
        return [_coerce(v, inner, name) for v in value]
    try:
        if t is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if t is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if t is float:
            return float(value)
        if t is str:
            return str(value)
    except (TypeError, ValueError):
        raise UserError(f"config '{name}': expected {t.__name__}, got {value!r}") from None
    return value


def _flatten(d: dict, prefix="") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def _resolve_key(key: str, leaves: dict) -> str:
    key = key.replace("-", "_")
    if key in leaves:
        return key
    matches = [k for k in leaves if k.split(".")[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UserError(f"config key '{key}' is ambiguous: {matches}")
    raise UserError(f"unknown config key '{key}'; known keys: {', '.join(sorted(leaves))}")


def build(cls, values: dict[str, Any]):
    """Build a dataclass tree from dotted-name values (unknown names are errors)."""
    leaves = _leaf_fields(cls)
    flat = {}
    for k, v in values.items():
        name = _resolve_key(k, leaves)
        flat[name] = _coerce(v, leaves[name][0], name)

    def make(c, prefix=""):
        hints = typing.get_type_hints(c)
        kwargs = {}
        for f in dataclasses.fields(c):
            t = hints[f.name]
            if dataclasses.is_dataclass(t):
                kwargs[f.name] = make(t, prefix + f.name + ".")
            elif prefix + f.name in flat:
                kwargs[f.name] = flat[prefix + f.name]
        try:
            return c(**kwargs)
        except ValueError as e:
            raise UserError(f"config: {e}") from None

    return make(cls)


def load(cls, yaml_path: str | None = None, overrides: dict[str, Any] | None = None):
    """YAML file (optional) then overrides → validated dataclass instance."""
    values: dict[str, Any] = {}
    if yaml_path:
        p = Path(yaml_path)
        if not p.is_file():
            raise UserError(f"config file '{yaml_path}' does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{yaml_path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise UserError(f"{yaml_path}: expected a mapping at the top level")
        values.update(_flatten(data))
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k] = v
    return build(cls, values)


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``["--train.lr", "1e-4", "--greedy"]`` → {"train.lr": "1e-4", "greedy": "true"}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise UserError(f"unexpected argument '{a}' (overrides look like --key value)")
        key = a[2:]
        if "=" in key:
            key, val = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            val = args[i + 1]
            i += 2
        else:
            val = "true"
            i += 1
        out[key] = val
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def field(default=dataclasses.MISSING, help: str = "", **kw):  # noqa: A002
    """A dataclass field with a one-line help string (shown by ``lmsmith ... --help``)."""
    if default is not dataclasses.MISSING and isinstance(default, (list, dict)):
        return dataclasses.field(
            default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw
        )
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def describe(cls) -> str:
    """A help listing of every key with its type, default and help."""
    lines = []
    inst = None
    try:
        inst = cls()
    except Exception:
        pass
    for name, (t, h) in _leaf_fields(cls).items():
        default = ""
        if inst is not None:
            obj = inst
            for part in name.split("."):
                obj = getattr(obj, part)
            default = f" (default {obj!r})"
        tname = getattr(t, "__name__", str(t)).replace("typing.", "")
        lines.append(f"  --{name} {tname}{default}  {h}")
    return "\n".join(lines)
