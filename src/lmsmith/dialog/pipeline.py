"""retrieve → ground → generate, for one turn (:class:`Pipeline`) or a whole set (:func:`evaluate`).

Evaluation sets:

- a MultiDoc2Dial dial file (+ its doc file): every agent turn with references; the grounding
  reference is the text of the turn's referenced spans, in document order, joined by spaces;
  the reply reference is the agent's utterance;
- an instruction jsonl (dolly): the rows with a context; the grounding and the reply are both
  scored against the reference answer (the data has no span labels).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from lmsmith.dialog.generate import DialogExample, dialog_prompt, generate_texts
from lmsmith.dialog.ground import Grounding, passage_body, sentence_ground, target_span
from lmsmith.errors import UserError
from lmsmith.metrics.qa import reply_scores, squad_scores

log = logging.getLogger(__name__)


@dataclass
class EvalItem:
    qid: str
    current: str
    history: list[tuple[str, str]]
    grounding_refs: list[str]
    reply_refs: list[str]
    gold_pids: list[str] = field(default_factory=list)
    gold_passages: list = field(default_factory=list)  # the gold passage objects (training)


def md2d_items(dial_file, doc_file, passages) -> list[EvalItem]:
    """Items of a MultiDoc2Dial split; ``passages`` map references to gold passage ids."""
    from lmsmith.data.md2d import build_instances, load_dialogues, load_docs
    from lmsmith.dialog.corpus import gold_passages

    docs = load_docs(doc_file)
    by_doc: dict[str, list] = {}
    for p in passages:
        by_doc.setdefault(p.doc_id, []).append(p)
    by_pid = {p.pid: p for p in passages}
    out = []
    for inst in build_instances(load_dialogues(dial_file)):
        spans = []
        for ref in inst.references:
            doc = docs.get(ref.doc_id)
            sp = next((s for s in doc.spans if s.id_sp == ref.id_sp), None) if doc else None
            if sp is not None and sp not in spans:
                spans.append(sp)
        spans.sort(key=lambda s: s.start)
        span_text = " ".join(" ".join(s.text.split()) for s in spans)
        gold = gold_passages(inst, by_doc)
        out.append(
            EvalItem(
                inst.qid,
                inst.current,
                inst.history,
                [span_text] if span_text else [inst.response],
                [inst.response],
                gold,
                [by_pid[g] for g in gold],
            )
        )
    return out


def instruct_items(path) -> list[EvalItem]:
    """Items of an instruction jsonl: rows with a context (``input``) only."""
    from pathlib import Path

    from lmsmith.data.instruct import load_instruct
    from lmsmith.dialog.corpus import Passage, context_id

    out = []
    for i, row in enumerate(load_instruct(path)):
        ctx = " ".join(row.input.split())
        if not ctx:
            continue
        pid = context_id(ctx)
        out.append(
            EvalItem(
                f"{Path(path).stem}-{i}",
                row.instruction.strip(),
                [],
                list(row.references),
                list(row.references),
                [pid],
                [Passage(pid, ctx, doc_id=pid)],
            )
        )
    return out


def load_items(data, corpus, extra_docs=()) -> tuple[list[EvalItem], list]:
    """(items, passages) of a MD2D dial file or an instruction jsonl, for eval and training;
    ``corpus`` is a :class:`~lmsmith.dialog.config.CorpusConfig`."""
    from lmsmith.data.md2d import load_docs
    from lmsmith.dialog.corpus import data_source, instruct_set, segment

    kind, doc_file = data_source(data, corpus.docs)
    if kind == "md2d-dials":
        docs = list(load_docs(doc_file).values())
        passages = segment(docs, corpus.segmentation, corpus.size, corpus.stride)
        return md2d_items(data, doc_file, passages), passages
    if kind == "instruct":
        return instruct_items(data), instruct_set([data], list(extra_docs)).passages
    raise UserError(f"{data}: needs a MD2D dial file or an instruction jsonl (got {kind})")


def training_examples(items: list[EvalItem]) -> list[DialogExample]:
    """DialogExamples with the gold passages and grounding / reply targets."""
    out = []
    for it in items:
        span = ""
        for p in it.gold_passages:
            body, _ = passage_body(p.text)
            se = target_span(body, it.grounding_refs[0])
            if se is not None:
                span = body[se[0] : se[1]]
                break
        out.append(
            DialogExample(
                it.current,
                list(it.history),
                list(it.gold_passages),
                grounding=span,
                reply=it.reply_refs[0],
                target_grounding=span,
            )
        )
    return out


def reader_examples(items: list[EvalItem]) -> list:
    """One ReaderExample per (item, gold passage): the grounding span's place in the body."""
    from lmsmith.dialog.ground import ReaderExample

    out = []
    for it in items:
        for p in it.gold_passages:
            body, _ = passage_body(p.text)
            out.append(ReaderExample(it.current, body, target_span(body, it.grounding_refs[0])))
    return out


