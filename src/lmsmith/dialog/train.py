"""Fine-tuning retrievers: a DPR-style bi-encoder and a cross-encoder reranker.

Bi-encoder (Karpukhin et al., 2020, as the MultiDoc2Dial baseline trains DPR): each query's
gold passage competes with the other queries' gold passages (in-batch negatives) and with
BM25-mined hard negatives (BM25 ranks ``neg_rank_min``..``neg_rank_max``, gold excluded).
Loss: cross-entropy over ``scale * cos(q, p)`` for all passages of the batch.

Cross-encoder: a sequence-classification head (one logit) on an encoder, trained listwise:
each query's gold passage against its hard negatives, cross-entropy over the group.

Both save a plain Hugging Face folder (``save_pretrained``), written to a temporary sibling
and renamed into place, with ``train_config.json``, ``metrics.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time

import torch
from tqdm.auto import tqdm

from lmsmith.dialog.config import BM25Config, TrainRetrieverConfig
from lmsmith.dialog.corpus import Passage, Query, RetrievalSet
from lmsmith.dialog.retrieve import BM25Retriever, CrossEncoder, embed
from lmsmith.errors import UserError
from lmsmith.runs import MetricsSink, atomic_dir, write_json

log = logging.getLogger(__name__)


def dpr_loss(
    q: torch.Tensor,
    p: torch.Tensor,
    targets: torch.Tensor,
    allowed: torch.Tensor | None = None,
    scale: float = 20.0,
) -> torch.Tensor:
    """In-batch softmax loss of dense retrieval.

    Args:
        q: (B, H) query vectors  p: (P, H) passage vectors (P >= B)
        targets: (B,) index into P of each query's gold passage
        allowed: (B, P) bool, False where a passage must not count as a negative (another
            copy of the query's gold); None allows all.
    Returns: scalar, mean cross-entropy over the B queries.
    """
    logits = scale * q @ p.T  # (B, P)
    if allowed is not None:
        keep = allowed.clone()
        keep[torch.arange(q.shape[0]), targets] = True
        logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
    return torch.nn.functional.cross_entropy(logits, targets)


def listwise_loss(scores: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the gold in column 0.  scores: (B, 1 + n) → scalar."""
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return torch.nn.functional.cross_entropy(scores, target)


def mine_hard_negatives(
    passages: list[Passage],
    queries: list[Query],
    rank_min: int = 5,
    rank_max: int = 15,
    bm25: BM25Config | None = None,
    progress: bool = False,
) -> list[list[str]]:
    """For each query, the passage ids BM25 ranks rank_min..rank_max (1-based), gold excluded.

    Returns Q lists (possibly empty when the corpus is small).
    """
    r = BM25Retriever(bm25)
    r.index(passages)
    out = []
    for q in tqdm(queries, desc="mine negatives", disable=not progress, leave=False):
        hits = r.search(q.text, rank_max)
        gold = set(q.relevant)
        out.append([h.pid for h in hits[rank_min - 1 : rank_max] if h.pid not in gold])
    return out


def _schedule(opt, total: int, warmup: float):
    n_warm = int(total * warmup)

    def f(step):
        if step < n_warm:
            return (step + 1) / n_warm
        return max(0.0, (total - step) / max(1, total - n_warm))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _usable(data: RetrievalSet, max_queries: int | None) -> list[Query]:
    qs = [q for q in data.queries if q.relevant]
    if max_queries is not None:
        qs = qs[:max_queries]
    if not qs:
        raise UserError(f"{data.name}: no training query has a gold passage")
    return qs


def train_bi_encoder(
    cfg: TrainRetrieverConfig, data: RetrievalSet, model=None, tokenizer=None
) -> dict:
    """setup → mine negatives → train → save.  Returns the summary (also in summary.json)."""
    from lmsmith.dialog.retrieve import load_encoder

    if not cfg.output:
        raise UserError("train-retriever needs --output FOLDER")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if model is None:
        model, tokenizer = load_encoder(cfg.init)
    queries = _usable(data, cfg.max_queries)
    by_id = {p.pid: p for p in data.passages}
    negs = mine_hard_negatives(
        data.passages, queries, cfg.neg_rank_min, cfg.neg_rank_max, progress=cfg.progress
    )
    steps_per_epoch = math.ceil(len(queries) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    sched = _schedule(opt, total, cfg.warmup)
    with atomic_dir(cfg.output) as tmp:  # a crash leaves no half-written model
        sink = MetricsSink(tmp / "metrics.jsonl")
        write_json(tmp / "train_config.json", dataclasses.asdict(cfg))
        model.train()
        t0, step, epoch_losses = time.time(), 0, []
        bar = tqdm(total=total, desc="train bi-encoder", disable=not cfg.progress)
        for epoch in range(cfg.epochs):
            order = list(range(len(queries)))
            random.shuffle(order)
            losses = []
            for s in range(0, len(order), cfg.batch_size):
                idx = order[s : s + cfg.batch_size]
                qs = [queries[i] for i in idx]
                gold = [random.choice(q.relevant) for q in qs]
                pids = list(gold)
                for i in idx:
                    pool = negs[i]
                    pids += random.sample(pool, min(cfg.hard_negatives, len(pool)))
                qv = embed(model, tokenizer, [q.text for q in qs], cfg.query_max_length)  # (B, H)
                pv = embed(
                    model, tokenizer, [by_id[p].text for p in pids], cfg.max_length
                )  # (P, H)
                allowed = torch.tensor(
                    [[pid not in q.relevant for pid in pids] for q in qs], device=qv.device
                )  # (B, P)
                targets = torch.arange(len(qs), device=qv.device)
                loss = dpr_loss(qv, pv, targets, allowed, cfg.scale)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                step += 1
                losses.append(loss.item())
                sink.log(
                    step=step,
                    epoch=epoch,
                    loss=loss.item(),
                    lr=sched.get_last_lr()[0],
                    n_passages=len(pids),
                )
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            epoch_losses.append(sum(losses) / len(losses))
            log.info("epoch %d: mean loss %.4f", epoch, epoch_losses[-1])
        bar.close()
        model.eval()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        summary = {
            "model": "bi-encoder",
            "init": cfg.init,
            "n_queries": len(queries),
            "n_passages": len(data.passages),
            "queries_without_hard_negatives": sum(1 for n in negs if not n),
            "steps": step,
            "epoch_losses": epoch_losses,
            "train_time_s": round(time.time() - t0, 1),
        }
        write_json(tmp / "summary.json", summary)
    return summary


def train_cross_encoder(
    cfg: TrainRetrieverConfig, data: RetrievalSet, model=None, tokenizer=None
) -> dict:
    """setup (encoder + a one-logit head) → mine negatives → listwise training → save."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmsmith.models import resolve

    if not cfg.output:
        raise UserError("train-retriever needs --output FOLDER")
    if cfg.hard_negatives < 1:
        raise UserError("a cross-encoder needs --hard_negatives >= 1 (its only negatives)")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if model is None:
        path = resolve(cfg.init)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        tokenizer = AutoTokenizer.from_pretrained(path)
    cross = CrossEncoder(cfg.init, cfg.max_length, cfg.batch_size, model=model, tokenizer=tokenizer)
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
    steps_per_epoch = math.ceil(len(keep) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    # the pooler and classifier start random (a bi-encoder checkpoint has no trained head):
    # they may learn faster than the pretrained encoder
    head = [p for n, p in model.named_parameters() if n.startswith("classifier") or ".pooler." in n]
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    opt = torch.optim.AdamW(
        [{"params": body, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr or cfg.lr}]
    )
    sched = _schedule(opt, total, cfg.warmup)
    n = cfg.hard_negatives
    with atomic_dir(cfg.output) as tmp:  # a crash leaves no half-written model
        sink = MetricsSink(tmp / "metrics.jsonl")
        write_json(tmp / "train_config.json", dataclasses.asdict(cfg))
        model.train()
        t0, step, epoch_losses = time.time(), 0, []
        bar = tqdm(total=total, desc="train cross-encoder", disable=not cfg.progress)
        for epoch in range(cfg.epochs):
            order = list(keep)
            random.shuffle(order)
            losses = []
            for s in range(0, len(order), cfg.batch_size):
                idx = order[s : s + cfg.batch_size]
                q_texts, p_texts = [], []
                for i in idx:
                    q = queries[i]
                    # pad short negative pools by repetition so every group has 1 + n members
                    pool = random.sample(negs[i], min(n, len(negs[i])))
                    pool += [random.choice(negs[i]) for _ in range(n - len(pool))]
                    for pid in [random.choice(q.relevant)] + pool:
                        q_texts.append(q.text)
                        p_texts.append(by_id[pid].text)
                scores = cross.logits(q_texts, p_texts).view(len(idx), 1 + n)  # (B, 1 + n)
                loss = listwise_loss(scores)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                step += 1
                losses.append(loss.item())
                sink.log(step=step, epoch=epoch, loss=loss.item(), lr=sched.get_last_lr()[0])
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            epoch_losses.append(sum(losses) / len(losses))
            log.info("epoch %d: mean loss %.4f", epoch, epoch_losses[-1])
        bar.close()
        model.eval()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        summary = {
            "model": "cross-encoder",
            "init": cfg.init,
            "n_queries": len(keep),
            "n_passages": len(data.passages),
            "group_size": 1 + n,
            "steps": step,
            "epoch_losses": epoch_losses,
            "train_time_s": round(time.time() - t0, 1),
        }
        write_json(tmp / "summary.json", summary)
    return summary
