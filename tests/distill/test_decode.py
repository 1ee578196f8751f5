import pytest
import torch

from lmsmith.distill.decode import HFDecoder, LeanDecoder, decoder, lean_supported
from lmsmith.distill.rollout import left_pad
from lmsmith.models import tiny_causal_lm

PROMPTS = [[5, 9, 14, 3], [7], [11, 12, 13, 14, 15, 16, 17], [20, 21]]


def _script(dec, ids, mask, prefill_keep=0):
    """Prefill, two single steps, a 3-slot block, a masked-out block, one more step; the logits
    of every call at its valid query slots."""
    B = ids.shape[0]
    out = []
    attn = mask.clone()
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    logits = dec(ids, attn, pos, keep=prefill_keep)
    out.append(logits[mask.bool()] if prefill_keep == 0 else logits[:, -1])
    n = attn.sum(-1)
    g = torch.Generator().manual_seed(0)
    for q, valid in [(1, True), (1, True), (3, True), (2, False), (1, True)]:
        new = torch.randint(3, 100, (B, q), generator=g)
        v = torch.ones(B, q, dtype=attn.dtype) if valid else torch.zeros(B, q, dtype=attn.dtype)
        attn = torch.cat([attn, v], 1)
        logits = dec(new, attn, n.unsqueeze(1) + torch.arange(q), keep=0)
        if valid:
            out.append(logits.reshape(-1, logits.shape[-1]))
            n = n + q
    return out


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("prefill_keep", [0, 1])  # 1: the packed (row by row) prefill
def test_lean_decoder_equals_hf_forward(kv_heads, prefill_keep):
    model = tiny_causal_lm(layers=2, seed=3, kv_heads=kv_heads)
    assert lean_supported(model)
    ids, mask = left_pad(PROMPTS, 0)
    ref = _script(HFDecoder(model), ids, mask, prefill_keep)
    # a small capacity forces the cache to grow on the way
    got = _script(LeanDecoder(model, len(PROMPTS), capacity=8), ids, mask, prefill_keep)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_keep_returns_the_last_columns_only():
    model = tiny_causal_lm(layers=1, seed=4)
    ids, mask = left_pad(PROMPTS, 0)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    full = LeanDecoder(model, 4, 16)(ids, mask, pos)
    last = LeanDecoder(model, 4, 16)(ids, mask, pos, keep=1)
    assert last.shape == (4, 1, 100)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_bf16_weights_stay_close_to_fp32():
    model = tiny_causal_lm(layers=2, seed=6, kv_heads=2)
    ids, mask = left_pad(PROMPTS, 0)
    ref = _script(HFDecoder(model), ids, mask)
    got = _script(LeanDecoder(model, len(PROMPTS), 64, dtype=torch.bfloat16), ids, mask)
    for a, b in zip(ref, got):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a, atol=0.05, rtol=0.05)


def test_unsupported_models_fall_back_to_hf():
    model = tiny_causal_lm(layers=1)
    model.config.mlp_bias = True
    assert isinstance(decoder(model, 2, 8), HFDecoder)
    assert isinstance(decoder(tiny_causal_lm(layers=1), 2, 8, lean=False), HFDecoder)

    class AdapterLinear(torch.nn.Linear):  # what peft injects in place of a projection
        pass

    lora = tiny_causal_lm(layers=1)
    lora.model.layers[0].mlp.up_proj = AdapterLinear(32, 64, bias=False)
    assert not lean_supported(lora)


def test_packed_prefill_equals_the_padded_batch():
    # prompts of very different lengths: the lean decoder prefills row by row
    model = tiny_causal_lm(layers=2, seed=5, kv_heads=2)
    prompts = [[5] * 20, [7, 8], [9, 10, 11], [12]]
    ids, mask = left_pad(prompts, 0)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    ref = HFDecoder(model)
    lean = LeanDecoder(model, 4, 64)
    torch.testing.assert_close(lean(ids, mask, pos, keep=1), ref(ids, mask, pos, keep=1)[:, -1:])
    # and the cache it left behind decodes the next token like HF's
    attn = torch.cat([mask, torch.ones(4, 1, dtype=mask.dtype)], 1)
    nxt = torch.tensor([[3], [4], [5], [6]])
    torch.testing.assert_close(
        lean(nxt, attn, mask.sum(-1, keepdim=True)), ref(nxt, attn, mask.sum(-1, keepdim=True))
    )