def history_pairs(turns: list[str]) -> list[tuple[str, str]]:
    """Oldest-first alternating user/agent turns → (role, text) most recent first."""
    roles = ["user", "agent"]
    return list(reversed([(roles[i % 2], t) for i, t in enumerate(turns)]))


def prompt_kw(gen) -> dict:
    """Prompt options of a :class:`~lmsmith.dialog.config.GenConfig`."""
    return {"passage_words": gen.passage_words, "max_history": gen.max_turns}


def build_pipeline(retriever, gen, grounding, k: int) -> Pipeline:
    """A :class:`Pipeline` from the shared ``gen`` / ``grounding`` config blocks."""
    from lmsmith.dialog.generate import load_generator
    from lmsmith.dialog.ground import ExtractiveReader

    model = tok = None
    seq2seq = False
    if gen.reply_mode != "extract":  # extractive replies need no language model
        model, tok, seq2seq = load_generator(gen.generator)
    reader = dense = None
    if grounding.grounder == "reader":
        reader = ExtractiveReader.load(
            grounding.reader, grounding.reader_max_length, grounding.max_answer_tokens
        )
    if grounding.grounder == "dense" and retriever is not None:
        dense = dense_grounder(retriever, grounding)
    return Pipeline(
        retriever,
        model,
        tok,
        grounder=grounding.grounder,
        reader=reader,
        dense=dense,
        k=k,
        seq2seq=seq2seq,
        max_new_tokens=gen.max_new_tokens,
        max_prompt_tokens=gen.max_prompt_tokens,
        batch_size=gen.gen_batch_size,
        prompt_kw=prompt_kw(gen),
        reply_mode=gen.reply_mode,
        abstain_threshold=grounding.threshold(),
    )


def dense_grounder(retriever, grounding):
    """A :class:`~lmsmith.dialog.ground.DenseGrounder` over the retriever's passages, with the
    retriever's own bi-encoder when it has one (hybrid, dense), else ``grounding.encoder``."""
    from lmsmith.dialog.ground import DenseGrounder
    from lmsmith.dialog.retrieve import load_encoder

    inner = getattr(retriever, "first", retriever)  # rerank: its first stage
    side = inner if inner.kind == "dense" else getattr(inner, "dense", None)
    if side is not None and side.cfg.encoder == grounding.ground_encoder:
        encoder = side.encoder
    else:
        encoder = load_encoder(grounding.ground_encoder)
    return DenseGrounder(
        encoder, retriever.passages, grounding.history_weight, grounding.unknown_penalty
    )


ABSTAIN_REPLY = "The documents do not say. I could not find an answer to that in them."


