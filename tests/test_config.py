from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from lmsmith import config as C
from lmsmith.errors import UserError
from lmsmith.evaluate import EvalConfig


@dataclass
class Inner:
    lr: float = C.field(1e-3, help="learning rate")
    kind: Literal["a", "b"] = C.field("a", help="variant")

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class Top:
    name: str = C.field("x", help="a name")
    seeds: list[int] = C.field([1, 2], help="seeds")
    train: Inner = None  # type: ignore[assignment]

    def __post_init__(self):
        if self.train is None:
            self.train = Inner()


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: y\ntrain:\n  lr: 0.5\n")
    cfg = C.load(Top, str(p), C.parse_overrides(["--kind", "b", "--seeds", "4,5"]))
    assert (cfg.name, cfg.train.lr, cfg.train.kind, cfg.seeds) == ("y", 0.5, "b", [4, 5])


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--train.kind", "c"], "not one of"),
        (["--lr", "-1"], "lr must be > 0"),
        (["--lr", "abc"], "expected float"),
        (["--nope", "1"], "unknown config key"),
        (["stray"], "unexpected argument"),
    ],
)
def test_bad_values_are_user_errors(args, msg):
    with pytest.raises(UserError, match=msg):
        C.load(Top, None, C.parse_overrides(args))


def test_flags_without_value_are_true():
    assert C.parse_overrides(["--greedy", "--limit", "3"]) == {"greedy": "true", "limit": "3"}
    cfg = C.load(EvalConfig, None, {"greedy": "true", "limit": "3", "max-new-tokens": "7"})
    assert cfg.greedy and cfg.limit == 3 and cfg.max_new_tokens == 7


def test_every_shipped_config_parses():
    """Every YAML under configs/ builds its subsystem's config (a typo fails here)."""
    import importlib

    roots = {
        "distill": "lmsmith.distill.config:DistillConfig",
        "debias": "lmsmith.debias.config:DebiasConfig",
        "dialog": "lmsmith.dialog.config:DialogConfig",
        "eval": "lmsmith.evaluate:EvalConfig",
    }
    files = sorted(Path(__file__).resolve().parents[1].joinpath("configs").rglob("*.yaml"))
    checked = 0
    for f in files:
        target = roots.get(f.parent.name)
        if target is None:
            continue
        mod, cls = target.split(":")
        try:
            klass = getattr(importlib.import_module(mod), cls)
        except (ImportError, AttributeError):
            pytest.fail(f"{f}: no config class {target}")
        C.load(klass, str(f))
        checked += 1
    assert checked == len([f for f in files if f.parent.name in roots])
