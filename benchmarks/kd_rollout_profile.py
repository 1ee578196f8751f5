"""Where a SWITCH rollout's time goes: every lean-decoder call timed, grouped by model, rows and
slots, for lmsmith's draft-and-verify rollout batch by batch and with continuous batching, on
kd_speed's prompts and student (issue 19).

    python benchmarks/kd_rollout_profile.py --tau0 0.69 --decay 0.003 --repeats 2
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tau0", type=float, default=0.6)
    ap.add_argument("--decay", type=float, default=0.02)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    import kd_speed
    from lmsmith.distill.rollout import SwitchRule, switch_rollout
    from lmsmith.generation import LeanDecoder, Noise, left_pad, prepare_weights

    teacher, student, tok, label = kd_speed._models(argparse.Namespace(random_init=False))
    _, prompts = kd_speed._prompts(tok, args.prompts)
    weights = prepare_weights(teacher)
    calls, fills = [], []
    call, fill = LeanDecoder.__call__, LeanDecoder.fill_row

    def timed_call(self, ids, attn, pos_ids, keep=0):
        t0 = time.perf_counter()
        out = call(self, ids, attn, pos_ids, keep)
        calls.append((len(self.layers), ids.shape[0], ids.shape[1], time.perf_counter() - t0))
        return out

    def timed_fill(self, row, ids, pos_ids):
        t0 = time.perf_counter()
        fill(self, row, ids, pos_ids)
        fills.append(time.perf_counter() - t0)

    LeanDecoder.__call__, LeanDecoder.fill_row = timed_call, timed_fill
    noise = Noise.draw(len(prompts), seed=0)
    teacher_layers = teacher.config.num_hidden_layers

    def run(rows, batch=None):
        ids, mask = left_pad([prompts[i] for i in rows], tok.pad_token_id)
        return switch_rollout(
            student,
            teacher,
            ids,
            mask,
            SwitchRule(args.tau0, args.decay),
            args.max_new,
            noise.select(rows),
            tok.eos_token_id,
            tok.pad_token_id,
            adaptive=True,
            teacher_weights=weights,
            batch=batch,
        )

    def report(name, seconds, stats):
        print(
            f"{name}: {seconds:.1f} s; decoder calls {len(calls)}, {sum(c[-1] for c in calls):.1f} s; "
            f"prompts written into finished rows {len(fills)}, {sum(fills):.1f} s; {stats}"
        )
        groups = collections.defaultdict(lambda: [0, 0.0])
        for layers, rows, slots, dt in calls:
            key = ("teacher" if layers == teacher_layers else "student", rows, min(slots, 9))
            groups[key][0] += 1
            groups[key][1] += dt
        for (model, rows, slots), (n, dt) in sorted(groups.items()):
            slots = "prefill" if slots == 9 else f"{slots} slot(s)"
            print(f"    {model} {rows} rows {slots}: {n} calls, {1000 * dt / n:.1f} ms each")
        calls.clear()
        fills.clear()

    print(f"student: {label}; τ0={args.tau0} λ={args.decay}")
    everyone = list(range(len(prompts)))
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        stats = [
            run(everyone[s : s + args.batch]).stats for s in range(0, len(prompts), args.batch)
        ]
        report(f"batch by batch #{rep}", time.perf_counter() - t0, stats)
        t0 = time.perf_counter()
        stats = run(everyone, batch=args.batch).stats
        report(f"continuous batching #{rep}", time.perf_counter() - t0, stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
