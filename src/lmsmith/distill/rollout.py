"""Rollouts: who writes the response tokens of each training sequence.

All policies share one set of random numbers: ``noise.student[b, t]`` and ``noise.teacher[b, t]``,
uniforms drawn up front for every row ``b`` and response position ``t``. A token is drawn from a
distribution by inverse CDF with the uniform of its position, so the result does not depend on
the order in which positions are computed. That is what lets the draft-and-verify SWITCH rollout
equal the naive token-by-token loop, token for token.

Draft and verify (``switch_rollout``). Both caches hold the same slots. A block starts with each
row's *pending* token (accepted, not yet fed). The student feeds ``[pending, d0 .. d(k-2)]`` one
token at a time and samples a draft ``d0 .. d(k-1)``; the teacher scores the same k inputs in one
forward. Positions are then decided in order: the draft is kept up to the first intervention,
where the teacher's token is taken. Slots of rejected drafts are masked out of both caches; the
last accepted token becomes the new pending one. The teacher's logits at every kept position are
returned for the loss: no second teacher pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from lmsmith.distill.losses import token_jsd

Schedule = Literal["constant", "linear", "exponential"]


@dataclass
class Noise:
    """Uniform random numbers per (row, response position), for student and teacher draws."""

    student: torch.Tensor  # (B, N)
    teacher: torch.Tensor  # (B, N)

    @classmethod
    def draw(cls, batch: int, max_new: int, seed: int) -> Noise:
        g = torch.Generator().manual_seed(seed)
        return cls(torch.rand(batch, max_new, generator=g), torch.rand(batch, max_new, generator=g))


@dataclass
class Rollout:
    """Prompts and the responses a policy wrote for them."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    tokens: torch.Tensor  # (B, N) response tokens, pad after the end
    mask: torch.Tensor  # (B, N) bool, True on written tokens (EOS included)
    teacher_wrote: torch.Tensor  # (B, N) bool
    divergence: torch.Tensor  # (B, N) float, JSD(p_T‖p_S) where computed, NaN elsewhere
    teacher_logits: torch.Tensor | None = None  # (B, N, V) at kept positions
    stats: dict = field(default_factory=dict)

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, response_mask) of prompt + response, each (B, P+N)."""
        ids = torch.cat([self.prompt_ids, self.tokens], dim=1)
        attn = torch.cat([self.prompt_mask.bool(), self.mask], dim=1).long()
        resp = torch.cat([torch.zeros_like(self.prompt_mask, dtype=torch.bool), self.mask], dim=1)
        return ids, attn, resp

    def teacher_share(self) -> float:
        n = int(self.mask.sum())
        return float(self.teacher_wrote[self.mask].sum()) / n if n else 0.0


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists → (ids, mask), both (B, P), padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def draw(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0, greedy: bool = False):
    """One token per row by inverse CDF. logits (B, V), u (B,) in [0, 1) → (B,) long."""
    if greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    cdf = probs.cumsum(-1)  # (B, V)
    idx = torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    return idx.clamp_max(logits.shape[-1] - 1)


def _at(u: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """u[b, pos[b]] with positions past the end clamped (those are never kept)."""
    return u.gather(1, pos.clamp_max(u.shape[1] - 1).unsqueeze(1)).squeeze(1)


# --------------------------------------------------------------------------------------------
# Intervention rules: decide, per row and position, whether the teacher writes the token.
# ``intervene`` sees the candidates; ``accept`` is told what was kept (for stateful rules).


class SwitchRule:
    """SWITCH: the teacher writes y_t when JSD(p_T‖p_S) > τ_t = τ₀·f(t)."""

    def __init__(self, tau0: float, decay: float, schedule: Schedule = "exponential"):
        self.tau0, self.decay, self.schedule = tau0, decay, schedule

    def threshold(self, pos: torch.Tensor) -> torch.Tensor:
        t = pos.float()
        if self.schedule == "constant":
            return torch.full_like(t, self.tau0)
        if self.schedule == "linear":
            return self.tau0 * (1.0 - self.decay * t).clamp_min(0.0)
        return self.tau0 * torch.exp(-self.decay * t)

    def intervene(self, pos, div, draft, t_logits) -> torch.Tensor:
        return div > self.threshold(pos)

    def accept(self, rows, pos, div, intervened) -> None:
        pass


class SKDRule:
    """SKD: the teacher resamples y_t when the student's token is not in its top-K."""

    def __init__(self, top_k: int = 25):
        self.top_k = top_k

    def intervene(self, pos, div, draft, t_logits) -> torch.Tensor:
        top = t_logits.topk(min(self.top_k, t_logits.shape[-1]), dim=-1).indices  # (B, K)
        return ~(top == draft.unsqueeze(-1)).any(-1)

    def accept(self, rows, pos, div, intervened) -> None:
        pass


