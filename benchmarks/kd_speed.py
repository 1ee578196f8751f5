"""Distillation speed: SWITCH rollouts and training steps, side by side with TRL's GKDTrainer.

    python benchmarks/kd_speed.py --json benchmarks/results/kd_speed.json
    python benchmarks/kd_speed.py --prompts 4 --max-new 8 --steps 2 --skip-trl   # smoke

1. Rollout (16 Dolly prompts, batch 8, 128 new tokens): lmsmith's draft-and-verify SWITCH (batch
   by batch, and with continuous batching: every prompt at once, at most 8 rows decoding), the
   naive token-by-token SWITCH loop (both models stepped through the plain HF forward with its
   default cache, batch by batch), and plain student sampling followed by one teacher scoring
   pass. Row i draws the same random numbers in each, so the SWITCH rollouts must write the
   same tokens.
2. A full training step (rollout + teacher logits + loss + backward + optimiser): lmsmith SWITCH,
   lmsmith GKD (λ = 1, β = 0.5) and TRL's GKDTrainer with the same models, prompts, batch,
   lengths and precision; median over steps after a warm-up, and peak memory. Each trainer runs in
   its own process so that its peak memory is its own.

The student is the SFT warm-up checkpoint of benchmarks/kd_repro.py when it exists (runs/kd/
warmup-L10/student), else a fresh layer-pruned copy; the table says which.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "instruct" / "dolly" / "valid.jsonl"
WARM = ROOT / "runs" / "kd" / "warmup-L10" / "student"


def _models(args):
    import torch
    from transformers import AutoModelForCausalLM

    from lmsmith.models import layer_pruned, load_lm

    teacher, tok = load_lm("smollm2-135m-instruct")
    if args.random_init:  # GPU speed runs: same architectures, random weights
        from transformers import AutoConfig

        torch.manual_seed(0)
        teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model(**teacher.config.to_dict()))
    if WARM.exists() and not args.random_init:
        student, label = (
            AutoModelForCausalLM.from_pretrained(WARM, dtype=torch.float32),
            f"SFT warm-up ({WARM.relative_to(ROOT)})",
        )
    else:
        student, label = layer_pruned(teacher, 10), "fresh layer-pruned copy (10 of 30 layers)"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return teacher.to(dev).eval(), student.to(dev).eval(), tok, label


def _prompts(tok, n):
    from lmsmith.data.instruct import build_prompt, load_instruct, tokenize_prompt

    rows = load_instruct(DATA, limit=n)
    return rows, [
        tokenize_prompt(tok, build_prompt(r, tok, chat_template=True), 256)[0] for r in rows
    ]


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rollout_bench(args, teacher, student, tok, precision: str) -> dict:
    """The rollouts on the same prompts and random numbers, in one precision: fp32 as loaded, or
    bf16 (the naive loop on bf16 copies of the models through the HF forward; lmsmith's lean
    decoder on bf16 weight copies). The naive loop, lmsmith's SWITCH batch by batch and plain
    sampling run batch by batch; lmsmith's SWITCH with continuous batching gets every prompt at
    once and decodes at most ``--batch`` rows at a time. Row i draws the same noise in each."""
    import copy

    import torch

    from lmsmith.distill.rollout import SwitchRule, naive_switch_rollout, switch_rollout
    from lmsmith.generation import (
        Noise,
        lean_supported,
        left_pad,
        prepare_weights,
        sample_rollout,
    )

    dev = next(student.parameters()).device
    dtype = torch.bfloat16 if precision == "bf16" else None
    hf_t, hf_s = teacher, student
    if dtype is not None:
        hf_t, hf_s = copy.deepcopy(teacher).to(dtype), copy.deepcopy(student).to(dtype)
    t_weights = prepare_weights(teacher, dtype) if lean_supported(teacher) else None
    _, prompts = _prompts(tok, args.prompts)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    rule = lambda: SwitchRule(args.tau0, args.decay)  # noqa: E731
    noise = Noise.draw(len(prompts), seed=0)

    def lmsmith_switch(ids, mask, rows, batch=None):
        return switch_rollout(
            student,
            teacher,
            ids,
            mask,
            rule(),
            args.max_new,
            noise.select(rows),
            eos,
            pad,
            block_size=args.block,
            adaptive=True,
            dtype=dtype,
            teacher_weights=t_weights,
            batch=batch,
        )

    names = ["naive", "switch_per_batch", "switch", "plain"]
    res = {k: [0.0, 0] for k in names}
    stats = {k: [] for k in names}
    naive_rows = []
    for start in range(0, len(prompts), args.batch):
        rows = list(range(start, min(start + args.batch, len(prompts))))
        ids, mask = left_pad([prompts[i] for i in rows], pad)
        ids, mask = ids.to(dev), mask.to(dev)
        _sync()
        t0 = time.perf_counter()
        a = naive_switch_rollout(
            hf_s,
            hf_t,
            ids,
            mask,
            rule(),
            args.max_new,
            noise.select(rows),
            eos,
            pad,
            keep_teacher_logits=True,
        )
        _sync()
        t1 = time.perf_counter()
        b = lmsmith_switch(ids, mask, rows)
        _sync()
        t2 = time.perf_counter()
        c = sample_rollout(
            student, ids, mask, args.max_new, noise.select(rows), eos, pad, dtype=dtype
        )
        full, attn, _ = c.sequences()
        with torch.no_grad():
            hf_t(
                input_ids=full,
                attention_mask=attn,
                position_ids=(attn.cumsum(-1) - 1).clamp_min(0),
                logits_to_keep=args.max_new + 1,
            )
        _sync()
        t3 = time.perf_counter()
        for k, (t, r) in {
            "naive": (t1 - t0, a),
            "switch_per_batch": (t2 - t1, b),
            "plain": (t3 - t2, c),
        }.items():
            res[k][0] += t
            res[k][1] += int(r.mask.sum())
            stats[k].append(r.stats)
        naive_rows += [(a.mask[r], a.tokens[r]) for r in range(ids.shape[0])]
        per_batch_rows = [(b.mask[r], b.tokens[r]) for r in range(ids.shape[0])]
        stats["switch_per_batch"][-1]["rows"] = per_batch_rows
    # every prompt at once, at most --batch rows decoding, waiting prompts taking finished rows
    ids, mask = left_pad(prompts, pad)
    _sync()
    t0 = time.perf_counter()
    d = lmsmith_switch(ids.to(dev), mask.to(dev), list(range(len(prompts))), batch=args.batch)
    _sync()
    res["switch"] = [time.perf_counter() - t0, int(d.mask.sum())]
    stats["switch"].append(d.stats)

    def equal_rows(rows):  # rows that agree token for token with the naive loop
        return sum(
            bool(torch.equal(m, m2) and torch.equal(t[m], t2[m2]))
            for (m, t), (m2, t2) in zip(naive_rows, rows)
        )

    per_batch = [r for st in stats["switch_per_batch"] for r in st.pop("rows")]
    eq = {
        "switch": equal_rows([(d.mask[r], d.tokens[r]) for r in range(len(prompts))]),
        "switch_per_batch": equal_rows(per_batch),
    }
    tps = {k: v[1] / v[0] for k, v in res.items()}
    n = len(prompts)
    return {
        "rollout_tokens_per_s": tps,
        "rollout_seconds": {k: v[0] for k, v in res.items()},
        "rollout_tokens": {k: v[1] for k, v in res.items()},
        "switch_vs_naive_speedup": tps["switch"] / tps["naive"],
        "switch_per_batch_vs_naive_speedup": tps["switch_per_batch"] / tps["naive"],
        "switch_vs_plain_ratio": tps["switch"] / tps["plain"],
        "switch_equals_naive": eq["switch"] == n and eq["switch_per_batch"] == n,
        "rows_equal": f"{eq['switch']}/{n}",
        "rows_equal_per_batch": f"{eq['switch_per_batch']}/{n}",
        "teacher_token_share": d.teacher_share(),
        "forward_counts": stats,
        # rows × slots each model computed after the prompts: the naive loop steps every row of
        # a batch to the batch's last position; lmsmith drops finished rows or refills them
        # (and computes rejected drafts)
        "row_slots": {k: sum(st["row_slots"] for st in stats[k]) for k in names[:3]},
        "teacher_drafted_blocks": f"{d.stats['teacher_drafted_blocks']}/{d.stats['blocks']}",
    }


def _step_worker(args) -> dict:
    """One trainer in this process: median step time after warm-up, and peak RSS."""
    import torch

    teacher, student, tok, label = _models(args)
    rows, _ = _prompts(tok, args.batch * (args.steps + 1))
    times: list[float] = []
    if args.worker == "trl":
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        ds = Dataset.from_list(
            [
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": r.instruction
                            if not r.input
                            else f"{r.instruction}\n\n{r.input}",
                        },
                        # λ = 1: every sequence is generated, the reference is never trained on;
                        # cut so that TRL's truncation never drops the prompt
                        {"role": "assistant", "content": " ".join(r.references[0].split()[:32])},
                    ]
                }
                for r in rows
            ]
        )

        class Clock(TrainerCallback):
            def on_step_begin(self, *a, **k):
                self.t = time.perf_counter()

            def on_step_end(self, *a, **k):
                times.append(time.perf_counter() - self.t)

        with tempfile.TemporaryDirectory() as out:
            cfg = GKDConfig(
                output_dir=out,
                per_device_train_batch_size=args.batch,
                lmbda=1.0,
                beta=0.5,
                max_new_tokens=args.max_new,
                temperature=1.0,
                max_steps=args.steps + 1,
                learning_rate=5e-5,
                logging_steps=1,
                report_to=[],
                save_strategy="no",
                use_cpu=not torch.cuda.is_available(),
                bf16=args.precision == "bf16",
                max_length=256 + args.max_new,
                seed=0,
                dataloader_num_workers=0,
                disable_tqdm=True,
                gradient_checkpointing=False,
            )
            GKDTrainer(
                model=student,
                teacher_model=teacher,
                args=cfg,
                train_dataset=ds,
                processing_class=tok,
                callbacks=[Clock()],
            ).train()
    else:
        from lmsmith import config as C
        from lmsmith.data.instruct import save_instruct
        from lmsmith.distill.config import DistillConfig
        from lmsmith.distill.trainer import run

        with tempfile.TemporaryDirectory() as out:
            save_instruct(rows, Path(out) / "d.jsonl")
            cfg = C.load(
                DistillConfig,
                None,
                {
                    "method": args.worker,
                    "data": str(Path(out) / "d.jsonl"),
                    "chat_template": True,
                    "batch_size": args.batch,
                    "max_steps": args.steps + 1,
                    "max_new_tokens": args.max_new,
                    "student_share": 1.0,
                    "beta": 0.5,
                    "tau0": args.tau0,
                    "decay": args.decay,
                    "precision": args.precision,
                    "output_dir": str(Path(out) / "run"),
                    "progress": False,
                    "lr": 5e-5,
                },
            )
            run(cfg, teacher, student, tok)
            rows_m = [
                json.loads(x)
                for x in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()
            ]
            times = [r["step_time_s"] for r in rows_m if "step_time_s" in r]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    after_warmup = times[1:] or times
    return {
        "median_step_s": statistics.median(after_warmup),
        "step_times_s": times,
        "peak_mem_mb": peak_mb,
        "student": label,
    }


def step_bench(args, which: list[str]) -> dict:
    out = {}
    for w in which:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            w,
            "--prompts",
            str(args.prompts),
            "--batch",
            str(args.batch),
            "--max-new",
            str(args.max_new),
            "--steps",
            str(args.steps),
            "--precision",
            args.precision,
            "--tau0",
            str(args.tau0),
            "--decay",
            str(args.decay),
        ] + (["--random-init"] if args.random_init else [])
        print(f"… training steps: {w}", flush=True)
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "LMSMITH_LOG": "ERROR"}
        )
        if proc.returncode != 0:
            raise SystemExit(f"{w} worker failed:\n{proc.stderr[-3000:]}")
        out[w] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--block", type=int, default=4, help="initial draft length (adapts)")
    ap.add_argument(
        "--steps", type=int, default=5, help="timed training steps after one warm-up step"
    )
    ap.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="training-step precision (lmsmith rollouts decode in it too); auto: bf16 where the "
        "device computes it natively, else fp32",
    )
    ap.add_argument(
        "--rollout-precisions",
        type=lambda s: [p for p in s.split(",") if p not in ("", "none")],
        default=None,
        help="precisions of the rollout comparison, comma-separated ('none': training steps "
        "only; default: the training precision)",
    )
    ap.add_argument("--tau0", type=float, default=0.6)
    ap.add_argument("--decay", type=float, default=0.02)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument(
        "--random-init",
        action="store_true",
        help="teacher from config with random weights (GPU runs)",
    )
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_step_worker(args)))
        return 0
    import torch

    from lmsmith.precision import hardware, resolve_precision

    args.precision = resolve_precision(args.precision)  # workers get the resolved value
    if args.rollout_precisions is None:
        args.rollout_precisions = [args.precision]
    machine = {
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
        **hardware(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    print(f"machine: {machine}")
    teacher, student, tok, label = _models(args)
    per = {p: rollout_bench(args, teacher, student, tok, p) for p in args.rollout_precisions}
    del teacher, student
    # the headline keys are those of the training precision (the precision rollouts run in)
    head = per.get(args.precision) or next(iter(per.values()), {})
    result = {"machine": machine, "config": vars(args), "student": label, **head, "rollouts": per}
    if not args.skip_steps:
        steps = step_bench(args, ["switch", "gkd"] + ([] if args.skip_trl else ["trl"]))
        result["steps"] = steps
        result["switch_step_over_gkd_step"] = (
            steps["switch"]["median_step_s"] / steps["gkd"]["median_step_s"]
        )
        if "trl" in steps:
            result["gkd_step_over_trl_step"] = (
                steps["gkd"]["median_step_s"] / steps["trl"]["median_step_s"]
            )
    print(
        f"\nstudent: {label}; {args.prompts} prompts, batch {args.batch}, {args.max_new} new tokens, "
        f"SWITCH τ0={args.tau0} λ={args.decay}\n"
    )
    print("| rollout | precision | tokens/s | seconds |\n|---|---|---|---|")
    for p, r in per.items():
        for k, name in [
            ("naive", "naive token-by-token SWITCH (HF forward, default cache)"),
            ("switch_per_batch", "lmsmith SWITCH, batch by batch (draft and verify, lean decoder)"),
            ("switch", "lmsmith SWITCH, continuous batching"),
            ("plain", "student sampling + one teacher pass"),
        ]:
            print(
                f"| {name} | {p} | {r['rollout_tokens_per_s'][k]:.1f} | {r['rollout_seconds'][k]:.1f} |"
            )
    for p, r in per.items():
        print(
            f"\n{p}: SWITCH / naive speed-up {r['switch_vs_naive_speedup']:.2f}x (batch by batch "
            f"{r['switch_per_batch_vs_naive_speedup']:.2f}x); same tokens: {r['switch_equals_naive']} "
            f"(rows {r['rows_equal']}; batch by batch {r['rows_equal_per_batch']}); SWITCH / plain "
            f"on-policy {r['switch_vs_plain_ratio']:.2f}x; teacher-token share "
            f"{100 * r['teacher_token_share']:.1f}%; teacher-drafted blocks "
            f"{r['teacher_drafted_blocks']}; row-slots per model {r['row_slots']}"
        )
    if "steps" in result:
        print(f"\n| training step ({args.precision}) | median s | peak memory MB |\n|---|---|---|")
        for k, v in result["steps"].items():
            print(f"| {k} | {v['median_step_s']:.2f} | {v['peak_mem_mb']:.0f} |")
        print(f"\nSWITCH step / GKD step: {result['switch_step_over_gkd_step']:.2f}")
        if "gkd_step_over_trl_step" in result:
            print(f"lmsmith GKD step / TRL GKDTrainer step: {result['gkd_step_over_trl_step']:.2f}")
    if args.json:
        from lmsmith.runs import write_json

        write_json(args.json, result)
        print(f"\nwritten: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
