"""The command table: every command is listed, parses, has --help; required options."""

from __future__ import annotations

import dataclasses

import pytest

from lmsmith.cli import BY_NAME, COMMANDS, GROUPS, main, resolve

EXPECTED = {
    "eval", "distill", "demo",
    "debias attribute", "debias prune", "debias eval", "debias run", "debias testbed",
    "dialog index", "dialog search", "dialog train-retriever", "dialog eval-retrieval",
    "dialog train-reader", "dialog train-generator", "dialog answer", "dialog eval",
    "dialog serve",
}  # fmt: skip


def test_the_table_lists_every_command_once():
    assert [c.name for c in COMMANDS] == list(BY_NAME) and set(BY_NAME) == EXPECTED
    for c in COMMANDS:
        assert dataclasses.is_dataclass(resolve(c.config)), c.name
        for ref in (c.call, c.show, c.before):
            assert ref is None or callable(resolve(ref)), (c.name, ref)
        assert c.help and "\n" not in c.help


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_help_of_every_command(name, capsys):
    assert main([*name.split(), "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lmsmith {name} ") and "--" in out.split("options")[1]


def test_top_level_and_group_usage(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {g} " in out for g in (*GROUPS, "eval", "distill", "demo"))
    assert main(["dialog", "--help"]) == 0
    assert "eval-retrieval" in capsys.readouterr().out
    assert main([]) == 2 and main(["dialog"]) == 2 and main(["nope"]) == 2
    assert main(["debias", "frobnicate"]) == 2
    assert "choose one of attribute, prune, eval, run" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, line",
    [
        (["eval"], "lmsmith eval: error: missing required option --data "
                   "(instruction jsonl with references, or hf:NAME[:split])"),
        (["dialog", "index", "--out", "x"], "lmsmith dialog index: error: missing required "
                                            "option --docs"),
        (["dialog", "index", "--docs", "d"], "lmsmith dialog index: error: missing required "
                                             "option --output"),
        (["dialog", "search", "--query", "q"], "lmsmith dialog search: error: missing "
                                               "required option --index"),
        (["dialog", "search", "--index", "i", "--query", " "], "lmsmith dialog search: error: "
                                                                "missing required option --query"),
        (["dialog", "train-reader", "--data", "x"], "lmsmith dialog train-reader: error: "
                                                    "missing required option --output"),
        (["debias", "eval"], "lmsmith debias eval: error: missing required option --data"),
    ],
)  # fmt: skip
def test_missing_required_option_is_one_line_exit_2(argv, line, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(line), err
