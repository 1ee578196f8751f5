"""Divergences between a teacher distribution p and a student distribution q over a vocabulary.

Every loss takes ``(B, T, V)`` logits and a ``(B, T)`` boolean mask, works on the masked rows
only (padding costs nothing), and returns the mean over unmasked tokens; an all-masked batch
gives 0, never NaN. ``temperature`` divides both logits before the softmax (no T² factor).

Conventions (as in TRL's GKD): p = teacher, q = student. Forward KL = KL(p‖q) (mode covering),
reverse KL = KL(q‖p) (mode seeking), JSD(β) = β·KL(p‖m) + (1−β)·KL(q‖m) with m = β·p + (1−β)·q,
which tends to forward KL / reverse KL (after dividing by β or 1−β) at β → 0 / 1; at exactly
β = 0 and β = 1 it returns those KLs.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Divergence = Literal["fkl", "rkl", "jsd", "tv", "sfkl", "srkl"]


def _select(student_logits, teacher_logits, mask, temperature):
    """Masked rows as (N, V) float32 log-probabilities for student and teacher."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    mask = mask.bool()
    s = student_logits[mask].float() / temperature  # (N, V)
    t = teacher_logits[mask].float() / temperature  # (N, V)
    return F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a‖b) per row for log-probabilities (N, V) → (N,). Zero-probability terms give 0."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _mean(per_token: torch.Tensor) -> torch.Tensor:
    return per_token.sum() / max(per_token.numel(), 1)


def forward_kl(student_logits, teacher_logits, mask, temperature: float = 1.0):
    """KL(p‖q). Args: student_logits, teacher_logits (B, T, V); mask (B, T). Returns scalar."""
    ls, lt = _select(student_logits, teacher_logits, mask, temperature)
    return _mean(_kl(lt, ls))


def reverse_kl(student_logits, teacher_logits, mask, temperature: float = 1.0):
    """KL(q‖p). Args: (B, T, V), (B, T, V), (B, T). Returns scalar."""
    ls, lt = _select(student_logits, teacher_logits, mask, temperature)
    return _mean(_kl(ls, lt))


def _mixture(log_p, log_q, w_p: float):
    """log(w_p·p + (1−w_p)·q), stable."""
    return torch.logsumexp(torch.stack([log_p + math.log(w_p), log_q + math.log1p(-w_p)]), dim=0)


def generalized_jsd(
    student_logits, teacher_logits, mask, beta: float = 0.5, temperature: float = 1.0
):
    """β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q. (B, T, V), (B, T, V), (B, T) → scalar."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, mask, temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, mask, temperature)
    ls, lt = _select(student_logits, teacher_logits, mask, temperature)
    lm = _mixture(lt, ls, beta)
    return _mean(beta * _kl(lt, lm) + (1 - beta) * _kl(ls, lm))


def total_variation(student_logits, teacher_logits, mask, temperature: float = 1.0):
    """½·Σ|p − q|. (B, T, V), (B, T, V), (B, T) → scalar."""
    ls, lt = _select(student_logits, teacher_logits, mask, temperature)
    return _mean(0.5 * (lt.exp() - ls.exp()).abs().sum(-1))


def skew_forward_kl(
    student_logits, teacher_logits, mask, alpha: float = 0.1, temperature: float = 1.0
):
    """KL(p ‖ α·p + (1−α)·q), DistiLLM's SKL. (B, T, V), (B, T, V), (B, T) → scalar."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    ls, lt = _select(student_logits, teacher_logits, mask, temperature)
    if alpha == 0:
        return _mean(_kl(lt, ls))
    return _mean(_kl(lt, _mixture(lt, ls, alpha)))


def skew_reverse_kl(
    student_logits, teacher_logits, mask, alpha: float = 0.1, temperature: float = 1.0
):
    """KL(q ‖ (1−α)·p + α·q), DistiLLM's SRKL. (B, T, V), (B, T, V), (B, T) → scalar."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    ls, lt = _select(student_logits, teacher_logits, mask, temperature)
    if alpha == 0:
        return _mean(_kl(ls, lt))
    return _mean(_kl(ls, _mixture(lt, ls, 1 - alpha)))


def divergence(
    name: Divergence, student_logits, teacher_logits, mask, *, beta=0.5, alpha=0.1, temperature=1.0
):
    """Dispatch by name (the configs say ``divergence: srkl``)."""
    if name == "fkl":
        return forward_kl(student_logits, teacher_logits, mask, temperature)
    if name == "rkl":
        return reverse_kl(student_logits, teacher_logits, mask, temperature)
    if name == "jsd":
        return generalized_jsd(student_logits, teacher_logits, mask, beta, temperature)
    if name == "tv":
        return total_variation(student_logits, teacher_logits, mask, temperature)
    if name == "sfkl":
        return skew_forward_kl(student_logits, teacher_logits, mask, alpha, temperature)
    if name == "srkl":
        return skew_reverse_kl(student_logits, teacher_logits, mask, alpha, temperature)
    raise ValueError(f"unknown divergence '{name}'")


def token_jsd(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """The symmetric Jensen–Shannon divergence (nats, in [0, ln 2]) per position.

    SWITCH's intervention test JSD(p_T‖p_S). Args: (..., V), (..., V). Returns (...).
    """
    lt = F.log_softmax(teacher_logits.float(), dim=-1)
    ls = F.log_softmax(student_logits.float(), dim=-1)
    lm = torch.logaddexp(lt, ls) - math.log(2.0)
    return (0.5 * _kl(lt, lm) + 0.5 * _kl(ls, lm)).clamp_min(0.0)


def sequence_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of next-token ``labels`` (B, T) under ``logits`` (B, T, V), masked mean."""
    mask = mask.bool()
    if not mask.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[mask].float(), labels[mask])
