"""Decoding shared by evaluation, distillation and dialogue: a lean decoder and seeded sampling.

Cached forward passes. A rollout calls ``dec(ids, attn, pos_ids, keep)`` again and again:
``ids`` (B, q) are the new slots, ``attn`` (B, L + q) marks which of all slots so far are
valid, ``pos_ids`` (B, q) are the new slots' positions. Both decoders hold the key/value cache
between calls.

``HFDecoder`` is the model's own forward with its default dynamic cache. ``LeanDecoder`` computes
the same function for ``LlamaForCausalLM`` (SmolLM2, the tiny test models) with what a decode
step does not need stripped away: the cache is preallocated (a slice assignment per layer and
call, no concatenation that copies the whole cache every step), the q/k/v and gate/up projections
are fused into one matmul each, the rotary tables are computed once per call, and there are no
mask builders, hooks or output objects. The per-call overhead is what dominates a decode step of
a small model with a small batch on a CPU, so this is where a rollout's time goes. Numerically the
lean forward equals HF's up to the rounding of a different matmul grouping (≈1e-6 in fp32);
tests/test_generation.py checks its logits against the HF forward.

Sampling. For every row ``b``, response position ``t`` and stream (student, teacher), ``Noise``
derives a vector of Gumbel noise over the vocabulary from a hash of (seed, stream, row, t), with a
counter-based generator (splitmix64) computed on the logits' device. A
token is the argmax of logits/T plus that noise (the Gumbel-max trick: an exact sample of
softmax(logits/T)), so the result does not depend on the order in which positions are computed,
nor on which other rows share the batch. That is what lets lmsmith.distill's draft-and-verify
SWITCH rollout equal the naive token-by-token loop, token for token.

Gumbel-max rather than inverse-CDF sampling: a draw by inverse CDF flips to the neighbouring token
whenever the uniform falls within the rounding error of a CDF boundary, and over a 49k vocabulary
the cumulated rounding of a one-token forward against a block forward (~1e-6) made the two loops
disagree within a few hundred tokens of SmolLM2. An argmax flips only on a near tie.

``generate`` is the batched text-in, text-out front end (transformers ``generate``, or the lean
decoder with Gumbel-max draws).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmsmith.data.instruct import tokenize_prompt
from lmsmith.precision import Precision, resolve_precision, torch_dtype

Engine = Literal["hf", "lean"]


class HFDecoder:
    """The model's own forward with its default (dynamic) KV cache."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.cache = model, None

    def __call__(self, ids, attn, pos_ids, keep: int = 0) -> torch.Tensor:
        """Feed new slots ``ids`` (B, q) → logits (B, q, V), or the last ``keep`` columns."""
        out = self.model(
            input_ids=ids,
            attention_mask=attn,
            position_ids=pos_ids,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        self.cache = out.past_key_values
        return out.logits

    def select_rows(self, idx: torch.Tensor) -> None:
        """Keep only batch rows ``idx`` (a 1-D index) of the cache, in that order."""
        if self.cache is not None:
            self.cache.batch_select_indices(idx.to(next(self.model.parameters()).device))


def lean_supported(model: torch.nn.Module) -> bool:
    """Whether ``LeanDecoder`` reproduces the model's forward.

    Args:
        model: any causal LM.

    Returns:
        True for a plain ``LlamaForCausalLM`` (SiLU MLP, no biases, default rotary, no adapter
        layers injected in place).
    """
    c = model.config
    rope = getattr(c, "rope_parameters", None) or {}
    return (
        type(model).__name__ == "LlamaForCausalLM"
        # adapters injected in place (LoRA layers) would be read as their base weights
        and all(
            type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear)
        )
        and c.hidden_act == "silu"
        and not getattr(c, "attention_bias", False)
        and not getattr(c, "mlp_bias", False)
        and getattr(c, "pretraining_tp", 1) == 1
        and rope.get("rope_type", "default") == "default"
    )


