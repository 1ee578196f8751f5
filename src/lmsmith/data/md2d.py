"""MultiDoc2Dial data: the official JSON files, retrieval instances, and the user's own documents.

Official files (doc2dial.github.io, CC BY 3.0):

- ``multidoc2dial_doc.json``: ``{"doc_data": {domain: {doc_id: {doc_id, title, doc_text,
  spans: {id_sp: {id_sp, start_sp, end_sp, text_sp, id_sec, title, parent_titles}}}}}}``;
- ``multidoc2dial_dial_{train,validation,test}.json``: ``{"dial_data": {domain: [{dial_id,
  turns: [{turn_id, role, da, utterance, references: [{id_sp, label, doc_id}]}]}]}}``.

A malformed record raises :class:`DataError` naming the file, the dialogue (or document) and the
field, e.g. ``dial.json: field 'dial_data.dmv[3] (dial_id=abc).turns[2].role': expected ...``.

Everything is turned into one shape, :class:`Document` with :class:`Span` s, so that the
passage segmenters in ``lmsmith.dialog.corpus`` treat MultiDoc2Dial documents and a folder of
Markdown / text / HTML files alike.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from lmsmith.errors import DataError

log = logging.getLogger(__name__)

ROLES = ("user", "agent")
USER_DOC_SUFFIXES = {".md": "markdown", ".markdown": "markdown", ".txt": "text"}
USER_DOC_SUFFIXES.update({".html": "html", ".htm": "html"})


@dataclass
class Span:
    """A contiguous piece of a document: ``doc.text[start:end] == text`` for our own docs."""

    id_sp: str
    start: int
    end: int
    text: str
    id_sec: str
    title: str = ""  # the title of the section the span belongs to
    parent_titles: list[str] = field(default_factory=list)  # outermost first
    heading: bool = False  # the span is a section heading (our own documents mark them)


@dataclass
class Document:
    doc_id: str
    title: str
    text: str
    spans: list[Span]
    domain: str = ""


@dataclass
class Reference:
    id_sp: str
    doc_id: str
    label: str = ""


@dataclass
class Turn:
    turn_id: int
    role: str  # "user" | "agent"
    utterance: str
    da: str = ""
    references: list[Reference] = field(default_factory=list)


@dataclass
class Dialogue:
    dial_id: str
    domain: str
    turns: list[Turn]
    source: str = ""  # the file, for messages


@dataclass
class Instance:
    """One retrieval / grounding example: a user turn and the agent turn that answers it.

    ``references`` are the next agent turn's grounding spans (the target); ``history`` holds
    the earlier turns as ``(role, utterance)``, most recent first.
    """

    qid: str
    current: str
    history: list[tuple[str, str]]
    references: list[Reference]
    response: str
    domain: str = ""
    source: str = ""


# --------------------------------------------------------------------------- schema helpers


def _read_json(path: Path):
    if not path.is_file():
        raise DataError(path, None, None, "no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(path, line, None, f"not UTF-8 text (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, None, f"not valid JSON ({e.msg})") from None


def _get(obj, key: str, typ, path, where: str, required: bool = True):
    """``obj[key]`` checked against ``typ``; ``where`` names the record for the message."""
    name = f"{where}.{key}" if where else key
    if not isinstance(obj, dict):
        raise DataError(path, None, where or None, f"expected an object, got {type(obj).__name__}")
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(path, None, name, "missing")
        return None
    val = obj[key]
    if typ is int and isinstance(val, bool):
        raise DataError(path, None, name, "expected an integer, got bool")
    if not isinstance(val, typ):
        tname = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise DataError(path, None, name, f"expected {tname}, got {type(val).__name__}")
    return val


def _title_text(t) -> str:
    """A parent title is a string, or the official ``{"id_sp", "text", "level"}`` object."""
    if isinstance(t, dict):
        return str(t.get("text", "")).strip()
    return str(t).strip()


def _parent_titles(raw, path, where) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, dict) and isinstance(raw.get("text"), list):  # HF datasets' layout
        return [str(t).strip() for t in raw["text"]]
    if not isinstance(raw, list):
        raise DataError(path, None, f"{where}.parent_titles", "expected a list of titles")
    return [_title_text(t) for t in raw]


# --------------------------------------------------------------------------- official files


def load_docs(path) -> dict[str, Document]:
    """Read ``multidoc2dial_doc.json`` → ``{doc_id: Document}`` (spans sorted by start)."""
    path = Path(path)
    data = _read_json(path)
    doc_data = _get(data, "doc_data", dict, path, "")
    docs: dict[str, Document] = {}
    for domain, by_id in doc_data.items():
        if not isinstance(by_id, dict):
            raise DataError(path, None, f"doc_data.{domain}", "expected an object of documents")
        for key, raw in by_id.items():
            where = f"doc_data.{domain}[{key}]"
            doc_id = _get(raw, "doc_id", str, path, where, required=False) or key
            title = _get(raw, "title", str, path, where)
            text = _get(raw, "doc_text", str, path, where)
            raw_spans = _get(raw, "spans", (dict, list), path, where)
            items = raw_spans.values() if isinstance(raw_spans, dict) else raw_spans
            spans = []
            for i, s in enumerate(items):
                sw = f"{where}.spans[{i}]"
                id_sp = _get(s, "id_sp", (str, int), path, sw)
                start = _get(s, "start_sp", int, path, sw)
                end = _get(s, "end_sp", int, path, sw)
                if not 0 <= start <= end <= len(text):
                    raise DataError(
                        path, None, f"{sw}.start_sp", f"span [{start}, {end}) outside doc_text"
                    )
                spans.append(
                    Span(
                        id_sp=str(id_sp),
                        start=start,
                        end=end,
                        text=_get(s, "text_sp", str, path, sw),
                        id_sec=str(_get(s, "id_sec", (str, int), path, sw)),
                        title=(_get(s, "title", str, path, sw, required=False) or "").strip(),
                        parent_titles=_parent_titles(s.get("parent_titles"), path, sw),
                    )
                )
            if not spans:
                raise DataError(path, None, f"{where}.spans", "document has no spans")
            if doc_id in docs:
                raise DataError(path, None, f"{where}.doc_id", f"duplicate doc_id '{doc_id}'")
            spans.sort(key=lambda s: (s.start, s.end))
            docs[doc_id] = Document(doc_id, title, text, spans, domain)
    if not docs:
        raise DataError(path, None, "doc_data", "contains no documents")
    return docs


def load_dialogues(path) -> list[Dialogue]:
    """Read ``multidoc2dial_dial_{split}.json`` → dialogues, with schema checks per field."""
    path = Path(path)
    data = _get(_read_json(path), "dial_data", dict, path, "")
    out: list[Dialogue] = []
    for domain, dials in data.items():
        if not isinstance(dials, list):
            raise DataError(path, None, f"dial_data.{domain}", "expected a list of dialogues")
        for i, d in enumerate(dials):
            where = f"dial_data.{domain}[{i}]"
            dial_id = _get(d, "dial_id", str, path, where)
            where = f"{where} (dial_id={dial_id})"
            turns = []
            for j, t in enumerate(_get(d, "turns", list, path, where)):
                tw = f"{where}.turns[{j}]"
                role = _get(t, "role", str, path, tw)
                if role not in ROLES:
                    raise DataError(
                        path, None, f"{tw}.role", f"expected one of {ROLES}, got {role!r}"
                    )
                refs = []
                for r_i, r in enumerate(
                    _get(t, "references", list, path, tw, required=False) or []
                ):
                    rw = f"{tw}.references[{r_i}]"
                    refs.append(
                        Reference(
                            id_sp=str(_get(r, "id_sp", (str, int), path, rw)),
                            doc_id=_get(r, "doc_id", str, path, rw),
                            label=_get(r, "label", str, path, rw, required=False) or "",
                        )
                    )
                turns.append(
                    Turn(
                        turn_id=_get(t, "turn_id", int, path, tw),
                        role=role,
                        utterance=_get(t, "utterance", str, path, tw),
                        da=_get(t, "da", str, path, tw, required=False) or "",
                        references=refs,
                    )
                )
            out.append(Dialogue(dial_id, domain, turns, source=str(path)))
    if not out:
        raise DataError(path, None, "dial_data", "contains no dialogues")
    return out


def build_instances(dialogues: list[Dialogue], keep_unreferenced: bool = False) -> list[Instance]:
    """The baseline's turn → instance construction.

    Every agent turn that follows a user turn gives one instance: the query is that user turn,
    then the earlier turns most recent first; the target is the agent turn's references.
    Agent turns with no references (nothing to ground) are dropped unless asked for.
    """
    out: list[Instance] = []
    dropped = 0
    for d in dialogues:
        for j in range(1, len(d.turns)):
            agent, user = d.turns[j], d.turns[j - 1]
            if agent.role != "agent" or user.role != "user":
                continue
            if not agent.references and not keep_unreferenced:
                dropped += 1
                continue
            history = [(t.role, t.utterance) for t in reversed(d.turns[: j - 1])]
            out.append(
                Instance(
                    qid=f"{d.dial_id}_{agent.turn_id}",
                    current=user.utterance,
                    history=history,
                    references=list(agent.references),
                    response=agent.utterance,
                    domain=d.domain,
                    source=f"{d.source} (dial_id={d.dial_id}, turn_id={agent.turn_id})",
                )
            )
    if dropped:
        log.info("dropped %d agent turns without references", dropped)
    return out


def format_query(
    current: str, history: list[tuple[str, str]], max_history: int | None = None
) -> str:
    """``current[SEP]role: utt||role: utt...`` (history most recent first), as the baseline.

    ``max_history`` keeps only the N most recent earlier turns (None keeps all).
    """
    turns = history if max_history is None else history[:max_history]
    rest = "||".join(f"{r}: {u.strip()}" for r, u in turns)
    return f"{current.strip()}[SEP]{rest}" if rest else current.strip()


# --------------------------------------------------------------------------- the DPR sample


@dataclass
class SampleQuery:
    """One row of a ``dpr_top10_*.json`` file: a question and the passages judged for it."""

    qid: str
    current: str
    history: list[tuple[str, str]]
    positives: list[str]  # passage ids relevant to the question (the target and is_positive)
    passages: dict[str, str]  # passage id → text, every passage the row names


def parse_sample_question(question: str) -> tuple[str, list[tuple[str, str]]]:
    """``"current[SEP]agent: a||user: b"`` → ``("current", [("agent", "a"), ("user", "b")])``."""
    current, _, rest = question.partition("[SEP]")
    history = []
    for part in rest.split("||"):
        part = part.strip()
        if not part:
            continue
        role, sep, utt = part.partition(":")
        if sep and role.strip() in ROLES:
            history.append((role.strip(), utt.strip()))
        else:
            history.append(("user", part))
    return current.strip(), history


def load_dpr_sample(path) -> list[SampleQuery]:
    """Read a MultiDoc2Dial reranking sample (``question, positive_passage(_id), DPR_result``)."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list) or not data:
        raise DataError(path, None, None, "expected a non-empty JSON list of questions")
    out = []
    for i, row in enumerate(data):
        where = f"[{i}]"
        q = _get(row, "question", str, path, where)
        pos_id = str(_get(row, "positive_passage_id", (str, int), path, where))
        passages = {pos_id: _get(row, "positive_passage", str, path, where)}
        positives = [pos_id]
        for j, r in enumerate(_get(row, "DPR_result", list, path, where)):
            rw = f"{where}.DPR_result[{j}]"
            pid = str(_get(r, "passage_id", (str, int), path, rw))
            passages[pid] = _get(r, "text", str, path, rw)
            if r.get("is_positive") is True or r.get("is_target") is True:
                if pid not in positives:
                    positives.append(pid)
        current, history = parse_sample_question(q)
        out.append(SampleQuery(f"q{i}", current, history, positives, passages))
    return out


