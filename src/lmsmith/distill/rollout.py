"""Rollouts: who writes the response tokens of each training sequence.

The sampling primitives (Gumbel-max ``Noise``, ``draw``, ``sample_rollout``, the ``Rollout``
container) and the cached decoders live in ``lmsmith.generation``; this module holds what is
particular to distillation: the intervention rules (SWITCH, SKD, AdaSwitch), the naive
token-by-token reference loop, the draft-and-verify ``switch_rollout`` and its block planner.
Every draw is keyed by (seed, stream, row, position), so the two loops agree token for token.

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
from typing import Literal

import torch

from lmsmith.distill.losses import token_jsd
from lmsmith.generation import HFDecoder, Noise, Rollout, decoder, draw

Schedule = Literal["constant", "linear", "exponential"]


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
    # the plain HF forward with its dynamic cache: the reference a re-implementation would write
    s_dec, t_dec = HFDecoder(student), HFDecoder(teacher)
    ls = s_dec(prompt_ids, attn, pos_ids, keep=1)
    lt = t_dec(prompt_ids, attn, pos_ids, keep=1)
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
        s_tok = draw(ls, noise, "student", pos, temperature)
        inter = rule.intervene(pos, div, s_tok, lt) & live
        tok = _take_teacher(lt, s_tok, inter, noise, pos, temperature, teacher_greedy)
        _record(out, live, pos, tok, inter, div, lt)
        rule.accept(live, pos, div, inter)
        done = done | (live & (tok == eos_id))
        pos = pos + 1
        if done.all() or t == max_new - 1:
            break
        attn = torch.cat([attn, (~done).long().unsqueeze(1)], 1)
        feed = torch.where(done, torch.full_like(tok, pad_id), tok).unsqueeze(1)
        ls = s_dec(feed, attn, n_valid.unsqueeze(1))
        lt = t_dec(feed, attn, n_valid.unsqueeze(1))
        ls, lt = ls[:, -1], lt[:, -1]
        n_valid = n_valid + (~done).long()
    out.stats = {"student_forwards": max_new, "teacher_forwards": max_new}
    return out


def _take_teacher(t_logits, draft, inter, noise, pos, temperature, greedy) -> torch.Tensor:
    """The draft, with the teacher's own draw where it intervenes (drawn for those rows only)."""
    if not inter.any():
        return draft
    rows = torch.nonzero(inter).flatten()
    tok = draft.clone()
    tok[rows] = draw(
        t_logits[rows], noise.select(rows.tolist()), "teacher", pos[rows], temperature, greedy
    )
    return tok


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
    lean: bool = True,
    dtype: torch.dtype | None = None,
    teacher_weights=None,
    planner: BlockPlanner | None = None,
) -> Rollout:
    """Draft-and-verify rollout for any intervention rule (SWITCH, SKD, AdaSwitch).

    Equal, token for token, to ``naive_switch_rollout`` under the same ``noise`` (exactly in
    fp32; in bf16 a k-slot forward rounds differently from k one-slot ones). With ``adaptive`` a
    BlockPlanner (or the given ``planner``) picks each block's size from the acceptance seen so
    far. ``lean`` decodes through generation.LeanDecoder where the models allow it, in ``dtype``
    (default: the models'), with the frozen teacher's ``teacher_weights`` prepared once by the caller.
    """
    B, P = prompt_ids.shape
    fed = prompt_mask[:, :-1].clone()  # (B, L) validity of the slots fed so far
    s_dec = decoder(student, B, P + 2 * max_new, lean, dtype)
    t_dec = decoder(teacher, B, P + 2 * max_new, lean, dtype, teacher_weights)
    if P > 1:
        pos_ids = (fed.cumsum(-1) - 1).clamp_min(0)
        s_dec(prompt_ids[:, :-1], fed, pos_ids, keep=1)
        t_dec(prompt_ids[:, :-1], fed, pos_ids, keep=1)
    pending = prompt_ids[:, -1].clone()  # (B,)
    n_valid = fed.sum(-1)  # position id of the pending token
    pos = torch.zeros(B, dtype=torch.long)  # response tokens kept per row
    done = torch.zeros(B, dtype=torch.bool)
    vocab = student.get_output_embeddings().weight.shape[0]
    out = _empty(prompt_ids, prompt_mask, B, max_new, pad_id, vocab if keep_teacher_logits else 0)
    planner = planner or BlockPlanner(
        block_size, max_block, decode_cost(student), decode_cost(teacher)
    )
    k = block_size
    n_s = n_t = blocks = 0
    while not done.all():
        k = max(1, min(k, int((max_new - pos[~done]).max())))
        # --- the student drafts k tokens, feeding [pending, d0 .. d(k-2)] one at a time
        s_logits, drafts, feed = [], [], pending
        for i in range(k):
            attn = torch.cat([fed, torch.ones(B, i + 1, dtype=fed.dtype)], 1)
            ls = s_dec(feed.unsqueeze(1), attn, (n_valid + i).unsqueeze(1))
            s_logits.append(ls[:, -1])
            drafts.append(draw(ls[:, -1], noise, "student", pos + i, temperature))
            feed = drafts[-1]
            n_s += 1
        # --- the teacher scores the same k inputs in one forward
        block_ids = torch.stack([pending] + drafts[:-1], dim=1)  # (B, k)
        attn = torch.cat([fed, torch.ones(B, k, dtype=fed.dtype)], 1)
        pos_ids = n_valid.unsqueeze(1) + torch.arange(k).unsqueeze(0)
        lt = t_dec(block_ids, attn, pos_ids)  # (B, k, V)
        n_t += 1
        blocks += 1
        # --- decide position by position; a row stops at its first intervention
        kept = torch.zeros(B, dtype=torch.long)
        live = ~done
        decisions = accepted = 0
        for i in range(k):
            if not live.any():
                break
            p_i = pos + i
            div = token_jsd(lt[:, i], s_logits[i])
            inter = rule.intervene(p_i, div, drafts[i], lt[:, i]) & live
            tok = _take_teacher(lt[:, i], drafts[i], inter, noise, p_i, temperature, teacher_greedy)
            _record(out, live, p_i, tok, inter, div, lt[:, i])
            rule.accept(live, p_i, div, inter)
            decisions += int(live.sum())
            accepted += int((live & ~inter).sum())
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
            planner.observe(decisions, accepted)
            k = planner.next()
    out.stats = {"student_forwards": n_s, "teacher_forwards": n_t, "blocks": blocks}
    return out