class AdaSwitchRule:
    """AdaSwitch: the student writes until the mean divergence of the last ``window`` positions
    exceeds ``factor`` × the mean of all earlier ones; from there the teacher writes the rest."""

    def __init__(self, batch: int, window: int = 5, factor: float = 1.5):
        self.window, self.factor = window, factor
        self.history: list[list[float]] = [[] for _ in range(batch)]
        self.switched = torch.zeros(batch, dtype=torch.bool)

    def intervene(self, pos, div, draft, t_logits) -> torch.Tensor:
        out = self.switched.clone()
        for b in range(len(self.history)):
            h = self.history[b] + [float(div[b])]
            if not out[b] and len(h) > self.window:
                recent = sum(h[-self.window :]) / self.window
                before = sum(h[: -self.window]) / (len(h) - self.window)
                out[b] = recent > self.factor * before
        return out

    def accept(self, rows, pos, div, intervened) -> None:
        for b in torch.nonzero(rows).flatten().tolist():
            self.history[b].append(float(div[b]))
            if intervened[b]:
                self.switched[b] = True


# --------------------------------------------------------------------------------------------


def _forward(model, ids, attn, pos_ids, cache, keep: int = 0):
    """One cached forward; ``keep`` > 0 computes the LM head on the last ``keep`` columns only
    (a prefill needs one: the vocabulary projection of every prompt token is wasted work)."""
    out = model(
        input_ids=ids,
        attention_mask=attn,
        position_ids=pos_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=keep,
    )
    return out.logits, out.past_key_values


@torch.no_grad()
def sample_rollout(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new: int,
    u: torch.Tensor,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    greedy: bool = False,
) -> Rollout:
    """One model writes every token (student: on-policy; teacher: SeqKD). KV cache, EOS aware."""
    B = prompt_ids.shape[0]
    attn = prompt_mask.clone()
    pos_ids = (attn.cumsum(-1) - 1).clamp_min(0)
    logits, cache = _forward(model, prompt_ids, attn, pos_ids, None, keep=1)
    nxt = logits[:, -1]
    n_valid = attn.sum(-1)
    tokens = torch.full((B, max_new), pad_id, dtype=torch.long)
    mask = torch.zeros((B, max_new), dtype=torch.bool)
    done = torch.zeros(B, dtype=torch.bool)
    for t in range(max_new):
        tok = draw(nxt, u[:, t], temperature, greedy)
        live = ~done
        tokens[live, t] = tok[live]
        mask[live, t] = True
        done = done | (tok == eos_id)
        if done.all() or t == max_new - 1:
            break
        attn = torch.cat([attn, (~done).long().unsqueeze(1)], 1)
        feed = torch.where(done, torch.full_like(tok, pad_id), tok).unsqueeze(1)
        logits, cache = _forward(model, feed, attn, n_valid.unsqueeze(1), cache)
        n_valid = n_valid + (~done).long()
        nxt = logits[:, -1]
    return Rollout(
        prompt_ids,
        prompt_mask,
        tokens,
        mask,
        teacher_wrote=torch.zeros_like(mask),
        divergence=torch.full(mask.shape, math.nan),
    )


