"""``lmsmith distill``: train a student from a teacher with any of the nine methods."""

from __future__ import annotations

from lmsmith import config as C
from lmsmith.distill.config import DistillConfig

USAGE = """usage: lmsmith distill [--config configs/distill/METHOD.yaml] [--key value ...]

e.g. lmsmith distill --method switch --teacher smollm2-135m-instruct --student layers:10 \\
       --data ../shared/data/instruct/dolly/dev.jsonl --max-steps 20 --output-dir runs/switch

options (a key may be given by its last part when unique: --method = --train.method):
"""


def main(argv: list[str]) -> int:
    from lmsmith.cli import split_config

    if "-h" in argv or "--help" in argv:
        print(USAGE + C.describe(DistillConfig))
        return 0
    path, rest = split_config(argv)
    cfg = C.load(DistillConfig, path, C.parse_overrides(rest))
    from lmsmith.distill.trainer import run
    from lmsmith.precision import describe, resolve_precision

    print(describe(cfg.train.precision, resolve_precision(cfg.train.precision)), flush=True)
    s = run(cfg)
    print("\n| method | steps | final loss | tokens/s | teacher-token share | eval ROUGE-L |")
    print("|---|---|---|---|---|---|")
    share = "–" if s["teacher_token_share"] is None else f"{100 * s['teacher_token_share']:.1f}%"
    ev = f"{s['eval_rougeL']:.2f}" if "eval_rougeL" in s else "–"
    print(
        f"| {s['method']} | {s['steps']} | {s['final_loss']:.4f} | {s['tokens_per_s']:.1f} | {share} | {ev} |"
    )
    print(
        f"\nstudent: {s['student_dir']}\nrun folder: {s['run_dir']} (config.json, metrics.jsonl, summary.json)"
    )
    return 0
