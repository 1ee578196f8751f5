"""``make demo``: the main job on the embedded default, offline.

Until distillation lands: the embedded teacher answers a few built-in prompts, and where
../shared/data is present, its ROUGE-L on 50 Dolly validation rows is printed.
"""

from __future__ import annotations

import time

from lmsmith.data import shared_data_dir
from lmsmith.data.instruct import build_prompt, builtin_prompts, load_instruct
from lmsmith.evaluate import EvalConfig, evaluate_rows, format_table, generate
from lmsmith.models import load_lm
from lmsmith.runs import make_run_dir, write_json


def main(argv: list[str]) -> int:
    t0 = time.perf_counter()
    model, tok = load_lm("smollm2-135m-instruct")
    rows = builtin_prompts()
    picks = [rows[i] for i in range(0, len(rows), len(rows) // 4)][:4]
    answers = generate(
        model,
        tok,
        [build_prompt(r, tok, chat_template=True) for r in picks],
        max_new_tokens=64,
        greedy=True,
    )
    for r, a in zip(picks, answers):
        print(f"\n[{r.category}] {r.instruction}\n  → {a}")
    data = shared_data_dir()
    if data and (data / "instruct/dolly/valid.jsonl").exists():
        run = make_run_dir(None, "demo")
        cfg = EvalConfig(
            data=str(data / "instruct/dolly/valid.jsonl"),
            limit=50,
            seeds=[10],
            max_new_tokens=128,
            output_dir=str(run),
        )
        metrics, _ = evaluate_rows(model, tok, load_instruct(cfg.data, limit=50), cfg)
        write_json(run / "metrics.json", metrics)
        print("\n" + format_table(metrics))
        print(f"run folder: {run}")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s")
    return 0
