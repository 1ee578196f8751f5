"""SQuAD-style answer metrics: normalised exact match and token F1, max over references (x100).

Normalisation is the SQuAD v1.1 evaluation script's rule, written here from its description:
lower-case, drop punctuation, drop the articles "a", "an", "the", collapse whitespace.
The generation metrics of the MultiDoc2Dial shared task (token F1, SacreBLEU, ROUGE-L) are here
too, so that grounding and replies are scored by one module.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _refs(references: list[str] | str) -> list[str]:
    if isinstance(references, str):
        references = [references]
    if not references:
        raise ValueError("needs at least one reference")
    return list(references)


def exact_match(prediction: str, references: list[str] | str) -> float:
    """100 if the normalised prediction equals any normalised reference, else 0."""
    p = normalize_answer(prediction)
    return 100.0 * max(float(p == normalize_answer(r)) for r in _refs(references))


def pair_f1(prediction: str, reference: str) -> float:
    """Token F1 in [0, 1] of one prediction against one reference."""
    p = normalize_answer(prediction).split()
    r = normalize_answer(reference).split()
    if not p or not r:
        # SQuAD's rule for empty answers: 1 when both are empty, else 0
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: list[str] | str) -> float:
    """Bag-of-tokens F1 x100 against the best-matching reference."""
    return 100.0 * max(pair_f1(prediction, r) for r in _refs(references))


def squad_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean EM and F1 (x100) over examples; ``references[i]`` lists example i's answers."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if not predictions:
        return {"em": float("nan"), "f1": float("nan"), "n": 0}
    em = [exact_match(p, r) for p, r in zip(predictions, references)]
    f1 = [token_f1(p, r) for p, r in zip(predictions, references)]
    return {"em": sum(em) / len(em), "f1": sum(f1) / len(f1), "n": len(em)}


def sacrebleu_corpus(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus SacreBLEU (default 13a tokenisation) with a variable number of references."""
    import sacrebleu

    if not predictions:
        return float("nan")
    n = max(len(r) for r in references)
    # sacrebleu wants one stream per reference slot; a missing reference is None
    streams = [[r[j] if j < len(r) else None for r in references] for j in range(n)]
    return float(sacrebleu.corpus_bleu(predictions, streams).score)


def reply_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """The shared task's reply metrics: token F1, SacreBLEU, ROUGE-L (x100) and their sum.

    METEOR needs NLTK's WordNet data (a download), so ``sum`` here is F1 + SacreBLEU +
    ROUGE-L, *without* METEOR, and is named ``sum_no_meteor`` to say so.
    """
    from lmsmith.metrics.rouge import rouge_l

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if not predictions:
        return {"f1": float("nan"), "sacrebleu": float("nan"), "rougeL": float("nan"), "n": 0}
    f1 = sum(token_f1(p, r) for p, r in zip(predictions, references)) / len(predictions)
    rl = sum(rouge_l(p, r) for p, r in zip(predictions, references)) / len(predictions)
    bleu = sacrebleu_corpus(predictions, references)
    return {
        "f1": f1,
        "sacrebleu": bleu,
        "rougeL": rl,
        "sum_no_meteor": f1 + bleu + rl,
        "n": len(predictions),
    }