class Pipeline:
    """One turn: retrieve ``k`` passages, ground a sentence, abstain or reply.

    ``retriever`` None: no documents in the prompt. ``grounder``: "dense" (needs ``dense``, a
    :class:`~lmsmith.dialog.ground.DenseGrounder`), "reader" (needs ``reader``), "sentence",
    "lm" (the generator copies a span: multi-task models) or "none".

    ``reply_mode``: "extract" (the reply is the grounding sentence, no LM), "generate" (the LM
    writes it from the chat prompt: documents + the grounding sentence + the dialogue) or
    "phrase" (the LM rewrites the grounding sentence alone as a reply; a rewrite that drops
    or changes a figure of the sentence is replaced by the sentence). When the grounding score
    is below ``abstain_threshold`` (or nothing was retrieved) the reply is
    :data:`ABSTAIN_REPLY`, nothing is cited and ``abstained`` is true.
    """

    def __init__(
        self,
        retriever,
        model,
        tokenizer,
        grounder: str = "sentence",
        reader=None,
        k: int = 3,
        seq2seq: bool = False,
        max_new_tokens: int = 64,
        max_prompt_tokens: int = 1024,
        batch_size: int = 4,
        prompt_kw: dict | None = None,
        reply_mode: str = "generate",
        abstain_threshold: float | None = None,
        dense=None,
    ):
        if grounder == "reader" and reader is None:
            raise ValueError("grounder 'reader' needs a reader model")
        if grounder == "dense" and dense is None:
            raise ValueError("grounder 'dense' needs a DenseGrounder")
        if grounder not in ("dense", "reader", "sentence", "lm", "none"):
            raise ValueError(f"grounder must be dense|reader|sentence|lm|none, got {grounder!r}")
        if reply_mode not in ("extract", "generate", "phrase"):
            raise ValueError(f"reply_mode must be extract|generate|phrase, got {reply_mode!r}")
        if reply_mode != "extract" and model is None:
            raise ValueError(f"reply_mode {reply_mode!r} needs a generator model")
        if reply_mode != "generate" and grounder in ("none", "lm"):
            raise ValueError(f"reply_mode {reply_mode!r} needs a grounder that extracts")
        self.retriever, self.model, self.tokenizer = retriever, model, tokenizer
        self.grounder, self.reader, self.dense, self.k = grounder, reader, dense, k
        self.seq2seq, self.reply_mode = seq2seq, reply_mode
        self.max_new_tokens, self.max_prompt_tokens = max_new_tokens, max_prompt_tokens
        self.batch_size, self.prompt_kw = batch_size, prompt_kw or {}
        self.abstain_threshold = abstain_threshold

    def query(self, current: str, history: list[tuple[str, str]]) -> str:
        from lmsmith.data.md2d import format_query

        return format_query(current, history)

    def retrieve(self, queries: list[str]) -> list[list]:
        if self.retriever is None:
            return [[] for _ in queries]
        by_pid = {p.pid: p for p in self.retriever.passages}
        out = []
        for hits in self.retriever.search_batch(queries, self.k):
            out.append([(by_pid[h.pid], h.score) for h in hits])
        return out

    def _gen(self, prompts: list[str], progress: bool = False) -> list[str]:
        return generate_texts(
            self.model,
            self.tokenizer,
            prompts,
            self.max_new_tokens,
            self.batch_size,
            self.max_prompt_tokens,
            self.seq2seq,
            progress,
        )

    def ground(
        self, queries: list[str], examples: list[DialogExample], progress: bool = False
    ) -> list[Grounding | None]:
        if self.grounder == "none":
            return [None] * len(queries)
        if self.grounder == "lm":
            texts = self._gen(
                [dialog_prompt(x, self.tokenizer, "ground", **self.prompt_kw) for x in examples],
                progress,
            )
            return [
                Grounding(x.passages[0].pid if x.passages else "", t, -1, -1, 0.0)
                for x, t in zip(examples, texts)
            ]
        out = []
        for q, x in tqdm(
            list(zip(queries, examples)), desc="ground", disable=not progress, leave=False
        ):
            if self.grounder == "reader":
                out.append(self.reader.ground(q, x.passages))
            elif self.grounder == "dense":
                out.append(self.dense.ground(x.current, x.history, x.passages))
            else:
                out.append(sentence_ground(q, x.passages))
        return out

    def abstains(self, example: DialogExample, g: Grounding | None) -> bool:
        """True when the documents do not answer: nothing retrieved, or a grounding score
        below the threshold (no threshold: never, except with nothing retrieved)."""
        if self.retriever is None:
            return False
        if not example.passages:
            return True
        if self.abstain_threshold is None:
            return False
        return g is None or g.score < self.abstain_threshold

    def reply_prompt(self, x: DialogExample) -> str:
        """The LM prompt of a turn: the full chat prompt ("generate"), or the grounding
        sentence alone as the document ("phrase")."""
        if self.reply_mode == "phrase":
            x = DialogExample(
                x.current,
                x.history,
                [type("Fact", (), {"text": x.grounding})()],
                grounding="",
            )
        return dialog_prompt(x, self.tokenizer, "reply", **self.prompt_kw)

    def _prepare(self, turns, progress: bool = False):
        queries = [self.query(c, h) for c, h in turns]
        retrieved = self.retrieve(queries)
        examples = [
            DialogExample(c, list(h), [p for p, _ in r]) for (c, h), r in zip(turns, retrieved)
        ]
        groundings = self.ground(queries, examples, progress)
        for x, g in zip(examples, groundings):
            x.grounding = g.text if g is not None else ""
        abstained = [self.abstains(x, g) for x, g in zip(examples, groundings)]
        return retrieved, examples, groundings, abstained

    @staticmethod
    def _result(reply: str, r, g, abstained: bool) -> dict:
        if abstained:
            return {"reply": reply, "grounding": None, "citations": [], "abstained": True}
        return {
            "reply": reply,
            "grounding": None
            if g is None
            else {"passage_id": g.pid, "text": g.text, "score": g.score},
            "citations": [
                {"passage_id": p.pid, "title": p.title, "text": p.text, "score": s} for p, s in r
            ],
            "abstained": False,
        }

    def run(
        self, turns: list[tuple[str, list[tuple[str, str]]]], progress: bool = False
    ) -> list[dict]:
        """Answer a batch of ``(current, history)`` turns (history most recent first)."""
        retrieved, examples, groundings, abstained = self._prepare(turns, progress)
        replies = [ABSTAIN_REPLY if a else "" for a in abstained]
        todo = [i for i, a in enumerate(abstained) if not a]
        if self.reply_mode == "extract":
            for i in todo:
                replies[i] = examples[i].grounding
        elif todo:
            texts = self._gen([self.reply_prompt(examples[i]) for i in todo], progress)
            for i, t in zip(todo, texts):
                replies[i] = self._checked(examples[i], t)
        return [
            self._result(reply, r, g, a)
            for reply, r, g, a in zip(replies, retrieved, groundings, abstained)
        ]

    def _checked(self, x: DialogExample, text: str) -> str:
        """ "phrase": the LM's rewrite if it keeps the sentence's figures, else the sentence."""
        if self.reply_mode != "phrase" or keeps_facts(x.grounding, text):
            return text
        return x.grounding

    def answer(self, message: str, history: list[tuple[str, str]] | None = None) -> dict:
        return self.run([(message, list(history or []))])[0]

    def stream(
        self,
        message: str,
        history: list[tuple[str, str]] | None = None,
        cancel=None,
        max_new_tokens: int | None = None,
    ):
        """One turn as events: ``("meta", result without "reply")`` first, then
        ``("token", text)`` pieces, then ``("done", full result)``. The reply streamed is the
        one :meth:`answer` returns (extractive and abstaining replies come in one piece; a
        "phrase" rewrite that fails the figure check is followed by ``("replace", text)``).
        ``cancel`` (a ``threading.Event``) stops generation; ``max_new_tokens`` lowers the
        configured cap for this turn."""
        from lmsmith.dialog.generate import stream_text

        history = list(history or [])
        retrieved, examples, groundings, abstained = self._prepare([(message, history)])
        x, r, g, a = examples[0], retrieved[0], groundings[0], abstained[0]
        meta = self._result("", r, g, a)
        meta.pop("reply")
        yield "meta", meta
        if a or self.reply_mode == "extract":
            reply = ABSTAIN_REPLY if a else x.grounding
            yield "token", reply
        else:
            parts = []
            for piece in stream_text(
                self.model,
                self.tokenizer,
                self.reply_prompt(x),
                min(self.max_new_tokens, max_new_tokens or self.max_new_tokens),
                self.max_prompt_tokens,
                cancel,
            ):
                parts.append(piece)
                yield "token", piece
            reply = "".join(parts).strip()
            checked = self._checked(x, reply)
            if checked != reply:
                reply = checked
                yield "replace", reply
        yield "done", self._result(reply, r, g, a)


