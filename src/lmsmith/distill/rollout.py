"""Rollouts: who writes the response tokens of each training sequence.

The sampling primitives (Gumbel-max ``Noise``, ``draw``, ``sample_rollout``, the ``Rollout``
container) and the cached decoders live in ``lmsmith.generation``; this module holds what is
particular to distillation: the intervention rules (SWITCH, SKD, AdaSwitch), the naive
token-by-token reference loop, the draft-and-verify ``switch_rollout`` and its block planner.
Every draw is keyed by (seed, stream, row, position), so the two loops agree token for token.

Draft and verify (``switch_rollout``). Both caches hold the same slots. A block starts with each
row's *pending* token (accepted, not yet fed). One model, the drafter, feeds
``[pending, x0 .. x(k-2)]`` one token at a time and samples ``x0 .. x(k-1)`` from its own noise
stream; the other scores the same k inputs in one forward. Positions are then decided in order:
the drafter's tokens are kept while the rule says the drafter is the one that writes (the
student: no intervention; the teacher: an intervention), and at the first position where the
other model writes, its own draw is taken (its distribution there is already computed). Slots
of rejected drafts are masked out of both caches; the last kept token becomes the new pending
one. SWITCH needs both distributions at every position either way, so the two roles give the
same tokens; a planner picks the role and k from the recent intervention rate. The teacher's
logits at every kept position are returned for the loss: no second teacher pass. Finished rows
leave both caches, and with ``batch`` a waiting prompt takes a finished row's place (continuous
batching).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from lmsmith.distill.losses import token_jsd
from lmsmith.generation import HFDecoder, Noise, Rollout, decoder, draw, lean_supported

Schedule = Literal["constant", "linear", "exponential"]
Role = Literal["student", "teacher"]


# --------------------------------------------------------------------------------------------
# Intervention rules: decide, per row and position, whether the teacher writes the token.
# ``intervene`` sees the candidates; ``accept`` is told what was kept (for stateful rules);
# ``uses_draft`` says whether ``intervene`` reads the student's token (else it gets None when
# the teacher drafts, and the student draws only where it writes).


class SwitchRule:
    """SWITCH: the teacher writes y_t when JSD(p_T‖p_S) > τ_t = τ₀·f(t)."""

    uses_draft = False  # the decision reads the divergence only

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

    uses_draft = True  # the decision reads the student's token

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

    uses_draft = False

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
        _record(
            out, live.nonzero().flatten(), pos[live], tok[live], inter[live], div[live], lt[live]
        )
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
    out.stats = {"student_forwards": t + 1, "teacher_forwards": t + 1, "row_slots": B * (t + 1)}
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


def _record(out: Rollout, b, p, tok, inter, div, t_logits) -> None:
    """Write the kept token of batch rows ``b`` (n,) at their response positions ``p`` (n,);
    the other arguments hold those rows' values."""
    out.tokens[b, p] = tok
    out.mask[b, p] = True
    out.teacher_wrote[b, p] = inter
    out.divergence[b, p] = div.float()
    if out.teacher_logits is not None:
        out.teacher_logits[b, p] = t_logits.float()


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
    drafter: Role = "student",
    batch: int | None = None,
) -> Rollout:
    """Draft-and-verify rollout for any intervention rule (SWITCH, SKD, AdaSwitch).

    Equal, token for token, to ``naive_switch_rollout`` under the same ``noise`` (exactly in
    fp32; in bf16 a k-slot forward rounds differently from k one-slot ones). ``drafter`` is the
    model that drafts (the other scores the draft in one forward); with ``adaptive`` a
    BlockPlanner (or the given ``planner``) picks each block's drafter and size from the
    interventions seen so far. Rows leave the batch (and both caches) when they finish; with
    ``batch`` below the number of prompts, at most ``batch`` rows decode at once and a waiting
    prompt takes the place of each finished row (continuous batching; lean decoders only, else
    every prompt decodes at once). ``lean`` decodes through generation.LeanDecoder where the
    models allow it, in ``dtype`` (default: the models'), with the frozen teacher's
    ``teacher_weights`` prepared once by the caller.
    """
    if drafter not in ("student", "teacher"):
        raise ValueError(f"drafter must be 'student' or 'teacher', got {drafter!r}")
    B, P = prompt_ids.shape
    lengths = prompt_mask.sum(-1)
    refill = lean and lean_supported(student) and lean_supported(teacher)
    width = max(1, min(batch, B)) if refill and batch else B
    w0 = int(lengths[:width].max())  # the first rows' prompts, without columns of padding only
    fed = prompt_mask[:width, P - w0 : -1].clone()  # (A, L) validity of the slots fed so far
    s_dec = decoder(student, width, w0 + 2 * max_new, lean, dtype)
    t_dec = decoder(teacher, width, w0 + 2 * max_new, lean, dtype, teacher_weights)
    if w0 > 1:
        pos_ids = (fed.cumsum(-1) - 1).clamp_min(0)
        s_dec(prompt_ids[:width, P - w0 : -1], fed, pos_ids, keep=1)
        t_dec(prompt_ids[:width, P - w0 : -1], fed, pos_ids, keep=1)
    rows = torch.arange(width)  # (A,) prompt (row of the rollout) of each decoded row
    waiting = list(range(width, B))  # prompts not started yet
    live_noise = noise.select(rows.tolist())
    pending = prompt_ids[:width, -1].clone()  # (A,) accepted, not yet fed
    n_valid = fed.sum(-1)  # (A,) position id of the pending token
    pos = torch.zeros(width, dtype=torch.long)  # (A,) response tokens kept per row
    vocab = student.get_output_embeddings().weight.shape[0]
    out = _empty(prompt_ids, prompt_mask, B, max_new, pad_id, vocab if keep_teacher_logits else 0)
    planner = planner or BlockPlanner(
        block_size, max_block, decode_cost(student), decode_cost(teacher), role=drafter
    )
    role, k = drafter, block_size
    n_s = n_t = slots = 0
    blocks = {"student": 0, "teacher": 0}
    alive = torch.ones(width, dtype=torch.bool)  # (A,) decoded rows that have not finished
    while alive.any():
        A = len(rows)
        k = max(1, min(k, int((max_new - pos[alive]).max())))
        d_dec, v_dec = (s_dec, t_dec) if role == "student" else (t_dec, s_dec)
        greedy = teacher_greedy and role == "teacher"
        # --- the drafter writes k tokens, feeding [pending, x0 .. x(k-2)] one at a time
        d_logits, drafts, feed = [], [], pending
        for i in range(k):
            attn = torch.cat([fed, torch.ones(A, i + 1, dtype=fed.dtype)], 1)
            logits = d_dec(feed.unsqueeze(1), attn, (n_valid + i).unsqueeze(1))[:, -1]
            d_logits.append(logits)
            drafts.append(draw(logits, live_noise, role, pos + i, temperature, greedy))
            feed = drafts[-1]
        # --- the other model scores the same k inputs in one forward
        block_ids = torch.stack([pending] + drafts[:-1], dim=1)  # (A, k)
        attn = torch.cat([fed, torch.ones(A, k, dtype=fed.dtype)], 1)
        pos_ids = n_valid.unsqueeze(1) + torch.arange(k).unsqueeze(0)
        v_logits = v_dec(block_ids, attn, pos_ids)  # (A, k, V)
        n_s += k if role == "student" else 1
        n_t += 1 if role == "student" else k
        slots += A * k  # row-slots each model computed in this block
        blocks[role] += 1
        # --- decide position by position: a row keeps the drafter's tokens while the drafter
        # is the one that writes there, and stops at the first position the other one writes
        kept = torch.zeros(A, dtype=torch.long)
        live = alive.clone()
        finished = torch.zeros(A, dtype=torch.bool)
        decisions = interventions = 0
        for i in range(k):
            if not live.any():
                break
            p_i = pos + i
            if role == "student":
                ls, lt = d_logits[i], v_logits[:, i]
            else:
                ls, lt = v_logits[:, i], d_logits[i]
            div = token_jsd(lt, ls)
            s_tok = drafts[i] if role == "student" else None
            if s_tok is None and getattr(rule, "uses_draft", True):
                s_tok = draw(ls, live_noise, "student", p_i, temperature)
            inter = _decide(rule, rows, B, live, p_i, div, s_tok, lt)
            if role == "student":
                tok = _take_teacher(lt, s_tok, inter, live_noise, p_i, temperature, teacher_greedy)
            else:  # the teacher's draft where it intervenes, else the student's own draw
                tok = _take_student(
                    ls, drafts[i], s_tok, live & ~inter, live_noise, p_i, temperature
                )
            _record(out, rows[live], p_i[live], tok[live], inter[live], div[live], lt[live])
            decisions += int(live.sum())
            interventions += int(inter.sum())
            kept = kept + live.long()
            pending = torch.where(live, tok, pending)
            stop = live & ((tok == eos_id) | (p_i + 1 >= max_new))
            finished = finished | stop
            live = live & ~stop & (~inter if role == "student" else inter)
        # slots of this block: [old pending, x0 .. x(k-2)]; the first `kept` stay valid
        fed = torch.cat([fed, (torch.arange(k).unsqueeze(0) < kept.unsqueeze(1)).to(fed.dtype)], 1)
        n_valid = n_valid + kept
        pos = pos + kept
        alive = alive & ~finished
        if not alive.all() and waiting:  # waiting prompts take the finished rows' places
            free = torch.nonzero(~alive).flatten()[: len(waiting)]
            new, waiting = waiting[: len(free)], waiting[len(free) :]
            q = lengths[new] - 1  # prompt tokens to prefill (the last one is pending)
            extra = max(0, int(q.max()) - fed.shape[1])
            if extra:  # room at the end of every row, masked out for the others
                s_dec.grow(extra)
                t_dec.grow(extra)
                fed = torch.cat([fed, torch.zeros(len(rows), extra, dtype=fed.dtype)], 1)
            L = fed.shape[1]
            for r, j, n in zip(free.tolist(), new, q.tolist()):
                ids = prompt_ids[j, P - n - 1 :]
                s_dec.fill_row(r, ids[:-1], torch.arange(n))
                t_dec.fill_row(r, ids[:-1], torch.arange(n))
                fed[r] = 0
                fed[r, L - n :] = 1
                rows[r], pending[r], n_valid[r], pos[r] = j, ids[-1], n, 0
            alive[free] = True
        # finished rows leave the batch and both caches once at most half the rows are alive:
        # until then they are fed along (masked out), because a matrix product over 7 rows took
        # 15-30% longer than over 8 on the AVX2 machine (issue 19), and dropping rows saves
        # little in a step that mostly reads weights
        if not alive.all() and 2 * int(alive.sum()) <= A:
            idx = torch.nonzero(alive).flatten()
            rows, fed, pending, n_valid, pos = (x[idx] for x in (rows, fed, pending, n_valid, pos))
            alive = alive[idx]
            if len(rows):
                s_dec.select_rows(idx)
                t_dec.select_rows(idx)
        if refill and alive.any():  # slots no live row attends to any more
            dead = int((fed[alive] == 0).all(0).long().cumprod(0).sum())
            if dead:
                s_dec.drop_front(dead)
                t_dec.drop_front(dead)
                fed = fed[:, dead:]
        live_noise = noise.select(rows.tolist())
        if adaptive:
            planner.observe(decisions, interventions)
            role, k = planner.next()
    out.stats = {
        "student_forwards": n_s,
        "teacher_forwards": n_t,
        "blocks": blocks["student"] + blocks["teacher"],
        "teacher_drafted_blocks": blocks["teacher"],
        "row_slots": slots,
    }
    return out


