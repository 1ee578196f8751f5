"""CRISPR on SmolLM2-135M-Instruct and on the BBQ testbed, BBQ Age and Disability_status: the
tables of the "debias" section of docs/results.md.

    python benchmarks/debias_experiment.py --testbed   # fine-tune the testbed model first
    python benchmarks/debias_experiment.py --run       # `lmsmith debias run` per model x category
    python benchmarks/debias_experiment.py             # only prints the tables of finished runs

The testbed is ``lmsmith debias testbed`` on ``../shared/data/bbq/train-categories/``
(Nationality, Physical_appearance: never evaluated) into ``runs/bbq-testbed``. Each run is
``lmsmith debias run --config configs/debias/experiment.yaml`` into
``runs/debias-exp/<model>/<category>``: the verdict, original vs CRISPR vs CC vs DC vs random
units on the same seeded test rows, with bootstrap CIs, the answer distributions, retention,
the guard and the search table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CATEGORIES = ("Age", "Disability_status")
MODELS = {"smollm2": "smollm2-135m-instruct", "testbed": "runs/bbq-testbed/model"}
ORDER = ("original", "CRISPR", "CC", "DC", "random units")


def lmsmith(*args: str) -> None:
    cmd = [sys.executable, "-m", "lmsmith.cli", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=False)  # a degenerate verdict exits 1: keep going


def testbed(data: Path) -> None:
    lmsmith("debias", "testbed", "--model", "smollm2-135m-instruct",
            "--data", str(data / "train-categories"), "--output-dir", "runs/bbq-testbed",
            "--progress", "false")  # fmt: skip


def run(out: Path, data: Path, models: list[str], categories: list[str]) -> None:
    for tag in models:
        for cat in categories:
            lmsmith("debias", "run", "--model", MODELS[tag], "--data", str(data / f"{cat}.jsonl"),
                    "--config", "configs/debias/experiment.yaml",
                    "--output-dir", str(out / tag / cat), "--progress", "false")  # fmt: skip


def guard_check(unit: str = "model.layers.29.mlp.down_proj", index: int = 31) -> None:
    """The unit the first version pruned first on SmolLM2: its activation at the first position
    and in the answer positions, and what ablating it alone does to held-out NLL and to an
    answer (the guard's measurement)."""
    import statistics

    import torch

    from lmsmith import config
    from lmsmith.debias.config import DebiasConfig
    from lmsmith.debias.guard import mean_nll
    from lmsmith.debias.pipeline import heldout
    from lmsmith.debias.prune import Pruner
    from lmsmith.debias.scoring import pad_id
    from lmsmith.models import load_lm

    model, tok = load_lm("smollm2-135m-instruct")
    cfg = config.load(DebiasConfig, None, {"data": "unused"})
    texts = heldout(tok, cfg, "guard")
    acts = []
    mod = dict(model.named_modules())[unit]
    h = mod.register_forward_hook(lambda _m, _i, out: acts.append(out[0, :, index].abs()))
    base = mean_nll(model, texts, pad_id(tok), batch_size=1)
    h.remove()
    first = statistics.median(float(a[0]) for a in acts)
    rest = statistics.median(float(x) for a in acts for x in a[1:])
    p = Pruner(model)
    p.apply([(unit, index)])
    ablated = mean_nll(model, texts, pad_id(tok))
    q = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                tokenize=False, add_generation_prompt=True)  # fmt: skip
    ids = tok(q, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    p.restore()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    orig = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"{unit}[{index}]: median |a| at position 0 {first:.0f}, elsewhere {rest:.1f}; "
          f"held-out NLL {base:.3f} → {ablated:.3f} (+{100 * (ablated / base - 1):.0f}%) "
          f"ablated alone; 'capital of France?' → {orig!r} / ablated {answer!r}")  # fmt: skip


def one(d: Path, title: str) -> str:
    from lmsmith.debias.pipeline import format_answers, format_search, format_table

    if not (d / "summary.json").exists():
        return f"### {title}\n\n(no finished run in {d})\n"
    s = json.loads((d / "summary.json").read_text())
    res = json.loads((d / "results.json").read_text())
    res = {k: res[k] for k in ORDER if k in res}
    r = s["retention_nll"]
    g = s["guard"]
    a = s.get("attribution") or {}
    lines = [
        f"### {title}",
        "",
        f"**verdict: {s['verdict']}** — {'; '.join(s['verdict_reasons'])}",
        "",
        f"{s['n_test_rows_scored']} test rows x {s['instructions_per_row']} instructions; "
        f"{s['n_dev_rows']} dev rows; **{s['n_pruned']} units pruned**; "
        f"wall time {s['wall_time_s']:.0f} s.",
        "",
        format_table(res),
        "",
        "Answers (% of predictions) by context type:",
        "",
        format_answers(res),
        "",
        f"Retention: next-token NLL on {r['n_texts']} Dolly validation texts ({r['tokens_each']} "
        f"tokens each): {r['before']:.3f} before, {r['after']:.3f} after.",
        "",
    ]
    if a:
        lines += [
            f"Attribution: {a['n_samples']} samples, α = {a['alpha']} (mean {a['mean_alpha']:.3f}); "
            f"share of the top-100 units' score from ambiguous rows: "
            f"{a.get('ambiguous_share_top100_prob', float('nan')):.2f} with α = raw P(ŷ), "
            f"{a.get('ambiguous_share_top100_softmax', float('nan')):.2f} with α = softmax; "
            f"top-100 overlap between the two: {a['top100_overlap_prob_softmax']:.2f}"
            + (
                " (a share above 1: the disambiguated rows' part of those units' score is negative,"
                " i.e. the units also carry the skill the score subtracts)."
                if max(
                    a.get("ambiguous_share_top100_prob", 0),
                    a.get("ambiguous_share_top100_softmax", 0),
                )
                > 1
                else "."
            ),
            "",
        ]
    if g.get("top_k"):
        dropped = ", ".join(
            f"`{u['module']}[{u['index']}]` (NLL +{100 * u['rise']:.1f}%)" for u in g["dropped"]
        )
        lines += [
            f"Guard: top {g['top_k']} units ablated one at a time on held-out Dolly dev texts "
            f"(NLL {g['base_nll']:.3f}); dropped: {dropped or 'none'}.",
            "",
        ]
    if s["search"]:
        lines += ["Search (dev):", "", format_search(s["search"]), ""]
    return "\n".join(lines)


def tables(out: Path) -> str:
    parts = []
    for tag in MODELS:
        for cat in CATEGORIES:
            parts.append(one(out / tag / cat, f"{tag} × {cat}"))
    return "\n".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbed", action="store_true", help="fine-tune the testbed model first")
    ap.add_argument("--run", action="store_true", help="run the experiment first")
    ap.add_argument("--guard-check", action="store_true", help="measure the massive unit")
    ap.add_argument("--models", default="smollm2,testbed", help="which models to run")
    ap.add_argument("--categories", default=",".join(CATEGORIES), help="which categories")
    ap.add_argument("--out", default="runs/debias-exp", help="runs folder")
    ap.add_argument("--data", default="../shared/data/bbq", help="folder of BBQ category files")
    a = ap.parse_args()
    out = Path(a.out)
    if a.testbed:
        testbed(Path(a.data))
    if a.guard_check:
        guard_check()
        return 0
    if a.run:
        run(out, Path(a.data), a.models.split(","), a.categories.split(","))
    print(tables(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
