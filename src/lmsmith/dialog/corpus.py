"""Passages and retrieval sets: documents → passages with stable ids; queries with gold ids.

Two segmentations:

- ``structure``: one passage per section, ``"title // section text"``, where the title is the
  section's parent titles joined by " / " when it has more than one, else the document title
  (the IBM MultiDoc2Dial baseline's rule). Id: ``"{doc_id}::{id_sec}"``. In the user's own
  documents (where headings are marked) the title is the heading path, "document / ... /
  section heading", the body holds no heading, and a heading with no text of its own gives no
  passage.
- ``token``: windows of ``size`` whitespace tokens every ``stride`` tokens, ``"title // text"``.
  Id: ``"{doc_id}::w{first token}"``.

Ids depend only on the document, never on the corpus order, so an index built today and
gold labels computed tomorrow agree.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmsmith.data.md2d import (
    Document,
    Instance,
    _read_json,
    build_instances,
    format_query,
    load_dialogues,
    load_docs,
    load_dpr_sample,
    load_user_docs,
)
from lmsmith.errors import DataError, UserError

log = logging.getLogger(__name__)


@dataclass
class Passage:
    pid: str
    text: str  # what is indexed: "title // body"
    doc_id: str = ""
    title: str = ""
    span_ids: list[str] = field(default_factory=list)
    domain: str = ""


@dataclass
class Query:
    qid: str
    text: str
    relevant: list[str]  # passage ids


@dataclass
class RetrievalSet:
    passages: list[Passage]
    queries: list[Query]
    name: str = ""


def _clean_title(t: str) -> str:
    # official titles carry a "#<n>_<m>" suffix; slashes would read as path separators
    return t.split("#")[0].replace("/", "-").strip()


def _passage_title(doc: Document, parent_titles: list[str]) -> str:
    parents = [_clean_title(t) for t in parent_titles if t.strip()]
    return " / ".join(parents) if len(parents) > 1 else _clean_title(doc.title)


def _heading_title(doc: Document, parent_titles: list[str], heading: str) -> str:
    """``"doc title / enclosing headings / section heading"`` (repeats dropped)."""
    parts: list[str] = []
    for t in [doc.title, *parent_titles, heading]:
        t = _clean_title(t)
        if t and t not in parts:
            parts.append(t)
    return " / ".join(parts)


def structure_passages(docs: list[Document]) -> list[Passage]:
    """One passage per section (consecutive spans sharing ``id_sec``), in document order."""
    out: list[Passage] = []
    for doc in docs:
        groups: list[list] = []
        for sp in doc.spans:
            if groups and groups[-1][-1].id_sec == sp.id_sec:
                groups[-1].append(sp)
            else:
                groups.append([sp])
        seen: dict[str, int] = {}
        for g in groups:
            heads = [s for s in g if s.heading]
            body = " ".join(" ".join(s.text.split()) for s in g if not s.heading).strip()
            if not body:
                continue  # a heading alone: its text titles the sections below it
            sec = g[0].id_sec
            n = seen.get(sec, 0)
            seen[sec] = n + 1
            pid = f"{doc.doc_id}::{sec}" + (f"-{n}" if n else "")
            if heads:  # our own documents: the heading path is the title, not body text
                title = _heading_title(doc, g[0].parent_titles, heads[0].text)
            else:
                title = _passage_title(doc, g[0].parent_titles)
            out.append(
                Passage(
                    pid=pid,
                    text=f"{title} // {body}",
                    doc_id=doc.doc_id,
                    title=title,
                    span_ids=[s.id_sp for s in g],
                    domain=doc.domain,
                )
            )
    return out


def token_passages(
    docs: list[Document], size: int = 100, stride: int | None = None
) -> list[Passage]:
    """Windows of ``size`` whitespace tokens starting every ``stride`` (default ``size``).

    A passage lists the spans that overlap its characters, so gold spans map to passages.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    stride = size if stride is None else stride
    if not 1 <= stride <= size:
        raise ValueError(f"stride must be in [1, size={size}], got {stride}")
    out: list[Passage] = []
    for doc in docs:
        toks = [(m.start(), m.end()) for m in re.finditer(r"\S+", doc.text)]
        title = _clean_title(doc.title)
        start = 0
        while start < len(toks):
            window = toks[start : start + size]
            lo, hi = window[0][0], window[-1][1]
            body = " ".join(doc.text[a:b] for a, b in window)
            spans = [s.id_sp for s in doc.spans if s.start < hi and s.end > lo]
            out.append(
                Passage(
                    pid=f"{doc.doc_id}::w{start}",
                    text=f"{title} // {body}",
                    doc_id=doc.doc_id,
                    title=title,
                    span_ids=spans,
                    domain=doc.domain,
                )
            )
            if start + size >= len(toks):
                break
            start += stride
    return out


