"""Grounding: pick the span of the retrieved passages that the agent's reply should rest on.

Three grounders over the top-k passages:

- :class:`DenseGrounder` (the default): the sentence closest in meaning to the user's turn
  (bi-encoder cosine); its score, less a penalty per question word the collection never
  uses, decides abstention.

- :class:`ExtractiveReader`: an encoder with a start/end head (``AutoModelForQuestionAnswering``;
  MiniLM by default) reads ``query [SEP] passage body`` for each passage; the best span of each
  passage scores ``start_logit + end_logit``; the best over passages wins. Trained with
  cross-entropy on the gold start/end tokens (the [CLS] token when the span falls outside the
  window). :func:`train_reader` fits one.
- :func:`sentence_ground`: no training; the passage sentence sharing most content words with
  the query (ties: the better-ranked passage). The serving fallback and a baseline.

Passages are ``"title // body"``; spans are taken from the body only.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lmsmith.metrics.qa import normalize_answer, pair_f1

log = logging.getLogger(__name__)

_STOP = frozenset(
    "i me my we our you your he she it its they them what which who whom this that these those "
    "am is are was were be been being have has had do does did a an the and but if or because as "
    "until while of at by for with about against between into through during before after to "
    "from in out on off over under again then once here there when where why how all any both "
    "each few more most other some such no nor not only own same so than too very can will just "
    "should now please tell know want need get".split()
)


@dataclass
class Grounding:
    """A span of one passage: ``body[start:end] == text`` where body is the passage's text
    after its ``"title // "`` prefix."""

    pid: str
    text: str
    start: int
    end: int
    score: float


def passage_body(text: str) -> tuple[str, int]:
    """(body, offset of the body in ``text``) for ``"title // body"`` passages."""
    i = text.find(" // ")
    return (text[i + 4 :], i + 4) if i >= 0 else (text, 0)


# a sentence ends at . ! ? followed by a space and a capital, digit, quote or bracket, so
# "from 9 a.m. to 3 p.m." and "e.g. a lease" stay whole; line breaks always end one
_SENT_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])|\n+")


def sentences(text: str) -> list[tuple[int, int]]:
    """Character ranges of the sentences of ``text``."""
    out, start = [], 0
    for m in _SENT_END.finditer(text):
        if text[start : m.start()].strip():
            out.append((start, m.start()))
        start = m.end()
    if text[start:].strip():
        out.append((start, len(text.rstrip())))
    return out


def _content(text: str) -> list[str]:
    return [w for w in normalize_answer(text).split() if w not in _STOP]


def target_span(passage: str, answer: str) -> tuple[int, int] | None:
    """Where ``answer`` sits in ``passage`` (character range): the exact text when it occurs
    (case-insensitive), else the sentence with the highest token F1 against it (None if 0).

    Reference answers that paraphrase the passage (dolly) get the best-matching sentence as
    their grounding target.
    """
    a = " ".join(answer.split())
    if not a:
        return None
    i = passage.lower().find(a.lower())
    if i >= 0:
        return i, i + len(a)
    best, best_f1 = None, 0.0
    for s, e in sentences(passage):
        f1 = pair_f1(passage[s:e], answer)
        if f1 > best_f1:
            best, best_f1 = (s, e), f1
    return best


def sentence_ground(query: str, passages: list) -> Grounding | None:
    """The sentence of the ``passages`` (best first; objects with ``pid``, ``text``) that
    shares most content words with ``query``, normalised by sqrt(sentence length)."""
    q = set(_content(query.split("[SEP]")[0])) or set(_content(query))
    best: Grounding | None = None
    for p in passages:
        body, _ = passage_body(p.text)
        for s, e in sentences(body):
            words = _content(body[s:e])
            if not words:
                continue
            score = sum(1 for w in words if w in q) / math.sqrt(len(words))
            if best is None or score > best.score:
                best = Grounding(p.pid, body[s:e], s, e, score)
    return best


# --------------------------------------------------------------------------- dense sentences


# interrogative filler: never a topic word
_QUESTION_WORDS = frozenset("much many long often far soon early late time ahead".split())


def _stem(word: str) -> str:
    """Plural -s off (``permits`` → ``permit``), enough to match a question's words to a page's."""
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def topic_words(text: str) -> set[str]:
    """Content words of ``text`` (stop words and interrogative filler out), plural -s off."""
    return {_stem(w) for w in _content(text) if w not in _QUESTION_WORDS}


class DenseGrounder:
    """The sentence of the retrieved passages that answers the user's turn, by meaning; and a
    score that says whether any does.

    Every sentence of a passage body is embedded as ``"title: sentence"`` (the section's
    heading path tells the encoder what the sentence is about) with the retriever's bi-encoder
    (MiniLM by default); vectors are cached per passage. A sentence scores

        cos(current turn, sentence) + history_weight * cos(previous user turn, sentence)

    (the previous user turn counts only when there is one: follow-ups such as "And DVDs?"
    name no topic), and the best sentence is the grounding. Its score, less
    ``unknown_penalty`` for each topic word of the turn that occurs nowhere in the collection
    ("lifeguard", "passport": the documents cannot be about it), is what
    :class:`~lmsmith.dialog.pipeline.Pipeline` compares with the abstention threshold; the
    penalty and the threshold are calibrated together (docs/methods.md, "Abstention").
    """

    def __init__(
        self,
        encoder,
        passages: list,
        history_weight: float = 0.5,
        unknown_penalty: float = 0.05,
        max_cache: int = 20000,
    ):
        self.encoder, self.history_weight = encoder, history_weight
        self.unknown_penalty = unknown_penalty
        self.vocabulary: set[str] = set()
        for p in passages:
            self.vocabulary |= topic_words(p.text)
        self._cache: dict[str, tuple] = {}
        self.max_cache = max_cache

    def unknown_words(self, text: str) -> list[str]:
        """Topic words of ``text`` that no passage of the collection has, sorted."""
        return sorted(topic_words(text) - self.vocabulary)

    def _sentences(self, p):
        """(ranges, texts, vectors (S, H)) of a passage's body sentences, cached by pid."""
        hit = self._cache.get(p.pid)
        if hit is None:
            body, _ = passage_body(p.text)
            ranges = [(s, e) for s, e in sentences(body) if _content(body[s:e])]
            texts = [body[s:e] for s, e in ranges]
            title = getattr(p, "title", "") or p.text.partition(" // ")[0]
            docs = [f"{title}: {t}" if title else t for t in texts]
            vecs = self.encoder.encode_document(docs) if docs else None
            if len(self._cache) >= self.max_cache:
                self._cache.pop(next(iter(self._cache)))
            hit = self._cache[p.pid] = (ranges, texts, vecs)
        return hit

    def ground(
        self, current: str, history: list[tuple[str, str]], passages: list
    ) -> Grounding | None:
        """The best sentence of ``passages`` for the turn ``current`` (history most recent
        first), its ``score`` the abstention score; None when the passages hold no sentence."""
        import numpy as np

        prev = next((t for r, t in history if r == "user" and t.strip()), "")
        queries = [current] + ([prev] if prev and self.history_weight else [])
        qv = np.asarray(self.encoder.encode_query(queries))  # (1 or 2, H), unit length
        best: tuple[float, object, tuple[int, int], str] | None = None
        for p in passages:
            ranges, texts, vecs = self._sentences(p)
            if not texts:
                continue
            sims = np.asarray(vecs) @ qv.T  # (S, 1 or 2)
            scores = sims[:, 0] + (self.history_weight * sims[:, 1] if len(qv) > 1 else 0.0)
            i = int(np.argmax(scores))
            if best is None or scores[i] > best[0]:
                best = (float(scores[i]), p, ranges[i], texts[i])
        if best is None:
            return None
        score, p, (s, e), text = best
        score -= self.unknown_penalty * len(self.unknown_words(current))
        return Grounding(p.pid, text, s, e, score)


