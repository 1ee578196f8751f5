"""Every preset under configs/dialog parses into its command's typed config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lmsmith import config
from lmsmith.cli import BY_NAME, COMMANDS, resolve
from lmsmith.dialog.config import (
    CorpusConfig,
    EvalRetrievalConfig,
    FusionConfig,
    IndexConfig,
    SearchConfig,
    TrainRetrieverConfig,
)
from lmsmith.errors import UserError

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "dialog"
# a preset named after no command, and the command it configures
OTHER_NAMES = {"train-reranker": "train-retriever"}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_dialog_preset_parses(path):
    name = OTHER_NAMES.get(path.stem, path.stem)
    assert f"dialog {name}" in BY_NAME, f"{path.name}: no command 'dialog {name}'"
    cls = resolve(BY_NAME[f"dialog {name}"].config)
    cfg = config.load(cls, str(path))
    assert isinstance(cfg, cls)


def test_presets_exist_for_each_command():
    names = {OTHER_NAMES.get(p.stem, p.stem) for p in CONFIGS.glob("*.yaml")}
    commands = {c.name.split(" ", 1)[1] for c in COMMANDS if c.name.startswith("dialog ")}
    assert names >= commands - {"search"}  # search takes --index and --query, nothing to preset


def test_overrides_reach_nested_blocks_and_are_validated():
    cfg = config.load(
        EvalRetrievalConfig,
        str(CONFIGS / "eval-retrieval.yaml"),
        {"k1": "1.2", "alpha": "0.3", "retriever": "rerank", "docs": "d.json"},
    )
    assert (
        cfg.settings.bm25.k1 == 1.2
        and cfg.settings.fusion.alpha == 0.3
        and cfg.retriever == "rerank"
        and cfg.corpus.docs == "d.json"
    )
    with pytest.raises(UserError, match="alpha"):
        config.load(EvalRetrievalConfig, None, {"alpha": "1.5"})
    with pytest.raises(ValueError, match="stride"):
        CorpusConfig(size=10, stride=20)
    with pytest.raises(ValueError, match="depth"):
        FusionConfig(depth=0)


def test_each_commands_checks_run():
    with pytest.raises(UserError, match="k must be"):
        config.load(SearchConfig, None, {"k": "0"})
    with pytest.raises(UserError, match="neg_rank_min"):
        config.load(TrainRetrieverConfig, None, {"neg_rank_min": "20"})


def test_shared_fields_are_declared_once():
    """docs lives in the corpus block; no command declares its own."""
    for c in COMMANDS:
        if c.name.startswith("dialog "):
            names = {f.name for f in dataclasses.fields(resolve(c.config))}
            assert "docs" not in names, c.name
    leaves = config.leaf_fields(IndexConfig)
    assert leaves["corpus.docs"].required and leaves["output"].required
    assert not config.leaf_fields(EvalRetrievalConfig)["corpus.docs"].required
    # `--out DIR` is an alias of --output
    assert config.load(IndexConfig, None, {"out": "x"}).output == "x"
