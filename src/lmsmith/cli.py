"""The one entry point: ``lmsmith eval | distill | debias | dialog | demo``.

Each subcommand takes ``--config FILE.yaml`` and ``--key value`` overrides of its typed config;
``lmsmith SUBCOMMAND --help`` lists every key. User errors exit with code 2 and one line.
"""

from __future__ import annotations

import logging
import os
import sys

from lmsmith.errors import UserError

USAGE = """usage: lmsmith <command> [--config FILE.yaml] [--key value ...]

commands:
  eval      generate answers for an instruction jsonl and score ROUGE-L
  distill   distil a teacher LM into a student (SWITCH, GKD, DistiLLM, ...)
  debias    CRISPR: find and prune bias neurons, measured on BBQ
  dialog    document-grounded dialogue: index, search, answer, serve
  demo      the main job on the embedded default model, offline

`lmsmith <command> --help` lists a command's options."""


def split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """Pull ``--config FILE`` out of argv; the rest are overrides."""
    rest, cfg = [], None
    i = 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            cfg = argv[i + 1]
            i += 2
        elif argv[i].startswith("--config="):
            cfg = argv[i].split("=", 1)[1]
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    return cfg, rest


def cmd_eval(argv: list[str]) -> int:
    from lmsmith import config as C
    from lmsmith.data.instruct import load_instruct
    from lmsmith.evaluate import EvalConfig, evaluate_rows, format_table
    from lmsmith.models import load_lm
    from lmsmith.runs import make_run_dir, write_json, write_jsonl

    if "-h" in argv or "--help" in argv:
        print(
            "usage: lmsmith eval --model M --data FILE [--limit N] [--seeds 10,20,30] "
            "[--max-new-tokens 256] [--greedy]\n\noptions:\n" + C.describe(EvalConfig)
        )
        return 0
    path, rest = split_config(argv)
    cfg = C.load(EvalConfig, path, C.parse_overrides(rest))
    if not cfg.data:
        raise UserError("eval needs --data FILE (an instruction jsonl with references)")
    rows = load_instruct(cfg.data, limit=cfg.limit)
    model, tok = load_lm(cfg.model)
    if cfg.engine == "lean":
        from lmsmith.precision import describe, resolve_precision

        print(describe(cfg.precision, resolve_precision(cfg.precision)), flush=True)
    run = make_run_dir(cfg.output_dir, "eval")
    write_json(run / "config.json", C.to_dict(cfg))
    metrics, preds = evaluate_rows(model, tok, rows, cfg)
    write_jsonl(run / "predictions.jsonl", preds)
    write_json(run / "metrics.json", metrics)
    print(format_table(metrics))
    print(f"\nwall time {metrics['wall_time_s']:.1f}s; run folder: {run}")
    return 0


def cmd_demo(argv: list[str]) -> int:
    from lmsmith.distill.demo import main as demo_main

    return demo_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=os.environ.get("LMSMITH_LOG", "WARNING").upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "eval":
            return cmd_eval(rest)
        if cmd == "demo":
            return cmd_demo(rest)
        if cmd == "distill":
            from lmsmith.distill.cli import main as sub
        elif cmd == "debias":
            from lmsmith.debias.cli import main as sub
        elif cmd == "dialog":
            from lmsmith.dialog.cli import main as sub
        else:
            print(f"lmsmith: unknown command '{cmd}'\n\n{USAGE}", file=sys.stderr)
            return 2
        return sub(rest)
    except UserError as e:
        print(f"lmsmith {cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
