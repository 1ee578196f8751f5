"""How quickly a layer-pruned SmolLM2 becomes a language model again (issue 18's warm-up probe).

    python benchmarks/kd_warmup_probe.py --layers 10 --steps 300 --lr 5e-4
    python benchmarks/kd_warmup_probe.py --layers 15 --steps 120 --lr 3e-4 --loss kd \\
        --data runs/kd-study/data/warmup-teacher.jsonl --response-tokens 128

Trains a fresh ``layer_pruned`` student on the SWITCH study's warm-up rows (``kd_study.py``
writes them: ``runs/kd-study/data/warmup.jsonl``) with a plain loop (AdamW with
weight decay 0.01, batch 8, clip 1, chat template, each reference cut to its first N tokens
after the EOS is appended, as the trainer cuts it), and every ``--every`` steps prints a JSON line with the training loss,
the cross-entropy on 32 held-out references (the study's DistiLLM validation rows) and, every
second time, the share of 32 greedy Dolly-valid answers (128 new tokens) that loop (over half
of their word 4-grams repeat earlier ones) with their mean length. ``--loss kd`` is the forward
KL to the teacher's distribution on the same sequences instead of the cross-entropy.

It exists to choose the study's warm-up (docs/results.md, "the warm-up probe"); the loop is
kept apart from the trainer on purpose, so that probing never touches training semantics.

``--trainer`` instead steps lmsmith's own trainer with the study's warm-up settings
(``kd_study.warmup_values``: the same rows, order, skipped prompts and optimiser as the warm-up
cell; ``--steps``, ``--lr`` and ``--loss`` override the recipe), and every ``--every`` steps
scores the student as the study does, on the first ``--rows`` rows of each benchmark (greedy,
128 new tokens, lean engine): ROUGE-L, the share of looping answers and of answers that stop
before the cap, beside the held-out cross-entropy. Its step-60 line with the study's recipe
matches the warm-up cell's first rows exactly (a check that the probe is the cell's training).

    python benchmarks/kd_warmup_probe.py --trainer --layers 20 --steps 180 --every 60
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def encode(tok, rows, cut: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids) pairs: chat template, the EOS appended, then the cut."""
    import kd_study as ks

    out = []
    for ex in rows:
        r = tok(ex.references[0] + tok.eos_token, add_special_tokens=False)["input_ids"]
        out.append((ks.prompt_ids(ex, tok), r[:cut]))
    return out


@torch.no_grad()
def mean_ce(model, seqs) -> float:
    """Cross-entropy per reference token over ``encode``'s pairs."""
    tot, n = 0.0, 0
    for p, r in seqs:
        logits = model(torch.tensor([p + r])).logits[0, len(p) - 1 : -1]
        tot += F.cross_entropy(logits, torch.tensor(r), reduction="sum").item()
        n += len(r)
    return tot / n


def score(student, tok, val, rows: int) -> dict:
    """The student scored as a study cell scores it, on each benchmark's first ``rows`` rows,
    beside its cross-entropy on the held-out references ``val``."""
    import kd_study as ks

    student.eval()
    phase = ks.PHASES["main"]
    out = {"val_ce": round(mean_ce(student, val), 3)}
    for name, e in ks.evaluate(student, tok, phase, limit=rows).items():
        n = len(e["rows"])
        cap = phase["eval_max_new_tokens"]
        out[name] = {
            "rougeL": round(e["rougeL"], 2),
            "looping": round(sum(r > ks.LOOPING for r in e["repeat_share"]) / n, 3),
            "stopped": round(sum(k < cap for k in e["gen_tokens"]) / n, 3),
            "first_rows_rougeL": [round(x, 4) for x in e["row_rougeL"][:4]],
        }
    return out


