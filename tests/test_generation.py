"""lmsmith.generation: the lean decoder against the HF forward, seeded Gumbel-max sampling,
and the batched ``generate`` front end."""

import pytest
import torch

from lmsmith.generation import (
    HFDecoder,
    LeanDecoder,
    Noise,
    decoder,
    draw,
    generate,
    lean_supported,
    left_pad,
    sample_rollout,
)
from lmsmith.models import tiny_causal_lm

PAD = 0

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


# ---------------------------------------------------------------- sampling


def test_draw_samples_the_softmax():
    probs = torch.tensor([0.2, 0.5, 0.3])
    logits = probs.log().expand(4000, 3)
    noise = Noise.draw(4000, seed=0)
    toks = draw(logits, noise, "student", torch.zeros(4000, dtype=torch.long))
    freq = torch.bincount(toks, minlength=3).float() / 4000
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)
    assert draw(logits[:1], noise, "student", torch.zeros(1), greedy=True).item() == 1
    # temperature sharpens towards the argmax
    cold = draw(logits, noise, "student", torch.zeros(4000, dtype=torch.long), temperature=0.1)
    assert (cold == 1).float().mean() > 0.95


def test_noise_depends_on_row_position_and_stream_only():
    noise = Noise.draw(3, seed=5)
    pos = torch.tensor([0, 4, 7])
    g = noise.gumbel("student", pos, 50)
    assert torch.equal(noise.select([2]).gumbel("student", pos[2:], 50), g[2:])
    assert not torch.equal(noise.gumbel("teacher", pos, 50), g)
    assert not torch.equal(Noise.draw(3, seed=6).gumbel("student", pos, 50), g)
    assert torch.isfinite(g).all()


def test_noise_is_splitmix64_of_the_row_key_bit_for_bit():
    """The int64 tensor arithmetic equals the uint64 generator written with Python integers."""
    import math

    from lmsmith.generation import _C1, _C2, _GAMMA, _M64, _mix

    def reference(key: int, v: int) -> float:
        z = (key + (v + 1) * _GAMMA) & _M64
        z = ((z ^ (z >> 30)) * _C1) & _M64
        z = ((z ^ (z >> 27)) * _C2) & _M64
        z ^= z >> 31
        u = (z >> 11) * 2.0**-53
        return -math.log(-math.log(u))

    noise = Noise((1 << 63) + 12345, (0, 7, 2**40))  # a seed and row ids beyond 32 bits
    pos = torch.tensor([0, 3, 1000])
    g = noise.gumbel("teacher", pos, 300)
    for b, (row, t) in enumerate(zip(noise.rows, pos.tolist())):
        key = _mix(noise.seed, 2, row, t)
        for v in (0, 1, 2, 150, 299):
            assert g[b, v].item() == pytest.approx(reference(key, v), rel=1e-6)
    # a Gumbel(0, 1) sample: mean 0.5772, variance pi^2 / 6
    big = Noise.draw(64, seed=3).gumbel("student", torch.arange(64), 4096).double()
    assert abs(big.mean().item() - 0.5772) < 0.01 and abs(big.var().item() - 1.6449) < 0.02


def test_draw_is_stable_under_rounding_noise():
    # what the equality of the two SWITCH loops rests on: a 1e-6 change in the logits (the
    # rounding of a block forward against a one-token forward) almost never moves a draw
    torch.manual_seed(0)
    logits = torch.randn(256, 5000) * 3
    noise = Noise.draw(256, seed=1)
    pos = torch.zeros(256, dtype=torch.long)
    a = draw(logits, noise, "student", pos)
    b = draw(logits + 1e-6 * torch.randn_like(logits), noise, "student", pos)
    assert torch.equal(a, b)


def test_sample_rollout_matches_generate_greedy():
    model = tiny_causal_lm(layers=2, seed=3)
    ids, mask = left_pad(PROMPTS, PAD)
    r = sample_rollout(
        model, ids, mask, 8, Noise.draw(4, seed=0), eos_id=-1, pad_id=PAD, greedy=True
    )
    for b, p in enumerate(PROMPTS):
        ref = model.generate(
            torch.tensor([p]),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=None,
        )
        assert r.tokens[b].tolist() == ref[0, len(p) :].tolist()


# ---------------------------------------------------------------- generate


def test_generate_is_seeded_and_batch_independent_in_order(tiny):
    model, tok = tiny
    prompts = ["ab", "a much longer prompt", "xyz"]
    a = generate(model, tok, prompts, max_new_tokens=6, seed=1, batch_size=2)
    b = generate(model, tok, prompts, max_new_tokens=6, seed=1, batch_size=2)
    c = generate(model, tok, prompts, max_new_tokens=6, seed=2, batch_size=2)
    assert a == b and a != c and len(a) == 3


def test_greedy_left_padding_matches_unpadded(tiny):
    model, tok = tiny
    prompts = ["hello there", "x"]
    batched = generate(model, tok, prompts, max_new_tokens=5, greedy=True, batch_size=2)
    alone = [generate(model, tok, [p], max_new_tokens=5, greedy=True)[0] for p in prompts]
    assert batched == alone


