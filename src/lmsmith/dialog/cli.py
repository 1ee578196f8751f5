"""``lmsmith dialog <subcommand>``: index | search | train-retriever | eval-retrieval.

Each subcommand takes ``--config FILE.yaml`` and ``--key value`` overrides; ``--help`` lists
the keys. New subcommands (answer, eval, serve) register in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from lmsmith import config as C
from lmsmith.errors import UserError

USAGE = """usage: lmsmith dialog <subcommand> [--config FILE.yaml] [--key value ...]

subcommands:
{lines}

`lmsmith dialog <subcommand> --help` lists its options."""


def _parse(cls, argv: list[str], usage: str):
    from lmsmith.cli import split_config

    if "-h" in argv or "--help" in argv:
        print(f"{usage}\n\noptions:\n{C.describe(cls)}")
        return None
    path, rest = split_config(argv)
    return C.load(cls, path, C.parse_overrides(rest))


def load_set(data: str, docs: str | None, extra_docs: list[str], corpus) -> object:
    """A RetrievalSet from a MD2D dial file, a DPR sample file or an instruction jsonl."""
    from lmsmith.dialog import corpus as K

    if not data:
        raise UserError("needs --data FILE (MD2D dial file, DPR sample json or instruction jsonl)")
    kind = K.sniff(data)
    if kind == "md2d-dials":
        doc_file = docs or str(Path(data).with_name("multidoc2dial_doc.json"))
        if not Path(doc_file).is_file():
            raise UserError(f"MultiDoc2Dial documents not found at '{doc_file}'; pass --docs FILE")
        return K.md2d_set(
            data, doc_file, corpus.segmentation, corpus.size, corpus.stride, corpus.max_history
        )
    if kind == "dpr-sample":
        return K.dpr_sample_set(data, corpus.max_history)
    if kind == "instruct":
        return K.instruct_set([data], list(extra_docs))
    raise UserError(f"{data}: a MultiDoc2Dial doc file has no queries; pass a dial file as --data")


def cmd_index(argv: list[str]) -> int:
    from lmsmith.dialog.config import IndexConfig
    from lmsmith.dialog.corpus import docs_passages
    from lmsmith.dialog.retrieve import build_retriever

    cfg = _parse(
        IndexConfig,
        argv,
        "usage: lmsmith dialog index --docs PATH --output DIR [--retriever bm25|dense|hybrid|rerank]",
    )
    if cfg is None:
        return 0
    if not cfg.docs or not cfg.output:
        raise UserError("index needs --docs PATH and --output DIR")
    c = cfg.corpus
    passages = docs_passages(cfg.docs, c.segmentation, c.size, c.stride)
    r = build_retriever(cfg.retriever, cfg.settings)
    t0 = time.perf_counter()
    r.index(passages, progress=cfg.progress)
    r.save(cfg.output)
    print(
        f"indexed {len(passages)} passages ({cfg.retriever}, {c.segmentation}) in {time.perf_counter() - t0:.1f}s → {cfg.output}"
    )
    return 0


def cmd_search(argv: list[str]) -> int:
    from lmsmith.dialog.config import SearchConfig
    from lmsmith.dialog.retrieve import load_index
    from lmsmith.runs import write_json

    cfg = _parse(
        SearchConfig, argv, 'usage: lmsmith dialog search --index DIR --query "..." [--k 5]'
    )
    if cfg is None:
        return 0
    if not cfg.index or not cfg.query.strip():
        raise UserError("search needs --index DIR and --query TEXT")
    r = load_index(cfg.index)
    hits = r.search(cfg.query, cfg.k)
    for i, h in enumerate(hits, start=1):
        text = " ".join(h.text.split())
        print(
            f"{i:>2}. [{h.score:.4f}] {h.pid}\n    {text[:200]}{'...' if len(text) > 200 else ''}"
        )
    if cfg.json:
        write_json(
            cfg.json,
            [
                {"rank": i, "pid": h.pid, "score": h.score, "text": h.text}
                for i, h in enumerate(hits, 1)
            ],
        )
    return 0


def cmd_train_retriever(argv: list[str]) -> int:
    from lmsmith.dialog.config import TrainRetrieverConfig
    from lmsmith.dialog.train import train_bi_encoder, train_cross_encoder

    cfg = _parse(
        TrainRetrieverConfig,
        argv,
        "usage: lmsmith dialog train-retriever --data FILE --output DIR [--model bi-encoder|cross-encoder]",
    )
    if cfg is None:
        return 0
    data = load_set(cfg.data, cfg.docs, [], cfg.corpus)
    fn = train_bi_encoder if cfg.model == "bi-encoder" else train_cross_encoder
    s = fn(cfg, data)
    losses = ", ".join(f"{x:.4f}" for x in s["epoch_losses"])
    print(
        f"trained {s['model']} on {s['n_queries']} queries / {s['n_passages']} passages, "
        f"{s['steps']} steps in {s['train_time_s']}s; mean loss per epoch: {losses}\n"
        f"model: {cfg.output}"
    )
    return 0


def cmd_eval_retrieval(argv: list[str]) -> int:
    from lmsmith.dialog.config import EvalRetrievalConfig
    from lmsmith.dialog.retrieve import build_retriever, load_index
    from lmsmith.metrics.retrieval import first_relevant_rank, retrieval_metrics
    from lmsmith.runs import make_run_dir, write_json, write_jsonl

    cfg = _parse(
        EvalRetrievalConfig,
        argv,
        "usage: lmsmith dialog eval-retrieval --data FILE --retriever bm25|dense|hybrid|rerank [--json OUT]",
    )
    if cfg is None:
        return 0
    data = load_set(cfg.data, cfg.docs, cfg.extra_docs, cfg.corpus)
    queries = [q for q in data.queries if q.relevant]
    if cfg.limit is not None:
        queries = queries[: cfg.limit]
    if not queries:
        raise UserError(f"{cfg.data}: no query with a gold passage")
    t0 = time.perf_counter()
    if cfg.index:
        r = load_index(cfg.index)
        known = {p.pid for p in r.passages}
        missing = sum(1 for q in queries if not set(q.relevant) & known)
        if missing:
            raise UserError(
                f"index '{cfg.index}' lacks the gold passages of {missing} queries (built from other documents?)"
            )
    else:
        r = build_retriever(cfg.retriever, cfg.settings)
        r.index(data.passages, progress=cfg.progress)
    t_index = time.perf_counter() - t0
    t0 = time.perf_counter()
    hits = r.search_batch([q.text for q in queries], cfg.depth, progress=cfg.progress)
    t_search = time.perf_counter() - t0
    ranked = [[h.pid for h in hs] for hs in hits]
    m = retrieval_metrics(ranked, [q.relevant for q in queries])
    out = {
        "r@1": m["r@1"],
        "r@5": m["r@5"],
        "r@10": m["r@10"],
        "mrr": m["mrr"],
        "n_queries": len(queries),
        "n_passages": len(r.passages),
        "retriever": r.kind,
        "data": cfg.data,
        "index_time_s": round(t_index, 3),
        "search_time_s": round(t_search, 3),
    }
    if cfg.json:
        write_json(cfg.json, out)
    if cfg.run_dir:
        run = make_run_dir(cfg.run_dir, "eval-retrieval")
        write_json(run / "config.json", C.to_dict(cfg))
        write_json(run / "metrics.json", out)
        write_jsonl(
            run / "rankings.jsonl",
            [
                {
                    "qid": q.qid,
                    "query": q.text,
                    "relevant": q.relevant,
                    "rank": first_relevant_rank(rk, q.relevant),
                    "top10": rk[:10],
                }
                for q, rk in zip(queries, ranked)
            ],
        )
    print(
        f"{r.kind}: R@1 {100 * out['r@1']:.1f}  R@5 {100 * out['r@5']:.1f}  R@10 {100 * out['r@10']:.1f}  "
        f"MRR {100 * out['mrr']:.1f}  ({out['n_queries']} queries, {out['n_passages']} passages; "
        f"index {t_index:.1f}s, search {t_search:.1f}s)"
    )
    return 0


SUBCOMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "index": (cmd_index, "build a retriever index over documents (folder, MD2D doc file, ...)"),
    "search": (cmd_search, "query an index and print the top passages"),
    "train-retriever": (cmd_train_retriever, "fine-tune a DPR-style bi-encoder or a cross-encoder"),
    "eval-retrieval": (cmd_eval_retrieval, "R@1/5/10 and MRR of a retriever on a query set"),
}


def main(argv: list[str]) -> int:
    lines = "\n".join(f"  {name:<16}{help_}" for name, (_, help_) in SUBCOMMANDS.items())
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(lines=lines))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        raise UserError(
            f"unknown dialog subcommand '{name}'; choose one of {', '.join(SUBCOMMANDS)}"
        )
    return SUBCOMMANDS[name][0](rest)