class BlockPlanner:
    """Chooses the draft length k that maximises the expected kept tokens per unit of cost.

    A row keeps its drafts up to its first intervention, so with a per-position acceptance a it
    keeps E(k) = 1 + a + ... + a^(k-1) tokens of a block (the last one possibly the teacher's).
    A block costs k student steps plus one teacher forward over k slots. The planner keeps a
    running estimate of a from the decisions of the recent blocks and picks the k with the best
    E(k) / cost(k).

    Costs are counted, not timed: a decode step costs what the model's weights weigh (it reads
    each once: embedding lookups aside, layers plus LM head), and each extra slot of a teacher
    forward adds ``extra_slot`` of a one-slot forward (0.15-0.3 measured on a CPU in bf16,
    up to 0.9 in fp32; 0.25 by default). Timing would fit the machine better, but in bf16 the
    tokens depend slightly on k (a k-slot forward rounds differently), and a timed choice would
    make rollouts, and so ``--resume``, irreproducible.
    """

    def __init__(
        self,
        k0: int,
        max_block: int,
        student_cost: float = 1.0,
        teacher_cost: float = 2.0,
        extra_slot: float = 0.25,
        smoothing: float = 0.3,
    ):
        self.k, self.max_block, self.w = max(1, k0), max_block, smoothing
        self.student_cost, self.teacher_cost, self.extra_slot = (
            student_cost,
            teacher_cost,
            extra_slot,
        )
        self.acceptance: float | None = None

    def observe(self, decisions: int, accepted: int) -> None:
        if decisions:
            a = accepted / decisions
            self.acceptance = (
                a if self.acceptance is None else (1 - self.w) * self.acceptance + self.w * a
            )

    def cost(self, k: int) -> float:
        return k * self.student_cost + self.teacher_cost * (1 + self.extra_slot * (k - 1))

    def next(self) -> int:
        if self.acceptance is None:
            return self.k
        a = min(self.acceptance, 0.999)
        self.k = max(
            range(1, self.max_block + 1), key=lambda k: (1 - a**k) / (1 - a) / self.cost(k)
        )
        return self.k


def decode_cost(model) -> float:
    """Parameters a decode step reads (all but the input embedding, unless tied), in millions."""
    n = sum(p.numel() for p in model.parameters())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if emb.data_ptr() != head.data_ptr():
        n -= emb.numel()
    return n / 1e6
