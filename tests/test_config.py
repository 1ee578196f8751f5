from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from lmsmith import config
from lmsmith.errors import UserError
from lmsmith.evaluate import EvalConfig


@dataclass
class Inner:
    lr: float = config.field(1e-3, help="learning rate")
    kind: Literal["a", "b"] = config.field("a", help="variant")

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class Top:
    name: str = config.field("x", help="a name")
    seeds: list[int] = config.field([1, 2], help="seeds")
    train: Inner = None  # type: ignore[assignment]

    def __post_init__(self):
        if self.train is None:
            self.train = Inner()


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: y\ntrain:\n  lr: 0.5\n")
    cfg = config.load(Top, str(p), config.parse_overrides(["--kind", "b", "--seeds", "4,5"]))
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
        config.load(Top, None, config.parse_overrides(args))


def test_flags_without_value_are_true():
    assert config.parse_overrides(["--greedy", "--limit", "3"]) == {"greedy": "true", "limit": "3"}
    cfg = config.load(EvalConfig, None, {"greedy": "true", "limit": "3", "max-new-tokens": "7"})
    assert cfg.greedy and cfg.limit == 3 and cfg.max_new_tokens == 7


def test_every_shipped_config_parses():
    """Every YAML under configs/ builds the config of the command it is for (a typo fails
    here): configs/GROUP/NAME.yaml is for `lmsmith GROUP NAME`, else for `lmsmith GROUP`, else
    for every command of GROUP that has no NAME.yaml of its own (debias presets serve
    attribute, prune, eval and run alike; testbed.yaml is the testbed's)."""
    from lmsmith.cli import BY_NAME, COMMANDS, resolve

    other_names = {"dialog/train-reranker": "dialog train-retriever"}
    files = sorted(Path(__file__).resolve().parents[1].joinpath("configs").rglob("*.yaml"))
    files = [f for f in files if f.parent.name != "accelerate"]  # accelerate's own format
    assert files
    for f in files:
        group = f.parent.name
        key = f"{group}/{f.stem}"
        if key in other_names:
            names = [other_names[key]]
        elif f"{group} {f.stem}" in BY_NAME:
            names = [f"{group} {f.stem}"]
        elif group in BY_NAME:
            names = [group]
        else:  # every command of the group without a preset file of its own
            names = [
                c.name
                for c in COMMANDS
                if c.name.startswith(group + " ")
                and not f.with_name(c.name.split(" ", 1)[1] + ".yaml").exists()
            ]
        assert names, f"{f}: no command of the table takes it"
        for name in names:
            cls = resolve(BY_NAME[name].config)
            assert isinstance(config.load(cls, str(f)), cls), (f, name)


def test_required_keys_are_reported_by_parse_only(tmp_path):
    assert config.load(EvalConfig, None, {}).data == ""  # a preset may leave it out
    with pytest.raises(UserError, match=r"^missing required option --data \(instruction jsonl"):
        config.parse(EvalConfig, ["--limit", "3"])
    with pytest.raises(UserError, match="missing required option --data"):
        config.parse(EvalConfig, ["--data", "  "])
    p = tmp_path / "c.yaml"
    p.write_text("data: rows.jsonl\n")
    assert config.parse(EvalConfig, ["--config", str(p)]).data == "rows.jsonl"
    assert "(required)" in config.describe(EvalConfig)


def test_accelerate_presets_load_in_accelerate():
    """configs/accelerate/*.yaml are `accelerate launch --config_file` files: accelerate's own
    loader reads each, with lmsmith's precision left to lmsmith (no accelerate AMP)."""
    from accelerate.commands.config.config_args import load_config_from_file

    folder = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(expected)
    for name, kind in expected.items():
        c = load_config_from_file(str(folder / f"{name}.yaml"))
        assert str(c.distributed_type).endswith(kind) and c.mixed_precision == "no", name
    fsdp = load_config_from_file(str(folder / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # DCP's metadata is a pickle
    assert load_config_from_file(str(folder / "zero3.yaml")).deepspeed_config["zero_stage"] == 3
