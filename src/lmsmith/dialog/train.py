"""Fine-tuning retrievers with sentence-transformers: a DPR-style bi-encoder and a cross-encoder.

Bi-encoder (Karpukhin et al., 2020, as the MultiDoc2Dial baseline trains DPR):
``SentenceTransformerTrainer`` with ``MultipleNegativesRankingLoss`` on (query, gold passage,
hard negative 1..n) rows: each query's gold competes with every other passage of the batch
(in-batch negatives) and with BM25-mined hard negatives (BM25 ranks ``neg_rank_min`` ..
``neg_rank_max``, gold excluded). Loss: cross-entropy over ``scale * cos(q, p)``. The
``NO_DUPLICATES`` batch sampler keeps another copy of a query's gold out of its batch.

Cross-encoder: a one-logit head on an encoder (``CrossEncoderTrainer``), trained listwise: each
query's gold passage against its hard negatives, cross-entropy over the group's raw logits.

Both save a folder that loads as plain Hugging Face (``AutoModel`` /
``AutoModelForSequenceClassification``) and as sentence-transformers, written to a temporary
sibling and renamed into place, with ``train_config.json``, ``metrics.jsonl`` and
``summary.json``. Schedules: linear warm-up then linear decay (``transformers.get_scheduler``
inside the trainers), AdamW, gradient norm clipped to 1.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import tempfile
import time

import torch
from sentence_transformers.cross_encoder.losses import (
    MultipleNegativesRankingLoss as CrossEncoderMNRL,
)
from transformers import PrinterCallback, TrainerCallback

from lmsmith.dialog.config import BM25Config, TrainRetrieverConfig
from lmsmith.dialog.corpus import Passage, Query, RetrievalSet
from lmsmith.dialog.retrieve import BM25Retriever
from lmsmith.errors import UserError
from lmsmith.runs import MetricsSink, atomic_dir, write_json

log = logging.getLogger(__name__)


def mine_hard_negatives(
    passages: list[Passage],
    queries: list[Query],
    rank_min: int = 5,
    rank_max: int = 15,
    bm25: BM25Config | None = None,
    progress: bool = False,
) -> list[list[str]]:
    """For each query, the passage ids BM25 ranks rank_min..rank_max (1-based), gold excluded.

    BM25-mined, so ours: ``sentence_transformers.util.mine_hard_negatives`` ranks by an
    embedding model (or a cross-encoder) only. Returns Q lists (possibly empty when the corpus
    is small).
    """
    r = BM25Retriever(bm25)
    r.index(passages)
    ranked = r.search_batch([q.text for q in queries], rank_max, progress)
    out = []
    for q, hits in zip(queries, ranked):
        gold = set(q.relevant)
        out.append([h.pid for h in hits[rank_min - 1 : rank_max] if h.pid not in gold])
    return out


class HardNegativesOnlyLoss(CrossEncoderMNRL):
    """Listwise cross-entropy over each query's (gold, hard negatives) raw logits, gold in
    column 0: sentence-transformers' cross-encoder ``MultipleNegativesRankingLoss`` without its
    random in-batch negatives (no sigmoid, no scale)."""

    def __init__(self, model):
        super().__init__(model, num_negatives=None, scale=1.0, activation_fn=None)

    def get_in_batch_negatives(self, anchors, candidates):
        return iter(())


def _usable(data: RetrievalSet, max_queries: int | None) -> list[Query]:
    qs = [q for q in data.queries if q.relevant]
    if max_queries is not None:
        qs = qs[:max_queries]
    if not qs:
        raise UserError(f"{data.name}: no training query has a gold passage")
    return qs


def _rows(queries, negs, by_id, n: int, rng: random.Random) -> dict[str, list[str]]:
    """Columns anchor, positive, negative_1..n. A short negative pool is padded by repetition;
    an empty one by random non-gold passages (then only in-batch negatives are hard)."""
    cols: dict[str, list[str]] = {"anchor": [], "positive": []}
    cols.update({f"negative_{j + 1}": [] for j in range(n)})
    pids = list(by_id)
    for q, pool in zip(queries, negs):
        cols["anchor"].append(q.text)
        cols["positive"].append(by_id[rng.choice(q.relevant)].text)
        if not pool and n:
            draw = rng.sample(pids, min(len(pids), n + len(q.relevant)))
            pool = [p for p in draw if p not in q.relevant]
            if not pool:
                raise UserError("every passage is a gold passage: nothing to use as a negative")
        chosen = rng.sample(pool, min(n, len(pool)))
        chosen += [rng.choice(pool) for _ in range(n - len(chosen))]
        for j, pid in enumerate(chosen):
            cols[f"negative_{j + 1}"].append(by_id[pid].text)
    return cols


class _Sink(TrainerCallback):
    """Each optimizer step's loss and learning rate → metrics.jsonl; mean loss per epoch."""

    def __init__(self, sink: MetricsSink, steps_per_epoch: int, extra: dict | None = None):
        self.sink, self.spe, self.extra = sink, steps_per_epoch, extra or {}
        self.epoch_losses: list[list[float]] = []

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or "loss" not in logs:
            return
        epoch = (state.global_step - 1) // self.spe
        while len(self.epoch_losses) <= epoch:
            self.epoch_losses.append([])
        self.epoch_losses[epoch].append(logs["loss"])
        self.sink.log(
            step=state.global_step,
            epoch=epoch,
            loss=logs["loss"],
            lr=logs.get("learning_rate"),
            **self.extra,
        )


