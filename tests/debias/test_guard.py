import torch

from lmsmith.debias.guard import guard_units, mean_nll


def test_guard_drops_a_planted_massive_activation_unit(tiny):
    model, tok = tiny
    name, j = "model.layers.0.mlp.down_proj", 5
    with torch.no_grad():  # plant a massive-activation unit: its output dominates the residual
        model.model.layers[0].mlp.down_proj.weight[j] *= 1000
        model.lm_head.weight[:, j] *= 30  # ... and the predictions read it
    # Texts the planted model finds easy: its own greedy continuations.
    texts = []
    for start in range(4):
        out = model.generate(
            torch.tensor([[3 + start, 10 + start]]), max_new_tokens=20, do_sample=False
        )
        texts.append(out[0].tolist())
    ranked = [
        ("model.layers.1.mlp.up_proj", 0, 3.0),
        (name, j, 2.0),
        ("model.layers.1.self_attn.q_proj", 1, 1.0),
        ("model.layers.0.mlp.gate_proj", 7, 0.5),
    ]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kept, checked, base = guard_units(model, tok, ranked, texts, top_k=3, max_rise=0.02)
    assert [(m, i) for m, i, _ in kept] == [(m, i) for m, i, _ in ranked if (m, i) != (name, j)]
    assert [c["dropped"] for c in checked] == [False, True, False]  # only the top 3 checked
    assert checked[1]["rise"] > 0.5  # the planted unit alone: a large NLL rise
    assert base == mean_nll(model, texts, 0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # restored
