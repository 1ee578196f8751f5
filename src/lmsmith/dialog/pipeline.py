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

    model, tok, seq2seq = load_generator(gen.generator)
    reader = None
    if grounding.grounder == "reader":
        reader = ExtractiveReader.load(
            grounding.reader, grounding.reader_max_length, grounding.max_answer_tokens
        )
    return Pipeline(
        retriever,
        model,
        tok,
        grounder=grounding.grounder,
        reader=reader,
        k=k,
        seq2seq=seq2seq,
        max_new_tokens=gen.max_new_tokens,
        max_prompt_tokens=gen.max_prompt_tokens,
        batch_size=gen.gen_batch_size,
        prompt_kw=prompt_kw(gen),
    )


class Pipeline:
    """One turn: retrieve ``k`` passages, ground a span, generate the reply.

    ``retriever`` None: no documents in the prompt. ``grounder``: "reader" (needs ``reader``),
    "sentence", "lm" (the generator copies a span: multi-task models) or "none".
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
    ):
        if grounder == "reader" and reader is None:
            raise ValueError("grounder 'reader' needs a reader model")
        if grounder not in ("reader", "sentence", "lm", "none"):
            raise ValueError(f"grounder must be reader|sentence|lm|none, got {grounder!r}")
        self.retriever, self.model, self.tokenizer = retriever, model, tokenizer
        self.grounder, self.reader, self.k, self.seq2seq = grounder, reader, k, seq2seq
        self.max_new_tokens, self.max_prompt_tokens = max_new_tokens, max_prompt_tokens
        self.batch_size, self.prompt_kw = batch_size, prompt_kw or {}

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
            else:
                out.append(sentence_ground(q, x.passages))
        return out

    def run(
        self, turns: list[tuple[str, list[tuple[str, str]]]], progress: bool = False
    ) -> list[dict]:
        """Answer a batch of ``(current, history)`` turns (history most recent first)."""
        queries = [self.query(c, h) for c, h in turns]
        retrieved = self.retrieve(queries)
        examples = [
            DialogExample(c, list(h), [p for p, _ in r]) for (c, h), r in zip(turns, retrieved)
        ]
        groundings = self.ground(queries, examples, progress)
        for x, g in zip(examples, groundings):
            x.grounding = g.text if g is not None else ""
        replies = self._gen(
            [dialog_prompt(x, self.tokenizer, "reply", **self.prompt_kw) for x in examples],
            progress,
        )
        out = []
        for r, g, reply in zip(retrieved, groundings, replies):
            out.append(
                {
                    "reply": reply,
                    "grounding": None
                    if g is None
                    else {"passage_id": g.pid, "text": g.text, "score": g.score},
                    "citations": [
                        {"passage_id": p.pid, "title": p.title, "text": p.text, "score": s}
                        for p, s in r
                    ],
                }
            )
        return out

    def answer(self, message: str, history: list[tuple[str, str]] | None = None) -> dict:
        return self.run([(message, list(history or []))])[0]


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
            "reply_refs": it.reply_refs,
            "grounding": r["grounding"]["text"] if r["grounding"] else None,
            "grounding_refs": it.grounding_refs,
            "citations": [c["passage_id"] for c in r["citations"]],
            "gold": it.gold_pids,
        }
        for r, it in zip(results, items)
    ]
    return metrics, rows