def _args(cls, cfg: TrainRetrieverConfig, out: str, **kw):
    return cls(
        output_dir=out,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr,
        weight_decay=0.01,  # torch's AdamW default, as before
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup,  # a float < 1: share of the steps
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=not cfg.progress,
        seed=cfg.seed,
        data_seed=cfg.seed,
        **kw,
    )


def _train(trainer_cls, args, model, loss, dataset, spe: int, sink: MetricsSink, extra=None):
    cb = _Sink(sink, spe, extra)
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, loss=loss, callbacks=[cb])
    trainer.remove_callback(PrinterCallback)  # metrics go to metrics.jsonl, not stdout
    trainer.train()
    return trainer.state.global_step, [sum(x) / len(x) for x in cb.epoch_losses]


def train_bi_encoder(cfg: TrainRetrieverConfig, data: RetrievalSet, model=None) -> dict:
    """setup → mine negatives → train → save.  Returns the summary (also in summary.json).

    ``model``: a ``SentenceTransformer`` (default: :func:`~lmsmith.dialog.retrieve.load_encoder`
    of ``cfg.init``).
    """
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from lmsmith.dialog.retrieve import load_encoder

    if not cfg.output:
        raise UserError("train-retriever needs --output FOLDER")
    torch.manual_seed(cfg.seed)
    if model is None:
        model = load_encoder(cfg.init, cfg.max_length, cfg.query_max_length)
    queries = _usable(data, cfg.max_queries)
    by_id = {p.pid: p for p in data.passages}
    negs = mine_hard_negatives(
        data.passages, queries, cfg.neg_rank_min, cfg.neg_rank_max, progress=cfg.progress
    )
    cols = _rows(queries, negs, by_id, cfg.hard_negatives, random.Random(cfg.seed))
    # queries to the encoder's query length, passages to its document length
    tasks = {c: ("query" if c == "anchor" else "document") for c in cols}
    spe = -(-len(queries) // cfg.batch_size)
    with atomic_dir(cfg.output) as tmp, tempfile.TemporaryDirectory() as work:
        sink = MetricsSink(tmp / "metrics.jsonl")
        write_json(tmp / "train_config.json", dataclasses.asdict(cfg))
        args = _args(
            SentenceTransformerTrainingArguments,
            cfg,
            work,
            batch_sampler=BatchSamplers.NO_DUPLICATES,
            router_mapping=tasks,
        )
        loss = MultipleNegativesRankingLoss(model, scale=cfg.scale)
        summary = _fit_and_save(
            SentenceTransformerTrainer,
            args,
            model,
            loss,
            Dataset.from_dict(cols),
            spe,
            sink,
            tmp,
            {
                "model": "bi-encoder",
                "init": cfg.init,
                "n_queries": len(queries),
                "n_passages": len(data.passages),
                "queries_without_hard_negatives": sum(1 for n in negs if not n),
            },
        )
    return summary


def _fit_and_save(trainer_cls, args, model, loss, dataset, spe, sink, folder, summary) -> dict:
    """Train (see :func:`_train`), log each epoch's mean loss, save the model and
    ``summary.json`` (``summary`` plus steps, epoch losses and time) into ``folder``."""
    t0 = time.time()
    steps, epoch_losses = _train(trainer_cls, args, model, loss, dataset, spe, sink)
    for e, x in enumerate(epoch_losses):
        log.info("epoch %d: mean loss %.4f", e, x)
    model.eval()
    model.save(str(folder), create_model_card=False)
    summary = {
        **summary,
        "steps": steps,
        "epoch_losses": epoch_losses,
        "train_time_s": round(time.time() - t0, 1),
    }
    write_json(folder / "summary.json", summary)
    return summary


def train_cross_encoder(cfg: TrainRetrieverConfig, data: RetrievalSet, model=None) -> dict:
    """setup (encoder + a one-logit head) → mine negatives → listwise training → save.

    ``model``: a sentence-transformers ``CrossEncoder`` with one label (default: ``cfg.init``
    with a new head).
    """
    from datasets import Dataset
    from sentence_transformers import CrossEncoderTrainer, CrossEncoderTrainingArguments

    from lmsmith.dialog.retrieve import load_cross_encoder

    if not cfg.output:
        raise UserError("train-retriever needs --output FOLDER")
    if cfg.hard_negatives < 1:
        raise UserError("a cross-encoder needs --hard_negatives >= 1 (its only negatives)")
    torch.manual_seed(cfg.seed)
    if model is None:
        model = load_cross_encoder(cfg.init, max_length=cfg.max_length, num_labels=1)
    queries = _usable(data, cfg.max_queries)
    by_id = {p.pid: p for p in data.passages}
    negs = mine_hard_negatives(
        data.passages, queries, cfg.neg_rank_min, cfg.neg_rank_max, progress=cfg.progress
    )
    keep = [i for i, n in enumerate(negs) if n]
    if not keep:
        raise UserError(
            "no query has a BM25 hard negative: the corpus is too small for the rank window"
        )
    n = cfg.hard_negatives
    cols = _rows(
        [queries[i] for i in keep], [negs[i] for i in keep], by_id, n, random.Random(cfg.seed)
    )
    spe = -(-len(keep) // cfg.batch_size)
    # the pooler and classifier start random (a bi-encoder checkpoint has no trained head):
    # they may learn faster than the pretrained encoder
    lr_map = {r".*(classifier|pooler)\..*": cfg.head_lr} if cfg.head_lr else {}
    with atomic_dir(cfg.output) as tmp, tempfile.TemporaryDirectory() as work:
        sink = MetricsSink(tmp / "metrics.jsonl")
        write_json(tmp / "train_config.json", dataclasses.asdict(cfg))
        args = _args(CrossEncoderTrainingArguments, cfg, work, learning_rate_mapping=lr_map)
        summary = _fit_and_save(
            CrossEncoderTrainer,
            args,
            model,
            HardNegativesOnlyLoss(model),
            Dataset.from_dict(cols),
            spe,
            sink,
            tmp,
            {
                "model": "cross-encoder",
                "init": cfg.init,
                "n_queries": len(keep),
                "n_passages": len(data.passages),
                "group_size": 1 + n,
            },
        )
    return summary
