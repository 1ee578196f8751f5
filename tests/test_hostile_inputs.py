"""What lmsmith promises a hostile-but-fair user. Read this file as the list (issue 14).

1. Nothing lost: a command never deletes or overwrites anything it did not create. An output
   folder that exists and is not a finished run of the same command is refused with exit 2
   (``--overwrite`` takes it over); ``dialog index --out`` replaces only an index; ``--resume``
   continues only a checkpoint of the same config and says what differs.
2. Nothing run: only safe formats are deserialised (safetensors, JSON, ``weights_only=True``).
3. No traceback: every user-caused failure exits 2 with one line naming the file (and line,
   field or key); output paths are checked before any model loads; a failed command leaves
   nothing behind.
4. Resume is exact bookkeeping: metrics rows are never duplicated, leftovers of killed
   checkpoint writes are removed, an unreadable checkpoint falls back to the one before.
5. The HTTP server: a silent or slow client holds a thread for at most ``timeout`` seconds, a
   connection is never desynchronised, bad headers get a 4xx, only local Host names are served
   by default, and no file outside ``--docs`` is indexed.

Everything runs on tiny in-process models and files the tests write; sockets stay on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

import pytest
import torch

from lmsmith.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny causal LM folder (HF format), usable as --model / --teacher."""
    from lmsmith.models import tiny_causal_lm, tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny")
    tiny_causal_lm(seed=0).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    words = ["cat", "dog", "sun", "tree"]
    p.write_text(
        "".join(json.dumps({"instruction": f"Say {w}.", "output": w}) + "\n" for w in words)
    )
    return p


BBQ = Path(__file__).parent / "assets" / "bbq" / "Age_mini.jsonl"


@pytest.fixture
def docs(tmp_path) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.md").write_text("# Parking\n\nPermits cost ten dollars a month.\n")
    (d / "b.txt").write_text("Renewals happen online every year.\n")
    return d


