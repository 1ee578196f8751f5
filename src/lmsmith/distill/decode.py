"""Cached forward passes for rollouts: the plain HF path, and a lean one for Llama-family models.

A rollout calls ``dec(ids, attn, pos_ids, keep)`` again and again: ``ids`` (B, q) are the new
slots, ``attn`` (B, L + q) marks which of all slots so far are valid, ``pos_ids`` (B, q) are the
new slots' positions. Both decoders hold the key/value cache between calls.

``HFDecoder`` is the model's own forward with its default dynamic cache. ``LeanDecoder`` computes
the same function for ``LlamaForCausalLM`` (SmolLM2, the tiny test models) with what a decode
step does not need stripped away: the cache is preallocated (a slice assignment per layer and
call, no concatenation that copies the whole cache every step), the q/k/v and gate/up projections
are fused into one matmul each, the rotary tables are computed once per call, and there are no
mask builders, hooks or output objects. The per-call overhead is what dominates a decode step of
a small model with a small batch on a CPU, so this is where a rollout's time goes.

Numerically the lean forward equals HF's up to the rounding of a different matmul grouping
(≈1e-6 in fp32); tests/distill/test_decode.py checks its logits against the HF forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class HFDecoder:
    """The model's own forward with its default (dynamic) KV cache."""

    def __init__(self, model):
        self.model, self.cache = model, None

    def __call__(self, ids, attn, pos_ids, keep: int = 0) -> torch.Tensor:
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


def lean_supported(model) -> bool:
    """A plain Llama causal LM whose forward LeanDecoder reproduces exactly."""
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

    def __init__(self, model, batch: int, capacity: int, dtype=None, weights=None):
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
def prepare_weights(model, dtype=None) -> tuple:
    """The weights LeanDecoder reads: per layer (input norm, fused q/k/v, o, post norm, fused
    gate/up, down), then embedding, final norm, LM head and the rotary inverse frequencies."""
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


def decoder(model, batch: int, capacity: int, lean: bool = True, dtype=None, weights=None):
    """The lean decoder where the model supports it (and ``lean``), else the HF one."""
    if lean and lean_supported(model):
        return LeanDecoder(model, batch, capacity, dtype, weights)
    return HFDecoder(model)