class LeanDecoder:
    """Decode-only forward of a ``LlamaForCausalLM`` with a preallocated KV cache.

    The weights are read from the model when the decoder is built (fused copies of q/k/v and
    gate/up; cast to ``dtype`` when given), so build a new decoder after the model's weights
    change. ``weights`` reuses the prepared weights of another decoder of the same model.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        batch: int,
        capacity: int,
        dtype: torch.dtype | None = None,
        weights: tuple | None = None,
    ):
        c = model.config
        self.n_heads, self.n_kv = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps = c.rms_norm_eps
        p = next(model.parameters())
        if weights is not None:  # prepared elsewhere: their dtype decides
            dtype = weights[3].dtype
        self.dtype, self.device = dtype or p.dtype, p.device
        self.weights = weights if weights is not None else prepare_weights(model, self.dtype)
        self.layers, self.embed, self.norm, self.lm_head, self.inv_freq = self.weights
        self.batch, self.length = batch, 0
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        shape = (self.batch, self.n_kv, capacity, self.head_dim)
        new = [
            (
                torch.zeros(shape, dtype=torch.float32, device=self.device),
                torch.zeros(shape, dtype=torch.float32, device=self.device),
            )
            for _ in self.layers
        ]
        if self.length:  # grow: keep what is cached
            for (k, v), (k_old, v_old) in zip(new, self.cache):
                k[:, :, : self.length] = k_old[:, :, : self.length]
                v[:, :, : self.length] = v_old[:, :, : self.length]
        self.cache, self.capacity = new, capacity

    def select_rows(self, idx: torch.Tensor) -> None:
        """Keep only batch rows ``idx`` (a 1-D index) of the cache, in that order: a rollout
        drops its finished rows so that later steps compute only the live ones."""
        idx = idx.to(self.device)
        self.cache = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in self.cache]
        self.batch = len(idx)

    def grow(self, n: int) -> None:
        """Add ``n`` slots to every row, to be masked out by the caller's ``attn`` (their
        contents are stale): room at the end for a prompt that ``fill_row`` writes."""
        if self.length + n > self.capacity:
            self._alloc(max(2 * self.capacity, self.length + n))
        self.length += n

    def drop_front(self, n: int) -> None:
        """Forget the first ``n`` slots of every row (no row attends to them any more; the caller
        drops them from ``attn`` too): the cache keeps views, nothing is copied."""
        self.cache = [(k[:, :, n:], v[:, :, n:]) for k, v in self.cache]
        self.capacity -= n
        self.length -= n

    @torch.no_grad()
    def fill_row(self, row: int, ids: torch.Tensor, pos_ids: torch.Tensor) -> None:
        """Write a new prompt ``ids`` (q,) at positions ``pos_ids`` (q,) into the last q slots of
        batch row ``row``, attending to itself only: continuous batching puts a waiting prompt
        in the row of a finished one (the caller masks the row's older slots out)."""
        q, L = len(ids), self.length
        if q > L:
            raise ValueError(f"a {q}-token prompt does not fit the last {L} slots; grow first")
        if q == 0:
            return
        causal = torch.ones(q, q, dtype=torch.bool, device=ids.device).tril()
        self._run(
            ids.unsqueeze(0),
            pos_ids.unsqueeze(0),
            causal.unsqueeze(0),
            slice(row, row + 1),
            L - q,
            L - q,
        )

    def _attend(self, qs, ks, vs, bias):
        """Grouped-query attention in fp32, written out: at decode sizes (a few query slots, a
        few hundred keys) two batched matmuls and a softmax are faster on a CPU than the fused
        kernel (0.17 against 0.21 ms for one slot, 0.38 against 0.55 for four; 2-3x slower in
        bf16, hence the fp32 cache). qs (B, H, q, D), ks/vs (B, Hkv, L, D) → (B, H, q, D)."""
        B, H, q, D = qs.shape
        Hkv, L = ks.shape[1], ks.shape[2]
        qg = qs.reshape(B, Hkv, (H // Hkv) * q, D)  # query heads grouped by their kv head
        scores = (qg @ ks.transpose(-1, -2)) * D**-0.5
        probs = (scores.view(B, Hkv, H // Hkv, q, L) + bias).softmax(-1)
        return (probs.view(B, Hkv, (H // Hkv) * q, L) @ vs).view(B, H, q, D).to(self.dtype)

    def _rms(self, x, w):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * x32.to(x.dtype)

    @torch.no_grad()
    def __call__(self, ids, attn, pos_ids, keep: int = 0) -> torch.Tensor:
        """Feed new slots ``ids`` (B, q) → logits (B, q, V), or the last ``keep`` columns."""
        B, q = ids.shape
        L = self.length
        if attn.shape != (B, L + q):
            raise ValueError(f"attn has shape {tuple(attn.shape)}, expected {(B, L + q)}")
        if L + q > self.capacity:
            self._alloc(max(2 * self.capacity, L + q))
        if L == 0 and keep > 0 and q > 1 and B > 1:
            packed = self._prefill_rows(ids, attn, pos_ids, keep)
            if packed is not None:
                return packed
        # slot j is visible to new slot i when valid and j <= L + i; a slot always sees itself,
        # so a padding query never has an empty row (its output is never read)
        slots = torch.arange(L + q, device=ids.device)
        causal = slots.unsqueeze(0) <= (L + torch.arange(q, device=ids.device)).unsqueeze(1)
        visible = attn.bool().unsqueeze(1) & causal.unsqueeze(0)  # (B, q, L+q)
        diag = torch.arange(q, device=ids.device)
        visible[:, diag, L + diag] = True
        x = self._run(ids, pos_ids, visible, slice(None), L, 0)
        self.length = L + q
        h = self._rms(x if keep <= 0 else x[:, -keep:], self.norm)
        return F.linear(h, self.lm_head)

    def _prefill_rows(self, ids, attn, pos_ids, keep):
        """A left-padded prompt batch, row by row over each row's real tokens only: the padding
        of a batch of prompts of mixed lengths is often more than half of its slots, and a
        prefill is compute, not weight reads. None where a row is not a contiguous suffix."""
        B, q = ids.shape
        valid = attn.bool()
        n = valid.sum(-1)
        if not bool((valid == (torch.arange(q, device=ids.device) >= q - n.unsqueeze(1))).all()):
            return None
        if int(n.sum()) > 0.75 * B * q:  # little padding: one batched pass is cheaper
            return None
        out = []
        for b in range(B):
            first = q - int(n[b])
            if first == q:  # an empty row: its slots stay masked
                out.append(
                    torch.zeros(
                        1, keep, self.lm_head.shape[0], dtype=self.dtype, device=self.device
                    )
                )
                continue
            m = q - first
            causal = torch.ones(m, m, dtype=torch.bool, device=ids.device).tril()
            x = self._run(
                ids[b : b + 1, first:],
                pos_ids[b : b + 1, first:],
                causal.unsqueeze(0),
                slice(b, b + 1),
                first,
                first,
            )
            x = x[:, -keep:] if m >= keep else F.pad(x, (0, 0, keep - m, 0))
            out.append(F.linear(self._rms(x, self.norm), self.lm_head))
        self.length = q
        return torch.cat(out)

    def _run(self, ids, pos_ids, visible, rows, start: int, key_start: int) -> torch.Tensor:
        """The layers over new slots [start, start+q) of cache rows ``rows``, attending to slots
        [key_start, start+q) as ``visible`` (B, q, start+q-key_start) allows. → hidden (B, q, d)."""
        B, q = ids.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        # rotary tables for the new positions, shared by every layer
        freqs = pos_ids.float().unsqueeze(-1) * self.inv_freq  # (B, q, D/2)
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = emb.cos().to(self.dtype).unsqueeze(1), emb.sin().to(self.dtype).unsqueeze(1)
        bias = torch.zeros(visible.shape, device=ids.device).masked_fill_(~visible, float("-inf"))
        bias = bias[:, None, None]  # (B, 1, 1, q, keys), added to every layer's scores
        end = start + q
        x = self.embed[ids]  # (B, q, d)
        for (w_in, w_qkv, w_o, w_post, w_gu, w_down), (kc, vc) in zip(self.layers, self.cache):
            qkv = F.linear(self._rms(x, w_in), w_qkv)  # (B, q, (H + 2Hkv)·D)
            qs, ks, vs = qkv.split([H * D, Hkv * D, Hkv * D], -1)
            qs = qs.view(B, q, H, D).transpose(1, 2)  # (B, H, q, D)
            ks = ks.view(B, q, Hkv, D).transpose(1, 2)
            qs = qs * cos + _rotate_half(qs) * sin
            kc[rows, :, start:end] = ks * cos + _rotate_half(ks) * sin
            vc[rows, :, start:end] = vs.view(B, q, Hkv, D).transpose(1, 2)
            a = self._attend(
                qs.float(), kc[rows, :, key_start:end], vc[rows, :, key_start:end], bias
            )
            x = x + F.linear(a.transpose(1, 2).reshape(B, q, H * D), w_o)
            g, u = F.linear(self._rms(x, w_post), w_gu).chunk(2, -1)
            x = x + F.linear(F.silu(g) * u, w_down)
        return x


@torch.no_grad()
def prepare_weights(model: torch.nn.Module, dtype: torch.dtype | None = None) -> tuple:
    """The weights ``LeanDecoder`` reads, prepared once and shareable between decoders.

    Args:
        model: a model for which ``lean_supported`` holds.
        dtype: cast the copies to this dtype (default: the model's own).

    Returns:
        ``(layers, embedding, final norm, LM head, rotary inverse frequencies)``, where each
        layer is (input norm, fused q/k/v, o, post norm, fused gate/up, down).
    """
    m = model.model

    def w(t):
        return t.detach().to(dtype) if dtype is not None else t.detach()

    layers = [
        (
            w(layer.input_layernorm.weight),
            w(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),  # (Hq·D+2·Hkv·D, d)
            w(a.o_proj.weight),
            w(layer.post_attention_layernorm.weight),
            w(torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight])),  # (2·I, d)
            w(layer.mlp.down_proj.weight),
        )
        for layer in m.layers
        for a in [layer.self_attn]
    ]
    return (
        layers,
        w(m.embed_tokens.weight),
        w(m.norm.weight),
        w(model.lm_head.weight),
        m.rotary_emb.inv_freq.detach().float(),
    )


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def decoder(
    model: torch.nn.Module,
    batch: int,
    capacity: int,
    lean: bool = True,
    dtype: torch.dtype | None = None,
    weights: tuple | None = None,
) -> HFDecoder | LeanDecoder:
    """A cached decoder for ``model``.

    Args:
        model: the causal LM.
        batch: rows decoded together.
        capacity: slots to preallocate (the lean cache grows past it when needed).
        lean: use ``LeanDecoder`` where ``lean_supported(model)``.
        dtype: the lean decoder's weight dtype (default: the model's).
        weights: weights from ``prepare_weights`` to reuse.

    Returns:
        A ``LeanDecoder`` where the model supports it and ``lean``, else an ``HFDecoder``.
    """
    if lean and lean_supported(model):
        return LeanDecoder(model, batch, capacity, dtype, weights)
    return HFDecoder(model)


# --------------------------------------------------------------------------------------------
# Seeded sampling

_STREAMS = {"student": 1, "teacher": 2}
_M64 = 0xFFFFFFFFFFFFFFFF
_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment (the golden ratio)
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # its output mixer's multipliers


def _mix(*xs: int) -> int:
    """splitmix64 over a tuple of integers: a seed per (run seed, stream, row, position)."""
    h = _GAMMA
    for x in xs:
        h = (h ^ (x & _M64)) * _C1 & _M64
        h = (h ^ (h >> 31)) * _C2 & _M64
        h ^= h >> 29
    return h


def _signed(x: int) -> int:
    """A uint64 as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(h: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (h >> s) & ((1 << (64 - s)) - 1)


def splitmix64(key: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """Output ``counter`` (0-based) of the splitmix64 generator seeded with ``key``, as int64
    bit patterns; ``key`` and ``counter`` broadcast. Wrapping int64 arithmetic gives the uint64
    result bit for bit on every device (checked against Python integers in the tests). Written
    in place on one buffer: on a CPU, fresh (B, V) buffers cost more than the arithmetic."""
    h = (counter + 1) * _signed(_GAMMA) + key
    t = torch.empty_like(h)
    for s, c in ((30, _C1), (27, _C2), (31, None)):
        torch.bitwise_right_shift(h, s, out=t)
        h ^= t.bitwise_and_((1 << (64 - s)) - 1)
        if c is not None:
            h *= _signed(c)
    return h


@dataclass
class Noise:
    """Gumbel noise per (row, response position, stream), derived on demand from a seed.

    ``rows`` are the global ids of the batch rows (``select`` keeps a subset with their noise).
    A distributed trainer gives each row its index in the run's stream of rows, so a row's noise
    does not depend on which process, micro-batch or batch neighbours it has.
    """

    seed: int
    rows: tuple[int, ...]

    @classmethod
    def draw(cls, batch: int, seed: int) -> Noise:
        """The noise of rows 0 .. batch-1 under ``seed`` (any number of positions)."""
        return cls(seed, tuple(range(batch)))

    def select(self, idx: list[int]) -> Noise:
        """The noise of batch rows ``idx`` (each keeps its global row id, so its draws)."""
        return Noise(self.seed, tuple(self.rows[i] for i in idx))

    def gumbel(self, stream: str, pos: torch.Tensor, vocab: int, device=None) -> torch.Tensor:
        """(B, V) Gumbel(0, 1) noise (float32, on ``device``) for row b at response position pos[b].

        Counter-based and drawn where the logits are: element v of a row is output v of a
        splitmix64 generator keyed by the 64-bit hash of (seed, stream, row, position), computed
        with int64 tensor arithmetic on ``device``, so the noise is the same on a CPU and a GPU
        and costs a few elementwise kernels instead of a host-side loop. The uniforms take 53 bits
        and the logs run in float64, so the tail is not cut at float32's 24-bit uniforms."""
        keys = [
            _signed(_mix(self.seed, _STREAMS[stream], row, t))
            for row, t in zip(self.rows, pos.tolist())
        ]
        key = torch.tensor(keys, dtype=torch.int64, device=device).unsqueeze(1)  # (B, 1)
        h = splitmix64(key, torch.arange(vocab, dtype=torch.int64, device=device))  # (B, V)
        u = _shr(h, 11).double().mul_(2.0**-53)  # [0, 1): 0 gives -inf (never drawn), < 1 finite
        return u.log_().neg_().log_().neg_().float()


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
        """Share of the written tokens that the teacher wrote (0 when nothing was written)."""
        n = int(self.mask.sum())
        return float(self.teacher_wrote[self.mask].sum()) / n if n else 0.0


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists on the left into one batch.

    Args:
        prompts: B non-empty lists of token ids.
        pad_id: the id written in the padding.

    Returns:
        ``(ids, mask)``, both (B, P) long, P the longest prompt; mask is 1 on real tokens.
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def draw(
    logits: torch.Tensor,
    noise: Noise,
    stream: str,
    pos: torch.Tensor,
    temperature: float = 1.0,
    greedy: bool = False,
) -> torch.Tensor:
    """One token per row: argmax(logits / T + Gumbel noise of (row, pos[b])).

    Args:
        logits: (B, V) next-token logits.
        noise: the rows' noise.
        stream: ``"student"`` or ``"teacher"``: which noise stream to read.
        pos: (B,) response position of each row.
        temperature: divides the logits.
        greedy: take the plain argmax (no noise).

    Returns:
        (B,) long token ids.
    """
    if greedy:
        return logits.argmax(-1)
    g = noise.gumbel(stream, pos, logits.shape[-1], device=logits.device)
    return (logits.float() / temperature + g).argmax(-1)


@torch.no_grad()
def sample_rollout(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new: int,
    noise: Noise,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    greedy: bool = False,
    lean: bool = True,
    stream: str = "student",
    dtype: torch.dtype | None = None,
    weights=None,
) -> Rollout:
    """One model writes every response token, with the KV cache, stopping rows at EOS.

    Args:
        model: the causal LM that writes (a distillation student, or the teacher for SeqKD).
        prompt_ids: (B, P) left-padded prompts.
        prompt_mask: (B, P) 1 on real prompt tokens.
        max_new: response tokens at most.
        noise: the rows' Gumbel noise (the same noise gives the same tokens).
        eos_id: ends a row (written, then padding).
        pad_id: fills the rest.
        temperature: sampling temperature.
        greedy: argmax instead of sampling.
        lean: decode through ``LeanDecoder`` where the model allows it.
        stream: the noise stream, ``"student"`` or ``"teacher"``.
        dtype: the lean decoder's weight dtype (default: the model's).
        weights: ``prepare_weights(model, dtype)`` computed beforehand, if any.

    Returns:
        A ``Rollout`` whose ``tokens`` (B, max_new) and ``mask`` hold what was written.
    """
    B, P = prompt_ids.shape
    dec = decoder(model, B, P + max_new, lean, dtype, weights)
    attn = prompt_mask.clone()
    pos_ids = (attn.cumsum(-1) - 1).clamp_min(0)
    nxt = dec(prompt_ids, attn, pos_ids, keep=1)[:, -1]
    n_valid = attn.sum(-1)
    tokens = torch.full((B, max_new), pad_id, dtype=torch.long)
    mask = torch.zeros((B, max_new), dtype=torch.bool)
    done = torch.zeros(B, dtype=torch.bool)
    for t in range(max_new):
        tok = draw(nxt, noise, stream, torch.full((B,), t), temperature, greedy)
        live = ~done
        tokens[live, t] = tok[live]
        mask[live, t] = True
        done = done | (tok == eos_id)
        if done.all() or t == max_new - 1:
            break
        attn = torch.cat([attn, (~done).long().unsqueeze(1)], 1)
        feed = torch.where(done, torch.full_like(tok, pad_id), tok).unsqueeze(1)
        nxt = dec(feed, attn, n_valid.unsqueeze(1))[:, -1]
        n_valid = n_valid + (~done).long()
    return Rollout(
        prompt_ids,
        prompt_mask,
        tokens,
        mask,
        teacher_wrote=torch.zeros_like(mask),
        divergence=torch.full(mask.shape, math.nan),
    )


# --------------------------------------------------------------------------------------------
# Text in, text out


def check_engine(
    engine: str, top_p: float, precision: str = "auto", no_repeat_ngram_size: int = 0
) -> None:
    """Refuse a decoding setup ``generate`` cannot honour.

    Args:
        engine: ``"hf"`` or ``"lean"``.
        top_p: nucleus mass; the lean engine samples the full distribution (top-p 1 only).
        precision: ``auto``, ``fp32`` or ``bf16``; bf16 applies to the lean engine only.

    Raises:
        ValueError: naming the offending argument.
    """
    if engine not in ("hf", "lean"):
        raise ValueError(f"engine must be 'hf' or 'lean', got {engine!r}")
    if engine == "lean" and top_p < 1:
        raise ValueError("engine 'lean' samples from the full distribution: top_p must be 1")
    if no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0, got {no_repeat_ngram_size}")
    if engine == "lean" and no_repeat_ngram_size:
        raise ValueError(
            "no_repeat_ngram_size needs engine 'hf' (the lean engine has no n-gram ban)"
        )
    if engine == "hf" and precision == "bf16":
        raise ValueError(
            "precision bf16 applies to engine 'lean'; engine 'hf' generates in the model's dtype"
        )


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 256,
    greedy: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    max_prompt_tokens: int = 256,
    progress: bool = False,
    engine: Engine = "hf",
    precision: Precision = "auto",
    no_repeat_ngram_size: int = 0,
) -> list[str]:
    """Batched generation with left padding and the KV cache.

    Prompts are cut to their last ``max_prompt_tokens`` tokens and generated in length-sorted
    batches; each batch draws its seed from ``seed``, so the answers are reproducible and do not
    depend on which other prompts share a batch (greedy: exactly; sampling: per seed).

    ``engine="lean"`` decodes with ``LeanDecoder`` in ``precision`` where the model is a plain
    Llama (else the HF forward) and Gumbel-max draws keyed by (seed, row, position): the
    distribution of ``hf`` sampling at top-p 1 (up to bf16 rounding of the weights when the
    precision resolves to bf16), not the same samples.

    Args:
        model: a causal LM (``transformers`` ``PreTrainedModel``); put in eval mode.
        tokenizer: its tokenizer (the EOS token ends an answer; pad falls back to EOS).
        prompts: the texts to continue, as they are (no template is applied).
        max_new_tokens: tokens generated per answer at most.
        greedy: argmax decoding instead of sampling.
        temperature: sampling temperature.
        top_p: nucleus sampling mass (``hf`` engine only; ``lean`` needs 1).
        seed: the run's seed.
        batch_size: prompts generated together.
        max_prompt_tokens: prompts are cut to their last N tokens.
        progress: show a progress bar.
        engine: ``"hf"`` (transformers ``generate``) or ``"lean"``.
        precision: decode precision of the lean engine (``auto``, ``fp32``, ``bf16``).
        no_repeat_ngram_size: forbid repeating any n-gram of this size (``hf`` only; 0 = off),
            as some KD papers' evaluations do.

    Returns:
        One answer per prompt, in the order of ``prompts``, decoded without special tokens and
        stripped.
    """
    check_engine(engine, top_p, precision, no_repeat_ngram_size)
    model.eval()
    device = next(model.parameters()).device
    ids = [tokenize_prompt(tokenizer, p, max_prompt_tokens)[0] for p in prompts]
    # Length-sorted batches waste less padding; answers go back to the input order.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    answers: list[str] = [""] * len(ids)
    gen = torch.Generator().manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    bar = tqdm(total=len(ids), desc="generate", disable=not progress, leave=False)
    weights, dtype = None, None
    if engine == "lean" and lean_supported(model):
        dtype = torch_dtype(resolve_precision(precision, device))
        weights = prepare_weights(model, dtype)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(ids[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
            attn[row, width - len(ids[i]) :] = 1
        # One seed per batch, drawn from the run's generator: reproducible and batch-local.
        batch_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        input_ids, attn = input_ids.to(device), attn.to(device)
        if engine == "lean":
            ro = sample_rollout(
                model,
                input_ids,
                attn,
                max_new_tokens,
                Noise.draw(len(idx), batch_seed),
                eos,
                pad,
                temperature,
                greedy,
                lean=weights is not None,
                dtype=dtype,
                weights=weights,
            )
            written = [row[m].tolist() for row, m in zip(ro.tokens, ro.mask)]
        else:
            torch.manual_seed(batch_seed)
            kwargs = (
                dict(do_sample=False)
                if greedy
                else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            )
            if no_repeat_ngram_size:
                kwargs["no_repeat_ngram_size"] = no_repeat_ngram_size
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attn,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eos,
                **kwargs,
            )
            written = out[:, width:]
        for row, i in enumerate(idx):
            answers[i] = tokenizer.decode(written[row], skip_special_tokens=True).strip()
        bar.update(len(idx))
    bar.close()
    return answers
