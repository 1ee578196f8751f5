import torch

from lmsmith.debias.attribution import candidate_layers
from lmsmith.debias.prune import Pruner, golden_section_search, random_units, save_pruned


def _ids():
    return torch.tensor([[5, 17, 42, 9, 33, 60, 7]])


def test_pruning_n_units_zeroes_exactly_n_rows(tiny):
    model, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    units = [
        ("model.layers.0.mlp.up_proj", 3),
        ("model.layers.0.mlp.up_proj", 11),
        ("model.layers.1.self_attn.q_proj", 0),
        ("model.layers.1.mlp.down_proj", 31),
    ]
    p = Pruner(model)
    p.apply(units)
    after = model.state_dict()
    changed_rows = 0
    for k, w in after.items():
        diff = w != before[k]
        if w.dim() == 2:
            rows = diff.any(dim=1).nonzero().flatten().tolist()
            changed_rows += len(rows)
            for r in rows:
                assert (k.removesuffix(".weight"), r) in units
                assert torch.all(w[r] == 0)
        else:
            assert not diff.any(), k  # no bias / norm touched (Llama has no biases)
    assert changed_rows == len(units)
    p.restore()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_pruned_output_changes_only_through_the_units(tiny):
    model, _ = tiny
    units = [("model.layers.0.mlp.gate_proj", 2), ("model.layers.1.self_attn.v_proj", 5)]
    with torch.no_grad():
        ref_orig = model(_ids()).logits
    # The original model with those output units forced to zero by hooks ...
    mods = dict(model.named_modules())
    handles = []
    for name, j in units:

        def zero(_m, _i, out, j=j):
            out = out.clone()
            out[..., j] = 0
            return out

        handles.append(mods[name].register_forward_hook(zero))
    with torch.no_grad():
        hooked = model(_ids()).logits
    for h in handles:
        h.remove()
    # ... equals the pruned model, and differs from the original.
    p = Pruner(model)
    p.apply(units)
    with torch.no_grad():
        pruned = model(_ids()).logits
    assert torch.allclose(pruned, hooked, atol=1e-6)
    assert not torch.allclose(pruned, ref_orig, atol=1e-4)
    p.restore()
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, ref_orig)


def test_biases_are_zeroed_too():
    lin = torch.nn.Sequential(torch.nn.Linear(3, 4))
    lin.get_output_embeddings = lambda: None
    p = Pruner(lin)
    p.apply([("0", 1)])
    assert torch.all(lin[0].weight[1] == 0) and lin[0].bias[1] == 0
    out = lin(torch.randn(5, 3))
    assert torch.all(out[:, 1] == 0) and torch.all(out[:, 0] != 0)


def test_random_units_distinct_seeded(tiny):
    model, _ = tiny
    layers = candidate_layers(model)
    a = random_units(layers, 50, seed=1)
    assert len(set(a)) == 50 and a == random_units(layers, 50, seed=1)
    assert a != random_units(layers, 50, seed=2)
    assert all(0 <= j < layers[m].weight.shape[0] for m, j in a)


def test_golden_section_finds_the_peak_with_few_evaluations():
    calls = []

    def f(n):
        calls.append(n)
        return -((n - 137) ** 2)

    best, hist = golden_section_search(f, 0, 500, tol=2, max_evals=40)
    assert abs(best - 137) <= 1
    assert len(calls) == len(set(calls)) == len(hist) <= 20
    assert hist[0][0] == 0 and hist[1][0] == 500


def test_golden_section_prefers_zero_on_flat_or_falling():
    best, _ = golden_section_search(lambda n: 50.0, 0, 500)
    assert best == 0
    best, _ = golden_section_search(lambda n: -n, 0, 500)
    assert best == 0


def test_save_pruned_reloads_with_zero_rows(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = tiny
    units = [{"module": "model.layers.1.mlp.up_proj", "index": 4, "score": 1.0}]
    Pruner(model).apply([("model.layers.1.mlp.up_proj", 4)])
    out = save_pruned(model, tok, units, tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(out)
    assert torch.all(again.model.layers[1].mlp.up_proj.weight[4] == 0)
    assert (out / "pruned_units.json").is_file()
