"""What ``lmsmith distill`` prints around :func:`lmsmith.distill.trainer.run` (the table in
:mod:`lmsmith.cli` parses the options and calls it)."""

from __future__ import annotations

import os


def _main_process() -> bool:
    """Under ``accelerate launch`` every process runs the command; one prints."""
    return os.environ.get("RANK", "0") == "0"


def show_precision(cfg) -> None:
    from lmsmith.precision import describe, resolve_precision

    if not _main_process():
        return
    print(describe(cfg.train.precision, resolve_precision(cfg.train.precision)), flush=True)


def show_run(cfg, s: dict) -> None:
    if not _main_process():
        return
    print("\n| method | steps | final loss | tokens/s | teacher-token share | eval ROUGE-L |")
    print("|---|---|---|---|---|---|")
    share = "–" if s["teacher_token_share"] is None else f"{100 * s['teacher_token_share']:.1f}%"
    ev = f"{s['eval_rougeL']:.2f}" if "eval_rougeL" in s else "–"
    print(
        f"| {s['method']} | {s['steps']} | {_num(s['final_loss'], '.4f')} "
        f"| {_num(s['tokens_per_s'], '.1f')} "
        f"| {share} | {ev} |"
    )
    print(
        f"\nstudent: {s['student_dir']}\n"
        f"run folder: {s['run_dir']} (config.json, metrics.jsonl, summary.json)"
    )


def _num(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)
