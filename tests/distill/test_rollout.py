import pytest
import torch

from lmsmith.distill.rollout import (
    AdaSwitchRule,
    SKDRule,
    SwitchRule,
    naive_switch_rollout,
    switch_rollout,
)
from lmsmith.generation import LeanDecoder, Noise, left_pad, sample_rollout
from lmsmith.models import tiny_causal_lm

EOS, PAD = 2, 0
PROMPTS = [[5, 9, 14, 3], [7], [11, 12, 13, 14, 15, 16, 17], [20, 21]]


def _models():
    return tiny_causal_lm(layers=1, seed=1), tiny_causal_lm(layers=2, seed=2)


def _same(a, b):
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.tokens[a.mask], b.tokens[b.mask])
    assert torch.equal(a.teacher_wrote[a.mask], b.teacher_wrote[b.mask])
    torch.testing.assert_close(a.divergence[a.mask], b.divergence[b.mask], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block", [1, 2, 3, 5])
@pytest.mark.parametrize("tau0", [0.0, 0.0032, 10.0])
def test_switch_draft_and_verify_equals_naive_loop(block, tau0):
    student, teacher = _models()
    ids, mask = left_pad(PROMPTS, PAD)
    noise = Noise.draw(len(PROMPTS), seed=block)
    fast = switch_rollout(
        student, teacher, ids, mask, SwitchRule(tau0, 0.1), 12, noise, EOS, PAD, block_size=block
    )
    slow = naive_switch_rollout(
        student,
        teacher,
        ids,
        mask,
        SwitchRule(tau0, 0.1),
        12,
        noise,
        EOS,
        PAD,
        keep_teacher_logits=True,
    )
    _same(fast, slow)
    torch.testing.assert_close(
        fast.teacher_logits[fast.mask], slow.teacher_logits[slow.mask], rtol=1e-4, atol=1e-4
    )
    if tau0 == 10.0:  # never above the threshold: all student tokens
        assert not fast.teacher_wrote.any()
    if tau0 == 0.0032:  # near the typical JSD of these two models: both write
        assert fast.teacher_wrote[fast.mask].any() and not fast.teacher_wrote[fast.mask].all()
    if tau0 == 0.0:  # always above: all teacher tokens
        assert fast.teacher_wrote[fast.mask].all()


def test_switch_mixes_writers_and_stops_early_on_eos():
    student, teacher = _models()
    # bias both models toward EOS so some rows stop before max_new
    for m in (student, teacher):
        m.lm_head.weight.data[EOS] += 1.0 * m.lm_head.weight.data.mean(0)
        m.lm_head.bias = None
    ids, mask = left_pad(PROMPTS, PAD)
    seen_early_stop = seen_mix = False
    for seed in range(6):
        noise = Noise.draw(len(PROMPTS), seed=seed)
        rule = lambda: SwitchRule(0.0036, 0.01)  # noqa: E731
        fast = switch_rollout(
            student, teacher, ids, mask, rule(), 16, noise, EOS, PAD, block_size=3, adaptive=True
        )
        slow = naive_switch_rollout(student, teacher, ids, mask, rule(), 16, noise, EOS, PAD)
        _same(fast, slow)
        lengths = fast.mask.sum(1)
        seen_early_stop |= bool((lengths < 16).any())
        seen_mix |= bool(
            fast.teacher_wrote[fast.mask].any() and (~fast.teacher_wrote[fast.mask]).any()
        )
        # after an EOS nothing is written
        for b in range(len(PROMPTS)):
            n = int(lengths[b])
            assert fast.mask[b, :n].all() and not fast.mask[b, n:].any()
            if n < 16:
                assert int(fast.tokens[b, n - 1]) == EOS
    assert seen_early_stop and seen_mix


@pytest.mark.parametrize(
    "make_rule", [lambda B: SKDRule(top_k=5), lambda B: AdaSwitchRule(B, window=3, factor=1.2)]
)
def test_other_rules_equal_naive(make_rule):
    student, teacher = _models()
    ids, mask = left_pad(PROMPTS, PAD)
    noise = Noise.draw(len(PROMPTS), seed=7)
    fast = switch_rollout(
        student, teacher, ids, mask, make_rule(4), 14, noise, EOS, PAD, block_size=4
    )
    slow = naive_switch_rollout(student, teacher, ids, mask, make_rule(4), 14, noise, EOS, PAD)
    _same(fast, slow)
    assert fast.teacher_wrote.any()


def test_adaswitch_switches_once_and_for_all():
    student, teacher = _models()
    ids, mask = left_pad(PROMPTS, PAD)
    r = naive_switch_rollout(
        student, teacher, ids, mask, AdaSwitchRule(4, 3, 1.0), 20, Noise.draw(4, seed=3), EOS, PAD
    )
    for b in range(4):
        w = r.teacher_wrote[b][r.mask[b]].tolist()
        if True in w:
            first = w.index(True)
            assert all(w[first:]), "after the switch the teacher writes every token"


def test_sample_rollout_equals_switch_with_infinite_threshold():
    student, teacher = _models()
    ids, mask = left_pad(PROMPTS, PAD)
    noise = Noise.draw(4, seed=11)
    a = sample_rollout(student, ids, mask, 10, noise, EOS, PAD)
    b = switch_rollout(
        student, teacher, ids, mask, SwitchRule(1e9, 0.1), 10, noise, EOS, PAD, block_size=4
    )
    assert torch.equal(a.mask, b.mask) and torch.equal(a.tokens[a.mask], b.tokens[b.mask])


def test_block_planner_follows_interventions_and_costs():
    from lmsmith.distill.rollout import BlockPlanner

    p = BlockPlanner(4, max_block=8, student_cost=0.5, teacher_cost=1.0, smoothing=1.0)
    p.observe(decisions=32, interventions=0)
    assert p.next() == ("student", 8)  # every draft kept: a longer block is cheaper per token
    p.observe(decisions=8, interventions=4)
    assert p.next() == ("student", 1)  # half the drafts rejected: drafting only wastes steps
    p.observe(decisions=10, interventions=1)
    role, k = p.next()
    assert role == "student" and 2 < k < 8  # in between
    # the teacher writes nearly everything: it drafts, and the student scores its drafts
    p.observe(decisions=100, interventions=99)
    role, k = p.next()
    assert role == "teacher" and k > 1
    # a k-slot forward that costs k one-slot ones: drafting never pays, the role stays
    q = BlockPlanner(1, max_block=8, student_cost=0.5, teacher_cost=1.0, extra_slot=1.0)
    q.observe(10, 3)
    assert q.next() == ("student", 1)
    q.observe(10, 10)  # ... and the model that writes most tokens drafts
    assert q.next() == ("teacher", 1)


class _ScriptedPlanner:
    """Roles and block sizes from a fixed random sequence: the equality must hold for any."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def observe(self, decisions, interventions):
        pass

    def next(self):
        role = ("student", "teacher")[int(torch.randint(2, (1,), generator=self.g))]
        return role, int(torch.randint(1, 7, (1,), generator=self.g))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_switch_equals_naive_for_any_block_sequence(seed):
    student = tiny_causal_lm(layers=1, seed=1, kv_heads=2)  # grouped-query attention
    teacher = tiny_causal_lm(layers=2, seed=2, kv_heads=2)
    prompts = PROMPTS + [[30 + i for i in range(15)]]  # mostly padding: the packed prefill
    ids, mask = left_pad(prompts, PAD)
    noise = Noise.draw(len(prompts), seed=seed)
    rule = lambda: SwitchRule(0.0032, 0.05)  # noqa: E731
    fast = switch_rollout(
        student,
        teacher,
        ids,
        mask,
        rule(),
        20,
        noise,
        EOS,
        PAD,
        adaptive=True,
        planner=_ScriptedPlanner(seed),
    )
    slow = naive_switch_rollout(student, teacher, ids, mask, rule(), 20, noise, EOS, PAD)
    _same(fast, slow)
    assert 0 < fast.teacher_share() < 1
    assert 0 < fast.stats["teacher_drafted_blocks"] < fast.stats["blocks"]


def _ragged_case(seed):
    """Six prompts of 1-15 tokens and a student/teacher pair with grouped-query attention."""
    student = tiny_causal_lm(layers=1, seed=10 + seed, kv_heads=2)
    teacher = tiny_causal_lm(layers=2, seed=20 + seed, kv_heads=1)
    g = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(3, 100, (int(n),), generator=g).tolist()
        for n in torch.randint(1, 16, (6,), generator=g)
    ]
    ids, mask = left_pad(prompts, PAD)
    return student, teacher, ids, mask, Noise.draw(len(prompts), seed=100 + seed)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "make_rule",
    [
        lambda B: SwitchRule(0.006, 0.05),  # the teacher writes 35-45%
        lambda B: SwitchRule(0.0032, 0.05),  # the teacher writes ~90%
        lambda B: SwitchRule(0.0, 0.1),  # the teacher writes everything
        lambda B: SKDRule(top_k=5),  # the decision reads the student's token
        lambda B: AdaSwitchRule(B, window=3, factor=1.2),  # state per row
    ],
)
def test_random_roles_ragged_prompts_and_early_eos_equal_naive(seed, make_rule):
    """Random drafters and block sizes, ragged prompts, rows that stop early and so leave the
    batch mid-rollout (test_early_eos_is_exercised), teacher sampling or argmax."""
    student, teacher, ids, mask, noise = _ragged_case(seed)
    greedy = seed % 2 == 1
    fast = switch_rollout(
        student,
        teacher,
        ids,
        mask,
        make_rule(len(ids)),
        24,
        noise,
        EOS,
        PAD,
        teacher_greedy=greedy,
        adaptive=True,
        planner=_ScriptedPlanner(seed),
    )
    slow = naive_switch_rollout(
        student,
        teacher,
        ids,
        mask,
        make_rule(len(ids)),
        24,
        noise,
        EOS,
        PAD,
        teacher_greedy=greedy,
        keep_teacher_logits=True,
    )
    _same(fast, slow)
    torch.testing.assert_close(
        fast.teacher_logits[fast.mask], slow.teacher_logits[slow.mask], rtol=1e-4, atol=1e-4
    )
    assert fast.stats["teacher_drafted_blocks"] > 0


def test_early_eos_is_exercised():
    """The cases of the random-role test: some rows stop early, others run to the end."""
    lengths = []
    for seed in range(4):
        student, teacher, ids, mask, noise = _ragged_case(seed)
        r = naive_switch_rollout(
            student, teacher, ids, mask, SwitchRule(0.006, 0.05), 24, noise, EOS, PAD
        )
        lengths += r.mask.sum(1).tolist()
    assert sum(n < 24 for n in lengths) >= 3 and sum(n == 24 for n in lengths) >= 3


def test_rows_leave_the_batch_through_the_hf_decoder_too():
    student, teacher, ids, mask, noise = _ragged_case(0)
    rule = lambda: SwitchRule(0.006, 0.05)  # noqa: E731
    kw = dict(adaptive=True, planner=_ScriptedPlanner(0))
    fast = switch_rollout(
        student, teacher, ids, mask, rule(), 24, noise, EOS, PAD, lean=False, **kw
    )
    slow = naive_switch_rollout(student, teacher, ids, mask, rule(), 24, noise, EOS, PAD)
    _same(fast, slow)
    assert (fast.mask.sum(1) < 24).any()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("width", [1, 3, 5])
@pytest.mark.parametrize(
    "make_rule",
    [
        lambda B: SwitchRule(0.006, 0.05),
        lambda B: SwitchRule(0.0032, 0.05),
        lambda B: AdaSwitchRule(B, window=3, factor=1.2),
    ],
)
def test_continuous_batching_equals_naive(seed, width, make_rule, monkeypatch):
    """At most ``width`` rows decode at once and a waiting prompt takes each finished row's place
    (its prompt written into the row's cache, the cache grown when the prompt is longer than
    the row's slots so far): every row writes what the naive loop writes for it, in any order,
    under random drafters and block sizes."""
    student, teacher, ids, mask, noise = _ragged_case(seed)
    # a long prompt first in the queue (the cache grows for it), a one-token prompt last
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    prompts = prompts[:width] + [[3 + (7 * i) % 97 for i in range(120)]] + prompts[width:] + [[9]]
    ids, mask = left_pad(prompts, PAD)
    noise = Noise.draw(len(prompts), seed=200 + seed)
    grown = []
    grow = LeanDecoder.grow
    monkeypatch.setattr(LeanDecoder, "grow", lambda self, n: grown.append(n) or grow(self, n))
    fast = switch_rollout(
        student,
        teacher,
        ids,
        mask,
        make_rule(len(ids)),
        24,
        noise,
        EOS,
        PAD,
        adaptive=True,
        planner=_ScriptedPlanner(seed),
        batch=width,
    )
    slow = naive_switch_rollout(
        student,
        teacher,
        ids,
        mask,
        make_rule(len(ids)),
        24,
        noise,
        EOS,
        PAD,
        keep_teacher_logits=True,
    )
    _same(fast, slow)
    torch.testing.assert_close(
        fast.teacher_logits[fast.mask], slow.teacher_logits[slow.mask], rtol=1e-4, atol=1e-4
    )
    assert grown  # the long prompt did not fit the slots of the row it took


@pytest.mark.parametrize("drafter", ["student", "teacher"])
def test_fixed_drafter_equals_naive(drafter):
    student, teacher = _models()
    ids, mask = left_pad(PROMPTS, PAD)
    noise = Noise.draw(len(PROMPTS), seed=5)
    rule = lambda: SwitchRule(0.0032, 0.05)  # noqa: E731
    fast = switch_rollout(
        student, teacher, ids, mask, rule(), 16, noise, EOS, PAD, block_size=3, drafter=drafter
    )
    slow = naive_switch_rollout(student, teacher, ids, mask, rule(), 16, noise, EOS, PAD)
    _same(fast, slow)
    assert fast.stats["teacher_drafted_blocks"] == (
        fast.stats["blocks"] if drafter == "teacher" else 0
    )
