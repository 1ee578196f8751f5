"""Every preset under configs/dialog parses into its command's typed config."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmsmith import config as C
from lmsmith.dialog.config import (
    COMMAND_CONFIGS,
    CorpusConfig,
    DialogConfig,
    EvalRetrievalConfig,
    FusionConfig,
    IndexConfig,
    TrainRetrieverConfig,
)
from lmsmith.errors import UserError

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "dialog"
# file-name prefix → config class; a new preset must be listed here (or in part 2's own map)
CLASSES = {
    "index": IndexConfig,
    "eval-retrieval": EvalRetrievalConfig,
    "train-retriever": TrainRetrieverConfig,
    "train-reranker": TrainRetrieverConfig,
}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_dialog_preset_parses(path):
    cls = CLASSES.get(path.stem)
    if cls is None:
        pytest.skip(f"{path.name} belongs to another dialog command")
    cfg = C.load(cls, str(path))
    assert isinstance(cfg, cls)


def test_presets_exist_for_each_retrieval_command():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} >= set(CLASSES)


def test_overrides_reach_nested_blocks_and_are_validated():
    cfg = C.load(
        EvalRetrievalConfig,
        str(CONFIGS / "eval-retrieval.yaml"),
        {"k1": "1.2", "alpha": "0.3", "retriever": "rerank"},
    )
    assert (
        cfg.settings.bm25.k1 == 1.2
        and cfg.settings.fusion.alpha == 0.3
        and cfg.retriever == "rerank"
    )
    with pytest.raises(UserError, match="alpha"):
        C.load(EvalRetrievalConfig, None, {"alpha": "1.5"})
    with pytest.raises(ValueError, match="stride"):
        CorpusConfig(size=10, stride=20)
    with pytest.raises(ValueError, match="depth"):
        FusionConfig(depth=0)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_dialog_config_holds_every_preset_and_runs_each_commands_checks(path):
    cfg = C.load(DialogConfig, str(path))
    assert isinstance(cfg, DialogConfig)


def test_dialog_config_is_the_union_of_the_commands():
    import dataclasses

    names = {f.name for f in dataclasses.fields(DialogConfig)}
    for cls in COMMAND_CONFIGS.values():
        assert {f.name for f in dataclasses.fields(cls)} <= names
    with pytest.raises(UserError, match="k must be"):
        C.load(DialogConfig, None, {"k": "0"})  # SearchConfig's check
    with pytest.raises(UserError, match="neg_rank_min"):
        C.load(DialogConfig, None, {"neg_rank_min": "20"})  # TrainRetrieverConfig's check
