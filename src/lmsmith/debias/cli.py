"""``lmsmith debias attribute | prune | eval | run``.

Every command takes ``--config FILE.yaml`` and ``--key value`` overrides of DebiasConfig
(``lmsmith debias run --help`` lists them) and writes a run folder (``--output-dir DIR``).
"""

from __future__ import annotations

import time

from lmsmith import config as C
from lmsmith.debias.config import DebiasConfig

USAGE = """usage: lmsmith debias <attribute|prune|eval|run> --model M --data BBQ.jsonl [--key value ...]

  attribute  score every unit on sampled dev rows; writes attribution.safetensors, top_units.json
  prune      choose n (golden-section search on dev accuracy, or --n N) and save the pruned model
  eval       BBQ metrics of --model on the test split (plus --methods cc,dc baselines)
  run        the whole pipeline: evaluate, attribute, search, prune, evaluate, baselines, summary
"""


def _setup(argv: list[str], kind: str):
    from lmsmith.cli import split_config
    from lmsmith.runs import make_run_dir, write_json

    path, rest = split_config(argv)
    cfg = C.load(DebiasConfig, path, C.parse_overrides(rest))
    return cfg, make_run_dir, write_json


def cmd_attribute(argv: list[str]) -> int:
    from lmsmith.debias import pipeline as P

    cfg, make_run_dir, write_json = _setup(argv, "attribute")
    t0 = time.perf_counter()
    dev, _ = P.load_split(cfg)
    model, tok = P.load_model(cfg.model)
    run = make_run_dir(cfg.output_dir, "debias-attribute")
    write_json(run / "config.json", C.to_dict(cfg))
    res = P.run_attribution(model, tok, dev, cfg)
    P.save_attribution(res, run)
    top = P.rank_units(res.scores, 10)
    write_json(
        run / "summary.json",
        {
            "n_samples": res.n_samples,
            "mean_alpha": res.mean_alpha,
            "n_units": sum(v.numel() for v in res.scores.values()),
            "top10": [{"module": m, "index": i, "score": s} for m, i, s in top],
            "wall_time_s": time.perf_counter() - t0,
        },
    )
    print(f"attributed {sum(v.numel() for v in res.scores.values())} units "
          f"over {res.n_samples} samples (mean α {res.mean_alpha:.3f}); top units:")  # fmt: skip
    for m, i, s in top:
        print(f"  {m}[{i}]  {s:.4g}")
    print(f"run folder: {run}")
    return 0


def cmd_prune(argv: list[str]) -> int:
    from lmsmith.debias import pipeline as P
    from lmsmith.debias.prune import Pruner, save_pruned, units_record
    from lmsmith.runs import MetricsSink

    cfg, make_run_dir, write_json = _setup(argv, "prune")
    dev, _ = P.load_split(cfg)
    model, tok = P.load_model(cfg.model)
    run = make_run_dir(cfg.output_dir, "debias-prune")
    write_json(run / "config.json", C.to_dict(cfg))
    if cfg.scores:
        scores = P.load_scores(cfg.scores)
        P.check_scores(model, scores)
    else:
        res = P.run_attribution(model, tok, dev, cfg)
        P.save_attribution(res, run)
        scores = res.scores
    ranked = P.rank_units(scores, top=max(cfg.prune.search_max, cfg.prune.n or 0))
    if cfg.prune.n is not None:
        n, history = min(cfg.prune.n, len(ranked)), []
    else:
        n, history = P.search_n(model, tok, ranked, dev, cfg, MetricsSink(run / "metrics.jsonl"))
    units = units_record(ranked, n)
    Pruner(model).apply([(u["module"], u["index"]) for u in units])
    write_json(run / "pruned_units.json", units)
    save_pruned(model, tok, units, run / "model")
    write_json(
        run / "summary.json",
        {"n_pruned": n, "search": [{"n": a, "dev_accuracy": b} for a, b in history]},
    )
    for a, b in history:
        print(f"  n={a:4d}  dev accuracy {b:.2f}")
    print(f"pruned {n} units; model: {run / 'model'}")
    return 0


def cmd_eval(argv: list[str]) -> int:
    from lmsmith.debias import pipeline as P

    cfg, make_run_dir, write_json = _setup(argv, "eval")
    _, test = P.load_split(cfg)
    model, tok = P.load_model(cfg.model)
    run = make_run_dir(cfg.output_dir, "debias-eval")
    write_json(run / "config.json", C.to_dict(cfg))
    k = cfg.prompt.eval_instructions
    s = P.evaluate_model(model, tok, test, cfg, k, "test")
    results = {cfg.model: s.metrics}
    if "cc" in cfg.baselines.methods:
        prior = P.cc_prior(
            model, tok, test, P.instructions(k), cfg.prompt, cfg.baselines.content_free,
            cfg.progress,
        )  # fmt: skip
        results["CC"] = P._calibrated(s.logscores, prior, test)
    if "dc" in cfg.baselines.methods:
        prior = P.dc_prior(
            model, tok, test, P.instructions(k), cfg.prompt, cfg.baselines.dc_draws,
            cfg.split.split_seed, cfg.progress,
        )  # fmt: skip
        results["DC"] = P._calibrated(s.logscores, prior, test)
    write_json(run / "metrics.json", results)
    write_json(run / "summary.json", {k2: s.metrics[k2] for k2 in P.SUMMARY_KEYS})
    print(P.format_table(results))
    print(f"\n{len(test)} test rows x {k} instructions; run folder: {run}")
    return 0


def cmd_run(argv: list[str]) -> int:
    from lmsmith.debias import pipeline as P

    cfg, _, _ = _setup(argv, "run")
    summary = P.run_pipeline(cfg)
    print(summary["table"])
    print(
        f"\n{summary['n_test_rows_scored']} test rows x {summary['instructions_per_row']} "
        f"instructions; {summary['n_pruned']} units pruned"
    )
    if summary["retention_rougeL"]:
        r = summary["retention_rougeL"]
        print(f"retention ROUGE-L ({r['n_rows']} rows): {r['before']:.2f} → {r['after']:.2f}")
    print(f"wall time {summary['wall_time_s']:.0f}s; run folder: {summary['run_dir']}")
    return 0


COMMANDS = {"attribute": cmd_attribute, "prune": cmd_prune, "eval": cmd_eval, "run": cmd_run}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE + "\noptions:\n" + C.describe(DebiasConfig))
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        from lmsmith.errors import UserError

        raise UserError(f"unknown debias command '{cmd}' (one of {', '.join(COMMANDS)})")
    if "-h" in rest or "--help" in rest:
        print(USAGE + "\noptions:\n" + C.describe(DebiasConfig))
        return 0
    return COMMANDS[cmd](rest)
