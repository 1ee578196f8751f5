"""CRISPR bias-neuron attribution.

A *unit* is one output feature of an ``nn.Linear`` (or transformers' ``Conv1D``) anywhere in
the model except the LM head and any layer whose weight is tied to the embeddings. For an
option y of a prompt x, a unit's attribution is

    A(y) = max over answer positions t of  a_t · ∂ log P(y | x) / ∂a_t

where a_t is the unit's output at position t. The answer positions (``positions="answer"``)
are those that predict the option's tokens: in a causal LM the last prompt token and the
option's tokens but its last; in an encoder-decoder every encoder position for encoder layers
and the option's positions for decoder layers (the official code's split). The system prompt
and BOS never count: a few "massive activation" units (|a| in the thousands at position 0) would
otherwise win the max whatever the question. ``positions="all"`` takes every token.

With ŷ the model's most likely wrong option and α = P(ŷ | x) (``alpha="prob"``: the raw
probability of the option's tokens, as the official code; ``"softmax"``: renormalised over the
three options), a unit's score on one instance is

    score = α · A(ŷ) − λ · max(0, α · A(y_gold))

and the final score is its mean over instances, instructions and seeds. One forward and one
backward pass per (instance, option) gives every unit of every layer at once: forward hooks
keep each layer's output and a tensor hook multiplies it by its gradient when the backward
pass reaches it. Several (instance, option) sequences share a batch; rows are independent, so
the gradient of the summed log-probabilities gives each row its own gradient.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lmsmith.data.bbq import BBQExample
from lmsmith.debias.prompts import example_prompt, option_text, uses_chat
from lmsmith.debias.scoring import Encoded, encode, is_seq2seq, pad_id, pad_ids, score_items

log = logging.getLogger(__name__)

try:  # GPT-2 style layers store the weight transposed: (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv1D by name, without the LM head and layers tied to the embeddings."""
    excluded = set()
    out_emb = model.get_output_embeddings()
    if out_emb is not None:
        excluded.add(id(out_emb.weight))
    in_emb = model.get_input_embeddings()
    if in_emb is not None:
        excluded.add(id(in_emb.weight))
    layers = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, Conv1D)) and id(mod.weight) not in excluded:
            if mod is out_emb:
                continue
            layers[name] = mod
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear layers to attribute")
    return layers


def n_units(layer: nn.Module) -> int:
    return layer.weight.shape[1] if isinstance(layer, Conv1D) else layer.weight.shape[0]


def crispr_score(
    bias: torch.Tensor, skill: torch.Tensor, alpha: torch.Tensor, lam: float = 1.0
) -> torch.Tensor:
    """α·bias − λ·max(0, α·skill).

    Args: bias, skill: (B, U) attributions for ŷ and the gold option; alpha: (B,) P(ŷ).
    Returns: (B, U).
    """
    a = alpha.to(bias.dtype)[:, None]
    return a * bias - lam * torch.clamp(a * skill, min=0.0)


def _encoder_layer_ids(model) -> set[int]:
    if not is_seq2seq(model):
        return set()
    return {id(m) for m in model.get_encoder().modules()}


def _batch_tensors(batch: list[tuple[Encoded, int]], pad: int, seq2seq: bool):
    """(prompt, option index) pairs → input tensors, token masks and the option log-prob mask
    (``target``: the positions whose next token is an option token — the answer positions)."""
    if seq2seq:
        ids, attn = pad_ids([e.prompt_ids for e, _ in batch], pad)
        lab, dec_mask = pad_ids([e.option_ids[k] for e, k in batch], -100)
        return {"ids": ids, "attn": attn, "labels": lab, "dec_mask": dec_mask}
    seqs = [e.prompt_ids + e.option_ids[k] for e, k in batch]
    ids, attn = pad_ids(seqs, pad)
    target = torch.zeros_like(ids, dtype=torch.bool)  # positions whose *next* token is scored
    for i, ((e, _k), s) in enumerate(zip(batch, seqs)):
        target[i, len(e.prompt_ids) - 1 : len(s) - 1] = True
    return {"ids": ids, "attn": attn, "target": target}


def _sequence_logp(model, t: dict, length_norm: str) -> torch.Tensor:
    """Differentiable log P(option | prompt) per row: (B,)."""
    if "labels" in t:
        lab = t["labels"]
        dec_in = model.prepare_decoder_input_ids_from_labels(labels=lab)
        logits = model(
            input_ids=t["ids"],
            attention_mask=t["attn"],
            decoder_input_ids=dec_in,
            decoder_attention_mask=t["dec_mask"],
        ).logits
        mask = lab != -100
        tok = lab.clamp(min=0)
        lp = torch.log_softmax(logits.float(), -1).gather(-1, tok[..., None])[..., 0]
    else:
        logits = model(input_ids=t["ids"], attention_mask=t["attn"]).logits[:, :-1]
        mask = t["target"][:, :-1]
        nxt = t["ids"][:, 1:]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, nxt[..., None])[..., 0]
    s = (lp * mask).sum(-1)
    return s / mask.sum(-1) if length_norm == "mean" else s


