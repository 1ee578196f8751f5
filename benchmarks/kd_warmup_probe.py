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


def main(argv=None) -> int:
    from kd_study import BENCHES, WORK, repeat_share, split_rows
    from lmsmith.data.instruct import build_prompt, load_instruct
    from lmsmith.models import layer_pruned, load_lm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--loss", choices=["ce", "kd"], default="ce")
    ap.add_argument("--data", default=None, help="training rows (default: the warm-up rows)")
    ap.add_argument("--response-tokens", type=int, default=64)
    ap.add_argument("--every", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    files = split_rows()
    teacher, tok = load_lm("smollm2-135m-instruct")
    teacher.eval()

    def encode(rows, cut):
        out = []
        for ex in rows:
            p = tok(build_prompt(ex, tok, True), add_special_tokens=False)["input_ids"]
            r = tok(ex.references[0] + tok.eos_token, add_special_tokens=False)["input_ids"]
            out.append((p, r[:cut]))
        return out

    train = encode(load_instruct(args.data or files["warmup"]), args.response_tokens)
    val = encode(load_instruct(files["val"], limit=32), 64)
    probe = load_instruct(BENCHES["dolly"], limit=32)
    student = layer_pruned(teacher, args.layers)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.01)  # torch default

    @torch.no_grad()
    def val_ce() -> float:
        tot, n = 0.0, 0
        for p, r in val:
            logits = student(torch.tensor([p + r])).logits[0, len(p) - 1 : -1]
            tot += F.cross_entropy(logits, torch.tensor(r), reduction="sum").item()
            n += len(r)
        return tot / n

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
            row = {"step": step, "train": round(total, 3), "val_ce": round(val_ce(), 3)}
            if step % (2 * args.every) == 0:
                rate, mean_len, text = loops()
                row.update(looping=rate, mean_len=round(mean_len, 1), last_answer=text[:160])
            row["s"] = round(time.perf_counter() - t0)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
