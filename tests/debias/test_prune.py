import torch

from lmsmith.debias.attribution import candidate_layers
from lmsmith.debias.config import PruneConfig
from lmsmith.debias.prune import Pruner, constrained_search, log_grid, random_units, save_pruned
from lmsmith.debias.verdict import judge


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


def _metrics(amb, dis, unk_dis, nll=2.0, unknown_share=None):
    share = unknown_share if unknown_share is not None else (amb + unk_dis) / 2
    return {
        "accuracy": (amb + dis) / 2,
        "accuracy_ambig": amb,
        "accuracy_disambig": dis,
        "unknown_rate_disambig": unk_dis,
        "bias_ambig": 0.0,
        "bias_disambig": 0.0,
        "nll": nll,
        "answers": {"target": (100 - share) / 2, "other": (100 - share) / 2, "unknown": share},
        "answers_by_position": {"ans0": 34.0, "ans1": 33.0, "ans2": 33.0},
    }


def test_log_grid():
    assert log_grid(512) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert log_grid(12) == [0, 1, 2, 4, 8, 12]
    assert log_grid(1) == [0, 1]


def test_search_refuses_an_n_whose_model_answers_only_unknown():
    """Plain accuracy would pick n >= 16 (50% by answering "unknown" to everything)."""
    calls = []

    def dev(n):
        calls.append(n)
        if n >= 16:  # the collapse: every answer "unknown"
            return _metrics(100.0, 0.0, 100.0, unknown_share=100.0)
        return _metrics(4.0 + n, 50.0, 3.0)  # a little better with n, skill intact

    n, table = constrained_search(dev, 512, PruneConfig(refine=1, patience=2), "ambig")
    rows = {r["n"]: r for r in table}
    assert not rows[16]["feasible"] and not rows[32]["feasible"]
    assert any("unknown" in w for w in rows[16]["why"])
    assert 64 not in rows  # stopped after two infeasible grid points
    assert 0 < n < 16 and rows[n]["feasible"]
    assert n == 12  # refinement: midpoint between 8 and 16
    assert len(calls) == len(set(calls))


def test_search_keeps_zero_when_nothing_is_feasible_or_no_gain():
    n, table = constrained_search(
        lambda n: _metrics(100.0, 0.0, 100.0, unknown_share=100.0) if n else _metrics(3, 50, 3),
        64,
        PruneConfig(),
    )
    assert n == 0 and all(not r["feasible"] for r in table if r["n"])
    n, _ = constrained_search(lambda n: _metrics(3.5, 50, 3), 64, PruneConfig(min_gain=2.0))
    assert n == 0  # feasible but no gain of 2 points
    n, _ = constrained_search(
        lambda n: _metrics(3 + n, 50, 3, nll=2.0 + (n >= 8)), 64, PruneConfig()
    )
    assert n == 6  # n >= 8 raises the held-out NLL by 50%: refused; refined between 4 and 8


def test_verdict_degenerate_and_no_feasible():
    before = _metrics(3.0, 50.0, 3.0)
    collapsed = _metrics(97.0, 1.5, 97.0, unknown_share=97.2)
    v = judge(73, before, collapsed, PruneConfig())
    assert v["verdict"] == "degenerate"
    assert any("97% of answers are unknown" in r for r in v["reasons"])
    assert judge(0, before, before, PruneConfig())["verdict"] == "no-feasible-pruning"
    better = _metrics(20.0, 49.0, 5.0)
    assert judge(8, before, better, PruneConfig())["verdict"] == "improved"
    worse = _metrics(2.0, 50.0, 3.0)
    assert judge(8, before, worse, PruneConfig())["verdict"] == "no-feasible-pruning"


def test_save_pruned_reloads_with_zero_rows(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = tiny
    units = [{"module": "model.layers.1.mlp.up_proj", "index": 4, "score": 1.0}]
    Pruner(model).apply([("model.layers.1.mlp.up_proj", 4)])
    out = save_pruned(model, tok, units, tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(out)
    assert torch.all(again.model.layers[1].mlp.up_proj.weight[4] == 0)
    assert (out / "pruned_units.json").is_file()
