"""The one entry point: ``lmsmith eval | distill | debias ... | dialog ... | demo``.

:data:`COMMANDS` is the table of every command: its config dataclass, the library function it
calls and the function that prints the result. :func:`main` parses ``--config FILE.yaml`` and
``--key value`` overrides once, through :func:`lmsmith.config.parse`, calls, prints.
``lmsmith COMMAND --help`` lists every key. User errors exit with code 2 and one line.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from dataclasses import dataclass

from lmsmith import config
from lmsmith.errors import UserError


@dataclass(frozen=True)
class Command:
    """One row of the table; ``"module:name"`` references are imported only when used."""

    name: str  # "eval", "dialog index"
    config: str  # the typed config dataclass
    call: str  # the library function: call(cfg) -> result
    help: str  # one line for `lmsmith --help`
    show: str | None = None  # prints the result: show(cfg, result)
    before: str | None = None  # prints before the call (what a long run will use): before(cfg)


D = "lmsmith.dialog"
COMMANDS: list[Command] = [
    Command("eval", "lmsmith.evaluate:EvalConfig", "lmsmith.evaluate:run",
            "generate answers for an instruction jsonl and score ROUGE-L",
            show="lmsmith.cli:show_eval", before="lmsmith.cli:show_eval_precision"),
    Command("distill", "lmsmith.distill.config:DistillConfig", "lmsmith.distill.trainer:run",
            "distil a teacher LM into a student (SWITCH, GKD, DistiLLM, ...)",
            show="lmsmith.distill.cli:show_run", before="lmsmith.distill.cli:show_precision"),
    Command("debias attribute", "lmsmith.debias.config:DebiasConfig",
            "lmsmith.debias.pipeline:attribute",
            "score every unit on sampled dev rows (attribution.safetensors, top_units.json)",
            show="lmsmith.debias.cli:show_attribute"),
    Command("debias prune", "lmsmith.debias.config:DebiasConfig", "lmsmith.debias.pipeline:prune",
            "choose n (search on dev accuracy, or --n N) and save the pruned model",
            show="lmsmith.debias.cli:show_prune"),
    Command("debias eval", "lmsmith.debias.config:DebiasConfig",
            "lmsmith.debias.pipeline:evaluate",
            "BBQ metrics of --model on the test split (plus --methods cc,dc baselines)",
            show="lmsmith.debias.cli:show_eval"),
    Command("debias run", "lmsmith.debias.config:DebiasConfig",
            "lmsmith.debias.pipeline:run_pipeline",
            "the whole pipeline: evaluate, attribute, search, prune, evaluate, baselines",
            show="lmsmith.debias.cli:show_run"),
    Command("debias testbed", "lmsmith.debias.config:TestbedConfig",
            "lmsmith.debias.testbed:run",
            "fine-tune a model into a BBQ-style reader on categories never evaluated",
            show="lmsmith.debias.cli:show_testbed"),
    Command("dialog index", f"{D}.config:IndexConfig", f"{D}.tasks:index",
            "build a retriever index over documents (folder, MD2D doc file, ...)",
            show=f"{D}.cli:show_index"),
    Command("dialog search", f"{D}.config:SearchConfig", f"{D}.tasks:search",
            "query an index and print the top passages", show=f"{D}.cli:show_search"),
    Command("dialog train-retriever", f"{D}.config:TrainRetrieverConfig",
            f"{D}.tasks:train_retriever", "fine-tune a DPR-style bi-encoder or a cross-encoder",
            show=f"{D}.cli:show_train_retriever"),
    Command("dialog eval-retrieval", f"{D}.config:EvalRetrievalConfig",
            f"{D}.tasks:eval_retrieval", "R@1/5/10 and MRR of a retriever on a query set",
            show=f"{D}.cli:show_eval_retrieval"),
    Command("dialog train-reader", f"{D}.config:TrainReaderConfig", f"{D}.tasks:train_reader",
            "fine-tune an extractive grounding reader (start/end)",
            show=f"{D}.cli:show_train_reader"),
    Command("dialog train-generator", f"{D}.config:TrainGeneratorConfig",
            f"{D}.tasks:train_generator", "LoRA-tune the reply LM (optionally multi-task)",
            show=f"{D}.cli:show_train_generator"),
    Command("dialog answer", f"{D}.config:AnswerConfig", f"{D}.tasks:answer",
            "retrieve, ground and generate a reply to one message", show=f"{D}.cli:show_answer"),
    Command("dialog eval", f"{D}.config:DialogEvalConfig", f"{D}.tasks:evaluate",
            "grounding EM/F1 and reply F1/SacreBLEU/ROUGE-L of the pipeline",
            show=f"{D}.cli:show_eval"),
    Command("dialog serve", f"{D}.config:ServeConfig", f"{D}.tasks:serve",
            "HTTP JSON API + web page to chat over an index", show=f"{D}.cli:show_serve"),
    Command("demo", "lmsmith.distill.demo:DemoConfig", "lmsmith.distill.demo:main",
            "SWITCH on the embedded default model, offline, in minutes (`make demo`)"),
]  # fmt: skip
BY_NAME = {c.name: c for c in COMMANDS}
GROUPS = {
    "debias": "CRISPR: find and prune bias neurons, measured on BBQ",
    "dialog": "document-grounded dialogue: index, search, answer, serve",
}


def resolve(ref: str):
    """``"package.module:name"`` → the object."""
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def usage(prefix: str = "") -> str:
    """The command list (of one group with ``prefix``, e.g. "dialog ")."""
    lines, seen = [], set()
    for c in COMMANDS:
        if not c.name.startswith(prefix):
            continue
        head = c.name[len(prefix) :].split(" ")[0]
        if head in GROUPS and not prefix:
            if head not in seen:
                lines.append(f"  {head:<17}{GROUPS[head]}")
                seen.add(head)
            continue
        lines.append(f"  {head:<17}{c.help}")
    name = f"lmsmith {prefix}<command>"
    return (
        f"usage: {name} [--config FILE.yaml] [--key value ...]\n\ncommands:\n"
        + "\n".join(lines)
        + f"\n\n`{name} --help` lists a command's options."
    )


def command_help(cmd: Command) -> str:
    cls = resolve(cmd.config)
    leaves = config.leaf_fields(cls)
    req = "".join(
        f" {config.option_name(n, leaves)} {n.split('.')[-1].upper()}"
        for n, leaf in leaves.items()
        if leaf.required
    )
    return (
        f"usage: lmsmith {cmd.name} [--config FILE.yaml]{req} [--key value ...]\n\n{cmd.help}\n\n"
        "options (a nested key may be given by its last part when unique: --lr = --train.lr):\n"
        + config.describe(cls)
    )


def run(cmd: Command, argv: list[str]) -> int:
    """Parse argv into the command's config, call its library function, print the result."""
    if "-h" in argv or "--help" in argv:
        print(command_help(cmd))
        return 0
    cfg = config.parse(resolve(cmd.config), argv)
    if cmd.before:
        resolve(cmd.before)(cfg)
    result = resolve(cmd.call)(cfg)
    rc = resolve(cmd.show)(cfg, result) if cmd.show else None
    return rc if isinstance(rc, int) else 0  # a show function may set the exit code


