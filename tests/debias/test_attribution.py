import pytest
import torch
from torch import nn

from lmsmith.debias.attribution import (
    attribute_batch,
    biased_label,
    candidate_layers,
    crispr_score,
    n_units,
    rank_units,
)
from lmsmith.debias.scoring import encode

from .test_scoring import tiny_t5


def slow_reference(model, layer_name, enc, k, positions="all"):
    """Per layer, per sequence: replace the layer output by a leaf tensor, take
    d log P / d output with autograd.grad, and max over positions of output · grad (causal LM
    with ``positions="answer"``: the last prompt token and the option tokens but the last)."""
    layer = dict(model.named_modules())[layer_name]
    holder = {}

    def hook(_m, _i, out):
        leaf = out.detach().clone().requires_grad_(True)
        holder["leaf"] = leaf
        return leaf

    h = layer.register_forward_hook(hook)
    try:
        o = enc.option_ids[k]
        if model.config.is_encoder_decoder:
            logits = model(
                input_ids=torch.tensor([enc.prompt_ids]), labels=torch.tensor([o])
            ).logits[0]
            lp = torch.log_softmax(logits, -1)
            logp = sum(lp[j, o[j]] for j in range(len(o)))
        else:
            ids = torch.tensor([enc.prompt_ids + o])
            lp = torch.log_softmax(model(ids).logits[0], -1)
            p = len(enc.prompt_ids)
            logp = sum(lp[p - 1 + j, o[j]] for j in range(len(o)))
        (g,) = torch.autograd.grad(logp, holder["leaf"])
    finally:
        h.remove()
    prod = (holder["leaf"].detach() * g)[0]  # (T, U)
    if positions == "answer" and not model.config.is_encoder_decoder:
        p = len(enc.prompt_ids)
        prod = prod[p - 1 : p + len(enc.option_ids[k]) - 1]
    return prod.amax(0)


def _check(model, tok, s2s, positions="all"):
    layers = candidate_layers(model)
    items = [
        ("Who forgot? A:", [" the old man", " the boy", " unknown"]),
        ("Context: two met.\nWho left? A:", [" him", " her", " can't tell"]),
        ("Q: who? A:", [" x", " yy", " zzz"]),
    ]
    enc = [encode(tok, p, o, seq2seq=s2s) for p, o in items]
    pairs = [(enc[0], 1), (enc[1], 0), (enc[2], 2), (enc[0], 2)]  # ragged lengths
    fast = attribute_batch(model, layers, pairs, pad=0, length_norm="sum", positions=positions)
    for name in list(layers)[:: max(1, len(layers) // 6)] + [list(layers)[-1]]:
        for row, (e, k) in enumerate(pairs):
            ref = slow_reference(model, name, e, k, positions)
            assert fast[name].shape == (len(pairs), n_units(layers[name]))
            assert torch.allclose(fast[name][row], ref, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("positions", ["answer", "all"])
def test_fast_path_equals_slow_reference_causal(tiny, positions):
    model, tok = tiny
    _check(model, tok, s2s=False, positions=positions)


@pytest.mark.parametrize("positions", ["answer", "all"])
def test_fast_path_equals_slow_reference_seq2seq(tiny, positions):
    _, tok = tiny
    _check(tiny_t5(), tok, s2s=True, positions=positions)


def test_biased_label_alpha_choices():
    logs = torch.log(torch.tensor([[0.5, 0.2, 0.1]]))  # raw option probabilities
    yhat, a = biased_label(logs, torch.tensor([0]), "prob")
    assert int(yhat) == 1 and float(a) == pytest.approx(0.2)
    _, a = biased_label(logs, torch.tensor([0]), "softmax")
    assert float(a) == pytest.approx(0.2 / 0.8)


def test_candidates_exclude_head_and_tied_embeddings(tiny):
    model, _ = tiny
    layers = candidate_layers(model)
    assert "lm_head" not in layers
    assert len(layers) == 2 * 7  # q k v o gate up down per layer
    t5 = tiny_t5()  # T5 ties lm_head to the shared embeddings by default in transformers
    names = candidate_layers(t5)
    assert all(not n.startswith("lm_head") for n in names)
    assert all(m.weight is not t5.shared.weight for m in names.values())


def test_crispr_score_formula():
    bias = torch.tensor([[1.0, 2.0, -1.0]])
    skill = torch.tensor([[0.5, -3.0, 2.0]])
    alpha = torch.tensor([0.5])
    s = crispr_score(bias, skill, alpha, lam=1.0)
    # α·b − max(0, α·s): 0.5−0.25, 1−0, −0.5−1
    assert torch.allclose(s, torch.tensor([[0.25, 1.0, -1.5]]))
    assert torch.allclose(crispr_score(bias, skill, alpha, lam=0.0), 0.5 * bias)


def test_rank_units_orders_by_score():
    scores = {"b": torch.tensor([0.1, 5.0]), "a": torch.tensor([3.0, 0.2, 5.0])}
    r = rank_units(scores, 3)
    assert [(m, i) for m, i, _ in r] == [("a", 2), ("b", 1), ("a", 0)]
    assert len(rank_units(scores)) == 5


def test_layer_called_twice_keeps_max():
    lin = nn.Linear(4, 4)
    assert n_units(lin) == 4
