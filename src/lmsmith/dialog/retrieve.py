"""Retrievers with one small API: ``index(passages)``, ``search(query, k)``, save and load.

- :class:`BM25Retriever`: ``bm25s`` (Lucene BM25) with its own tokeniser (lower-cased words of
  two or more characters, English stopwords dropped; no stemmer) and batched top-k.
- :class:`DenseRetriever`: a sentence-transformers bi-encoder (all-MiniLM-L6-v2 by default),
  mean pooling over non-padding tokens, L2-normalised, exact inner-product search in FAISS
  (``IndexFlatIP``).
- :class:`HybridRetriever`: BM25 + dense, fused by reciprocal rank or a weighted sum of
  min-max normalised scores.
- :class:`RerankRetriever`: a first stage whose top candidates a sentence-transformers
  ``CrossEncoder`` rescores.

An index folder holds ``meta.json`` (kind + settings), ``passages.jsonl`` and the retriever's
own files; :func:`save_index` writes it to a temporary sibling and renames it into place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lmsmith.dialog.config import (
    BM25Config,
    DenseConfig,
    FusionConfig,
    RerankConfig,
    RetrieverConfig,
)
from lmsmith.dialog.corpus import Passage, load_passages, save_passages
from lmsmith.errors import UserError
from lmsmith.runs import atomic_dir, write_json

log = logging.getLogger(__name__)

INDEX_VERSION = 1


@dataclass
class Hit:
    pid: str
    score: float
    text: str = ""


# --------------------------------------------------------------------------- helpers


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, best first; ties broken by the lower index.

    scores: (N,) → (min(k, N),)
    """
    k = min(k, scores.shape[0])
    order = np.lexsort((np.arange(scores.shape[0]), -scores))  # last key is primary
    return order[:k]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _spec_for_meta(spec: str) -> str:
    """Local folders are stored as absolute paths so the index loads from anywhere."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


class _Base:
    kind = ""

    def __init__(self):
        self.passages: list[Passage] = []

    def _hits(self, idx, scores) -> list[Hit]:
        return [
            Hit(self.passages[i].pid, float(s), self.passages[i].text) for i, s in zip(idx, scores)
        ]

    def search_batch(self, queries: list[str], k: int, progress: bool = False) -> list[list[Hit]]:
        return [
            self.search(q, k)
            for q in tqdm(queries, desc=f"search {self.kind}", disable=not progress, leave=False)
        ]

    def settings(self) -> dict:
        return {}

    def save(self, folder) -> None:
        save_index(self, folder)

    def _write(self, folder: Path) -> None:
        """Write this retriever's files into an (empty, temporary) folder."""
        raise NotImplementedError


# --------------------------------------------------------------------------- BM25


def bm25_tokenize(
    texts: list[str], stopwords: bool = True, progress: bool = False
) -> list[list[str]]:
    """``bm25s.tokenize``: lower-cased words of >= 2 word characters, English stopwords dropped
    if asked."""
    import bm25s

    return bm25s.tokenize(
        texts,
        stopwords="en" if stopwords else None,
        return_ids=False,
        show_progress=progress,
    )


class BM25Retriever(_Base):
    kind = "bm25"

    def __init__(self, cfg: BM25Config | None = None):
        super().__init__()
        self.cfg = cfg or BM25Config()
        self.model = None

    def settings(self) -> dict:
        return {"bm25": dataclasses.asdict(self.cfg)}

    def index(self, passages: list[Passage], progress: bool = False) -> None:
        import bm25s

        # bm25s sets its own logger to DEBUG at import; let the application's level decide
        logging.getLogger("bm25s").setLevel(logging.NOTSET)
        if not passages:
            raise UserError("cannot index an empty passage list")
        self.passages = list(passages)
        toks = bm25_tokenize([p.text for p in passages], self.cfg.stopwords, progress)
        self.model = bm25s.BM25(k1=self.cfg.k1, b=self.cfg.b, method="lucene")
        self.model.index(toks, show_progress=progress)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every passage.  → (N,) float32"""
        vocab = self.model.vocab_dict
        toks = [t for t in bm25_tokenize([query], self.cfg.stopwords)[0] if t in vocab]
        if not toks:
            return np.zeros(len(self.passages), dtype=np.float32)
        return np.asarray(self.model.get_scores(toks), dtype=np.float32)

    def search(self, query: str, k: int) -> list[Hit]:
        return self.search_batch([query], k)[0]

    def search_batch(self, queries: list[str], k: int, progress: bool = False) -> list[list[Hit]]:
        """``BM25.retrieve`` on the whole batch; equal scores are ordered by passage index."""
        toks = bm25_tokenize(queries, self.cfg.stopwords, progress)
        k = min(k, len(self.passages))
        idx, scores = self.model.retrieve(toks, k=k, show_progress=progress)  # (Q, k) each
        out = []
        for i, s in zip(idx, scores):
            order = np.lexsort((i, -s))  # bm25s leaves ties in arbitrary order
            out.append(self._hits(i[order], s[order]))
        return out

    def _write(self, folder: Path) -> None:
        self.model.save(str(folder / "bm25"), show_progress=False)

    @classmethod
    def _read(cls, folder: Path, meta: dict) -> BM25Retriever:
        import bm25s

        r = cls(BM25Config(**meta["settings"]["bm25"]))
        r.model = bm25s.BM25.load(str(folder / "bm25"), show_progress=False)
        return r


# --------------------------------------------------------------------------- dense


def load_encoder(spec: str, max_length: int = 256, query_max_length: int = 128):
    """A ``SentenceTransformer`` (transformer → mean pooling → L2 normalisation) from an alias,
    folder or Hub id; queries are cut to ``query_max_length`` tokens, passages to ``max_length``.

    The modules are built explicitly, so a plain HF encoder folder loads the same way as a
    sentence-transformers one and nothing is fetched from the Hub for a local folder.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    from lmsmith.models import resolve

    path = resolve(spec)
    try:
        tr = Transformer(path, query_length=query_max_length, document_length=max_length)
    except OSError as e:
        raise UserError(f"could not load encoder '{spec}': {e}") from e
    pool = Pooling(tr.get_embedding_dimension(), "mean")
    return SentenceTransformer(modules=[tr, pool, Normalize()], device=str(_device())).eval()


