"""ROUGE-L as the KD benchmarks report it: rouge-score's F-measure, stemming, max over refs, x100."""

from __future__ import annotations

import math
import statistics
from functools import lru_cache

LENGTH_BUCKETS = [(0, 16), (17, 32), (33, 64), (65, 128), (129, math.inf)]


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: list[str] | str) -> float:
    """ROUGE-L F1 x100 of ``prediction`` against the best-matching reference.

    Args:
        prediction: the generated text.
        references: one reference or several.

    Returns:
        A score in [0, 100] (rouge-score's F-measure with stemming, max over references).

    Raises:
        ValueError: no references.
    """
    if isinstance(references, str):
        references = [references]
    if not references:
        raise ValueError("rouge_l needs at least one reference")
    return 100.0 * max(_scorer().score(ref, prediction)["rougeL"].fmeasure for ref in references)


def bucket_name(lo: float, hi: float) -> str:
    """The label of a length bucket: ``<=16``, ``17-32``, ``>128``.

    Args:
        lo: smallest length in the bucket.
        hi: largest (``math.inf`` for the last bucket).

    Returns:
        The label.
    """
    return f"<={hi}" if lo == 0 else (f">{lo - 1}" if math.isinf(hi) else f"{lo}-{hi}")


def length_bucket(n_words: int) -> str:
    """The reference-length bucket a length falls in.

    Args:
        n_words: words of the first reference.

    Returns:
        The bucket's label (``bucket_name``).
    """
    for lo, hi in LENGTH_BUCKETS:
        if lo <= n_words <= hi:
            return bucket_name(lo, hi)
    raise AssertionError(n_words)


def by_length(scores: list[float], ref_lengths: list[int]) -> dict[str, dict[str, float]]:
    """Mean score per reference-length bucket.

    Args:
        scores: one score per row.
        ref_lengths: words of each row's first reference.

    Returns:
        ``{label: {"n": rows, "rougeL": mean or NaN}}`` for every bucket, in order.
    """
    groups: dict[str, list[float]] = {bucket_name(lo, hi): [] for lo, hi in LENGTH_BUCKETS}
    for s, n in zip(scores, ref_lengths):
        groups[length_bucket(n)].append(s)
    return {
        name: {"n": len(sel), "rougeL": statistics.fmean(sel) if sel else float("nan")}
        for name, sel in groups.items()
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation.

    Args:
        values: e.g. one score per seed.

    Returns:
        ``(mean, std)``; std is 0 for one value, both NaN for none.
    """
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
