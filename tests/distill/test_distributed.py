"""Two CPU processes through ``accelerate launch`` (gloo): the data-parallel promises.

``--multi_gpu`` is accelerate's torchrun launcher; on a machine without a GPU its processes join
a gloo group on the CPU (MULTI_CPU). ``--cpu --num_processes 2`` would start one process: in
accelerate 1.15 the CPU launcher spreads processes only through mpirun.

- the two ranks train on disjoint rows of every global batch;
- one writer: one run folder, one metrics row per logged step, ``world_size: 2`` in summary.json;
- two processes with batch b equal one process with batch b and grad_accum 2 (to 1e-5);
- killed with SIGKILL mid-run and resumed, a two-process run ends where an uninterrupted one does.

Tiny in-process models (tests/distill/ddp_worker.py), so each launch takes seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lmsmith
from lmsmith import config as C
from lmsmith.distill.config import DistillConfig
from lmsmith.distill.trainer import run

WORKER = Path(__file__).with_name("ddp_worker.py")
WORDS = ["cat", "dog", "sun", "tree", "blue", "red", "one", "two"] * 2
STEPS = 6


def _values(data, out, **kw) -> dict:
    values = {
        "method": "switch",
        "data": str(data),
        "max_steps": STEPS,
        "batch_size": 4,
        "lr": 3e-3,
        "max_new_tokens": 6,
        "output_dir": str(out),
        "progress": False,
        "precision": "fp32",
        "tau0": 0.0032,
        "decay": 0.05,
    }
    return {**values, **kw}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(values: dict, **env) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        str(WORKER), json.dumps(values),
    ]  # fmt: skip
    src = str(Path(lmsmith.__file__).parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "LMSMITH_LOG": "WARNING",
        **env,
    }
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )


def _finish(proc: subprocess.Popen, timeout: float = 240) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode(errors="replace")[-4000:]


def _worker():
    """tests/distill/ddp_worker.py as a module (its tiny models are the one-process reference)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    return worker


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "student" / "model.safetensors"))


def _assert_same(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("d") / "rows.jsonl"
    p.write_text(
        "".join(
            json.dumps({"instruction": f"Say {w} {i}.", "output": w}) + "\n"
            for i, w in enumerate(WORDS)
        )
    )
    return p


@pytest.fixture(scope="module")
def two(data, tmp_path_factory):
    """An uninterrupted two-process run (batch 4 per process: a global batch of 8)."""
    root = tmp_path_factory.mktemp("two")
    _finish(_launch(_values(data, root / "run", log_every=2)))
    return root


def test_two_processes_equal_one_with_grad_accum(two, data, tmp_path):
    run_dir = two / "run"
    # one writer: one run folder (plus the rows each rank recorded), finished, one row per step
    assert sorted(p.name for p in two.iterdir()) == [
        "run", "run.pid-0", "run.pid-1", "run.rows-0", "run.rows-1"
    ]  # fmt: skip
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 8
    assert summary["steps"] == STEPS and 0 < summary["teacher_token_share"] < 1
    # disjoint rows: every global row id once, 8 per step, split 4 + 4 between the ranks
    seen = {
        rank: [json.loads(x) for x in (two / f"run.rows-{rank}").read_text().splitlines()]
        for rank in (0, 1)
    }
    for step in range(STEPS):
        r0 = [j for x in seen[0] if x["step"] == step for j in x["rows"]]
        r1 = [j for x in seen[1] if x["step"] == step for j in x["rows"]]
        assert len(r0) == len(r1) == 4 and not set(r0) & set(r1)
        assert sorted(r0 + r1) == list(range(8 * step, 8 * step + 8))
    # one process, the same global batch through gradient accumulation
    teacher, student, tok = _worker().models()
    run(
        C.load(DistillConfig, None, _values(data, tmp_path / "one", grad_accum=2, log_every=2)),
        teacher,
        student,
        tok,
    )
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert one["world_size"] == 1 and one["global_batch"] == 8
    assert one["teacher_token_share"] == pytest.approx(summary["teacher_token_share"], abs=1e-9)
    _assert_same(_weights(tmp_path / "one"), _weights(run_dir), atol=1e-5)


def test_kill_9_then_resume_equals_uninterrupted(two, data, tmp_path):
    out = tmp_path / "run"
    values = _values(data, out, log_every=2, save_every=2)
    proc = _launch(values, LMSMITH_TEST_HANG_AFTER="4")
    deadline = time.monotonic() + 240
    while not out.with_name("run.hung").exists():
        assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")[-4000:]
        assert time.monotonic() < deadline, "the run never reached step 4"
        time.sleep(0.1)
    # the launcher and both ranks, mid-run (torchrun puts each rank in a session of its own)
    ranks = [int(out.with_name(f"run.pid-{r}").read_text()) for r in (0, 1)]
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in ranks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    while any(_alive(pid) for pid in ranks):
        assert time.monotonic() < deadline, "a rank survived SIGKILL"
        time.sleep(0.05)
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    assert not (out / "student").exists()
    _finish(_launch({**values, "resume": True}))
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    _assert_same(_weights(out), _weights(two / "run"), atol=1e-6)


# DistiLLM at a learning rate that makes its validation loss stall by step 2: the student share
# rises to 0.5 and the replay buffer holds enough rows to be drawn from in steps 5 and 6
PER_ROW = {
    "gkd": dict(method="gkd", max_steps=4, student_share=0.5),
    "distillm": dict(method="distillm", max_steps=6, lr=0.3, distillm_share_step=0.5),
}


@pytest.mark.parametrize("method", sorted(PER_ROW))
def test_per_row_choices_do_not_depend_on_the_split(method, data, tmp_path):
    """GKD's and DistiLLM's per-row coin flips (and DistiLLM's replay buffer, gathered from every
    process once per step) are keyed by the global row: two processes equal one again."""
    kw = PER_ROW[method]
    _finish(_launch(_values(data, tmp_path / "two", **kw)))
    teacher, student, tok = _worker().models()
    one = _values(data, tmp_path / "one", grad_accum=2, **kw)
    run(C.load(DistillConfig, None, one), teacher, student, tok)
    _assert_same(_weights(tmp_path / "one"), _weights(tmp_path / "two"), atol=1e-5)
    rows = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("student_data_share", 0) > 0 for r in rows)  # student rows were written