# --------------------------------------------------------------------------- user documents


class _DocBuilder:
    """Accumulates paragraphs under a heading path; produces a Document with char offsets."""

    def __init__(self, doc_id: str, title: str, domain: str):
        self.doc_id, self.title, self.domain = doc_id, title, domain
        self.parts: list[str] = []
        self.pos = 0
        self.spans: list[Span] = []
        self.path: list[tuple[int, str]] = []  # (level, heading) of the open sections
        self.n_sec = 0

    def heading(self, level: int, text: str) -> None:
        text = " ".join(text.split())
        if not text:
            return
        while self.path and self.path[-1][0] >= level:
            self.path.pop()
        self.path.append((level, text))
        self.n_sec += 1
        self.add(text, heading=True)

    def add(self, text: str, heading: bool = False) -> None:
        text = " ".join(text.split())
        if not text:
            return
        if self.parts:
            self.parts.append("\n\n")
            self.pos += 2
        start = self.pos
        self.parts.append(text)
        self.pos += len(text)
        sec_title = self.path[-1][1] if self.path else self.title
        # parent titles: the document title, then the headings above this section
        parents = [self.title]
        for _, h in self.path[:-1]:
            if h != parents[-1]:  # a leading "# Title" heading repeats the document title
                parents.append(h)
        self.spans.append(
            Span(
                id_sp=str(len(self.spans) + 1),
                start=start,
                end=self.pos,
                text=text,
                id_sec=str(self.n_sec),
                title=sec_title,
                parent_titles=parents,
                heading=heading,
            )
        )

    def build(self) -> Document | None:
        if not self.spans:
            return None
        return Document(self.doc_id, self.title, "".join(self.parts), self.spans, self.domain)