# --------------------------------------------------------------------------- extractive reader


@dataclass
class ReaderExample:
    query: str
    passage: str  # the passage body (no title)
    span: tuple[int, int] | None  # character range of the gold span, None: not in this passage


def _best_span(start: torch.Tensor, end: torch.Tensor, ctx: torch.Tensor, max_len: int):
    """Best (i, j, score) with i <= j < i + max_len over context tokens.

    start, end: (T,) logits; ctx: (T,) bool, True on the passage's tokens.
    """
    neg = torch.finfo(start.dtype).min / 4
    s = start.masked_fill(~ctx, neg)
    e = end.masked_fill(~ctx, neg)
    scores = s[:, None] + e[None, :]  # (T, T)
    t = scores.shape[0]
    i = torch.arange(t)
    ok = (i[None, :] >= i[:, None]) & (i[None, :] < i[:, None] + max_len)
    scores = scores.masked_fill(~ok, neg)
    flat = int(torch.argmax(scores))
    return flat // t, flat % t, float(scores.view(-1)[flat])


class ExtractiveReader:
    """Start/end span prediction over passages with an encoder QA head."""

    def __init__(self, model, tokenizer, max_length: int = 256, max_answer_tokens: int = 64):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length, self.max_answer_tokens = max_length, max_answer_tokens

    @classmethod
    def load(cls, spec: str, max_length: int = 256, max_answer_tokens: int = 64):
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        from lmsmith.errors import UserError
        from lmsmith.models import resolve

        path = resolve(spec)
        try:
            model = AutoModelForQuestionAnswering.from_pretrained(path, num_labels=2)
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise UserError(f"could not load reader '{spec}': {e}") from e
        return cls(model, tok, max_length, max_answer_tokens)

    def encode(self, queries: list[str], bodies: list[str]):
        return self.tokenizer(
            [q.split("[SEP]")[0] if q.split("[SEP]")[0].strip() else q for q in queries],
            bodies,
            truncation="only_second",
            max_length=self.max_length,
            padding=True,
            return_offsets_mapping=True,
            return_tensors="pt",
        )

    @torch.no_grad()
    def ground(self, query: str, passages: list) -> Grounding | None:
        """The best span over ``passages`` (objects with ``pid`` and ``text``)."""
        if not passages:
            return None
        bodies = [passage_body(p.text)[0] for p in passages]
        enc = self.encode([query] * len(passages), bodies)
        offsets = enc.pop("offset_mapping")
        seq_ids = [enc.sequence_ids(i) for i in range(len(passages))]
        dev = next(self.model.parameters()).device
        out = self.model(**{k: v.to(dev) for k, v in enc.items()})
        best: Grounding | None = None
        for b, p in enumerate(passages):
            ctx = torch.tensor([s == 1 for s in seq_ids[b]])
            if not ctx.any():
                continue
            i, j, score = _best_span(
                out.start_logits[b].float().cpu(),
                out.end_logits[b].float().cpu(),
                ctx,
                self.max_answer_tokens,
            )
            s, e = int(offsets[b, i, 0]), int(offsets[b, j, 1])
            if best is None or score > best.score:
                best = Grounding(p.pid, bodies[b][s:e], s, e, score)
        return best

    def labels(self, examples: list[ReaderExample]):
        """Tokenised batch with ``start_positions`` / ``end_positions`` (0: not in window)."""
        enc = self.encode([x.query for x in examples], [x.passage for x in examples])
        offsets = enc.pop("offset_mapping")
        starts, ends = [], []
        for b, x in enumerate(examples):
            si = ei = 0
            if x.span is not None:
                s, e = x.span
                seq = enc.sequence_ids(b)
                toks = [t for t, sid in enumerate(seq) if sid == 1]
                inside = [t for t in toks if offsets[b, t, 1] > s and offsets[b, t, 0] < e]
                if inside:
                    si, ei = inside[0], inside[-1]
            starts.append(si)
            ends.append(ei)
        enc["start_positions"] = torch.tensor(starts)
        enc["end_positions"] = torch.tensor(ends)
        return enc


def train_reader(
    reader: ExtractiveReader,
    examples: list[ReaderExample],
    epochs: int = 2,
    batch_size: int = 8,
    lr: float = 5e-5,
    seed: int = 0,
    progress: bool = True,
    sink=None,
) -> dict:
    """Fine-tune ``reader`` in place (AdamW, linear decay); returns a summary."""
    if not examples:
        raise ValueError("train_reader needs at least one example")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = reader.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    n_steps = epochs * math.ceil(len(examples) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / n_steps))
    dev = next(model.parameters()).device
    step, losses, t0 = 0, [], time.perf_counter()
    bar = tqdm(total=n_steps, desc="train reader", disable=not progress)
    for epoch in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            batch = reader.labels([examples[j] for j in order[i : i + batch_size]])
            loss = model(**{k: v.to(dev) for k, v in batch.items()}).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            if sink is not None:
                sink.log(step=step, epoch=epoch, loss=losses[-1])
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return {
        "steps": step,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "train_time_s": round(time.perf_counter() - t0, 2),
        "n_examples": len(examples),
    }