def main(argv=None) -> int:
    from kd_study import BENCHES, WORK, repeat_share, split_rows
    from lmsmith.data.instruct import build_prompt, load_instruct
    from lmsmith.models import layer_pruned, load_lm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=10, help="student layers (of 30)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--loss", choices=["ce", "kd"], default="ce")
    ap.add_argument("--data", default=None, help="training rows (default: the warm-up rows)")
    ap.add_argument("--response-tokens", type=int, default=64)
    ap.add_argument("--every", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trainer", action="store_true", help="step lmsmith's trainer (see above)")
    ap.add_argument(
        "--rows", type=int, default=100, help="rows of each benchmark --trainer and --score use"
    )
    ap.add_argument(
        "--score", action="store_true", help="score the plain loop's end point as --trainer does"
    )
    ap.add_argument(
        "--schedule",
        choices=["constant", "linear", "cosine"],
        default="constant",
        help="--trainer: the learning rate after warm-up (decaying ones reach 0 at --steps)",
    )
    ap.add_argument(
        "--targets",
        choices=["references", "teacher"],
        default="references",
        help="--trainer: SFT targets (teacher: its greedy answers, kd_study.teacher_targets)",
    )
    args = ap.parse_args(argv)
    if args.trainer:
        return trainer_probe(args)

    torch.manual_seed(args.seed)
    files = split_rows()
    teacher, tok = load_lm("smollm2-135m-instruct")
    teacher.eval()

    train = encode(tok, load_instruct(args.data or files["warmup"]), args.response_tokens)
    val = encode(tok, load_instruct(files["val"], limit=32), 64)
    probe = load_instruct(BENCHES["dolly"], limit=32)
    student = layer_pruned(teacher, args.layers)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.01)  # torch default

    @torch.no_grad()
    def loops() -> tuple[float, float, str]:
        student.eval()
        shares, lengths, text = [], [], ""
        for ex in probe:
            ids = tok(build_prompt(ex, tok, True), add_special_tokens=False, return_tensors="pt")
            p = ids["input_ids"]
            o = student.generate(
                p, max_new_tokens=128, do_sample=False, pad_token_id=tok.eos_token_id
            )
            text = tok.decode(o[0, p.shape[1] :], skip_special_tokens=True)
            shares.append(repeat_share(text))
            lengths.append(o.shape[1] - p.shape[1])
        student.train()
        return sum(s > 0.5 for s in shares) / len(shares), sum(lengths) / len(lengths), text

    rng, order, t0 = random.Random(args.seed), [], time.perf_counter()
    print(json.dumps({"args": vars(args), "work": str(WORK)}), flush=True)
    for step in range(1, args.steps + 1):
        if len(order) < 8:
            idx = list(range(len(train)))
            rng.shuffle(idx)
            order += idx
        batch = [train[i] for i in order[:8]]
        del order[:8]
        n, total = sum(len(r) for _, r in batch), 0.0
        for p, r in batch:
            ids = torch.tensor([p + r])
            logits = student(ids).logits[0, len(p) - 1 : -1]
            if args.loss == "kd":
                with torch.no_grad():
                    t = teacher(ids).logits[0, len(p) - 1 : -1].log_softmax(-1)
                loss = F.kl_div(logits.log_softmax(-1), t, log_target=True, reduction="sum") / n
            else:
                loss = F.cross_entropy(logits, torch.tensor(r), reduction="sum") / n
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % args.every == 0:
            row = {
                "step": step,
                "train": round(total, 3),
                "val_ce": round(mean_ce(student, val), 3),
            }
            if step % (2 * args.every) == 0:
                rate, mean_len, text = loops()
                row.update(looping=rate, mean_len=round(mean_len, 1), last_answer=text[:160])
            row["s"] = round(time.perf_counter() - t0)
            print(json.dumps(row), flush=True)
    if args.score:  # the end point scored exactly as the trainer probe scores it
        full_val = encode(tok, load_instruct(files["val"]), 64)
        print(json.dumps({"step": args.steps, **score(student, tok, full_val, args.rows)}))
    return 0


def trainer_probe(args) -> int:
    """The study's warm-up trained by lmsmith's trainer, scored every ``--every`` steps."""
    import kd_study as ks
    from lmsmith import config as C
    from lmsmith.data.instruct import load_instruct
    from lmsmith.distill.config import DistillConfig
    from lmsmith.distill.trainer import DistillTrainer
    from lmsmith.models import layer_pruned, load_lm

    ks.LAYERS = args.layers  # the study's student unless asked otherwise
    recipe = {**ks.WARMUP, "steps": args.steps, "lr": args.lr}
    recipe["method"] = {"ce": "sft", "kd": "kd"}[args.loss]
    recipe["max_response_tokens"] = args.response_tokens
    if args.schedule != "constant":
        recipe["lr_schedule"] = args.schedule
    files = ks.split_rows()
    if args.data:
        files = {**files, "warmup": Path(args.data)}
    out = ks.WORK / "probe" / f"L{args.layers}-{recipe['method']}-{args.steps}-{args.lr:g}"
    out = out.with_name(out.name + ("" if args.schedule == "constant" else f"-{args.schedule}"))
    teacher, tok = load_lm("smollm2-135m-instruct")
    teacher.eval()
    if args.targets == "teacher":
        recipe.update(targets="teacher", teacher_max_new_tokens=256)
        files = ks.warmup_files(teacher, tok, files, ks.WORK, recipe)
        out = out.with_name(out.name + "-teacher")
    values = {**ks.warmup_values(files, out, recipe), "seed": args.seed}  # the row order
    if args.seed:
        out = out.with_name(out.name + f"-seed{args.seed}")
        values["output_dir"] = str(out)
    cfg = C.load(DistillConfig, None, values)
    val = encode(tok, load_instruct(files["val"]), 64)

    tr = DistillTrainer(cfg, teacher, layer_pruned(teacher, args.layers), tok)
    tr.setup()
    print(json.dumps({"args": vars(args), "recipe": recipe, "rows": args.rows}), flush=True)
    t0, losses = time.perf_counter(), []
    while tr.step < args.steps:
        losses.append(tr.train_step()["loss"])
        if tr.step % args.every == 0:
            tail = losses[-args.every :]
            row = {"step": tr.step, "train": round(sum(tail) / len(tail), 3)}
            row.update(score(tr.accelerator.unwrap_model(tr.student), tok, val, args.rows))
            row["s"] = round(time.perf_counter() - t0)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
