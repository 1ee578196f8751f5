import pytest
import torch

from lmsmith.data.bbq import load_bbq
from lmsmith.debias.prompts import INSTRUCTIONS, bbq_prompt
from lmsmith.debias.scoring import Encoded, encode, match_answer, option_logprobs, score_items


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=100,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
        dropout_rate=0.0,
    )
    return T5ForConditionalGeneration(cfg).eval()


def reference_logprob(model, e: Encoded, k: int) -> float:
    """log P(option k | prompt) from one unbatched, uncached pass over the whole sequence."""
    o = e.option_ids[k]
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            lab = torch.tensor([o])
            logits = model(input_ids=torch.tensor([e.prompt_ids]), labels=lab).logits[0]
            lp = torch.log_softmax(logits, -1)
            return sum(lp[j, o[j]].item() for j in range(len(o)))
        ids = torch.tensor([e.prompt_ids + o])
        lp = torch.log_softmax(model(ids).logits[0], -1)
        p = len(e.prompt_ids)
        return sum(lp[p - 1 + j, o[j]].item() for j in range(len(o)))


def _items(tok, n=5):
    rows = load_bbq(__import__("pathlib").Path(__file__).parents[1] / "assets/bbq/Age_mini.jsonl")
    out = []
    for i, r in enumerate(rows[:n]):
        # prompts of different lengths so that the batch needs padding
        ctx = r.context + " more" * i
        out.append(
            (bbq_prompt(INSTRUCTIONS[i], ctx, r.question, r.answers, tok, False),
             [" " + a for a in r.answers])
        )  # fmt: skip
    return out


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_batched_shared_prompt_equals_reference(tiny, kind):
    model, tok = tiny
    if kind == "seq2seq":
        model = tiny_t5()
    items = _items(tok)
    enc = [encode(tok, p, o, seq2seq=kind == "seq2seq") for p, o in items]
    lp, n = option_logprobs(model, enc, pad=0)
    assert lp.shape == (5, 3)
    for i, e in enumerate(enc):
        for k in range(3):
            assert n[i, k] == len(e.option_ids[k])
            assert lp[i, k].item() == pytest.approx(reference_logprob(model, e, k), abs=1e-4)


def test_score_items_order_and_mean_norm(tiny):
    model, tok = tiny
    items = _items(tok)
    a = score_items(model, tok, items, batch_size=2, chat=False)
    b = score_items(model, tok, items, batch_size=5, chat=False)
    assert torch.allclose(a, b, atol=1e-4)
    m = score_items(model, tok, items, batch_size=3, length_norm="mean", chat=False)
    lens = torch.tensor([[len(tok(o, add_special_tokens=False)["input_ids"]) for o in opts]
                         for _, opts in items])  # fmt: skip
    assert torch.allclose(m, a / lens, atol=1e-4)


def test_match_answer():
    answers = ("The grandfather", "The grandson", "Can't be determined")
    assert match_answer("The grandson was.", answers, 2) == 1
    assert match_answer("grandfather", answers, 2) == 0
    assert match_answer("It can't be determined from the text", answers, 2) == 2
    assert match_answer("Not enough information.", answers, 2) == 2
    assert match_answer("The grandson, not the grandfather", answers, 2) == 1  # earliest wins
    assert match_answer("Paris", answers, 2) == -1


def test_shared_prefix_is_encoded_once_and_changes_nothing(tiny):
    model, tok = tiny
    items = [
        (bbq_prompt(INSTRUCTIONS[0], "A man and a boy" + " met" * i, "Who?", ("a", "b", "c"),
                      tok, False), [" the man", " the boy", " unknown"])
        for i in range(4)
    ]  # fmt: skip
    enc = [encode(tok, p, o) for p, o in items]
    calls = []
    h = model.register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True
    )
    shared, _ = option_logprobs(model, enc, pad=0)
    h.remove()
    assert calls[0][0] == 1 and calls[0][1] > 50  # the common prefix, batch of one
    assert calls[1][0] == 4  # then the four rests, then the options
    plain, _ = option_logprobs(model, enc, pad=0, share_prefix=False)
    assert torch.allclose(shared, plain, atol=1e-4)
    for i, e in enumerate(enc):
        assert shared[i, 2].item() == pytest.approx(reference_logprob(model, e, 2), abs=1e-4)
