"""Precision and threads on this machine: what ``precision: auto`` buys, and how torch's thread
pool behaves when another process shares the cores.

    python benchmarks/precision_bench.py matmul                 # fp32 vs bf16 matmul
    python benchmarks/precision_bench.py step --steps 3         # distill steps: auto vs fp32
    python benchmarks/precision_bench.py threads                # decode with a busy neighbour
    python benchmarks/precision_bench.py all --json benchmarks/results/precision.json

``step`` trains SWITCH (the default method) on the embedded SmolLM2 teacher and a 10-layer
student, batch 4, 32 rollout tokens, one warm-up step then ``--steps`` timed ones, once per
precision; bf16 is timed only where it is native (elsewhere one bf16 step would take minutes).
``threads`` times the same greedy decode (the teacher, 8 prompts, 32 tokens) in a child process,
idle and beside a CPU-bound neighbour, under torch's default thread count, OMP_WAIT_POLICY=PASSIVE
and one thread; each child is a fresh process so the OpenMP settings take effect.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "instruct" / "dolly" / "dev.jsonl"


def matmul(args) -> dict:
    import torch

    a, b = torch.randn(512, 576), torch.randn(576, 1536)

    def ms(fn, repeats=5) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1000 * min(times)

    a16, b16 = a.bfloat16(), b.bfloat16()

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return a @ b

    return {
        "shape": "(512x576) @ (576x1536)",
        "fp32_ms": ms(lambda: a @ b),
        "bf16_ms": ms(lambda: a16 @ b16, repeats=2),
        "autocast_bf16_ms": ms(autocast, repeats=2),
    }


def step(args) -> dict:
    from lmsmith import config as C
    from lmsmith.distill.config import DistillConfig
    from lmsmith.distill.trainer import run
    from lmsmith.models import layer_pruned, load_lm
    from lmsmith.precision import native_bf16, resolve_precision

    teacher, tok = load_lm("smollm2-135m-instruct")
    asked = ["auto", "fp32"] + (["bf16"] if native_bf16("cpu") else [])
    out = {}
    for precision in asked:
        student = layer_pruned(teacher, 10)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = C.load(
                DistillConfig,
                None,
                {
                    "method": "switch",
                    "data": str(DATA),
                    "limit": 64,
                    "batch_size": 4,
                    "max_steps": args.steps + 1,
                    "max_new_tokens": 32,
                    "precision": precision,
                    "output_dir": str(Path(tmp) / "run"),
                    "progress": False,
                    "seed": 0,
                },
            )
            summary = run(cfg, teacher, student, tok)
            rows = [
                json.loads(x)
                for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().split("\n")
                if x
            ]
        times = [r["step_time_s"] for r in rows if "step_time_s" in r][1:]
        out[precision] = {
            "resolved": resolve_precision(precision),
            "median_step_s": statistics.median(times),
            "step_times_s": times,
            "summary_precision": summary["precision"],
        }
        print(f"step {precision} → {summary['precision']}: {out[precision]['median_step_s']:.2f} s")
    out["auto_over_fp32"] = out["auto"]["median_step_s"] / out["fp32"]["median_step_s"]
    return out


def _decode_child() -> None:
    """One greedy decode of 8 prompts × 32 tokens by the teacher; prints its seconds."""
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")  # as torch's OpenMP will read it
    import torch

    from lmsmith.data.instruct import build_prompt, load_instruct
    from lmsmith.generation import generate
    from lmsmith.models import load_lm

    model, tok = load_lm("smollm2-135m-instruct")
    rows = load_instruct(DATA, limit=8)
    prompts = [build_prompt(r, tok, chat_template=True) for r in rows]
    generate(model, tok, prompts[:2], max_new_tokens=4, greedy=True)  # warm-up
    t0 = time.perf_counter()
    generate(model, tok, prompts, max_new_tokens=32, greedy=True, batch_size=8)
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - t0,
                "threads": torch.get_num_threads(),
                "omp_wait_policy": policy,
                "load_avg_1min": os.getloadavg()[0],
            }
        )
    )


def _child_env(changes: dict) -> dict:
    env = {**os.environ, "LMSMITH_LOG": "ERROR"}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def threads(args) -> dict:
    # libgomp spins unless OMP_WAIT_POLICY says otherwise; `import lmsmith` sets PASSIVE in this
    # process, so the spinning case removes the variable for its child explicitly
    settings = {
        "spin (OMP_WAIT_POLICY unset)": {"OMP_WAIT_POLICY": None},
        "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
        "1 thread": {"OMP_NUM_THREADS": "1"},
    }
    busy_code = "while True: pass"  # killed in the finally below
    out = {}
    for neighbour in ("idle", "busy"):
        hog = None
        if neighbour == "busy":  # a CPU-bound process on each core, as a second job would be
            hog = [
                subprocess.Popen([sys.executable, "-c", busy_code])
                for _ in range(os.cpu_count() or 2)
            ]
            time.sleep(1)
        try:
            for name, env in settings.items():
                proc = subprocess.run(
                    [sys.executable, __file__, "_decode"],
                    capture_output=True,
                    text=True,
                    env=_child_env(env),
                    timeout=1800,
                )
                if proc.returncode:
                    raise SystemExit(proc.stderr[-2000:])
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                out[f"{neighbour} / {name}"] = r
                print(
                    f"{neighbour:5s} {name:30s} {r['seconds']:6.2f} s ({r['threads']} threads, "
                    f"OMP_WAIT_POLICY {r['omp_wait_policy']}, load {r['load_avg_1min']:.1f})",
                    flush=True,
                )
        finally:
            for p in hog or []:
                p.kill()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="+", choices=["matmul", "step", "threads", "all", "_decode"])
    ap.add_argument("--steps", type=int, default=3, help="timed distill steps per precision")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    what = set(args.what)
    if "all" in what:
        what |= {"matmul", "step", "threads"}
    if "_decode" in what:
        _decode_child()
        return 0
    from lmsmith.precision import hardware

    result = {"hardware": hardware("cpu"), "cpu_cores": os.cpu_count()}
    print(f"hardware: {result['hardware']}")
    if "matmul" in what:
        result["matmul"] = matmul(args)
        print(json.dumps(result["matmul"]))
    if "step" in what:
        result["step"] = step(args)
    if "threads" in what:
        result["threads"] = threads(args)
    if args.json:
        from lmsmith.runs import write_json

        write_json(args.json, result)
        print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
