"""One path from YAML + ``--key value`` overrides to typed, self-validating dataclasses.

Nested dataclasses (declared with :func:`nested`) are addressed with dots: ``--train.lr 1e-4``
or, when the name is unique, ``--lr 1e-4``. Unknown keys are errors that list what exists.
A field declared ``field(..., required=True)`` must be given on the command line or in the YAML
file: :func:`parse` (the CLI's path) reports a missing one; :func:`load` does not, so a preset
(which leaves ``--data`` and the like to the command line) still loads on its own.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from lmsmith.errors import UserError


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One settable key of a config tree."""

    type: Any
    help: str
    required: bool
    aliases: tuple[str, ...]


def leaf_fields(cls, prefix="", required=()) -> dict[str, Leaf]:
    """Map dotted names → :class:`Leaf` for every leaf field of a dataclass tree."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out.update(leaf_fields(t, prefix + f.name + ".", f.metadata.get("required", ())))
        else:
            req = bool(f.metadata.get("required")) or f.name in required
            out[prefix + f.name] = Leaf(
                t, f.metadata.get("help", ""), req, tuple(f.metadata.get("aliases", ()))
            )
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


def read_yaml(path: Path) -> dict:
    """A YAML config file as a mapping; UserError (one line, naming the file and line) when it
    is not UTF-8, not YAML, or not a mapping."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    return data


def _flatten(d: dict, prefix="", path="") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if not isinstance(k, str):
            raise UserError(
                f"{path or 'config'}: key '{prefix}{k}' is not a name ({type(k).__name__})"
            )
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + k + ".", path))
        else:
            out[prefix + k] = v
    return out


def _resolve_key(key: str, leaves: dict) -> str:
    key = key.replace("-", "_")
    if key in leaves:
        return key
    aliased = [k for k, leaf in leaves.items() if key in leaf.aliases]
    if len(aliased) == 1:
        return aliased[0]
    matches = [k for k in leaves if k.split(".")[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UserError(f"config key '{key}' is ambiguous: {matches}")
    raise UserError(f"unknown config key '{key}'; known keys: {', '.join(sorted(leaves))}")


def build(cls, values: dict[str, Any]):
    """Build a dataclass tree from dotted-name values (unknown names are errors)."""
    leaves = leaf_fields(cls)
    flat = {}
    for k, v in values.items():
        name = _resolve_key(k, leaves)
        flat[name] = _coerce(v, leaves[name].type, name)

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
        values.update(_flatten(read_yaml(p), path=str(p)))
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k] = v
    return build(cls, values)


def split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """Pull ``--config FILE`` out of argv; the rest are overrides."""
    rest, cfg = [], None
    i = 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            cfg = argv[i + 1]
            i += 2
        elif argv[i].startswith("--config="):
            cfg = argv[i].split("=", 1)[1]
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    return cfg, rest


def option_name(name: str, leaves: dict) -> str:
    """The shortest flag that reaches a dotted key: ``--docs`` for ``corpus.docs`` if unique."""
    last = name.split(".")[-1]
    short = last if sum(k.split(".")[-1] == last for k in leaves) == 1 else name
    return "--" + short.replace("_", "-")


def missing_required(cfg) -> list[str]:
    """Flags of the required keys that ``cfg`` leaves empty ('' / None / [])."""
    leaves = leaf_fields(type(cfg))
    out = []
    for name, leaf in leaves.items():
        if not leaf.required:
            continue
        value = cfg
        for part in name.split("."):
            value = getattr(value, part)
        if value is None or value == [] or (isinstance(value, str) and not value.strip()):
            out.append(f"{option_name(name, leaves)} ({leaf.help})")
    return out


def parse(cls, argv: list[str]):
    """The CLI's path: ``[--config FILE.yaml] [--key value ...]`` → a validated ``cls``
    with every required key given (else one UserError naming the first missing one)."""
    path, rest = split_config(argv)
    cfg = load(cls, path, parse_overrides(rest))
    missing = missing_required(cfg)
    if missing:
        raise UserError(f"missing required option {missing[0]}")
    return cfg


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


def field(
    default=dataclasses.MISSING,
    help: str = "",  # noqa: A002
    required: bool = False,
    aliases: tuple[str, ...] = (),
    **kw,
):
    """A dataclass field with a one-line help string (shown by ``lmsmith ... --help``).

    ``required=True``: the CLI refuses to run without it (the default only keeps ``cls()``
    buildable); ``aliases``: other option names, e.g. ``("out",)`` for ``--out``.
    """
    meta = {"help": help, "required": required, "aliases": tuple(aliases)}
    if default is not dataclasses.MISSING and isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def nested(cls, required: tuple[str, ...] = ()):
    """A nested config block, built with its own defaults; ``required`` names fields of the
    block that this command cannot run without (the index command's ``docs``, say)."""
    return dataclasses.field(default_factory=cls, metadata={"required": tuple(required)})


def describe(cls) -> str:
    """A help listing of every key with its type, default and help."""
    lines = []
    inst = None
    try:
        inst = cls()
    except Exception:
        pass
    for name, leaf in leaf_fields(cls).items():
        t, h = leaf.type, leaf.help
        default = ""
        if leaf.required:
            default = " (required)"
        elif inst is not None:
            obj = inst
            for part in name.split("."):
                obj = getattr(obj, part)
            default = f" (default {obj!r})"
        tname = getattr(t, "__name__", str(t)).replace("typing.", "")
        also = "".join(f" (also --{a})" for a in leaf.aliases)
        lines.append(f"  --{name}{also} {tname}{default}  {h}")
    return "\n".join(lines)


def check_min(cfg, minimum, *names: str) -> None:
    """Raise ValueError naming the first field of ``names`` whose value is below ``minimum``
    (for a dataclass's ``__post_init__``)."""
    for name in names:
        if getattr(cfg, name) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {getattr(cfg, name)}")