def find(argv: list[str]) -> tuple[Command | None, list[str], str]:
    """(command, its argv, its name) of a command line; (None, [], message) when there is
    none: the message is a usage text (exit 0 / 2) or an error."""
    if argv[0] in GROUPS:
        group = argv[0]
        if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
            return None, argv[1:], usage(group + " ")
        name = f"{group} {argv[1]}"
        if name not in BY_NAME:
            subs = [c.name.split(" ", 1)[1] for c in COMMANDS if c.name.startswith(group + " ")]
            raise UserError(f"unknown {group} command '{argv[1]}'; choose one of {', '.join(subs)}")
        return BY_NAME[name], argv[2:], name
    if argv[0] not in BY_NAME:
        return None, [], f"lmsmith: unknown command '{argv[0]}'\n\n{usage()}"
    return BY_NAME[argv[0]], argv[1:], argv[0]


def one_line(message: str) -> str:
    """A message on one line (library errors sometimes quote multi-line text)."""
    return " ".join(part.strip() for part in message.strip().splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=os.environ.get("LMSMITH_LOG", "WARNING").upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name = argv[0]
    try:
        cmd, rest, text = find(argv)
        if cmd is None:
            asked = bool(rest) and rest[0] in ("-h", "--help", "help")
            print(text, file=sys.stdout if asked else sys.stderr)
            return 0 if asked else 2
        name = text
        return run(cmd, rest)
    except UserError as e:
        print(f"lmsmith {name}: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError) as e:
        # the file system refused a path the user gave (checked up front where we can)
        where = f"{e.filename}: " if e.filename else ""
        print(f"lmsmith {name}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------ what `lmsmith eval` prints


def show_eval_precision(cfg) -> None:
    if cfg.engine == "lean":
        from lmsmith.precision import describe, resolve_precision

        print(describe(cfg.precision, resolve_precision(cfg.precision)), flush=True)


def show_eval(cfg, metrics: dict) -> None:
    from lmsmith.evaluate import format_table

    print(format_table(metrics))
    print(f"\nwall time {metrics['wall_time_s']:.1f}s; run folder: {metrics['run_dir']}")


if __name__ == "__main__":
    sys.exit(main())