def attribute_batch(
    model,
    layers: dict[str, nn.Module],
    batch: list[tuple[Encoded, int]],
    pad: int,
    length_norm,
    positions: str = "answer",
) -> dict[str, torch.Tensor]:
    """Attribution of every unit for a batch of (prompt, option) pairs: name → (B, U).

    One forward and one backward pass; the max runs over each row's own positions: with
    ``positions="answer"`` a causal LM's last prompt token and option tokens (those that
    predict the option), an encoder-decoder's encoder positions for encoder layers and option
    positions for decoder layers; with ``"all"`` every non-pad token.
    """
    device = next(model.parameters()).device
    s2s = is_seq2seq(model)
    t = {k: v.to(device) for k, v in _batch_tensors(batch, pad, s2s).items()}
    enc_ids = _encoder_layer_ids(model)
    enc_mask = t["attn"].bool()
    if s2s:
        dec_mask = t["dec_mask"].bool()
    else:
        dec_mask = t["target"].bool() if positions == "answer" else enc_mask
    result: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name, mask):
        def fwd(_mod, _inp, out):
            act = out.detach()

            def on_grad(g):
                prod = (act * g).float()  # (B, T, U)
                if prod.dim() == 3 and prod.shape[1] == mask.shape[1]:
                    prod = prod.masked_fill(~mask[..., None], float("-inf"))
                if prod.dim() > 2:
                    prod = prod.flatten(1, -2).amax(dim=1)  # (B, U)
                prod = prod.cpu()
                # A layer called twice in one pass keeps the larger attribution.
                result[name] = prod if name not in result else torch.maximum(result[name], prod)

            out.register_hook(on_grad)

        return fwd

    for name, layer in layers.items():
        mask = enc_mask if id(layer) in enc_ids else dec_mask
        handles.append(layer.register_forward_hook(make_hook(name, mask)))
    try:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logp = _sequence_logp(model, t, length_norm)
            logp.sum().backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    missing = [n for n in layers if n not in result]
    for n in missing:  # a layer the loss does not reach: zero attribution
        result[n] = torch.zeros(len(batch), n_units(layers[n]))
    return result


@dataclass
class AttributionResult:
    scores: dict[str, torch.Tensor]  # name → (U,) mean CRISPR score
    bias: dict[str, torch.Tensor]  # name → (U,) mean α·A(ŷ)
    skill: dict[str, torch.Tensor]  # name → (U,) mean α·A(gold)
    n_samples: int
    mean_alpha: float
    scores_ambig: dict[str, torch.Tensor]  # name → (U,) the part of ``scores`` from ambiguous rows
    scores_other_alpha: dict[str, torch.Tensor]  # name → (U,) scores with the other α choice
    scores_ambig_other_alpha: dict[str, torch.Tensor]  # its part from ambiguous rows
    alpha: str = "prob"


def attribution_samples(dev: list[BBQExample], instructions: list[str], cfg) -> list:
    """(row, instruction) pairs: per seed, ``n_instances`` rows half ambiguous, half not."""
    from lmsmith.data.bbq import subsample_balanced

    samples: list[tuple[BBQExample, str]] = []
    for seed in cfg.seeds:
        picks = subsample_balanced(dev, cfg.n_instances, seed)
        samples += [(r, ins) for r in picks for ins in instructions]
    return samples


def biased_label(logs: torch.Tensor, gold: torch.Tensor, alpha: str = "prob"):
    """ŷ, the most likely wrong option, and α for each sample.

    Args: logs: (S, K) option log-scores; gold: (S,) labels.
    Returns: ŷ (S,), α (S,): exp(score of ŷ) for ``"prob"``, softmax(scores)[ŷ] for ``"softmax"``.
    """
    probs = torch.softmax(logs, dim=-1)  # (S, K)
    wrong = probs.masked_fill(torch.nn.functional.one_hot(gold, probs.shape[1]).bool(), -1.0)
    yhat = wrong.argmax(-1)
    if alpha == "softmax":
        return yhat, probs.gather(1, yhat[:, None])[:, 0]
    return yhat, logs.gather(1, yhat[:, None])[:, 0].exp()


