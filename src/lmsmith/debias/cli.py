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
    from lmsmith.debias.pipeline import format_search

    for g in s["guard_dropped"]:
        print(f"guard dropped {g['module']}[{g['index']}]: held-out NLL +{100 * g['rise']:.1f}%")
    if s["search"]:
        print(format_search(s["search"]))
    where = s["model_dir"] or "none written (nothing pruned)"
    print(f"pruned {s['n_pruned']} units; model: {where}")


def show_eval(cfg, s: dict) -> None:
    from lmsmith.debias.pipeline import format_table

    print(format_table(s["results"]))
    print(
        f"\n{s['n_test_rows_scored']} test rows x {s['instructions_per_row']} instructions; "
        f"run folder: {s['run_dir']}"
    )


def show_run(cfg, summary: dict) -> int:
    """Prints the verdict above the tables; returns the exit code (1 when degenerate)."""
    v = summary["verdict"]
    print(f"verdict: {v} — {'; '.join(summary['verdict_reasons'])}")
    print()
    print(summary["table"])
    print("\nanswers (% of predictions) by context type:")
    print(summary["answers_table"])
    for g in summary["guard"].get("dropped", []):
        print(f"guard dropped {g['module']}[{g['index']}]: alone it raises held-out NLL "
              f"{summary['guard']['base_nll']:.3f} → {g['nll']:.3f} (+{100 * g['rise']:.1f}%)")  # fmt: skip
    if summary["search_table"]:
        print("\nsearch (dev):")
        print(summary["search_table"])
    r = summary["retention_nll"]
    print(f"\n{summary['n_test_rows_scored']} test rows x {summary['instructions_per_row']} "
          f"instructions; {summary['n_pruned']} units pruned")  # fmt: skip
    print(f"retention: held-out NLL ({r['n_texts']} texts) {r['before']:.3f} → {r['after']:.3f}")
    if summary["retention_rougeL"]:
        r = summary["retention_rougeL"]
        print(f"retention ROUGE-L ({r['n_rows']} rows): {r['before']:.2f} → {r['after']:.2f}")
    where = summary["model_dir"] or "none written"
    print(f"wall time {summary['wall_time_s']:.0f}s; model: {where}; "
          f"run folder: {summary['run_dir']}")  # fmt: skip
    if v == "degenerate":
        import sys

        kept = " (written anyway: --allow-degenerate)" if summary["model_dir"] else ""
        print(f"lmsmith debias run: degenerate model{kept}: {summary['verdict_reasons'][0]}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def show_testbed(cfg, s: dict) -> None:
    print(f"testbed: {s['steps']} steps x {s['batch_size']} rows on {', '.join(s['categories'])} "
          f"({s['n_train_rows']} train rows; {s['trainable_parameters']:,} trainable parameters)")  # fmt: skip
    print(f"dev ({s['n_dev_rows_scored']} rows of the training categories' dev split):")
    for name in ("dev_before", "dev_after"):
        m = s[name]
        print(f"  {name[4:]:>6}: acc {m['accuracy']:.1f}  amb {m['accuracy_ambig']:.1f}  "
              f"dis {m['accuracy_disambig']:.1f}  unknown {m['unknown_rate']:.1f}%")  # fmt: skip
    print(f"wall time {s['wall_time_s']:.0f}s; model: {s['model_dir']}")
