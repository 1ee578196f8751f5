import math

import pytest
import torch

from lmsmith.distill import losses as L

ALL = ["fkl", "rkl", "jsd", "tv", "sfkl", "srkl"]


def _logits(seed, shape=(2, 3, 7)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2


def _closed_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_fkl_rkl_match_closed_form():
    p, q = [0.7, 0.2, 0.1], [0.4, 0.4, 0.2]
    t = torch.tensor(p).log().view(1, 1, 3)
    s = torch.tensor(q).log().view(1, 1, 3)
    m = torch.ones(1, 1, dtype=torch.bool)
    assert L.forward_kl(s, t, m).item() == pytest.approx(_closed_kl(p, q), rel=1e-5)
    assert L.reverse_kl(s, t, m).item() == pytest.approx(_closed_kl(q, p), rel=1e-5)
    mix = [(a + b) / 2 for a, b in zip(p, q)]
    js = 0.5 * _closed_kl(p, mix) + 0.5 * _closed_kl(q, mix)
    assert L.generalized_jsd(s, t, m, beta=0.5).item() == pytest.approx(js, rel=1e-5)
    assert L.token_jsd(t, s).item() == pytest.approx(js, rel=1e-5)
    assert L.total_variation(s, t, m).item() == pytest.approx(0.3, rel=1e-5)
    skew = [0.1 * a + 0.9 * b for a, b in zip(p, q)]
    assert L.skew_forward_kl(s, t, m, alpha=0.1).item() == pytest.approx(
        _closed_kl(p, skew), rel=1e-5
    )
    rskew = [0.9 * a + 0.1 * b for a, b in zip(p, q)]
    assert L.skew_reverse_kl(s, t, m, alpha=0.1).item() == pytest.approx(
        _closed_kl(q, rskew), rel=1e-5
    )


def test_jsd_limits_are_the_kls():
    s, t = _logits(0), _logits(1)
    m = torch.ones(2, 3, dtype=torch.bool)
    assert L.generalized_jsd(s, t, m, beta=0.0) == L.forward_kl(s, t, m)
    assert L.generalized_jsd(s, t, m, beta=1.0) == L.reverse_kl(s, t, m)
    # And the limits are continuous: JSD(β)/β → KL(p‖q), JSD(β)/(1−β) → KL(q‖p).
    eps = 1e-4
    torch.testing.assert_close(
        L.generalized_jsd(s, t, m, beta=eps) / eps, L.forward_kl(s, t, m), rtol=2e-3, atol=1e-4
    )
    torch.testing.assert_close(
        L.generalized_jsd(s, t, m, beta=1 - eps) / eps, L.reverse_kl(s, t, m), rtol=2e-3, atol=1e-4
    )


@pytest.mark.parametrize("name", ALL)
def test_equal_logits_give_zero_and_mask_works(name):
    s = _logits(3)
    m = torch.ones(2, 3, dtype=torch.bool)
    assert L.divergence(name, s, s.clone(), m).abs().item() < 1e-6
    t = _logits(4)
    # Masked positions do not count: garbage there changes nothing.
    m2 = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    t2 = t.clone()
    t2[~m2] = 1e4
    torch.testing.assert_close(L.divergence(name, s, t, m2), L.divergence(name, s, t2, m2))
    assert L.divergence(name, s, t, m2) > 0


@pytest.mark.parametrize("name", ALL)
def test_all_masked_is_zero_and_gradients_finite(name):
    s = _logits(5).requires_grad_(True)
    t = _logits(6)
    none = torch.zeros(2, 3, dtype=torch.bool)
    val = L.divergence(name, s, t, none)
    assert val.item() == 0.0 and not torch.isnan(val)
    val.backward()
    assert torch.isfinite(s.grad).all()
    s.grad = None
    # extreme logits: still finite
    big = torch.zeros(2, 3, 7)
    big[..., 0] = 80.0
    s2 = (big * -1).requires_grad_(True)
    L.divergence(name, s2, big, torch.ones(2, 3, dtype=torch.bool)).backward()
    assert torch.isfinite(s2.grad).all()


def test_temperature_flattens():
    s, t = _logits(7), _logits(8)
    m = torch.ones(2, 3, dtype=torch.bool)
    assert L.forward_kl(s, t, m, temperature=4.0) < L.forward_kl(s, t, m)


def test_token_jsd_bounded_by_ln2():
    t = torch.tensor([[50.0, 0, 0]])
    s = torch.tensor([[0, 50.0, 0]])
    assert L.token_jsd(t, s).item() == pytest.approx(math.log(2), rel=1e-4)
