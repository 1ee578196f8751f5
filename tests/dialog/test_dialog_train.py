"""DPR-style bi-encoder and cross-encoder fine-tuning on tiny in-process models."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification

from lmsmith.dialog.config import TrainRetrieverConfig
from lmsmith.dialog.corpus import Passage, Query, RetrievalSet, md2d_set
from lmsmith.dialog.train import mine_hard_negatives, train_bi_encoder, train_cross_encoder


def test_dpr_loss_is_cross_entropy_over_scaled_similarities(tiny_encoder):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from lmsmith.dialog.retrieve import load_encoder

    loss = MultipleNegativesRankingLoss(load_encoder(tiny_encoder), scale=20.0)
    torch.manual_seed(0)
    q, pos, neg = (torch.nn.functional.normalize(torch.randn(3, 8), dim=-1) for _ in range(3))
    # in-batch negatives (the other golds) + hard negatives (extra columns)
    logits = 20.0 * q @ torch.cat([pos, neg]).T  # (3, 6)
    manual = -(logits.log_softmax(-1)[torch.arange(3), torch.arange(3)]).mean()
    got = loss.compute_loss_from_embeddings([q, pos, neg], None)
    assert got.item() == pytest.approx(manual.item(), rel=1e-5)
    # perfect, well-separated retrieval costs almost nothing
    eye = torch.eye(3, 8)
    loss.scale = 50.0
    assert loss.compute_loss_from_embeddings([eye, eye], None).item() < 1e-6


def test_listwise_loss_prefers_the_gold_in_column_zero(tiny_cross):
    from lmsmith.dialog.retrieve import load_cross_encoder
    from lmsmith.dialog.train import HardNegativesOnlyLoss

    loss = HardNegativesOnlyLoss(load_cross_encoder(tiny_cross))

    def listwise_loss(scores):  # (B, 1 + n): the columns as the loss receives them
        return loss.calculate_loss(list(scores.T), scores.shape[0])

    good = torch.tensor([[5.0, 0.0, 0.0]])
    bad = torch.tensor([[0.0, 5.0, 0.0]])
    assert listwise_loss(good) < listwise_loss(bad)
    assert listwise_loss(torch.zeros(2, 4)).item() == pytest.approx(
        torch.log(torch.tensor(4.0)).item()
    )
    # no random in-batch negatives: a query only sees its own group
    assert list(loss.get_in_batch_negatives(["a", "b"], [["x", "y"]])) == []


def test_hard_negatives_come_from_the_rank_window_and_exclude_gold():
    passages = [Passage(f"p{i}", " ".join(["cat"] * (i + 1) + ["dog"] * 3)) for i in range(20)]
    # BM25 ranks by "cat" frequency (saturating, length-normalised): compute the ranking here
    from lmsmith.dialog.retrieve import BM25Retriever

    r = BM25Retriever()
    r.index(passages)
    ranking = [h.pid for h in r.search("cat", 20)]
    gold = ranking[6]  # inside the window: must be excluded
    (negs,) = mine_hard_negatives(passages, [Query("q", "cat", [gold])], rank_min=5, rank_max=15)
    assert gold not in negs
    assert negs == [pid for pid in ranking[4:15] if pid != gold]


def _cfg(tmp_path, model: str, **kw) -> TrainRetrieverConfig:
    base = dict(
        data="x",
        model=model,
        output=str(tmp_path / model),
        epochs=8,
        batch_size=3,
        lr=3e-3,
        warmup=0.0,
        hard_negatives=1,
        neg_rank_min=1,
        neg_rank_max=5,
        max_length=48,
        query_max_length=32,
        progress=False,
    )
    base.update(kw)
    return TrainRetrieverConfig(**base)


def _train_set(md2d_dir) -> RetrievalSet:
    return md2d_set(
        md2d_dir / "multidoc2dial_dial_train.json",
        md2d_dir / "multidoc2dial_doc.json",
        max_history=0,
    )


def test_bi_encoder_fine_tuning_lowers_the_loss_and_saves_an_hf_model(
    tiny_encoder, md2d_dir, tmp_path
):
    from lmsmith.dialog.retrieve import load_encoder

    model = load_encoder(tiny_encoder, max_length=48, query_max_length=32)
    for m in model.modules():  # a 32-wide model's dropout noise swamps the per-epoch losses
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    cfg = _cfg(tmp_path, "bi-encoder")
    s = train_bi_encoder(cfg, _train_set(md2d_dir), model)
    losses = s["epoch_losses"]
    assert len(losses) == 8 and losses[-1] < 0.7 * losses[0]
    out = tmp_path / "bi-encoder"
    assert AutoModel.from_pretrained(out).config.hidden_size == 32
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == s["steps"] == 8 * 2  # 6 queries, batches of 3
    assert json.loads((out / "summary.json").read_text())["n_queries"] == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_cross_encoder_fine_tuning_lowers_the_loss(tiny_cross, md2d_dir, tmp_path):
    from lmsmith.dialog.retrieve import load_cross_encoder

    model = load_cross_encoder(tiny_cross, max_length=48)
    for m in model.modules():  # as above: no dropout noise in a 32-wide model
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    cfg = _cfg(tmp_path, "cross-encoder", hard_negatives=2)
    s = train_cross_encoder(cfg, _train_set(md2d_dir), model)
    losses = s["epoch_losses"]
    assert losses[-1] < 0.7 * losses[0]
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cross-encoder")
    assert again.config.num_labels == 1


def test_train_config_validates_fields():
    with pytest.raises(ValueError, match="neg_rank_min"):
        TrainRetrieverConfig(neg_rank_min=9, neg_rank_max=3)
    with pytest.raises(ValueError, match="lr"):
        TrainRetrieverConfig(lr=0)
