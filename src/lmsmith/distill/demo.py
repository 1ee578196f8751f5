"""``make demo``: SWITCH distillation on the embedded default, offline, in minutes.

Teacher: the embedded SmolLM2-135M-Instruct. Student: a layer-pruned copy (10 of its 30 layers).
Data: lmsmith's built-in prompts with teacher-written references (greedy, cached once).
Steps: a short SFT warm-up, then SWITCH; a ROUGE-L table for the teacher, the student before
and after, and the teacher-intervention rate.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from lmsmith import config
from lmsmith.data.instruct import (
    InstructExample,
    build_prompt,
    builtin_prompts,
    load_instruct,
    save_instruct,
)
from lmsmith.distill.config import DistillConfig
from lmsmith.generation import generate
from lmsmith.metrics.rouge import rouge_l
from lmsmith.models import cache_home, layer_pruned, load_lm
from lmsmith.precision import Precision, describe, hardware, resolve_precision
from lmsmith.runs import make_run_dir, write_json

TEACHER = "smollm2-135m-instruct"


def teacher_references(
    teacher, tok, rows: list[InstructExample], max_new: int
) -> list[InstructExample]:
    """The teacher's greedy answers as references, cached in $LMSMITH_HOME (written once)."""
    key = hashlib.sha256(
        json.dumps([TEACHER, max_new, [(r.instruction, r.input) for r in rows]]).encode()
    ).hexdigest()[:16]
    path = cache_home() / "demo" / f"teacher-refs-{key}.jsonl"
    if path.exists():
        return load_instruct(path)
    prompts = [build_prompt(r, tok, chat_template=True) for r in rows]
    answers = generate(
        teacher, tok, prompts, max_new_tokens=max_new, greedy=True, batch_size=8, progress=True
    )
    out = [
        InstructExample(r.instruction, r.input, [a or "(no answer)"], None, r.source, r.category)
        for r, a in zip(rows, answers)
    ]
    save_instruct(out, path)
    return load_instruct(path)


def score(model, tok, rows: list[InstructExample], max_new: int) -> float:
    prompts = [build_prompt(r, tok, chat_template=True) for r in rows]
    answers = generate(model, tok, prompts, max_new_tokens=max_new, greedy=True, batch_size=8)
    return sum(rouge_l(a, r.references) for a, r in zip(answers, rows)) / len(rows)


@dataclass
class DemoConfig:
    layers: int = config.field(10, help="student layers (of 30)")
    warmup_steps: int = config.field(30, help="SFT warm-up steps")
    switch_steps: int = config.field(12, help="SWITCH steps")
    max_new_tokens: int = config.field(64, help="tokens generated per answer")
    precision: Precision = config.field(
        "auto", help="auto: bf16 where the CPU/GPU computes it natively, else fp32"
    )
    output_dir: str | None = config.field(None, help="run folder (default runs/demo-<time>)")

    def __post_init__(self):
        for name in ("layers", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def main(args: DemoConfig) -> dict:
    """The demo, printing each step as it goes (it is the `make demo` script); the summary."""
    t0 = time.perf_counter()
    run = make_run_dir(args.output_dir, "demo")
    precision = resolve_precision(args.precision)
    print(describe(args.precision, precision), flush=True)
    print(f"[1/5] loading the teacher ({TEACHER}) and a {args.layers}-layer student")
    teacher, tok = load_lm(TEACHER)
    rows = builtin_prompts()
    print(
        f"[2/5] teacher-written references for {len(rows)} built-in prompts (cached after the first run)"
    )
    refs = teacher_references(teacher, tok, rows, args.max_new_tokens)
    eval_rows = refs[::5]  # every fifth prompt is held out
    train_rows = [r for i, r in enumerate(refs) if i % 5]
    save_instruct(train_rows, run / "train.jsonl")
    save_instruct(eval_rows, run / "eval.jsonl")
    student = layer_pruned(teacher, args.layers)
    before = score(student, tok, eval_rows, args.max_new_tokens)
    teacher_score = score(teacher, tok, eval_rows, args.max_new_tokens)

    def cfg(method: str, steps: int, out: Path, lr: float) -> DistillConfig:
        return config.load(
            DistillConfig,
            None,
            {
                "method": method,
                "data": str(run / "train.jsonl"),
                "chat_template": True,
                "max_steps": steps,
                "batch_size": 8,
                "lr": lr,
                "max_new_tokens": args.max_new_tokens,
                "output_dir": str(out),
                "precision": args.precision,
                "seed": 0,
                "tau0": 0.6,
                "decay": 0.02,
            },
        )

    from lmsmith.distill.trainer import run as distill

    print(f"[3/5] SFT warm-up: {args.warmup_steps} steps")
    distill(cfg("sft", args.warmup_steps, run / "warmup", 3e-4), teacher, student, tok)
    warm = score(student, tok, eval_rows, args.max_new_tokens)
    print(f"[4/5] SWITCH: {args.switch_steps} steps (the teacher steps in where JSD > tau_t)")
    s = distill(cfg("switch", args.switch_steps, run / "switch", 5e-5), teacher, student, tok)
    after = score(student, tok, eval_rows, args.max_new_tokens)
    print(
        "[5/5] results (greedy decoding, ROUGE-L x100 against teacher references, "
        f"{len(eval_rows)} held-out built-in prompts)\n"
    )
    table = [
        ("teacher (30 layers)", teacher_score, "–"),
        (f"student before ({args.layers} layers)", before, "–"),
        ("student after SFT warm-up", warm, "–"),
        ("student after SWITCH", after, f"{100 * s['teacher_token_share']:.1f}%"),
    ]
    print("| model | ROUGE-L | teacher-written tokens |\n|---|---|---|")
    for name, v, share in table:
        print(f"| {name} | {v:.2f} | {share} |")
    summary = {
        "teacher": teacher_score,
        "student_before": before,
        "student_warmup": warm,
        "student_after": after,
        "teacher_token_share": s["teacher_token_share"],
        "eval_rows": len(eval_rows),
        "precision": precision,
        "hardware": hardware(),
        "wall_time_s": time.perf_counter() - t0,
    }
    write_json(run / "summary.json", summary)
    print(
        f"\nwritten: {run}/ (summary.json; warmup/ and switch/ with config.json, metrics.jsonl, "
        f"summary.json and the student)\nstudent after SWITCH: {s['student_dir']}"
    )
    print(f"demo finished in {summary['wall_time_s'] / 60:.1f} min")
    return summary