def cli(capsys, *argv) -> tuple[int, str]:
    """Exit code and stderr of one command; never a traceback."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def refused(capsys, *argv) -> str:
    """The command exits 2 and its last stderr line is its one error line; that line. Only
    progress bars and logged warnings may come before it."""
    code, err = cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and lines and " error: " in lines[-1], (code, err)
    for x in lines[:-1]:
        assert "\r" in x or "it/s]" in x or " WARNING " in x, f"more than one line: {err}"
    return lines[-1]


def distill_args(teacher, data, out, *more):
    return [
        "distill", "--teacher", teacher, "--student", "layers:1", "--data", data,
        "--method", "sft", "--batch-size", "2", "--max-steps", "4", "--max-new-tokens", "2",
        "--precision", "fp32", "--progress", "false", "--output-dir", out, *more,
    ]  # fmt: skip


def eval_args(model, data, out, *more):
    return [
        "eval", "--model", model, "--data", data, "--greedy", "--max-new-tokens", "2",
        "--limit", "1", "--progress", "false", "--output-dir", out, *more,
    ]  # fmt: skip


def steps_logged(run: Path) -> list[int]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


# --------------------------------------------------------------- 1. nothing lost (items 1, 3)


def test_index_out_never_replaces_a_folder_that_is_not_an_index(docs, tmp_path, capsys):
    precious = tmp_path / "out" / "precious"
    precious.mkdir(parents=True)
    (precious / "thesis.txt").write_text("x")
    line = refused(capsys, "dialog", "index", "--docs", docs, "--out", precious)
    assert "not an lmsmith index" in line and "--overwrite" in line
    assert (precious / "thesis.txt").read_text() == "x"

    a_file = tmp_path / "out" / "notes.txt"
    a_file.write_text("mine")
    assert "is a file" in refused(capsys, "dialog", "index", "--docs", docs, "--out", a_file)
    assert a_file.read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt", "precious"]

    index = tmp_path / "index"
    assert cli(capsys, "dialog", "index", "--docs", docs, "--out", index)[0] == 0
    assert cli(capsys, "dialog", "index", "--docs", docs, "--out", index)[0] == 0  # an index
    assert cli(capsys, "dialog", "index", "--docs", docs, "--out", precious, "--overwrite")[0] == 0


WRITERS = {  # every command that writes a folder: its argv up to the folder option
    "eval": ["eval", "--model", "no-such-model", "--data", "D.jsonl", "--output-dir"],
    "distill": ["distill", "--teacher", "no-such-model", "--data", "D.jsonl", "--output-dir"],
    **{
        f"debias {c}": ["debias", c, "--model", "no-such-model", "--data", str(BBQ),
                        "--output-dir"]
        for c in ("attribute", "prune", "eval", "run")
    },
    "dialog index": ["dialog", "index", "--docs", "D", "--out"],
    "dialog train-retriever": ["dialog", "train-retriever", "--data", "D.jsonl", "--output"],
    "dialog train-reader": ["dialog", "train-reader", "--data", "D.jsonl", "--output"],
    "dialog train-generator": ["dialog", "train-generator", "--data", "D.jsonl", "--output"],
    "dialog eval-retrieval": ["dialog", "eval-retrieval", "--data", "D.jsonl", "--run-dir"],
    "dialog eval": ["dialog", "eval", "--data", "D.jsonl", "--run-dir"],
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_no_command_writes_into_a_folder_it_did_not_create(command, tmp_path, capsys):
    """Refused first: before the data (D.jsonl does not exist) and the model are looked at."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("x")
    line = refused(capsys, *WRITERS[command], precious)
    assert str(precious) in line and "--overwrite" in line, line
    assert [p.name for p in precious.iterdir()] == ["thesis.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("y")
    assert "is a file" in refused(capsys, *WRITERS[command], a_file)
    assert a_file.read_text() == "y"


def test_atomic_dir_never_hides_a_file(tmp_path):
    from lmsmith.errors import UserError
    from lmsmith.runs import atomic_dir

    f = tmp_path / "f"
    f.write_text("keep")
    with pytest.raises(UserError, match="is a file"), atomic_dir(f):
        pass
    assert f.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_eval_refuses_a_folder_it_did_not_write(tiny_dir, rows, tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    (d / "metrics.json").write_text("mine")
    assert "exists and is not an lmsmith run" in refused(capsys, *eval_args(tiny_dir, rows, d))
    assert (d / "metrics.json").read_text() == "mine"
    # a finished eval run is replaced by the next eval; --overwrite takes over anything
    e = tmp_path / "e"
    assert cli(capsys, *eval_args(tiny_dir, rows, e))[0] == 0
    assert json.loads((e / "run.json").read_text()) == {"command": "eval", "status": "finished"}
    assert cli(capsys, *eval_args(tiny_dir, rows, e))[0] == 0
    assert cli(capsys, *eval_args(tiny_dir, rows, d, "--overwrite"))[0] == 0
    assert json.loads((d / "metrics.json").read_text())["n_rows"] == 1


def test_distill_over_a_run_replaces_it_whole_or_refuses(tiny_dir, rows, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, *distill_args(tiny_dir, rows, run, "--save-every", "2"))[0] == 0
    assert (run / "checkpoints" / "step-0000002").is_dir()
    # another command's run folder is refused
    assert "`lmsmith distill` run" in refused(capsys, *eval_args(tiny_dir, rows, run))
    # a new distill run over a finished one replaces all of it, old checkpoints included,
    # so a later --resume cannot continue the wrong run
    assert cli(capsys, *distill_args(tiny_dir, rows, run, "--method", "kd"))[0] == 0
    assert not (run / "checkpoints").exists() and steps_logged(run) == [1, 2, 3, 4]
    line = refused(capsys, *distill_args(tiny_dir, rows, run, "--method", "kd", "--resume"))
    assert "no checkpoint" in line
    # an unfinished run (killed) is neither replaced nor continued silently
    (run / "run.json").write_text(json.dumps({"command": "distill", "status": "running"}))
    assert "--resume to continue it" in refused(capsys, *distill_args(tiny_dir, rows, run))


def test_resume_names_what_differs_in_the_config(tiny_dir, rows, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, *distill_args(tiny_dir, rows, run, "--save-every", "2"))[0] == 0
    more = ("--resume", "--max-steps", "6", "--method", "kd", "--student", "layers:2")
    line = refused(capsys, *distill_args(tiny_dir, rows, run), *more)
    assert "train.method: 'sft' in the checkpoint, 'kd' now" in line
    assert "model.student: 'layers:1' in the checkpoint, 'layers:2' now" in line
    assert cli(capsys, *distill_args(tiny_dir, rows, run), "--resume", "--max-steps", "6")[0] == 0
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------- 2. nothing run (item 2)


class _Planted:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


# the files of a checkpoint that are pickles (accelerate's save_state: optimiser, scheduler and
# RNG states); the student is safetensors, lmsmith's own state JSON
PICKLED = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl")


def test_a_planted_pickle_in_a_checkpoint_is_never_run(tiny_dir, rows, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    args = distill_args(tiny_dir, rows, run, "--save-every", "1", "--max-steps", "3")
    assert cli(capsys, *args)[0] == 0
    newest = run / "checkpoints" / "step-0000002"
    assert {p.name for p in newest.iterdir()} >= {*PICKLED, "model.safetensors"}
    marker = tmp_path / "pwned"
    for name in PICKLED:
        torch.save({"model": _Planted(marker)}, newest / name)
    with caplog.at_level(logging.WARNING):
        assert cli(capsys, *distill_args(tiny_dir, rows, run, "--resume"))[0] == 0
    assert not marker.exists()
    assert "step-0000002 is unusable" in caplog.text  # fell back to step 1
    # the only checkpoints planted: refused, nothing run
    (run / "run.json").write_text(json.dumps({"command": "distill", "status": "running"}))
    for ck in (run / "checkpoints").iterdir():
        for name in PICKLED:
            torch.save({"model": _Planted(marker)}, ck / name)
    assert "no usable checkpoint" in refused(capsys, *distill_args(tiny_dir, rows, run, "--resume"))
    assert not marker.exists()


def test_no_unsafe_deserialisation_in_the_code():
    src = Path(__file__).parents[1] / "src" / "lmsmith"
    for f in src.rglob("*.py"):
        text = f.read_text()
        assert "weights_only=False" not in text, f
        assert "pickle.load" not in text and "import pickle" not in text, f


# --------------------------------------------------------------- 3. no traceback (items 4, 5, 7, 8)


def _bad_utf8(path: Path) -> Path:
    path.write_bytes(b'\n{"instruction": "caf\xe9"}\n')  # line 2
    return path


@pytest.mark.parametrize(
    "command",
    ["eval", "distill", "debias eval", "dialog index", "dialog eval-retrieval", "dialog md2d"],
)
def test_non_utf8_input_is_one_line_naming_file_and_line(command, tiny_dir, tmp_path, capsys):
    bad = _bad_utf8(tmp_path / "bad.jsonl")
    out = tmp_path / "out"
    argv = {
        "eval": eval_args(tiny_dir, bad, out, "--limit", "5"),
        "distill": distill_args(tiny_dir, bad, out),
        "debias eval": ["debias", "eval", "--model", tiny_dir, "--data", bad, "--output-dir", out],
        "dialog index": ["dialog", "index", "--docs", bad, "--out", out],
        "dialog eval-retrieval": ["dialog", "eval-retrieval", "--data", bad, "--run-dir", out],
        "dialog md2d": ["dialog", "index", "--docs", tmp_path / "doc.json", "--out", out],
    }[command]
    (tmp_path / "doc.json").write_bytes(b'{"doc_data": {"d": {}},\n "x": "\xff"}\n')
    line = refused(capsys, *argv)
    where = f"{tmp_path / 'doc.json'}:2" if command == "dialog md2d" else f"{bad}:2"
    assert where in line and "not UTF-8" in line, line
    assert not out.exists()


def test_non_utf8_document_in_a_docs_folder(docs, tmp_path, capsys):
    (docs / "c.md").write_bytes(b"# T\n\ncaf\xe9\n")
    line = refused(capsys, "dialog", "index", "--docs", docs, "--out", tmp_path / "i")
    assert str(docs / "c.md") in line and "not UTF-8" in line


@pytest.mark.parametrize(
    "text, needle",
    [
        (b"limit: 1\nmodel: caf\xe9\n", ":2: not UTF-8"),
        (b"1: 2\n", "key '1' is not a name"),
        (b"train:\n  3: x\n", "key 'train.3' is not a name"),
        (b"model: [unclosed\nlimit: 2\n", ": not valid YAML"),
        (b"- a list\n", "expected a mapping"),
    ],
)
def test_config_yaml_errors_are_one_line(text, needle, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(text)
    line = refused(capsys, "eval", "--config", cfg, "--data", "x.jsonl")
    assert str(cfg) in line and needle in line, line


@pytest.mark.parametrize("command", ["eval", "distill", "debias prune"])
def test_output_paths_are_checked_before_any_model_loads(command, rows, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    argv = {
        "eval": ["eval", "--model", "no-such-model", "--data", rows, "--output-dir"],
        "distill": ["distill", "--teacher", "no-such-model", "--data", rows, "--output-dir"],
        "debias prune": ["debias", "prune", "--model", "no-such-model", "--data", BBQ,
                         "--output-dir"],
    }[command]  # fmt: skip
    assert "is a file" in refused(capsys, *argv, a_file)
    assert "is a file" in refused(capsys, *argv, a_file / "sub")


def test_unwritable_output_is_refused_before_loading(rows, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == locked else real(p, m))
    line = refused(capsys, "eval", "--model", "no-such-model", "--data", rows,
                   "--output-dir", locked / "run")  # fmt: skip
    assert "permission denied" in line and not (locked / "run").exists()


def test_a_model_folder_without_model_type(rows, tmp_path, capsys):
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text("{}")
    line = refused(capsys, *eval_args(m, rows, tmp_path / "out"))
    assert "could not load model" in line and not (tmp_path / "out").exists()


def test_resume_before_or_at_the_checkpoint_step(tiny_dir, rows, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, *distill_args(tiny_dir, rows, run, "--save-every", "2", "--max-steps", "5"))[0] == 0  # fmt: skip
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    line = refused(capsys, *distill_args(tiny_dir, rows, run, "--resume", "--max-steps", "2"))
    assert "at step 4" in line and "max_steps (2) must be larger" in line
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before  # nothing written


def test_truncated_and_foreign_checkpoints_fall_back(tiny_dir, rows, tmp_path, capsys, caplog):
    run, other = tmp_path / "run", tmp_path / "other"
    assert cli(capsys, *distill_args(tiny_dir, rows, run, "--save-every", "1"))[0] == 0
    assert cli(capsys, *distill_args(tiny_dir, rows, other, "--save-every", "1",
                                     "--student", "layers:0,1"))[0] == 0  # fmt: skip
    cks = sorted((run / "checkpoints").iterdir())  # step 2 and step 3
    raw = (cks[1] / "model.safetensors").read_bytes()
    (cks[1] / "model.safetensors").write_bytes(raw[: len(raw) // 2])  # truncated
    foreign = other / "checkpoints" / cks[0].name / "model.safetensors"
    (cks[0] / "model.safetensors").write_bytes(foreign.read_bytes())  # another architecture
    with caplog.at_level(logging.WARNING):
        line = refused(capsys, *distill_args(tiny_dir, rows, run, "--resume", "--max-steps", "6"))
    assert "no usable checkpoint" in line and "another student architecture" in line
    assert "is unusable" in caplog.text


def test_corrupt_index_folders(docs, tmp_path, capsys):
    index = tmp_path / "index"
    assert cli(capsys, "dialog", "index", "--docs", docs, "--out", index)[0] == 0
    (index / "passages.jsonl").write_bytes(b"\xff\xfe garbage\n")
    for argv in (["search", "--query", "parking"], ["serve", "--port", "0"]):
        assert "damaged" in refused(capsys, "dialog", *argv[:1], "--index", index, *argv[1:])
    (index / "meta.json").write_text("{not json")
    assert "damaged" in refused(capsys, "dialog", "search", "--index", index, "--query", "x")
    assert "does not exist" in refused(capsys, "dialog", "search", "--index", tmp_path / "no",
                                       "--query", "x")  # fmt: skip


def test_serve_on_a_port_in_use(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = refused(capsys, "dialog", "serve", "--index", tmp_path, "--port", port)
    assert f"cannot listen on 127.0.0.1:{port}" in line


def test_a_failed_command_leaves_nothing(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    missing = refused(capsys, "debias", "prune", "--model", tiny_dir, "--data", BBQ,
                      "--scores", tmp_path / "MISSING", "--output-dir", out)  # fmt: skip
    assert "does not exist" in missing and not out.exists()
    garbage = tmp_path / "attribution.safetensors"
    garbage.write_bytes(b"not safetensors")  # found, loaded after the folder exists: removed
    line = refused(capsys, "debias", "prune", "--model", tiny_dir, "--data", BBQ, "--scores",
                   garbage, "--output-dir", out, "--n", "1")  # fmt: skip
    assert "not a readable safetensors file" in line and not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()  # a folder the user made stays, empty
    refused(capsys, "debias", "prune", "--model", tiny_dir, "--data", BBQ, "--scores", garbage,
            "--output-dir", empty, "--n", "1")  # fmt: skip
    assert empty.is_dir() and not list(empty.iterdir())


def test_distill_resume_without_a_checkpoint_leaves_no_folder(tiny_dir, rows, tmp_path, capsys):
    out = tmp_path / "new"
    assert "no `lmsmith distill` run" in refused(
        capsys, *distill_args(tiny_dir, rows, out, "--resume")
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["distill", "--log-every", "0", "--teacher", "no-such-model"], "log_every must be >= 1"),
        (
            ["distill", "--save-every", "-1", "--teacher", "no-such-model"],
            "save_every must be >= 0",
        ),
        (["distill", "--limit", "0", "--teacher", "no-such-model"], "data.limit must be >= 1"),
        (
            ["eval", "--data", "x", "--model", "no-such-model", "--max-prompt-tokens", "0"],
            "max_prompt_tokens must be >= 1",
        ),
        (
            ["distill", "--resume", "--overwrite", "--teacher", "no-such-model"],
            "exclude each other",
        ),
        (
            ["dialog", "serve", "--index", "i", "--timeout-request-s", "0"],
            "timeout_request_s must be > 0",
        ),
    ],
)
def test_validation_gaps(argv, needle, capsys):
    assert needle in refused(capsys, *argv)


def test_a_huge_row_is_refused_with_file_and_line(tiny_dir, tmp_path, capsys):
    big = tmp_path / "big.jsonl"
    big.write_text(
        json.dumps({"instruction": "a", "output": "b"})
        + "\n"
        + json.dumps({"instruction": "x" * (2 << 20), "output": "y"})
        + "\n"
    )
    t0 = time.perf_counter()
    line = refused(capsys, *eval_args(tiny_dir, big, tmp_path / "out", "--limit", "2"))
    assert f"{big}:2" in line and "longer than 1048576 bytes" in line
    assert time.perf_counter() - t0 < 30


# --------------------------------------------------------------- 4. resume bookkeeping (item 6)


def test_resume_after_a_kill_mid_checkpoint(tiny_dir, rows, tmp_path, capsys):
    run = tmp_path / "run"
    args = distill_args(tiny_dir, rows, run, "--save-every", "2", "--max-steps", "6")
    assert cli(capsys, *args)[0] == 0
    ckd = run / "checkpoints"
    assert sorted(p.name for p in ckd.iterdir()) == ["step-0000002", "step-0000004"]
    # as if killed while writing step 4: its folder is a leftover, metrics reach step 4
    (ckd / "step-0000004").rename(ckd / ".step-0000004.tmp-abc123")
    (ckd / "step-0000004.tmp-999").mkdir()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:4]) + '\n{"step": 5, "lo')  # cut row
    (run / "summary.json").unlink()
    (run / "run.json").write_text(json.dumps({"command": "distill", "status": "running"}))
    assert cli(capsys, *args, "--resume")[0] == 0
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 once
    assert sorted(p.name for p in ckd.iterdir()) == ["step-0000002", "step-0000004"]
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


# --------------------------------------------------------------- 5. the HTTP server (item 9)


class _Stub:
    def __init__(self):
        from lmsmith.dialog.corpus import Passage

        self.retriever = type("R", (), {"passages": [Passage("d::1", "T // body")]})()
        self.calls = []

    def stream(self, message, history, cancel=None, max_new_tokens=None):
        self.calls.append(message)
        meta = {"grounding": None, "citations": [], "abstained": False}
        yield "meta", meta
        yield "token", f"echo: {message}"
        yield "done", {"reply": f"echo: {message}", **meta}


@pytest.fixture
def server():
    from lmsmith.dialog.config import ServeConfig
    from lmsmith.dialog.serve import make_server

    started = []

    def start(**kw):
        cfg = ServeConfig(port=0, **{"timeout_request_s": 1.0, "timeout_keep_alive_s": 1, **kw})
        srv = make_server(_Stub(), cfg).start()
        started.append(srv)
        return srv.server_address[1], srv.service.pipeline

    yield start
    for s in started:
        s.shutdown()
        s.server_close()


def exchange(port: int, data: bytes, wait: float = 8.0) -> tuple[bytes, float]:
    """Send raw bytes, read until the server closes; (everything read, seconds taken)."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        got = b""
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                pytest.fail(f"server kept the connection open past {wait}s: {got[:200]!r}")
            if not chunk:
                return got, time.perf_counter() - t0
            got += chunk


def post(body: bytes, length: int | str | None = None, host: str = "127.0.0.1") -> bytes:
    n = len(body) if length is None else length
    head = f"POST /api/chat HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    return (head + f"Content-Length: {n}\r\n\r\n").encode() + body


def test_a_silent_connection_is_closed(server):
    port, _ = server()
    got, took = exchange(port, b"")
    assert got == b"" and took < 5


def test_a_body_shorter_than_its_content_length_times_out(server):
    port, stub = server()
    got, took = exchange(port, post(b'{"message"', length=100))
    assert got.startswith(b"HTTP/1.1 408") and took < 5 and not stub.calls


def test_bytes_beyond_content_length_are_never_a_request(server):
    port, stub = server()
    body = b'{"message": "hi"}'
    smuggled = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    got, _ = exchange(port, post(body + smuggled, length=len(body)))
    assert got.count(b"HTTP/1.1 ") == 1 and got.startswith(b"HTTP/1.1 200")
    assert stub.calls == ["hi"]


@pytest.mark.parametrize("length", ["\u00b2", "\u0661\u0662", "-1", "1e3", " "])
def test_a_malformed_content_length_gets_400(server, length):
    port, stub = server()
    got, _ = exchange(port, post(b'{"message": "hi"}').replace(b"Content-Length: 17",
                                                                 f"Content-Length: {length}".encode()))  # fmt: skip
    assert got.startswith(b"HTTP/1.1 400") and not stub.calls


@pytest.mark.parametrize(
    "host, allowed, status",
    [
        ("127.0.0.1", (), b"200"),
        ("localhost:8000", (), b"200"),
        ("[::1]:8000", (), b"200"),
        ("evil.example", (), b"400"),
        ("evil.example:80", (), b"400"),
        ("chat.lan:8000", ("chat.lan",), b"200"),
        ("anything", ("*",), b"200"),
    ],
)
def test_only_allowed_host_names_are_served(server, host, allowed, status):
    port, _ = server(allowed_hosts=list(allowed))
    got, _ = exchange(port, f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())  # fmt: skip
    assert got.startswith(b"HTTP/1.1 " + status), got[:200]


def test_a_symlink_out_of_docs_is_not_indexed(docs, tmp_path, caplog):
    from lmsmith.dialog.corpus import docs_passages

    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0 the secret password\n")
    (docs / "passwd.txt").symlink_to(secret)
    (docs / "linked").symlink_to(tmp_path, target_is_directory=True)
    with caplog.at_level(logging.WARNING):
        passages = docs_passages(docs)
    assert passages and not any("secret" in p.text for p in passages)
    assert "links outside" in caplog.text