class DenseRetriever(_Base):
    kind = "dense"

    def __init__(self, cfg: DenseConfig | None = None, model=None):
        super().__init__()
        self.cfg = cfg or DenseConfig()
        self._model = model  # a SentenceTransformer, loaded on first use
        self.faiss_index = None

    def settings(self) -> dict:
        d = dataclasses.asdict(self.cfg)
        d["encoder"] = _spec_for_meta(d["encoder"])
        return {"dense": d}

    @property
    def encoder(self):
        if self._model is None:
            c = self.cfg
            self._model = load_encoder(c.encoder, c.max_length, c.query_max_length)
        return self._model

    def encode_passages(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """Unit-length passage vectors.  → (N, H) float32"""
        return self.encoder.encode_document(
            texts, batch_size=self.cfg.batch_size, show_progress_bar=progress
        )

    def encode_queries(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """Unit-length query vectors.  → (Q, H) float32"""
        return self.encoder.encode_query(
            texts, batch_size=self.cfg.batch_size, show_progress_bar=progress
        )

    def index(self, passages: list[Passage], progress: bool = False) -> None:
        import faiss

        if not passages:
            raise UserError("cannot index an empty passage list")
        self.passages = list(passages)
        vecs = self.encode_passages([p.text for p in passages], progress)  # (N, H)
        self.faiss_index = faiss.IndexFlatIP(vecs.shape[1])
        self.faiss_index.add(vecs)

    def _search_vecs(self, qv: np.ndarray, k: int) -> list[list[Hit]]:
        k = min(k, len(self.passages))
        scores, idx = self.faiss_index.search(np.ascontiguousarray(qv, dtype=np.float32), k)
        return [self._hits(i, s) for i, s in zip(idx, scores)]

    def search(self, query: str, k: int) -> list[Hit]:
        return self._search_vecs(self.encode_queries([query]), k)[0]

    def search_batch(self, queries: list[str], k: int, progress: bool = False) -> list[list[Hit]]:
        return self._search_vecs(self.encode_queries(queries, progress), k)

    def _write(self, folder: Path) -> None:
        import faiss

        faiss.write_index(self.faiss_index, str(folder / "index.faiss"))

    @classmethod
    def _read(cls, folder: Path, meta: dict) -> DenseRetriever:
        import faiss

        r = cls(DenseConfig(**meta["settings"]["dense"]))
        r.faiss_index = faiss.read_index(str(folder / "index.faiss"))
        return r


# --------------------------------------------------------------------------- fusion


def rrf_fuse(rankings: list[list[Hit]], rrf_k: int = 60) -> list[tuple[str, float]]:
    """Reciprocal-rank fusion: score(p) = sum over rankings of 1 / (rrf_k + rank), rank 1-based.

    Returns (pid, score) best first; ties keep the order of first appearance.
    """
    scores: dict[str, float] = {}
    for hits in rankings:
        for rank, h in enumerate(hits, start=1):
            scores[h.pid] = scores.get(h.pid, 0.0) + 1.0 / (rrf_k + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])


def _minmax(hits: list[Hit]) -> dict[str, float]:
    if not hits:
        return {}
    s = np.array([h.score for h in hits], dtype=np.float64)
    lo, hi = s.min(), s.max()
    span = hi - lo
    return {h.pid: (float((h.score - lo) / span) if span > 0 else 1.0) for h in hits}


def weighted_fuse(sparse: list[Hit], dense: list[Hit], alpha: float) -> list[tuple[str, float]]:
    """``alpha * dense + (1 - alpha) * sparse`` over per-query min-max normalised scores.

    A passage missing from one list gets 0 from it (below that list's worst candidate).
    """
    a, b = _minmax(sparse), _minmax(dense)
    pids = list(dict.fromkeys([h.pid for h in sparse] + [h.pid for h in dense]))
    fused = {p: alpha * b.get(p, 0.0) + (1 - alpha) * a.get(p, 0.0) for p in pids}
    return sorted(fused.items(), key=lambda kv: -kv[1])


class HybridRetriever(_Base):
    kind = "hybrid"

    def __init__(self, cfg: RetrieverConfig | None = None, bm25=None, dense=None):
        super().__init__()
        cfg = cfg or RetrieverConfig()
        self.fusion: FusionConfig = cfg.fusion
        self.bm25 = bm25 or BM25Retriever(cfg.bm25)
        self.dense = dense or DenseRetriever(cfg.dense)

    def settings(self) -> dict:
        return {"fusion": dataclasses.asdict(self.fusion)}

    def index(self, passages: list[Passage], progress: bool = False) -> None:
        self.passages = list(passages)
        self.bm25.index(passages, progress)
        self.dense.index(passages, progress)

    def _fuse(self, sparse: list[Hit], dense: list[Hit], k: int) -> list[Hit]:
        if self.fusion.method == "rrf":
            fused = rrf_fuse([sparse, dense], self.fusion.rrf_k)
        else:
            fused = weighted_fuse(sparse, dense, self.fusion.alpha)
        text = {h.pid: h.text for h in sparse + dense}
        return [Hit(pid, s, text[pid]) for pid, s in fused[:k]]

    def sparse_query(self, query: str) -> str:
        """The text BM25 sees: all of it, or the current turn only (dialogue history dilutes
        BM25's term weights while the dense encoder uses it; see docs)."""
        if self.fusion.sparse_query == "current":
            return query.split("[SEP]", 1)[0]
        return query

    def search(self, query: str, k: int) -> list[Hit]:
        d = max(k, self.fusion.depth)
        sparse = self.bm25.search(self.sparse_query(query), d)
        return self._fuse(sparse, self.dense.search(query, d), k)

    def search_batch(self, queries: list[str], k: int, progress: bool = False) -> list[list[Hit]]:
        d = max(k, self.fusion.depth)
        sparse = self.bm25.search_batch([self.sparse_query(q) for q in queries], d, progress)
        dense = self.dense.search_batch(queries, d, progress)
        return [self._fuse(s, de, k) for s, de in zip(sparse, dense)]

    def _write(self, folder: Path) -> None:
        _write_into(self.bm25, folder / "bm25")
        _write_into(self.dense, folder / "dense")

    @classmethod
    def _read(cls, folder: Path, meta: dict) -> HybridRetriever:
        cfg = RetrieverConfig(fusion=FusionConfig(**meta["settings"]["fusion"]))
        return cls(cfg, bm25=load_index(folder / "bm25"), dense=load_index(folder / "dense"))


# --------------------------------------------------------------------------- reranking


class Reranker:
    """Scores (query, passage) pairs with a sentence-transformers ``CrossEncoder``.

    One logit → that logit (no sigmoid); two logits → logit[1] - logit[0] (the "relevant" margin).
    """

    def __init__(self, spec: str, max_length: int = 320, batch_size: int = 16, model=None):
        self.spec, self.max_length, self.batch_size = spec, max_length, batch_size
        self._model = model

    def _load(self):
        if self._model is None:
            if not self.spec:
                raise UserError(
                    "the rerank retriever needs --reranker: a cross-encoder folder (train one "
                    "with `lmsmith dialog train-retriever --model cross-encoder`) or a Hub id "
                    "such as cross-encoder/ms-marco-MiniLM-L-6-v2 when online"
                )
            self._model = load_cross_encoder(self.spec, max_length=self.max_length)
        return self._model

    def score(self, query: str, texts: list[str]) -> np.ndarray:
        """→ (len(texts),) float32"""
        if not texts:
            return np.zeros(0, dtype=np.float32)
        out = self._load().predict(
            [(query, t) for t in texts],
            batch_size=self.batch_size,
            activation_fn=torch.nn.Identity(),
            show_progress_bar=False,
            convert_to_numpy=True,
        )
        out = np.asarray(out, dtype=np.float32)
        return out if out.ndim == 1 else out[:, 1] - out[:, 0]


def load_cross_encoder(spec: str, max_length: int | None = None, num_labels: int | None = None):
    """A sentence-transformers ``CrossEncoder`` from an alias, folder or Hub id (a plain
    encoder folder gets a new ``num_labels`` head)."""
    from sentence_transformers import CrossEncoder

    from lmsmith.models import resolve

    try:
        return CrossEncoder(
            resolve(spec), max_length=max_length, num_labels=num_labels, device=str(_device())
        )
    except OSError as e:
        raise UserError(f"could not load cross-encoder '{spec}': {e}") from e


class RerankRetriever(_Base):
    kind = "rerank"

    def __init__(
        self, cfg: RetrieverConfig | None = None, first=None, cross: Reranker | None = None
    ):
        super().__init__()
        cfg = cfg or RetrieverConfig()
        self.rcfg: RerankConfig = cfg.rerank
        self.first = first or build_retriever(self.rcfg.first_stage, cfg)
        self.cross = cross or Reranker(
            self.rcfg.reranker, self.rcfg.rerank_max_length, self.rcfg.rerank_batch_size
        )

    def settings(self) -> dict:
        d = dataclasses.asdict(self.rcfg)
        d["reranker"] = _spec_for_meta(d["reranker"])
        return {"rerank": d}

    def index(self, passages: list[Passage], progress: bool = False) -> None:
        self.cross._load()  # fail early, before a long index build
        self.passages = list(passages)
        self.first.index(passages, progress)

    def _rerank(self, query: str, cands: list[Hit], k: int) -> list[Hit]:
        head, tail = cands[: self.rcfg.rerank_depth], cands[self.rcfg.rerank_depth :]
        s = self.cross.score(query, [h.text for h in head])
        order = _top_k(s, len(head))
        floor = float(s.min()) if len(s) else 0.0
        out = [Hit(head[i].pid, float(s[i]), head[i].text) for i in order]
        # the rest keep the first stage's order, below every reranked candidate
        out += [Hit(h.pid, floor - 1.0 - j, h.text) for j, h in enumerate(tail)]
        return out[:k]

    def search(self, query: str, k: int) -> list[Hit]:
        return self._rerank(query, self.first.search(query, max(k, self.rcfg.rerank_depth)), k)

    def search_batch(self, queries: list[str], k: int, progress: bool = False) -> list[list[Hit]]:
        cands = self.first.search_batch(queries, max(k, self.rcfg.rerank_depth), progress)
        bar = tqdm(
            zip(queries, cands),
            total=len(queries),
            desc="rerank",
            disable=not progress,
            leave=False,
        )
        return [self._rerank(q, c, k) for q, c in bar]

    def _write(self, folder: Path) -> None:
        _write_into(self.first, folder / "first")

    @classmethod
    def _read(cls, folder: Path, meta: dict) -> RerankRetriever:
        cfg = RetrieverConfig(rerank=RerankConfig(**meta["settings"]["rerank"]))
        return cls(cfg, first=load_index(folder / "first"))


# --------------------------------------------------------------------------- build / save / load

KINDS = {
    "bm25": BM25Retriever,
    "dense": DenseRetriever,
    "hybrid": HybridRetriever,
    "rerank": RerankRetriever,
}


def build_retriever(kind: str, cfg: RetrieverConfig | None = None):
    cfg = cfg or RetrieverConfig()
    if kind == "bm25":
        return BM25Retriever(cfg.bm25)
    if kind == "dense":
        return DenseRetriever(cfg.dense)
    if kind == "hybrid":
        return HybridRetriever(cfg)
    if kind == "rerank":
        return RerankRetriever(cfg)
    raise UserError(f"unknown retriever '{kind}'; choose one of {list(KINDS)}")


def _write_into(r: _Base, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "version": INDEX_VERSION,
        "kind": r.kind,
        "n_passages": len(r.passages),
        "settings": r.settings(),
    }
    save_passages(r.passages, folder / "passages.jsonl")
    r._write(folder)
    write_json(folder / "meta.json", meta)


def save_index(r: _Base, folder) -> None:
    """Write the index to a temporary sibling folder, then rename it over ``folder``."""
    if not r.passages:
        raise UserError("nothing to save: index some passages first")
    with atomic_dir(folder) as tmp:
        _write_into(r, tmp)


def load_index(folder):
    """Load any retriever saved by :func:`save_index`."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise UserError(
            f"'{folder}' is not an index folder (no meta.json); build one with `lmsmith dialog index`"
        )
    meta = json.loads(meta_path.read_text())
    kind = meta.get("kind")
    if kind not in KINDS:
        raise UserError(f"{meta_path}: unknown retriever kind {kind!r}")
    r = KINDS[kind]._read(folder, meta)
    r.passages = load_passages(folder / "passages.jsonl")
    return r