def test_lean_engine_is_seeded_and_left_padding_safe(tiny):
    model, tok = tiny
    prompts = ["ab", "a much longer prompt", "xyz"]
    a = generate(model, tok, prompts, max_new_tokens=6, seed=1, batch_size=2, engine="lean")
    b = generate(model, tok, prompts, max_new_tokens=6, seed=1, batch_size=2, engine="lean")
    c = generate(model, tok, prompts, max_new_tokens=6, seed=2, batch_size=2, engine="lean")
    assert a == b and a != c and len(a) == 3
    # greedy: a left-padded batch writes what each prompt writes alone
    batched = generate(model, tok, prompts, max_new_tokens=5, greedy=True, engine="lean")
    alone = [
        generate(model, tok, [p], max_new_tokens=5, greedy=True, engine="lean")[0] for p in prompts
    ]
    assert batched == alone


def test_lean_engine_without_the_lean_decoder_writes_what_hf_writes(tiny, monkeypatch):
    """A model the lean decoder does not cover falls back to the HF forward in its own dtype:
    greedy answers then equal HF generate's exactly, EOS and padding included."""
    import lmsmith.generation as generation

    model, tok = tiny
    monkeypatch.setattr(generation, "lean_supported", lambda m: False)
    prompts = ["hello there", "x", "a much longer prompt here"]
    hf = generate(model, tok, prompts, max_new_tokens=8, greedy=True, batch_size=2)
    lean = generate(model, tok, prompts, max_new_tokens=8, greedy=True, batch_size=2, engine="lean")
    assert lean == hf
    with pytest.raises(ValueError, match="engine"):
        generate(model, tok, prompts, max_new_tokens=4, engine="vllm")


def test_select_rows_keeps_those_rows_caches():
    """Dropping rows from the cache mid-decode: the kept rows continue as in the full batch."""
    model = tiny_causal_lm(layers=2, seed=7, kv_heads=2)
    ids, mask = left_pad(PROMPTS, 0)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    nxt = torch.tensor([[3], [4], [5], [6]])
    attn = torch.cat([mask, torch.ones(4, 1, dtype=mask.dtype)], 1)
    n = mask.sum(-1, keepdim=True)
    keep = torch.tensor([3, 1])
    for dec in (HFDecoder(model), LeanDecoder(model, 4, 16)):
        ref = HFDecoder(model)
        ref(ids, mask, pos, keep=1)
        full = ref(nxt, attn, n)[keep]
        dec(ids, mask, pos, keep=1)
        dec.select_rows(keep)
        got = dec(nxt[keep], attn[keep], n[keep])
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


def test_fill_row_writes_a_new_prompt_into_a_finished_row():
    """Continuous batching: after grow + fill_row, the row decodes its new prompt as a fresh
    decoder would (the row's older slots masked out)."""
    model = tiny_causal_lm(layers=2, seed=8, kv_heads=2)
    ids, mask = left_pad(PROMPTS, 0)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    dec = LeanDecoder(model, 4, 8)
    dec(ids, mask, pos, keep=1)
    new = torch.tensor([40, 41, 42, 43, 44, 45, 46, 47, 48])  # longer than the 7 slots so far
    dec.grow(len(new) - 1 - dec.length)
    dec.fill_row(2, new[:-1], torch.arange(len(new) - 1))
    attn = torch.cat([mask, torch.zeros(4, dec.length - mask.shape[1], dtype=mask.dtype)], 1)
    attn[2] = 0
    attn[2, -(len(new) - 1) :] = 1
    attn = torch.cat([attn, torch.ones(4, 1, dtype=attn.dtype)], 1)
    n = attn[:, :-1].sum(-1, keepdim=True)
    feed = torch.tensor([[3], [4], [48], [6]])
    got = dec(feed, attn, n)
    ref = HFDecoder(model)
    torch.testing.assert_close(
        got[2:3], ref(new[None], torch.ones(1, 9), torch.arange(9)[None], keep=1)
    )
    fresh = HFDecoder(model)
    fresh(ids, mask, pos, keep=1)
    keep = torch.tensor([0, 1, 3])
    att0 = torch.cat([mask, torch.ones(4, 1, dtype=mask.dtype)], 1)
    want = fresh(feed, att0, mask.sum(-1, keepdim=True))[keep]
    torch.testing.assert_close(got[keep], want, rtol=1e-5, atol=1e-5)


def test_no_repeat_ngram_size_bans_repeats_on_hf_and_is_refused_on_lean(tiny):
    model, tok = tiny
    prompts = ["ab", "hello"]
    plain = generate(model, tok, prompts, max_new_tokens=30, greedy=True)
    banned = generate(model, tok, prompts, max_new_tokens=30, greedy=True, no_repeat_ngram_size=2)
    # character-level tokens: a 2-gram ban leaves no repeated pair of characters in the answer
    for a in banned:
        pairs = [a[i : i + 2] for i in range(len(a) - 1)]
        assert len(pairs) == len(set(pairs))
    assert any(len({a[i : i + 2] for i in range(len(a) - 1)}) < len(a) - 1 for a in plain)
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        generate(model, tok, prompts, engine="lean", no_repeat_ngram_size=2)