@torch.no_grad()
def naive_switch_rollout(
    student,
    teacher,
    prompt_ids,
    prompt_mask,
    rule,
    max_new,
    noise: Noise,
    eos_id,
    pad_id,
    temperature: float = 1.0,
    teacher_greedy: bool = False,
    keep_teacher_logits: bool = False,
) -> Rollout:
    """The reference loop: both models stepped token by token, a decision at every position."""
    B = prompt_ids.shape[0]
    attn = prompt_mask.clone()
    pos_ids = (attn.cumsum(-1) - 1).clamp_min(0)
    ls, s_cache = _forward(student, prompt_ids, attn, pos_ids, None, keep=1)
    lt, t_cache = _forward(teacher, prompt_ids, attn, pos_ids, None, keep=1)
    ls, lt = ls[:, -1], lt[:, -1]
    n_valid = attn.sum(-1)
    out = _empty(
        prompt_ids, prompt_mask, B, max_new, pad_id, lt.shape[-1] if keep_teacher_logits else 0
    )
    done = torch.zeros(B, dtype=torch.bool)
    pos = torch.zeros(B, dtype=torch.long)
    for t in range(max_new):
        live = ~done
        div = token_jsd(lt, ls)
        s_tok = draw(ls, noise.student[:, t], temperature)
        inter = rule.intervene(pos, div, s_tok, lt) & live
        t_tok = draw(lt, noise.teacher[:, t], temperature, teacher_greedy)
        tok = torch.where(inter, t_tok, s_tok)
        _record(out, live, pos, tok, inter, div, lt)
        rule.accept(live, pos, div, inter)
        done = done | (live & (tok == eos_id))
        pos = pos + 1
        if done.all() or t == max_new - 1:
            break
        attn = torch.cat([attn, (~done).long().unsqueeze(1)], 1)
        feed = torch.where(done, torch.full_like(tok, pad_id), tok).unsqueeze(1)
        ls, s_cache = _forward(student, feed, attn, n_valid.unsqueeze(1), s_cache)
        lt, t_cache = _forward(teacher, feed, attn, n_valid.unsqueeze(1), t_cache)
        ls, lt = ls[:, -1], lt[:, -1]
        n_valid = n_valid + (~done).long()
    out.stats = {"student_forwards": max_new, "teacher_forwards": max_new}
    return out


def _empty(prompt_ids, prompt_mask, B, max_new, pad_id, vocab: int) -> Rollout:
    return Rollout(
        prompt_ids,
        prompt_mask,
        tokens=torch.full((B, max_new), pad_id, dtype=torch.long),
        mask=torch.zeros((B, max_new), dtype=torch.bool),
        teacher_wrote=torch.zeros((B, max_new), dtype=torch.bool),
        divergence=torch.full((B, max_new), math.nan),
        teacher_logits=torch.zeros((B, max_new, vocab)) if vocab else None,
    )


def _record(out: Rollout, rows, pos, tok, inter, div, t_logits) -> None:
    """Write the kept token of each row in ``rows`` at its response position."""
    b = torch.nonzero(rows).flatten()
    p = pos[b]
    out.tokens[b, p] = tok[b]
    out.mask[b, p] = True
    out.teacher_wrote[b, p] = inter[b]
    out.divergence[b, p] = div[b].float()
    if out.teacher_logits is not None:
        out.teacher_logits[b, p] = t_logits[b].float()


