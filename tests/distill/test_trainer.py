import json

import pytest
import torch

from lmsmith import config as C
from lmsmith.cli import main as cli_main
from lmsmith.distill.config import DistillConfig
from lmsmith.distill.trainer import run
from lmsmith.errors import UserError
from lmsmith.models import layer_pruned, tiny_causal_lm, tiny_tokenizer

METHODS = ["sft", "kd", "seqkd", "imitkd", "gkd", "distillm", "skd", "switch", "adaswitch"]
WORDS = ["cat", "dog", "sun", "tree", "blue", "red", "one", "two"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("d") / "mem.jsonl"
    p.write_text(
        "".join(
            json.dumps({"instruction": f"Say {w}.", "input": "", "output": w}) + "\n" for w in WORDS
        )
    )
    return p


def _cfg(data, out, method, **kw):
    values = {
        "method": method,
        "data": str(data),
        "max_steps": 8,
        "batch_size": 4,
        "lr": 3e-3,
        "max_new_tokens": 6,
        "output_dir": str(out),
        "progress": False,
        "precision": "fp32",
        "tau0": 0.05,
        "decay": 0.05,
        "chat_template": False,
    }
    values.update(kw)
    return C.load(DistillConfig, None, values)


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    """A tiny teacher that has memorised the set (so its distributions are worth matching)."""
    model = tiny_causal_lm(layers=2, seed=0)
    run(
        _cfg(data, tmp_path_factory.mktemp("t"), "sft", max_steps=60, lr=1e-2),
        tiny_causal_lm(),
        model,
        tiny_tokenizer(),
    )
    return model.eval()


def _losses(out):
    return [
        r["loss"]
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_with_falling_finite_loss(method, teacher, data, tmp_path):
    student = layer_pruned(teacher, [0])
    torch.nn.init.normal_(
        student.model.layers[0].mlp.down_proj.weight, std=0.2
    )  # start off the teacher
    s = run(_cfg(data, tmp_path, method), teacher, student, tiny_tokenizer())
    losses = _losses(tmp_path)
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == method and summary["steps"] == 8
    assert json.loads((tmp_path / "config.json").read_text())["train"]["method"] == method
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(s["student_dir"])
    assert back.config.num_hidden_layers == 1
    if method in ("switch", "skd", "adaswitch"):
        rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert all("teacher_share_by_position" in r for r in rows if "loss" in r)
        assert 0.0 <= summary["teacher_token_share"] <= 1.0


@pytest.mark.parametrize("method", ["switch", "distillm"])
def test_resume_equals_uninterrupted(method, teacher, data, tmp_path):
    tok = tiny_tokenizer()
    full = layer_pruned(teacher, [1])
    run(_cfg(data, tmp_path / "a", method, max_steps=6), teacher, full, tok)
    part = layer_pruned(teacher, [1])
    run(_cfg(data, tmp_path / "b", method, max_steps=3, save_every=2), teacher, part, tok)
    resumed = layer_pruned(teacher, [1])  # fresh weights: everything must come from the checkpoint
    run(_cfg(data, tmp_path / "b", method, max_steps=6, resume=True), teacher, resumed, tok)
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert not list((tmp_path / "b" / "checkpoints").glob("*.tmp-*"))


def test_lora_student_saves_merged_and_adapter(teacher, data, tmp_path):
    s = run(
        _cfg(data, tmp_path, "kd", max_steps=2, lora_rank=4),
        teacher,
        layer_pruned(teacher, [0]),
        tiny_tokenizer(),
    )
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(s["student_dir"]).config.num_hidden_layers == 1


def test_vocab_mismatch_and_nan_are_clear(teacher, data, tmp_path):
    with pytest.raises(UserError, match="teacher has 100 tokens, student has 64"):
        run(_cfg(data, tmp_path, "kd"), teacher, tiny_causal_lm(vocab_size=64), tiny_tokenizer())
    with pytest.raises(UserError, match="train.lr must be > 0"):
        _cfg(data, tmp_path / "n", "kd", lr=float("nan"))
    student = layer_pruned(teacher, [0])
    student.model.layers[0].mlp.down_proj.weight.data.fill_(float("nan"))
    with pytest.raises(UserError, match="loss became nan at step 1"):
        run(_cfg(data, tmp_path / "n2", "kd"), teacher, student, tiny_tokenizer())
    assert (
        not (tmp_path / "n2" / "student").exists()
        and not (tmp_path / "n2" / "checkpoints").exists()
    )


def test_long_prompts_and_empty_data(teacher, data, tmp_path):
    with pytest.raises(UserError, match="over data.max_prompt_tokens=8"):
        run(
            _cfg(data, tmp_path, "kd", max_prompt_tokens=8, long_prompts="error"),
            teacher,
            layer_pruned(teacher, [0]),
            tiny_tokenizer(),
        )
    with pytest.raises(UserError, match="no training rows left"):
        run(
            _cfg(data, tmp_path, "kd", max_prompt_tokens=8),
            teacher,
            layer_pruned(teacher, [0]),
            tiny_tokenizer(),
        )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="no rows"):
        run(
            _cfg(empty, tmp_path / "out", "kd"),
            teacher,
            layer_pruned(teacher, [0]),
            tiny_tokenizer(),
        )


def test_cli_distill_exit_codes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a failed run must not leave a runs/ folder behind
    assert cli_main(["distill", "--method", "nope"]) == 2
    assert "not one of" in capsys.readouterr().err
    assert (
        cli_main(
            ["distill", "--data", str(tmp_path / "missing.jsonl"), "--teacher", "no-such-model"]
        )
        == 2
    )
    assert not (tmp_path / "runs").exists()
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("warm", [0, 1, 3])
def test_warmup_schedule_is_linear_then_constant(warm):
    from lmsmith.distill.trainer import warmup_schedule

    optim = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = warmup_schedule(optim, warm)
    seen = []
    for _ in range(6):
        seen.append(optim.param_groups[0]["lr"])  # the rate this update runs at
        optim.step()
        sched.step()
    expected = [0.1 * (min(1.0, (k + 1) / warm) if warm else 1.0) for k in range(6)]
    assert seen == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_decaying_schedules_warm_up_then_fall_towards_zero(kind):
    import math

    from lmsmith.distill.trainer import warmup_schedule

    optim = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = warmup_schedule(optim, 2, kind, total=6)
    seen = []
    for _ in range(6):
        seen.append(optim.param_groups[0]["lr"])
        optim.step()
        sched.step()
    # updates 0, 1 warm up (0.05, 0.1); updates 2..5 decay over the 4 left, the last above 0
    fracs = [0, 0.25, 0.5, 0.75]
    decay = [1 - f if kind == "linear" else 0.5 * (1 + math.cos(math.pi * f)) for f in fracs]
    assert seen == pytest.approx([0.05, 0.1] + [0.1 * d for d in decay], rel=1e-12)
    assert seen[-1] > 0


def test_report_to_tensorboard_writes_the_metrics(teacher, data, tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'lmsmith[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(data, tmp_path, "switch", max_steps=3, report_to="tensorboard")
    run(cfg, teacher, layer_pruned(teacher, [0]), tiny_tokenizer())
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")  # hparams: a subfolder
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx(_losses(tmp_path), rel=1e-6)
    assert "teacher_share_by_position.0-15" in acc.Tags()["scalars"]


def test_references_cut_to_max_response_tokens(teacher, data, tmp_path):
    from lmsmith.distill.trainer import DistillTrainer

    long = tmp_path / "long.jsonl"
    long.write_text(
        json.dumps({"instruction": "Count.", "input": "", "output": " ".join(WORDS * 3)})
    )
    for cut, expect in ((None, None), (5, 5)):
        t = DistillTrainer(
            _cfg(long, tmp_path / f"o{cut}", "sft", max_response_tokens=cut),
            teacher,
            tiny_causal_lm(),
            tiny_tokenizer(),
        )
        t.setup()
        n = len(t.examples[0].response)
        assert n == expect if expect else n > 20  # 24 words + EOS uncut


def test_distillm_share_follows_the_official_rule(teacher, data, tmp_path, monkeypatch):
    """Raised by the step only when the validation loss is >= eps above the loss at the last
    raise (the first reference: before training); capped."""
    from lmsmith.distill.trainer import DistillTrainer

    t = DistillTrainer(
        _cfg(
            data,
            tmp_path / "o",
            "distillm",
            distillm_share_step=0.4,
            distillm_val_data=str(data),
            distillm_val_rows=3,
        ),  # fmt: skip
        teacher,
        tiny_causal_lm(),
        tiny_tokenizer(),
    )
    t.setup()
    assert len(t.val_examples) == 3
    real = t.validation_loss()
    assert real > 0 and real == t.validation_loss()  # deterministic, student untouched
    losses = iter([1.0, 1.05, 1.2, 1.25, 1.31, 1.0, 2.0])
    monkeypatch.setattr(t, "validation_loss", lambda: next(losses))
    shares = []
    for _ in range(7):
        t._distillm_schedule()
        shares.append(round(t.distillm_share, 6))
    # ref 1.0; 1.05 < 1.1; 1.2 raises (ref 1.2); 1.25 < 1.3; 1.31 raises; 1.0 no; 2.0 → cap 1.0
    assert shares == [0.0, 0.0, 0.4, 0.4, 0.8, 0.8, 1.0]


def test_distillm_validation_rows_must_be_positive(data, tmp_path):
    with pytest.raises(Exception, match="distillm_val_rows"):
        _cfg(data, tmp_path, "distillm", distillm_val_rows=0)
