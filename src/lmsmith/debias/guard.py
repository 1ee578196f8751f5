"""Held-out next-token NLL, and the guard against units whose removal breaks the model.

A handful of units in a transformer carry "massive activations" (|a| in the thousands at the
first position, against a median of tens): zeroing one of them alone can wreck every answer of
the model. The guard ablates each of the top-K CRISPR candidates *alone* and measures the
change in mean next-token NLL on a fixed held-out text set; a unit whose lone ablation raises it
by more than a bound is dropped from the candidates before any set is scored. K forward passes
over a few thousand tokens: cheap next to the search.
"""

from __future__ import annotations

import logging

import torch

from lmsmith.debias.prune import Pruner
from lmsmith.debias.scoring import pad_id, pad_ids

log = logging.getLogger(__name__)


def nll_texts(rows, tokenizer, max_tokens: int = 64) -> list[list[int]]:
    """Token ids of instruction rows as the model sees them (chat template when it has one:
    the instruction and input as the user turn, the reference as the reply), cut to
    ``max_tokens``."""
    out = []
    for r in rows:
        ref = r.references[0] if r.references else ""
        user = r.instruction + (f"\n\n{r.input}" if r.input else "")
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": user}, {"role": "assistant", "content": ref}],
                tokenize=False,
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(f"{user}\n{ref}")["input_ids"]
        if len(ids) >= 2:
            out.append(ids[:max_tokens])
    if not out:
        raise ValueError("no held-out text has two or more tokens")
    return out


@torch.no_grad()
def mean_nll(model, texts: list[list[int]], pad: int, batch_size: int = 8) -> float:
    """Mean next-token NLL (nats) over every predicted token of ``texts``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        ids, attn = pad_ids(texts[start : start + batch_size], pad)
        ids, attn = ids.to(device), attn.to(device)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]  # (B, T-1, V)
        lp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        m = attn[:, 1:].bool()
        total -= float(lp[m].sum())
        count += int(m.sum())
    return total / count


def guard_units(
    model,
    tokenizer,
    ranked: list[tuple[str, int, float]],
    texts: list[list[int]],
    top_k: int,
    max_rise: float,
    base_nll: float | None = None,
) -> tuple[list[tuple[str, int, float]], list[dict], float]:
    """Ablate each of the first ``top_k`` ranked units alone; drop those whose ablation raises
    the held-out NLL by more than ``max_rise`` x the unpruned NLL.

    Returns: (the ranking without the dropped units, every checked unit as {module, index,
    score, nll, rise, dropped}, the unpruned NLL).
    """
    pad = pad_id(tokenizer)
    base = mean_nll(model, texts, pad) if base_nll is None else base_nll
    pruner = Pruner(model)
    checked, dropped = [], set()
    for m, i, s in ranked[:top_k]:
        pruner.set([(m, i)])
        nll = mean_nll(model, texts, pad)
        pruner.restore()
        rise = (nll - base) / base
        bad = rise > max_rise
        checked.append({"module": m, "index": i, "score": s, "nll": nll, "rise": rise,
                        "dropped": bad})  # fmt: skip
        if bad:
            dropped.add((m, i))
            log.warning("guard: dropping %s[%d]: alone it raises held-out NLL %.3f → %.3f",
                        m, i, base, nll)  # fmt: skip
    kept = [u for u in ranked if (u[0], u[1]) not in dropped]
    return kept, checked, base