_MD_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def parse_markdown(text: str, doc_id: str, default_title: str, domain: str = "") -> Document | None:
    """ATX headings (``#`` .. ``######``) open sections; blank lines separate paragraphs.

    The first level-1 heading, if it comes first, is the document title. Fenced code blocks
    are kept as text (a ``#`` inside them is not a heading).
    """
    lines = text.splitlines()
    title = default_title
    first = next((ln for ln in lines if ln.strip()), "")
    m = _MD_HEADING.match(first.strip())
    if m and len(m.group(1)) == 1:
        title = m.group(2).strip() or default_title
    b = _DocBuilder(doc_id, title, domain)
    para: list[str] = []
    fenced = False
    for ln in lines:
        s = ln.strip()
        if s.startswith("```") or s.startswith("~~~"):
            fenced = not fenced
            para.append(ln)
            continue
        m = None if fenced else _MD_HEADING.match(s)
        if m:
            b.add(" ".join(para))
            para = []
            b.heading(len(m.group(1)), m.group(2))
        elif not s and not fenced:
            b.add(" ".join(para))
            para = []
        else:
            para.append(s)
    b.add(" ".join(para))
    return b.build()


def parse_text(text: str, doc_id: str, title: str, domain: str = "") -> Document | None:
    """Plain text: one section titled by the file name; blank lines separate paragraphs."""
    b = _DocBuilder(doc_id, title, domain)
    for para in re.split(r"\n\s*\n", text):
        b.add(para)
    return b.build()


