"""Answer quality and latency of `lmsmith dialog serve` on the grounded-QA set, over HTTP.

The set (benchmarks/assets/grounded-qa): nine Markdown pages of a fictional city's services
site, and qa.jsonl: questions with accepted answer strings (``answers``; a reply is right when
it contains one, case-insensitively), questions the pages do not answer (``answers`` empty),
follow-ups whose earlier user turns (``context``) are sent first in the same conversation, and
a ``split`` (dev / test: the abstention threshold is calibrated on dev only).

    # calibrate the abstention threshold (and the unknown-word penalty) on the dev half
    python benchmarks/serve_bench.py --calibrate
    # serve and ask every test question: sequentially, then from 4 concurrent clients
    python benchmarks/serve_bench.py --split test --reply-mode extract --json out.json

The server is started as a subprocess (`lmsmith dialog serve`, on 127.0.0.1 and a free port)
over an index built by `lmsmith dialog index` (hybrid, the default); each question goes to
``POST /api/chat/stream``. Time to first token: from sending the request to the first
``token`` event; full reply: to the ``done`` event.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "benchmarks" / "assets" / "grounded-qa"


def load_qa(path: Path, split: str) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if split == "all" or r["split"] == split]


def is_right(reply: str, answers: list[str]) -> bool:
    norm = " ".join(reply.lower().split())
    return any(" ".join(a.lower().split()) in norm for a in answers)


# --------------------------------------------------------------------------- calibration


def calibrate(args) -> dict:
    """Grounding scores of the dev questions in-process; the unknown-word penalty and the
    threshold that maximise (abstention on unanswerable) − 2 × (false abstention)."""
    from lmsmith.dialog.config import GroundConfig, RetrieverConfig
    from lmsmith.dialog.corpus import docs_passages
    from lmsmith.dialog.pipeline import dense_grounder
    from lmsmith.dialog.retrieve import build_retriever

    rows = load_qa(args.qa, "dev")
    r = build_retriever("hybrid", RetrieverConfig())
    r.index(docs_passages(args.docs))
    by = {p.pid: p for p in r.passages}
    g = dense_grounder(r, GroundConfig(unknown_penalty=0.0))
    from lmsmith.data.md2d import format_query

    base, unknown, answerable = [], [], []
    for row in rows:
        hist = [("user", c) for c in reversed(row["context"])]
        hits = r.search(format_query(row["question"], hist), args.k)
        gr = g.ground(row["question"], hist, [by[h.pid] for h in hits])
        base.append(gr.score)
        unknown.append(len(g.unknown_words(row["question"])))
        answerable.append(bool(row["answers"]))
    base, unknown, answerable = np.array(base), np.array(unknown), np.array(answerable)
    best = None
    for penalty in (0.0, 0.05, 0.1, 0.15, 0.2):
        score = base - penalty * unknown
        for t in np.unique(np.round(score, 3)):
            abst = float(np.mean(score[~answerable] < t))
            false = float(np.mean(score[answerable] < t))
            obj = abst - 2 * false
            if best is None or obj > best["objective"] + 1e-9:
                best = {
                    "objective": obj,
                    "unknown_penalty": penalty,
                    "threshold": float(t),
                    "dev_abstention": abst,
                    "dev_false_abstention": false,
                }
    best["n_dev"] = len(rows)
    return best


# --------------------------------------------------------------------------- HTTP client


def ask(port: int, message: str, cid: str | None, timeout: float) -> dict:
    """One streamed turn: reply, abstained, ttft_s, total_s, conversation id, token events."""
    body = json.dumps({"message": message, **({"conversation_id": cid} if cid else {})})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.perf_counter()
    conn.request(
        "POST",
        "/api/chat/stream",
        body=body,
        headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
    )
    resp = conn.getresponse()
    if resp.status != 200:
        out = {"status": resp.status, "error": resp.read().decode()[:200]}
        conn.close()
        return out
    ttft, done, tokens, event, buf = None, None, 0, None, b""
    while done is None:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if line.startswith(b"event:"):
            event = line[6:].strip().decode()
        elif line.startswith(b"data:"):
            data = json.loads(line[5:].strip())
            if event == "token":
                tokens += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
            elif event == "done":
                done = data
            elif event == "error":
                conn.close()
                return {"status": data.get("status", 500), "error": data.get("detail")}
        del buf
        buf = b""
    total = time.perf_counter() - t0
    conn.close()
    if done is None:
        return {"status": 0, "error": "stream ended without a reply"}
    return {
        "status": 200,
        "reply": done["reply"],
        "abstained": done["abstained"],
        "conversation_id": done["conversation_id"],
        "ttft_s": ttft if ttft is not None else total,
        "total_s": total,
        "tokens": tokens,
    }


def run_row(port: int, row: dict, timeout: float) -> dict:
    cid = None
    for turn in row["context"]:  # earlier turns of a follow-up: same conversation, not timed
        cid = ask(port, turn, cid, timeout).get("conversation_id")
    out = ask(port, row["question"], cid, timeout)
    out["id"] = row["id"]
    if out["status"] == 200:
        if row["answers"]:
            out["right"] = is_right(out["reply"], row["answers"])
        out["answerable"] = bool(row["answers"])
    return out


def summarise(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["status"] == 200]
    ans = [r for r in ok if r["answerable"]]
    un = [r for r in ok if not r["answerable"]]
    ttft = np.array([r["ttft_s"] for r in ok])
    total = np.array([r["total_s"] for r in ok])
    pct = lambda a, q: float(np.percentile(a, q)) if len(a) else float("nan")  # noqa: E731
    return {
        "n": len(results),
        "errors": len(results) - len(ok),
        "answer_accuracy": float(np.mean([r["right"] for r in ans])) if ans else None,
        "n_answerable": len(ans),
        "abstention": float(np.mean([r["abstained"] for r in un])) if un else None,
        "n_unanswerable": len(un),
        "false_abstention": float(np.mean([r["abstained"] for r in ans])) if ans else None,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p95_s": pct(ttft, 95),
        "total_p50_s": pct(total, 50),
        "total_p95_s": pct(total, 95),
        "wall_s": wall,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the server did not come up")


def bench(args) -> dict:
    rows = load_qa(args.qa, args.split)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    cli = [sys.executable, "-m", "lmsmith.cli", "dialog"]
    with tempfile.TemporaryDirectory() as tmp:
        index = args.index
        if index is None:
            index = str(Path(tmp) / "ix")
            subprocess.run(
                [*cli, "index", "--docs", str(args.docs), "--out", index, "--progress", "false"],
                check=True,
                env=env,
            )
        port = free_port()
        cmd = [
            *cli, "serve", "--index", index, "--port", str(port), "--k", str(args.k),
            "--reply-mode", args.reply_mode, "--max-new-tokens", str(args.max_new_tokens),
            "--max-queue", str(max(8, 2 * args.clients)),
        ]  # fmt: skip
        cmd += args.serve_args
        proc = subprocess.Popen(cmd, env=env)
        try:
            wait_healthy(port, proc, 300)
            run_row(port, rows[0], args.timeout)  # warm-up (first-call allocations), not counted
            out = {"config": vars(args) | {"qa": str(args.qa), "docs": str(args.docs)}}
            out["load_before"] = os.getloadavg()
            t0 = time.perf_counter()
            seq = [run_row(port, r, args.timeout) for r in rows]
            out["sequential"] = summarise(seq, time.perf_counter() - t0)
            out["rows"] = seq
            if args.clients < 1:
                return out
            conc: list[dict] = []
            lock = threading.Lock()
            todo = list(rows)

            def client():
                while True:
                    with lock:
                        if not todo:
                            return
                        row = todo.pop(0)
                    res = run_row(port, row, args.timeout)
                    with lock:
                        conc.append(res)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out[f"concurrent_{args.clients}"] = summarise(conc, time.perf_counter() - t0)
            out["load_after"] = os.getloadavg()
        finally:
            proc.terminate()
            proc.wait(30)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=Path, default=ASSETS / "docs")
    ap.add_argument("--qa", type=Path, default=ASSETS / "qa.jsonl")
    ap.add_argument("--index", help="serve this index instead of building one over --docs")
    ap.add_argument("--split", choices=["dev", "test", "all"], default="test")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--reply-mode", choices=["extract", "generate", "phrase"], default="extract")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, default=4, help="0: sequential pass only")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--calibrate", action="store_true", help="calibrate on dev; no server")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("serve_args", nargs="*", help="more `dialog serve` options, after --")
    args = ap.parse_args(argv)
    out = calibrate(args) if args.calibrate else bench(args)
    text = json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