@torch.no_grad()
def switch_rollout(
    student,
    teacher,
    prompt_ids,
    prompt_mask,
    rule,
    max_new,
    noise: Noise,
    eos_id,
    pad_id,
    block_size: int = 4,
    temperature: float = 1.0,
    teacher_greedy: bool = False,
    keep_teacher_logits: bool = True,
    adaptive: bool = False,
    max_block: int = 8,
) -> Rollout:
    """Draft-and-verify rollout for any intervention rule (SWITCH, SKD, AdaSwitch).

    Equal, token for token, to ``naive_switch_rollout`` under the same ``noise``. With
    ``adaptive`` the block size follows the run length of accepted drafts seen so far.
    """
    B, P = prompt_ids.shape
    fed = prompt_mask[:, :-1].clone()  # (B, L) validity of the slots fed so far
    s_cache = t_cache = None
    if P > 1:
        pos_ids = (fed.cumsum(-1) - 1).clamp_min(0)
        _, s_cache = _forward(student, prompt_ids[:, :-1], fed, pos_ids, None, keep=1)
        _, t_cache = _forward(teacher, prompt_ids[:, :-1], fed, pos_ids, None, keep=1)
    pending = prompt_ids[:, -1].clone()  # (B,)
    n_valid = fed.sum(-1)  # position id of the pending token
    pos = torch.zeros(B, dtype=torch.long)  # response tokens kept per row
    done = torch.zeros(B, dtype=torch.bool)
    vocab = student.get_output_embeddings().weight.shape[0]
    out = _empty(prompt_ids, prompt_mask, B, max_new, pad_id, vocab if keep_teacher_logits else 0)
    k = block_size
    n_s = n_t = blocks = 0
    accepted_runs: list[int] = []
    while not done.all():
        k = max(1, min(k, int((max_new - pos[~done]).max())))
        # --- the student drafts k tokens, feeding [pending, d0 .. d(k-2)] one at a time
        s_logits, drafts, feed = [], [], pending
        for i in range(k):
            attn = torch.cat([fed, torch.ones(B, i + 1, dtype=fed.dtype)], 1)
            ls, s_cache = _forward(
                student, feed.unsqueeze(1), attn, (n_valid + i).unsqueeze(1), s_cache
            )
            s_logits.append(ls[:, -1])
            drafts.append(draw(ls[:, -1], _at(noise.student, pos + i), temperature))
            feed = drafts[-1]
            n_s += 1
        # --- the teacher scores the same k inputs in one forward
        block_ids = torch.stack([pending] + drafts[:-1], dim=1)  # (B, k)
        attn = torch.cat([fed, torch.ones(B, k, dtype=fed.dtype)], 1)
        pos_ids = n_valid.unsqueeze(1) + torch.arange(k).unsqueeze(0)
        lt, t_cache = _forward(teacher, block_ids, attn, pos_ids, t_cache)  # (B, k, V)
        n_t += 1
        blocks += 1
        # --- decide position by position; a row stops at its first intervention
        kept = torch.zeros(B, dtype=torch.long)
        live = ~done
        for i in range(k):
            if not live.any():
                break
            p_i = pos + i
            div = token_jsd(lt[:, i], s_logits[i])
            inter = rule.intervene(p_i, div, drafts[i], lt[:, i]) & live
            t_tok = draw(lt[:, i], _at(noise.teacher, p_i), temperature, teacher_greedy)
            tok = torch.where(inter, t_tok, drafts[i])
            _record(out, live, p_i, tok, inter, div, lt[:, i])
            rule.accept(live, p_i, div, inter)
            kept = kept + live.long()
            pending = torch.where(live, tok, pending)
            finished = live & ((tok == eos_id) | (p_i + 1 >= max_new))
            done = done | finished
            live = live & ~inter & ~finished
        # slots of this block: [old pending, d0 .. d(k-2)]; the first `kept` stay valid
        fed = torch.cat([fed, (torch.arange(k).unsqueeze(0) < kept.unsqueeze(1)).to(fed.dtype)], 1)
        n_valid = n_valid + kept
        pos = pos + kept
        if adaptive:
            # The batch loops until its slowest row is done, so the block follows the shortest
            # run among rows still writing: a longer draft would only be thrown away there.
            going = (kept > 0) & ~done
            accepted_runs.append(float(kept[going].min()) if going.any() else float(k))
            k = _next_block(accepted_runs, k, max_block)
    out.stats = {"student_forwards": n_s, "teacher_forwards": n_t, "blocks": blocks}
    return out


def _next_block(runs: list[float], k: int, max_block: int) -> int:
    """Grow the block while whole blocks are kept; shrink to the recent mean shortest run otherwise."""
    recent = runs[-4:]
    mean_run = sum(recent) / len(recent)
    if mean_run >= k - 0.5:
        return min(max_block, k + 1)
    return max(1, min(max_block, math.ceil(mean_run)))