class _HTMLSections(HTMLParser):
    BLOCKS = {"p", "li", "td", "th", "pre", "blockquote", "dd", "dt", "div", "br", "tr", "table"}
    SKIP = {"script", "style", "noscript", "template", "head"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.events: list[tuple[str, int, str]] = []  # ("h", level, text) | ("p", 0, text)
        self.buf: list[str] = []
        self.heading_level = 0
        self.skip = 0
        self.title = ""
        self.in_title = False

    def _flush(self):
        text = " ".join("".join(self.buf).split())
        self.buf = []
        if text:
            kind = "h" if self.heading_level else "p"
            self.events.append((kind, self.heading_level, text))

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self.in_title = True
        if tag in self.SKIP:
            self.skip += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self._flush()
            self.heading_level = int(tag[1])
        elif tag in self.BLOCKS:
            self._flush()

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif re.fullmatch(r"h[1-6]", tag):
            self._flush()
            self.heading_level = 0
        elif tag in self.BLOCKS:
            self._flush()

    def handle_data(self, data):
        if self.in_title:
            self.title += data
        elif not self.skip:
            self.buf.append(data)


def parse_html(text: str, doc_id: str, default_title: str, domain: str = "") -> Document | None:
    """``<h1>``..``<h6>`` open sections; block elements (p, li, td ...) are paragraphs."""
    p = _HTMLSections()
    p.feed(text)
    p.close()
    p._flush()
    title = " ".join(p.title.split())
    if not title:
        title = next((t for k, lvl, t in p.events if k == "h" and lvl == 1), default_title)
    b = _DocBuilder(doc_id, title, domain)
    for kind, level, t in p.events:
        if kind == "h":
            b.heading(level, t)
        else:
            b.add(t)
    return b.build()


def load_user_docs(folder) -> list[Document]:
    """Every ``.md``, ``.markdown``, ``.txt``, ``.html`` and ``.htm`` file under ``folder``.

    The document id is the path relative to ``folder``; the domain is its first folder (or
    "" at the top). Empty files are skipped with a log line.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, None, None, "not a folder")
    docs = []
    root = folder.resolve()
    for f in sorted(folder.rglob("*")):
        kind = USER_DOC_SUFFIXES.get(f.suffix.lower())
        if kind is None or not f.is_file():
            continue
        if not f.resolve().is_relative_to(root):  # a symlink out of the folder: never indexed
            log.warning("skipping %s: it links outside %s", f, folder)
            continue
        rel = f.relative_to(folder)
        doc_id = rel.as_posix()
        domain = rel.parts[0] if len(rel.parts) > 1 else ""
        try:
            raw = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f, None, None, f"not UTF-8 text ({e.reason})") from None
        parse = {"markdown": parse_markdown, "text": parse_text, "html": parse_html}[kind]
        doc = parse(raw, doc_id, f.stem, domain)
        if doc is None:
            log.info("skipping %s: no text", f)
            continue
        docs.append(doc)
    if not docs:
        raise DataError(folder, None, None, "no .md, .txt or .html documents with text")
    return docs