def attribute(
    model,
    tokenizer,
    dev: list[BBQExample],
    instructions: list[str],
    cfg,
    prompt_cfg,
    progress: bool = False,
) -> AttributionResult:
    """CRISPR scores averaged over sampled dev instances × instructions × seeds.

    ``cfg``: AttributionConfig (n_instances, seeds, lam, batch_size, positions, alpha);
    ``prompt_cfg``: PromptConfig (chat_template, length_norm, max_prompt_tokens). The scores of
    the other α choice come from the same passes (only the weights differ).
    """
    model.eval()  # dropout off: the attribution describes the deployed model
    layers = candidate_layers(model)
    chat = uses_chat(tokenizer, prompt_cfg.chat_template)
    s2s = is_seq2seq(model)
    pad = pad_id(tokenizer)
    samples = attribution_samples(dev, instructions, cfg)
    items = [
        (
            example_prompt(r, ins, tokenizer, prompt_cfg.chat_template),
            [option_text(a, tokenizer, prompt_cfg.chat_template) for a in r.answers],
        )
        for r, ins in samples
    ]
    # Which wrong option the model prefers, and how strongly (no gradients needed).
    logs = score_items(
        model,
        tokenizer,
        items,
        prompt_cfg.batch_size,
        prompt_cfg.length_norm,
        prompt_cfg.chat_template,
        prompt_cfg.max_prompt_tokens,
        progress,
        "attribution: option scores",
    )
    gold = torch.tensor([r.label for r, _ in samples])
    yhat, alpha = biased_label(logs, gold, cfg.alpha)
    other = "softmax" if cfg.alpha == "prob" else "prob"
    _, alpha_other = biased_label(logs, gold, other)
    amb = torch.tensor([r.ambiguous for r, _ in samples])
    enc = [encode(tokenizer, p, o, s2s, chat, prompt_cfg.max_prompt_tokens) for p, o in items]

    def zeros():
        return {k: torch.zeros(n_units(v)) for k, v in layers.items()}

    sums, bias_sum, skill_sum, amb_sum = zeros(), zeros(), zeros(), zeros()
    other_sum, other_amb = zeros(), zeros()
    per_batch = max(1, cfg.batch_size // 2)  # each instance brings two sequences
    bar = tqdm(total=len(samples), desc="attribution", disable=not progress, leave=False)
    for start in range(0, len(samples), per_batch):
        idx = list(range(start, min(start + per_batch, len(samples))))
        pairs = [(enc[i], int(yhat[i])) for i in idx] + [(enc[i], int(gold[i])) for i in idx]
        attr = attribute_batch(model, layers, pairs, pad, prompt_cfg.length_norm, cfg.positions)
        a, a2, is_amb = alpha[idx], alpha_other[idx], amb[idx]
        for name, v in attr.items():
            b, s = v[: len(idx)], v[len(idx) :]
            sc = crispr_score(b, s, a, cfg.lam)  # (B, U)
            sums[name] += sc.sum(0)
            amb_sum[name] += sc[is_amb].sum(0)
            sc2 = crispr_score(b, s, a2, cfg.lam)
            other_sum[name] += sc2.sum(0)
            other_amb[name] += sc2[is_amb].sum(0)
            bias_sum[name] += (a[:, None] * b).sum(0)
            skill_sum[name] += (a[:, None] * s).sum(0)
        bar.update(len(idx))
    bar.close()
    n = len(samples)
    return AttributionResult(
        scores={k: v / n for k, v in sums.items()},
        bias={k: v / n for k, v in bias_sum.items()},
        skill={k: v / n for k, v in skill_sum.items()},
        n_samples=n,
        mean_alpha=float(alpha.mean()),
        scores_ambig={k: v / n for k, v in amb_sum.items()},
        scores_other_alpha={k: v / n for k, v in other_sum.items()},
        scores_ambig_other_alpha={k: v / n for k, v in other_amb.items()},
        alpha=cfg.alpha,
    )


def ambiguous_share(
    scores: dict[str, torch.Tensor], scores_ambig: dict[str, torch.Tensor], top: int = 100
) -> float:
    """Share of the top-``top`` units' summed score that comes from ambiguous rows."""
    ranked = rank_units(scores, top)
    total = sum(s for _, _, s in ranked)
    part = sum(float(scores_ambig[m][i]) for m, i, _ in ranked)
    return part / total if total else float("nan")


def top_overlap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], top: int = 100) -> float:
    """Share of the top-``top`` units of ``a`` that are also in the top-``top`` of ``b``."""
    ua = {(m, i) for m, i, _ in rank_units(a, top)}
    ub = {(m, i) for m, i, _ in rank_units(b, top)}
    return len(ua & ub) / max(1, len(ua))


def rank_units(
    scores: dict[str, torch.Tensor], top: int | None = None
) -> list[tuple[str, int, float]]:
    """All units as (layer name, index, score), highest score first (ties: name, index)."""
    names = sorted(scores)
    flat = torch.cat([scores[n].float().reshape(-1) for n in names])
    owner = [(n, i) for n in names for i in range(scores[n].numel())]
    k = flat.numel() if top is None else min(top, flat.numel())
    # Stable sort: equal scores keep the name-sorted, index-ascending order.
    order = torch.sort(flat, descending=True, stable=True).indices[:k].tolist()
    return [(owner[j][0], owner[j][1], float(flat[j])) for j in order]
