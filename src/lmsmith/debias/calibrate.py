"""Calibration baselines: contextual calibration (CC, Zhao et al., 2021) and domain-context
calibration (DC, Fei et al., 2023).

Both estimate the model's prior over the options from inputs that carry no answer, then
divide it out: p_cal(k) ∝ p(k | x) / p(k | x_prior). In BBQ every row has its own three
options, so the prior is estimated per (row, instruction) with the row's own options:

- CC: the context and the question are replaced by a content-free string ("N/A" by default).
- DC: they are replaced by random words drawn from the evaluated rows' contexts and questions
  (bag-of-words of the domain, no labels), as long as the average context / question; the
  prior is the mean probability over several such draws.
"""

from __future__ import annotations

import random
import statistics

import torch

from lmsmith.data.bbq import BBQExample
from lmsmith.debias.prompts import bbq_prompt, option_text
from lmsmith.debias.scoring import score_items


def calibrate(logscores: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Divide out the prior. logscores: (..., K) option log-scores; prior: (..., K) probabilities.

    Returns: (..., K) calibrated probabilities, softmax(logscores) / prior renormalised.
    """
    p = torch.softmax(logscores.float(), dim=-1)
    q = p / prior.float().clamp_min(1e-12)
    return q / q.sum(-1, keepdim=True)


def _prior(model, tokenizer, rows, instructions, fills, cfg, progress, desc) -> torch.Tensor:
    """Mean over ``fills`` of softmax option probabilities: (N, I, K).

    ``fills[j]`` maps a row index to the (context, question) that replaces the row's own.
    """
    total = None
    for fill in fills:
        items = []
        for n, r in enumerate(rows):
            ctx, q = fill(n)
            opts = [option_text(a, tokenizer, cfg.chat_template) for a in r.answers]
            for ins in instructions:
                items.append(
                    (bbq_prompt(ins, ctx, q, r.answers, tokenizer, cfg.chat_template), opts)
                )
        s = score_items(
            model,
            tokenizer,
            items,
            cfg.batch_size,
            cfg.length_norm,
            cfg.chat_template,
            cfg.max_prompt_tokens,
            progress,
            desc,
        )
        p = torch.softmax(s, dim=-1).view(len(rows), len(instructions), -1)
        total = p if total is None else total + p
    return total / len(fills)


def cc_prior(model, tokenizer, rows, instructions, cfg, content_free=("N/A",), progress=False):
    """Contextual calibration prior: (N, I, K)."""
    fills = [lambda n, t=t: (t, t) for t in content_free]
    return _prior(model, tokenizer, rows, instructions, fills, cfg, progress, "CC prior")


def domain_texts(
    rows: list[BBQExample], n_draws: int, seed: int = 0
) -> list[list[tuple[str, str]]]:
    """Random in-domain (context, question) word strings: n_draws lists of one per row."""
    ctx_words = [w for r in rows for w in r.context.split()]
    q_words = [w for r in rows for w in r.question.split()]
    ctx_len = max(1, round(statistics.fmean(len(r.context.split()) for r in rows)))
    q_len = max(1, round(statistics.fmean(len(r.question.split()) for r in rows)))
    rng = random.Random(seed)
    return [
        [
            (" ".join(rng.choices(ctx_words, k=ctx_len)), " ".join(rng.choices(q_words, k=q_len)))
            for _ in rows
        ]
        for _ in range(n_draws)
    ]


def dc_prior(model, tokenizer, rows, instructions, cfg, n_draws=2, seed=0, progress=False):
    """Domain-context calibration prior: (N, I, K)."""
    draws = domain_texts(rows, n_draws, seed)
    fills = [lambda n, d=d: d[n] for d in draws]
    return _prior(model, tokenizer, rows, instructions, fills, cfg, progress, "DC prior")