def segment(
    docs: list[Document], how: str = "structure", size: int = 100, stride: int | None = None
):
    if how == "structure":
        return structure_passages(docs)
    if how == "token":
        return token_passages(docs, size, stride)
    raise ValueError(f"segmentation must be 'structure' or 'token', got {how!r}")


def gold_passages(inst: Instance, passages_by_doc: dict[str, list[Passage]]) -> list[str]:
    """Ids of the passages that hold any of the instance's reference spans."""
    out: list[str] = []
    for ref in inst.references:
        cands = passages_by_doc.get(ref.doc_id)
        if cands is None:
            raise DataError(
                inst.source, None, "references.doc_id", f"unknown doc_id '{ref.doc_id}'"
            )
        hits = [p.pid for p in cands if ref.id_sp in p.span_ids]
        if not hits:
            raise DataError(
                inst.source,
                None,
                "references.id_sp",
                f"span '{ref.id_sp}' not in doc '{ref.doc_id}'",
            )
        out += [h for h in hits if h not in out]
    return out


def md2d_set(
    dial_file,
    doc_file,
    segmentation: str = "structure",
    size: int = 100,
    stride: int | None = None,
    max_history: int | None = None,
) -> RetrievalSet:
    """A MultiDoc2Dial split as a retrieval set over all documents of the doc file."""
    docs = list(load_docs(doc_file).values())
    passages = segment(docs, segmentation, size, stride)
    by_doc: dict[str, list[Passage]] = {}
    for p in passages:
        by_doc.setdefault(p.doc_id, []).append(p)
    queries = [
        Query(i.qid, format_query(i.current, i.history, max_history), gold_passages(i, by_doc))
        for i in build_instances(load_dialogues(dial_file))
    ]
    return RetrievalSet(passages, queries, name=Path(dial_file).name)


def dpr_sample_set(path, max_history: int | None = None) -> RetrievalSet:
    """A ``dpr_top10_*.json`` file: the union of its passages; positives are the gold."""
    rows = load_dpr_sample(path)
    texts: dict[str, str] = {}
    for r in rows:
        for pid, t in r.passages.items():
            texts.setdefault(pid, t)
    passages = [Passage(pid, t, doc_id=pid, title=t.split(" // ")[0]) for pid, t in texts.items()]
    queries = [
        Query(r.qid, format_query(r.current, r.history, max_history), r.positives) for r in rows
    ]
    return RetrievalSet(passages, queries, name=Path(path).name)


def context_id(text: str) -> str:
    """A stable id for a context string (identical contexts share one passage)."""
    return "ctx-" + hashlib.sha1(" ".join(text.split()).encode()).hexdigest()[:12]


