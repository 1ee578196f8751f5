"""Retrieval benchmark: quality (R@1/5/10, MRR), index build time and query latency.

Sets (real data kept beside the project, ../shared/data):
  md2d   md2d-sample/dpr_top10_50q.json: 50 real MultiDoc2Dial user turns over the union of
         the 130 passages they name; a passage is relevant if it is the target or is_positive.
  dolly  instruct/dolly: the contexts of dev.jsonl + valid.jsonl (deduplicated) are the
         documents; valid.jsonl instructions are the queries; gold = the row's own context.

Each query is searched on its own (``search(query, 100)``), which gives both the metrics and
the per-query latency; the index build is timed after the models are loaded.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/retrieval_bench.py \
        --reranker runs/dialog/reranker-dolly-dev --json runs/dialog/bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from lmsmith.data import shared_data_dir
from lmsmith.dialog.config import DenseConfig, RetrieverConfig
from lmsmith.dialog.corpus import dpr_sample_set, instruct_set
from lmsmith.dialog.retrieve import build_retriever
from lmsmith.metrics.retrieval import retrieval_metrics


def load_sets(names: list[str], max_history: int | None):
    root = shared_data_dir()
    if root is None:
        raise SystemExit("../shared/data not found (set LMSMITH_DATA)")
    out = {}
    if "md2d" in names:
        out["md2d"] = dpr_sample_set(root / "md2d-sample" / "dpr_top10_50q.json", max_history)
    if "dolly" in names:
        d = root / "instruct" / "dolly"
        out["dolly"] = instruct_set([d / "valid.jsonl"], [d / "dev.jsonl"])
    return out


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    s = sorted(xs)
    i = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[i]


def run_one(name: str, kind: str, cfg: RetrieverConfig, data, depth: int = 100) -> dict:
    r = build_retriever(kind, cfg)
    # load models before the clock starts
    for part in (
        r,
        getattr(r, "first", None),
        getattr(r, "dense", None),
        getattr(getattr(r, "first", None), "dense", None),
    ):
        if part is not None and hasattr(part, "encoder") and hasattr(part, "cfg"):
            part.encoder  # noqa: B018
    if hasattr(r, "cross"):
        r.cross._load()
    t0 = time.perf_counter()
    r.index(data.passages)
    t_index = time.perf_counter() - t0
    queries = [q for q in data.queries if q.relevant]
    for q in queries[:3]:  # warm-up
        r.search(q.text, depth)
    lat, ranked = [], []
    for q in queries:
        t0 = time.perf_counter()
        hits = r.search(q.text, depth)
        lat.append(1000 * (time.perf_counter() - t0))
        ranked.append([h.pid for h in hits])
    m = retrieval_metrics(ranked, [q.relevant for q in queries])
    return {
        "set": data.name,
        "retriever": name,
        "r@1": m["r@1"],
        "r@5": m["r@5"],
        "r@10": m["r@10"],
        "mrr": m["mrr"],
        "n_queries": len(queries),
        "n_passages": len(data.passages),
        "index_s": round(t_index, 2),
        "p50_ms": round(percentile(lat, 50), 1),
        "p95_ms": round(percentile(lat, 95), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sets", default="md2d,dolly")
    ap.add_argument("--retrievers", default="bm25,dense,hybrid,rerank")
    ap.add_argument("--reranker", default="", help="cross-encoder folder (rerank rows need it)")
    ap.add_argument(
        "--encoder-ft", default="", help="a fine-tuned bi-encoder: adds dense-ft and hybrid-ft rows"
    )
    ap.add_argument(
        "--max-history", type=int, default=None, help="md2d: earlier turns kept (default all)"
    )
    ap.add_argument("--rerank-depth", type=int, default=20)
    ap.add_argument(
        "--sparse-query", default="full", choices=["full", "current"], help="hybrid: what BM25 sees"
    )
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    sets = load_sets(args.sets.split(","), args.max_history)
    plan = []
    for kind in args.retrievers.split(","):
        cfg = RetrieverConfig()
        cfg.fusion.sparse_query = args.sparse_query
        if kind == "rerank":
            if not args.reranker:
                print("skipping rerank: no --reranker")
                continue
            cfg.rerank.reranker = args.reranker
            cfg.rerank.rerank_depth = args.rerank_depth
            cfg.rerank.rerank_max_length = 192
        plan.append((kind, kind, cfg))
    if args.encoder_ft:
        for kind in ("dense", "hybrid"):
            cfg = RetrieverConfig(dense=DenseConfig(encoder=args.encoder_ft))
            cfg.fusion.sparse_query = args.sparse_query
            plan.append((f"{kind}-ft", kind, cfg))

    rows = []
    for set_name, data in sets.items():
        for name, kind, cfg in plan:
            row = run_one(name, kind, cfg, data)
            row["set"] = set_name
            rows.append(row)
            print(json.dumps(row), flush=True)

    machine = (
        f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}"
    )
    print(f"\nmachine: {machine}; max_history={args.max_history}; sparse_query={args.sparse_query}")
    print(
        "| set | retriever | R@1 | R@5 | R@10 | MRR | queries | passages | index build s | p50 ms | p95 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['set']} | {r['retriever']} | {100 * r['r@1']:.1f} | {100 * r['r@5']:.1f} | {100 * r['r@10']:.1f} | "
            f"{100 * r['mrr']:.1f} | {r['n_queries']} | {r['n_passages']} | {r['index_s']} | {r['p50_ms']} | {r['p95_ms']} |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {"machine": machine, "max_history": args.max_history, "rows": rows}, indent=2
            )
        )


if __name__ == "__main__":
    main()
