"""What ``lmsmith debias attribute | prune | eval | run`` print, given the result of the
matching :mod:`lmsmith.debias.pipeline` function (the table in :mod:`lmsmith.cli`)."""

from __future__ import annotations


def show_attribute(cfg, s: dict) -> None:
    print(f"attributed {s['n_units']} units over {s['n_samples']} samples "
          f"(mean α {s['mean_alpha']:.3f}); top units:")  # fmt: skip
    for u in s["top10"]:
        print(f"  {u['module']}[{u['index']}]  {u['score']:.4g}")
    print(f"run folder: {s['run_dir']}")


def show_prune(cfg, s: dict) -> None:
    for row in s["search"]:
        print(f"  n={row['n']:4d}  dev accuracy {row['dev_accuracy']:.2f}")
    print(f"pruned {s['n_pruned']} units; model: {s['model_dir']}")


def show_eval(cfg, s: dict) -> None:
    from lmsmith.debias.pipeline import format_table

    print(format_table(s["results"]))
    print(
        f"\n{s['n_test_rows_scored']} test rows x {s['instructions_per_row']} instructions; "
        f"run folder: {s['run_dir']}"
    )


def show_run(cfg, summary: dict) -> None:
    print(summary["table"])
    print(
        f"\n{summary['n_test_rows_scored']} test rows x {summary['instructions_per_row']} "
        f"instructions; {summary['n_pruned']} units pruned"
    )
    if summary["retention_rougeL"]:
        r = summary["retention_rougeL"]
        print(f"retention ROUGE-L ({r['n_rows']} rows): {r['before']:.2f} → {r['after']:.2f}")
    print(f"wall time {summary['wall_time_s']:.0f}s; run folder: {summary['run_dir']}")
