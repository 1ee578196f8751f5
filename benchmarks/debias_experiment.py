"""CRISPR on SmolLM2-135M-Instruct, BBQ Age and Disability_status: the tables of
docs/_parts/debias-results.md.

    python benchmarks/debias_experiment.py --run      # runs `lmsmith debias run` per category
    python benchmarks/debias_experiment.py            # only prints the tables of finished runs

Each category runs ``lmsmith debias run --config configs/debias/experiment.yaml`` into
``runs/debias-exp/<category>``: original vs CRISPR vs CC vs DC vs random units on the same
seeded test rows, the pruned units and where they sit, and the retention check. The figure of
each run (``pruned_units.png``) is written by the run itself.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CATEGORIES = ("Age", "Disability_status")
ORDER = ("original", "CRISPR", "CC", "DC", "random units")


def run(out: Path, data: Path) -> None:
    for cat in CATEGORIES:
        cmd = [
            sys.executable, "-m", "lmsmith.cli", "debias", "run",
            "--model", "smollm2-135m-instruct", "--data", str(data / f"{cat}.jsonl"),
            "--config", "configs/debias/experiment.yaml", "--output-dir", str(out / cat),
        ]  # fmt: skip
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def tables(out: Path) -> str:
    from lmsmith.debias.pipeline import format_table

    parts = []
    for cat in CATEGORIES:
        d = out / cat
        if not (d / "summary.json").exists():
            parts.append(f"## {cat}\n\n(no finished run in {d})\n")
            continue
        s = json.loads((d / "summary.json").read_text())
        res = json.loads((d / "results.json").read_text())
        res = {k: res[k] for k in ORDER if k in res}
        r = s["retention_rougeL"]
        h = s["pruned_histogram"]
        lines = [
            f"## {cat}",
            "",
            f"{s['n_test_rows_scored']} test rows x {s['instructions_per_row']} instructions; "
            f"{s['n_dev_rows']} dev rows; **{s['n_pruned']} units pruned**; "
            f"wall time {s['wall_time_s']:.0f} s.",
            "",
            format_table(res),
            "",
            "Search (n → dev accuracy): "
            + ", ".join(f"{x['n']}→{x['dev_accuracy']:.1f}" for x in s["search"]),
            "",
        ]
        if r:
            lines += [
                f"Retention, greedy ROUGE-L on {r['n_rows']} Dolly validation rows: "
                f"{r['before']:.2f} before, {r['after']:.2f} after.",
                "",
            ]
        if h["by_layer"]:
            lines += [
                "| layer | " + " | ".join(h["by_layer"]) + " |",
                "|---|" + "---:|" * len(h["by_layer"]),
                "| units | " + " | ".join(str(v) for v in h["by_layer"].values()) + " |",
                "",
                "| module | " + " | ".join(h["by_module"]) + " |",
                "|---|" + "---:|" * len(h["by_module"]),
                "| units | " + " | ".join(str(v) for v in h["by_module"].values()) + " |",
                "",
            ]
        units = json.loads((d / "pruned_units.json").read_text())
        if units:
            lines.append(
                "Top pruned units: "
                + ", ".join(f"`{u['module']}[{u['index']}]` ({u['score']:.3g})" for u in units[:8])
            )
            lines.append("")
        parts.append("\n".join(lines))
    return "\n".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="store_true", help="run the experiment first")
    ap.add_argument("--out", default="runs/debias-exp", help="runs folder")
    ap.add_argument("--data", default="../shared/data/bbq", help="folder of BBQ category files")
    a = ap.parse_args()
    out = Path(a.out)
    if a.run:
        run(out, Path(a.data))
    print(tables(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