_FIGURE = re.compile(r"\$?\d[\d,.:%-]*(?:\s?(?:a\.m\.|p\.m\.))?")


def figures(text: str) -> set[str]:
    """Numbers, amounts, times and percentages in ``text`` (``"$45"``, ``"1.25%"``, ``"7 a.m."``),
    without trailing punctuation."""
    return {m.group(0).rstrip(".,:-") for m in _FIGURE.finditer(text)}


_NEGATION = re.compile(r"\b(?:not|no|never|cannot|n't)\b", re.IGNORECASE)


def keeps_facts(source: str, rewrite: str) -> bool:
    """Whether a rewrite keeps the facts of its source sentence: it is not empty, adds no
    figure the source lacks, keeps at least one of the source's figures (when it has any),
    and keeps a negation when the source has one."""
    if not rewrite.strip():
        return False
    src, new = figures(source), figures(rewrite)
    if new - src or (src and not new & src):
        return False
    return not (_NEGATION.search(source) and not _NEGATION.search(rewrite))


def evaluate(pipe: Pipeline, items: list[EvalItem], progress: bool = True) -> tuple[dict, list]:
    """Run the pipeline on ``items``; grounding EM/F1 and reply F1/SacreBLEU/ROUGE-L."""
    t0 = time.perf_counter()
    results = pipe.run([(it.current, it.history) for it in items], progress)
    wall = time.perf_counter() - t0
    replies = [r["reply"] for r in results]
    rs = reply_scores(replies, [it.reply_refs for it in items])
    metrics = {
        "n": len(items),
        "reply_f1": rs["f1"],
        "reply_sacrebleu": rs["sacrebleu"],
        "reply_rougeL": rs["rougeL"],
        "reply_sum_no_meteor": rs["sum_no_meteor"],
        "wall_time_s": round(wall, 2),
    }
    if pipe.grounder != "none":
        g = squad_scores(
            [r["grounding"]["text"] if r["grounding"] else "" for r in results],
            [it.grounding_refs for it in items],
        )
        metrics["grounding_em"], metrics["grounding_f1"] = g["em"], g["f1"]
    metrics["abstained_pct"] = 100.0 * sum(r["abstained"] for r in results) / len(results)
    if pipe.retriever is not None:
        hit = [
            any(c["passage_id"] in it.gold_pids for c in r["citations"])
            for r, it in zip(results, items)
        ]
        metrics[f"retrieval_r@{pipe.k}"] = 100.0 * sum(hit) / len(hit)
    rows = [
        {
            "qid": it.qid,
            "current": it.current,
            "reply": r["reply"],
            "abstained": r["abstained"],
            "reply_refs": it.reply_refs,
            "grounding": r["grounding"]["text"] if r["grounding"] else None,
            "grounding_refs": it.grounding_refs,
            "citations": [c["passage_id"] for c in r["citations"]],
            "gold": it.gold_pids,
        }
        for r, it in zip(results, items)
    ]
    return metrics, rows
