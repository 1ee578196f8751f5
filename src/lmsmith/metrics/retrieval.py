"""Retrieval metrics over ranked lists: R@k (success at k) and MRR.

A query counts as found at rank r (1-based) if the r-th retrieved id is relevant; R@k is the
share of queries found within the first k (what the MultiDoc2Dial baseline reports as
recall@k: at least one gold passage in the top k); MRR is the mean of 1/r (0 when no
relevant id was retrieved).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def first_relevant_rank(ranked: Sequence[str], relevant: Iterable[str]) -> int | None:
    """1-based rank of the first relevant id in ``ranked``; None if none is retrieved."""
    rel = set(relevant)
    for i, pid in enumerate(ranked, start=1):
        if pid in rel:
            return i
    return None


def recall_at_k(ranks: Sequence[int | None], k: int) -> float:
    """Share of queries whose first relevant rank is <= k.  ranks: (Q,) of int or None."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not ranks:
        return 0.0
    return sum(1 for r in ranks if r is not None and r <= k) / len(ranks)


def mrr(ranks: Sequence[int | None], cutoff: int | None = None) -> float:
    """Mean reciprocal rank; ranks beyond ``cutoff`` (if given) count as 0."""
    if not ranks:
        return 0.0
    total = 0.0
    for r in ranks:
        if r is not None and (cutoff is None or r <= cutoff):
            total += 1.0 / r
    return total / len(ranks)


def retrieval_metrics(
    ranked_lists: Sequence[Sequence[str]],
    relevant: Sequence[Iterable[str]],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """``{"r@1", "r@5", "r@10", "mrr", "n_queries"}`` for Q ranked lists and Q gold sets."""
    if len(ranked_lists) != len(relevant):
        raise ValueError(f"{len(ranked_lists)} ranked lists but {len(relevant)} gold sets")
    ranks = [first_relevant_rank(r, g) for r, g in zip(ranked_lists, relevant)]
    out: dict[str, float] = {f"r@{k}": recall_at_k(ranks, k) for k in ks}
    out["mrr"] = mrr(ranks)
    out["n_queries"] = len(ranks)
    return out