def _decide(rule, rows, B, live, pos, div, draft, t_logits) -> torch.Tensor:
    """The rule's decision for the live ones of the decoded rows, which hold the rollout's rows
    ``rows`` (A of B): rules see the whole batch, as in the naive loop (AdaSwitch keeps a history
    per row); the rows not decoded now are not live."""
    if len(rows) < B or not bool((rows == torch.arange(B)).all()):  # scatter into the batch
        full_live = torch.zeros(B, dtype=torch.bool)
        full_live[rows[live]] = True
        pos, div, t_logits = (_scatter(x, rows, B) for x in (pos, div, t_logits))
        draft = _scatter(draft, rows, B) if draft is not None else None
        inter = rule.intervene(pos, div, draft, t_logits) & full_live
        rule.accept(full_live, pos, div, inter)
        return inter[rows]
    inter = rule.intervene(pos, div, draft, t_logits) & live
    rule.accept(live, pos, div, inter)
    return inter


def _scatter(x: torch.Tensor, rows: torch.Tensor, B: int) -> torch.Tensor:
    full = x.new_zeros((B,) + x.shape[1:])
    full[rows] = x
    return full


def _take_student(s_logits, draft, s_tok, take, noise, pos, temperature) -> torch.Tensor:
    """The teacher's ``draft``, with the student's own draw where ``take`` (drawn for those
    rows only, unless ``s_tok`` already holds every row's draw)."""
    if not take.any():
        return draft
    if s_tok is not None:
        return torch.where(take, s_tok, draft)
    rows = torch.nonzero(take).flatten()
    tok = draft.clone()
    tok[rows] = draw(s_logits[rows], noise.select(rows.tolist()), "student", pos[rows], temperature)
    return tok


