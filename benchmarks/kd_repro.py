"""Reproduce SWITCH's claims at CPU scale: one (method, student, seed) cell per call.

    python benchmarks/kd_repro.py cell --method switch --layers 10 --seed 0
    python benchmarks/kd_repro.py cell --method switch --layers 10 --seed 0 --tag exp-tau0.3 \
        --set rollout.tau0=0.3
    python benchmarks/kd_repro.py aggregate          # tables (Markdown) + plots from the JSON

A cell starts from the SFT warm-up checkpoint of its student size (built once, cached under
runs/kd/), trains with the fixed budget below, evaluates on fixed subsets of Dolly and
Self-Instruct, and stores ``benchmarks/results/kd/<tag>-L<layers>-s<seed>.json``. Existing
cells are skipped, so the study accumulates across runs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "kd"
WORK = ROOT / "runs" / "kd"
DATA = ROOT.parent / "shared" / "data" / "instruct"

# The fixed budget of every cell of the study (docs/results.md repeats it). The issue asked for
# ~15-minute cells; the 44 cells of the grid at that size are ~11 hours of this 2-core machine,
# so the main budget is sized to fit the whole grid in one ~2-hour run (~3 minutes a cell).
# "long" is the size (30 steps of 128-token rollouts, ~15 minutes a cell), kept for
# whoever has the hours; "quick" is the earlier one-seed sweep of SWITCH's knobs.
WARMUP = {
    "warmup_steps": 60,  # SFT warm-up on dolly/dev, shared by every method of a student size
    "warmup_lr": 3e-4,
}
BUDGETS = {
    "main": {
        **WARMUP,
        "steps": 12,  # distillation steps per cell
        "batch_size": 8,
        "lr": 5e-5,
        "max_new_tokens": 64,  # rollout length
        "eval_rows": {"dolly": 100, "self-inst": 50},  # the first N rows of each validation file
        "eval_max_new_tokens": 128,
        "eval_seed": 10,
        "eval_engine": "lean",  # bf16 rollout decoder, 2.4x faster than HF generate here
        "eval_batch_size": 16,
    },
    "quick": {
        **WARMUP,
        "steps": 12,
        "batch_size": 8,
        "lr": 5e-5,
        "max_new_tokens": 64,
        "eval_rows": {"dolly": 60},
        "eval_max_new_tokens": 128,
        "eval_seed": 10,
        "eval_engine": "hf",
        "eval_batch_size": 8,
    },
}
BUDGETS["long"] = {**BUDGETS["main"], "steps": 30, "max_new_tokens": 128}
FOLDERS = {"main": "kd", "quick": "kd-quick", "long": "kd-long"}
METHODS = ["sft", "kd", "seqkd", "imitkd", "gkd", "distillm", "skd", "adaswitch", "switch"]


def _lm():
    from lmsmith.models import load_lm

    return load_lm("smollm2-135m-instruct")


def warmup(layers: int, teacher, tok) -> Path:
    """The SFT-warmed student of this size (built once; a crash leaves no half folder)."""
    from lmsmith import config as C
    from lmsmith.distill.config import DistillConfig
    from lmsmith.distill.trainer import run
    from lmsmith.models import layer_pruned

    out = WORK / f"warmup-L{layers}"
    if (out / "student" / "config.json").exists():
        return out / "student"
    cfg = C.load(
        DistillConfig,
        None,
        {
            "method": "sft",
            "data": str(DATA / "dolly" / "dev.jsonl"),
            "max_steps": WARMUP["warmup_steps"],
            "batch_size": 8,
            "lr": WARMUP["warmup_lr"],
            "output_dir": str(out),
            "seed": 0,
        },
    )
    run(cfg, teacher, layer_pruned(teacher, layers), tok)
    return out / "student"


def evaluate(model, tok, budget: dict) -> dict:
    from lmsmith.data.instruct import load_instruct
    from lmsmith.evaluate import EvalConfig, evaluate_rows

    out = {}
    for name, n in budget["eval_rows"].items():
        path = DATA / ("dolly" if name == "dolly" else "self-inst") / "valid.jsonl"
        cfg = EvalConfig(
            data=str(path),
            limit=n,
            seeds=[budget["eval_seed"]],
            max_new_tokens=budget["eval_max_new_tokens"],
            batch_size=budget.get("eval_batch_size", 8),
            engine=budget.get("eval_engine", "hf"),
            progress=False,
        )
        metrics, _ = evaluate_rows(model, tok, load_instruct(path, limit=n), cfg)
        out[name] = {"rougeL": metrics["rougeL_mean"], "by_length": metrics["by_length"]}
    return out


def cell(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from lmsmith import config as C
    from lmsmith.distill.config import DistillConfig
    from lmsmith.distill.trainer import run

    tag = args.tag or args.method
    budget = BUDGETS[args.budget]
    results = RESULTS.with_name(FOLDERS[args.budget])
    path = results / f"{tag}-L{args.layers}-s{args.seed}.json"
    if path.exists():
        print(f"skip: {path} exists")
        return 0
    t0 = time.perf_counter()
    teacher, tok = _lm()
    if args.method == "teacher":
        result = {"eval": evaluate(teacher, tok, budget)}
    else:
        start = warmup(args.layers, teacher, tok)
        student = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
        result = {}
        if args.method != "warmup":
            values = {
                "method": args.method,
                "data": str(DATA / "dolly" / "dev.jsonl"),
                "max_steps": budget["steps"],
                "batch_size": budget["batch_size"],
                "lr": budget["lr"],
                "max_new_tokens": budget["max_new_tokens"],
                "seed": args.seed,
                "progress": False,
                "output_dir": str(WORK / f"{args.budget}-{tag}-L{args.layers}-s{args.seed}"),
            }
            for kv in args.set:
                k, v = kv.split("=", 1)
                values[k] = v
            cfg = C.load(DistillConfig, None, values)
            summary = run(cfg, teacher, student, tok)
            metrics = [
                json.loads(x)
                for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()
            ]
            result["train"] = summary
            result["config"] = C.to_dict(cfg)
            result["teacher_share_by_position"] = _share_by_position(metrics)
        result["eval"] = evaluate(student, tok, budget)
    result.update(
        method=args.method,
        tag=tag,
        layers=args.layers,
        seed=args.seed,
        budget=budget,
        wall_time_s=time.perf_counter() - t0,
        commit=_commit(),
    )
    from lmsmith.runs import write_json

    write_json(path, result)
    print(json.dumps({k: result["eval"][k]["rougeL"] for k in result["eval"]}), f"→ {path}")
    return 0


# The ablation of SWITCH's threshold schedule (10-layer student; the exponential decay 0.02 row
# is the main SWITCH cell).
ABLATION = {
    "switch-constant": ["rollout.schedule=constant"],
    "switch-linear0.01": ["rollout.schedule=linear", "rollout.decay=0.01"],
    "switch-exp0.005": ["rollout.decay=0.005"],
    "switch-exp0.05": ["rollout.decay=0.05"],
}


def grid_cells(seeds=(0, 1, 2)) -> list[list[str]]:
    """The study's cells as `cell` arguments, in the order `grid` runs them: references, then
    seed by seed the nine methods on the main student, the small student and the ablation."""
    cells = [
        ["--method", "teacher", "--layers", "30"],
        ["--method", "warmup", "--layers", "10"],
        ["--method", "warmup", "--layers", "5"],
    ]
    for seed in seeds:
        s = ["--seed", str(seed)]
        cells += [["--method", m, "--layers", "10", *s] for m in METHODS]
        cells += [["--method", m, "--layers", "5", *s] for m in ("switch", "gkd", "distillm")]
        if seed == seeds[0]:
            for tag, sets in ABLATION.items():
                extra = [a for kv in sets for a in ("--set", kv)]
                cells.append(["--method", "switch", "--layers", "10", "--tag", tag, *s, *extra])
    return cells


def grid(args) -> int:
    """Run every missing cell of the study, one process each (a failed cell does not stop the
    others; it is reported and retried on the next call)."""
    import subprocess

    cells = grid_cells()
    failed = []
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(cells, 1):
        opts = dict(zip(c[::2], c[1::2]))
        name = f"{opts.get('--tag', opts['--method'])}-L{opts['--layers']}-s{opts.get('--seed', 0)}"
        print(f"[{i}/{len(cells)}] {' '.join(c)}", flush=True)
        if args.dry_run:
            continue
        with open(logs / f"{name}.log", "w") as log:
            rc = subprocess.call(
                [sys.executable, __file__, "cell", "--budget", args.budget, *c],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if rc:
            failed.append(" ".join(c))
            print(f"  failed (exit {rc}), log: {logs / (name + '.log')}", flush=True)
    if failed:
        print(f"{len(failed)} cells failed:", *failed, sep="\n  ")
    return 1 if failed else 0


def _commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def _share_by_position(rows: list[dict]) -> dict | None:
    """Teacher-token share per position bucket, averaged over the logged steps."""
    acc: dict[str, list[float]] = {}
    for r in rows:
        for k, v in (r.get("teacher_share_by_position") or {}).items():
            if v is not None:
                acc.setdefault(k, []).append(v)
    return {k: statistics.fmean(v) for k, v in acc.items()} or None


def aggregate(args) -> int:
    folder = RESULTS.with_name(FOLDERS[args.budget])
    cells = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    if not cells:
        print("no cells yet")
        return 1
    groups: dict[tuple[str, int], list[dict]] = {}
    for c in cells:
        groups.setdefault((c["tag"], c["layers"]), []).append(c)

    def ms(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "–"
        m = statistics.fmean(vals)
        s = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{m:.2f} ± {s:.2f}" if len(vals) > 1 else f"{m:.2f}"

    lines = [
        "| method (tag) | student layers | seeds | Dolly ROUGE-L | Self-Inst ROUGE-L | teacher-token share |",
        "|---|---|---|---|---|---|",
    ]
    for (tag, layers), cs in sorted(groups.items(), key=lambda x: (x[0][1], x[0][0])):
        share = [c["train"].get("teacher_token_share") for c in cs if c.get("train")]
        share = [s for s in share if s is not None]
        lines.append(
            f"| {tag} | {layers} | {len(cs)} | {ms([c['eval']['dolly']['rougeL'] for c in cs])} | "
            f"{ms([c['eval'].get('self-inst', {}).get('rougeL') for c in cs])} | "
            f"{(f'{100 * statistics.fmean(share):.1f}%' if share else '–')} |"
        )
    buckets = list(next(iter(cells))["eval"]["dolly"]["by_length"])
    lines += [
        "",
        "ROUGE-L on Dolly by reference length (words), mean over seeds:",
        "",
        "| method (tag) | layers | " + " | ".join(buckets) + " |",
        "|---|---|" + "---|" * len(buckets),
    ]
    for (tag, layers), cs in sorted(groups.items(), key=lambda x: (x[0][1], x[0][0])):
        vals = []
        for b in buckets:
            xs = [c["eval"]["dolly"]["by_length"][b]["rougeL"] for c in cs]
            xs = [x for x in xs if not math.isnan(x)]
            vals.append(f"{statistics.fmean(xs):.2f}" if xs else "–")
        lines.append(f"| {tag} | {layers} | " + " | ".join(vals) + " |")
    share_rows = [
        (k, cs) for k, cs in groups.items() if any(c.get("teacher_share_by_position") for c in cs)
    ]
    if share_rows:
        pos = list(
            next(
                c["teacher_share_by_position"]
                for _, cs in share_rows
                for c in cs
                if c.get("teacher_share_by_position")
            )
        )
        lines += [
            "",
            "Share of teacher-written tokens by response position:",
            "",
            "| method (tag) | layers | " + " | ".join(pos) + " |",
            "|---|---|" + "---|" * len(pos),
        ]
        for (tag, layers), cs in sorted(share_rows):
            vals = []
            for p in pos:
                xs = [
                    c["teacher_share_by_position"].get(p)
                    for c in cs
                    if c.get("teacher_share_by_position")
                ]
                xs = [x for x in xs if x is not None]
                vals.append(f"{100 * statistics.fmean(xs):.1f}%" if xs else "–")
            lines.append(f"| {tag} | {layers} | " + " | ".join(vals) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    _plots(groups, buckets, "" if args.budget == "main" else f"-{args.budget}")
    return 0


def _plots(groups, buckets, suffix: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (tag, layers), cs in sorted(groups.items()):
        ys = []
        for b in buckets:
            xs = [c["eval"]["dolly"]["by_length"][b]["rougeL"] for c in cs]
            xs = [x for x in xs if not math.isnan(x)]
            ys.append(statistics.fmean(xs) if xs else float("nan"))
        ax.plot(buckets, ys, marker="o", label=f"{tag} (L{layers})")
    ax.set_xlabel("reference length (words)")
    ax.set_ylabel("ROUGE-L (Dolly subset)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / f"kd_rouge_by_length{suffix}.png", dpi=110)
    fig, ax = plt.subplots(figsize=(7, 4))
    for (tag, layers), cs in sorted(groups.items()):
        sp = [c["teacher_share_by_position"] for c in cs if c.get("teacher_share_by_position")]
        if not sp:
            continue
        keys = list(sp[0])
        ax.plot(
            keys,
            [100 * statistics.fmean([s[k] for s in sp if k in s]) for k in keys],
            marker="o",
            label=f"{tag} (L{layers})",
        )
    ax.set_xlabel("response position")
    ax.set_ylabel("teacher-written tokens (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / f"kd_intervention_by_position{suffix}.png", dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cell", help="run one (method, student, seed) cell")
    c.add_argument("--method", required=True, choices=METHODS + ["teacher", "warmup"])
    c.add_argument("--layers", type=int, default=10)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--tag", default=None, help="name of the cell (default: the method)")
    c.add_argument(
        "--set", action="append", default=[], help="config override key=value (repeatable)"
    )
    g = sub.add_parser("grid", help="run every missing cell of the study in turn")
    g.add_argument("--budget", choices=list(BUDGETS), default="main")
    g.add_argument("--dry-run", action="store_true", help="list the cells only")
    a = sub.add_parser("aggregate", help="tables and plots from the stored cells")
    c.add_argument("--budget", choices=list(BUDGETS), default="main")
    a.add_argument("--out", default=None, help="also write the Markdown tables here")
    a.add_argument("--budget", choices=list(BUDGETS), default="main")
    args = ap.parse_args(argv)
    return {"cell": cell, "grid": grid, "aggregate": aggregate}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