def instruct_set(query_files: list, doc_files: list = ()) -> RetrievalSet:
    """A grounded-QA set from instruction jsonl: contexts (``input``) are the documents.

    Queries are the instructions of ``query_files`` whose row has a context; the gold passage
    is that row's own context. ``doc_files`` add more contexts (distractors) to the corpus.
    Identical contexts (after whitespace normalisation) are one passage.
    """
    from lmsmith.data.instruct import load_instruct

    passages: dict[str, Passage] = {}
    queries: list[Query] = []
    for f in list(query_files) + list(doc_files):
        is_query_file = f in query_files
        for i, row in enumerate(load_instruct(f, need_output=False)):
            ctx = " ".join(row.input.split())
            if not ctx:
                continue
            pid = context_id(ctx)
            passages.setdefault(pid, Passage(pid, ctx, doc_id=pid))
            if is_query_file:
                queries.append(Query(f"{Path(f).stem}-{i}", row.instruction.strip(), [pid]))
    if not passages:
        raise UserError(f"no row of {list(query_files) + list(doc_files)} has an input context")
    names = "+".join(Path(f).stem for f in list(query_files) + list(doc_files))
    return RetrievalSet(list(passages.values()), queries, name=names)


def docs_passages(
    path, segmentation: str = "structure", size: int = 100, stride: int | None = None
):
    """Passages of any document source: a folder of user docs, an MD2D doc file, a DPR sample
    file, or an instruction jsonl (its contexts)."""
    path = Path(path)
    if path.is_dir():
        return segment(load_user_docs(path), segmentation, size, stride)
    kind = sniff(path)
    if kind == "md2d-docs":
        return segment(list(load_docs(path).values()), segmentation, size, stride)
    if kind == "dpr-sample":
        return dpr_sample_set(path).passages
    if kind == "instruct":
        return instruct_set([], [path]).passages
    raise UserError(f"{path}: a dialogue file holds no documents; give the doc file or a folder")


def sniff(path) -> str:
    """``md2d-docs`` | ``md2d-dials`` | ``dpr-sample`` | ``instruct`` from a file's content."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "no such file or folder")
    if path.suffix == ".jsonl":
        return "instruct"
    with path.open("rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace").lstrip()
    if head.startswith("["):
        return "dpr-sample"
    m = re.match(r'\{\s*"(\w+)"', head)
    if m and m.group(1) in ("doc_data", "dial_data"):
        return "md2d-docs" if m.group(1) == "doc_data" else "md2d-dials"
    # fall back to parsing (keys in another order)
    data = _read_json(path)
    if isinstance(data, dict) and "doc_data" in data:
        return "md2d-docs"
    if isinstance(data, dict) and "dial_data" in data:
        return "md2d-dials"
    raise DataError(
        path, None, None, "not a MultiDoc2Dial doc/dial file, a DPR sample list, nor instruct jsonl"
    )


def data_source(data, docs=None) -> tuple[str, str | None]:
    """(kind, doc file) of a ``--data`` file: :func:`sniff`'s kind, and for a MultiDoc2Dial
    dial file its doc file (``docs``, else ``multidoc2dial_doc.json`` beside it)."""
    kind = sniff(data)
    if kind != "md2d-dials":
        return kind, None
    doc_file = docs or str(Path(data).with_name("multidoc2dial_doc.json"))
    if not Path(doc_file).is_file():
        raise UserError(f"MultiDoc2Dial documents not found at '{doc_file}'; pass --docs FILE")
    return kind, doc_file


def load_set(data, corpus, extra_docs=()) -> RetrievalSet:
    """A RetrievalSet from a MD2D dial file, a DPR sample file or an instruction jsonl;
    ``corpus`` is a :class:`~lmsmith.dialog.config.CorpusConfig`."""
    kind, doc_file = data_source(data, corpus.docs)
    if kind == "md2d-dials":
        return md2d_set(
            data, doc_file, corpus.segmentation, corpus.size, corpus.stride, corpus.max_history
        )
    if kind == "dpr-sample":
        return dpr_sample_set(data, corpus.max_history)
    if kind == "instruct":
        return instruct_set([data], list(extra_docs))
    raise UserError(f"{data}: a MultiDoc2Dial doc file has no queries; pass a dial file as --data")


def save_passages(passages: list[Passage], path) -> None:
    from lmsmith.runs import write_jsonl

    write_jsonl(path, [asdict(p) for p in passages])


def load_passages(path) -> list[Passage]:
    out = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(Passage(**json.loads(line)))
    return out