class BlockPlanner:
    """Chooses who drafts and how far: the role and the draft length k that maximise the expected
    kept tokens per unit of cost.

    A row keeps the drafter's tokens while the drafter is the one that writes, so with an
    intervention rate r the per-position continuation is a = 1 - r when the student drafts and
    a = r when the teacher drafts, and a block keeps E(k) = 1 + a + ... + a^(k-1) tokens (the last
    one possibly the other model's). A block costs k one-slot steps of the drafter plus one
    k-slot forward of the other model. The planner keeps a running estimate of r from the
    decisions of the recent blocks and picks the (role, k) with the best E(k) / cost; at k = 1
    the roles cost the same and the model that writes most tokens drafts (it draws a token for
    every row, the other one only where it writes).

    Costs are counted, not timed: a decode step costs what the model's weights weigh (it reads
    each once: embedding lookups aside, layers plus LM head), and each extra slot of a k-slot
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
        role: Role = "student",
        roles: tuple[Role, ...] = ("student", "teacher"),
    ):
        self.k, self.max_block, self.w = max(1, k0), max_block, smoothing
        self.role, self.roles = role, roles
        self.costs = {"student": student_cost, "teacher": teacher_cost}
        self.extra_slot = extra_slot
        self.intervention_rate: float | None = None

    def observe(self, decisions: int, interventions: int) -> None:
        if decisions:
            r = interventions / decisions
            self.intervention_rate = (
                r
                if self.intervention_rate is None
                else (1 - self.w) * self.intervention_rate + self.w * r
            )

    def cost(self, role: Role, k: int) -> float:
        other = "teacher" if role == "student" else "student"
        return k * self.costs[role] + self.costs[other] * (1 + self.extra_slot * (k - 1))

    def kept(self, role: Role, k: int) -> float:
        r = self.intervention_rate
        a = min(max(1 - r if role == "student" else r, 0.0), 0.999)
        return (1 - a**k) / (1 - a)

    def next(self) -> tuple[Role, int]:
        if self.intervention_rate is None:
            return self.role, self.k
        # at k = 1 the roles cost the same: the tie goes to the model that writes most tokens,
        # which then draws for every row while the other draws only where it writes
        first = "teacher" if self.intervention_rate > 0.5 else "student"
        order = sorted(self.roles, key=lambda r: r != first)
        self.role, self.k = max(
            ((role, k) for role in order for k in range(1, self.max_block + 1)),
            key=lambda rk: self.kept(*rk) / self.cost(*rk),
        )
        return self.role, self.k


def decode_cost(model) -> float:
    """Parameters a decode step reads (all but the input embedding, unless tied), in millions."""
    n = sum(p.numel() for p in model.parameters())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if emb.data_ptr() != head.data_ptr():
        n -= emb.numel()
    return n / 1e6
