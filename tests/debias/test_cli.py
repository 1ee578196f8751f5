import json
from pathlib import Path

import pytest
import torch

from lmsmith import config
from lmsmith.cli import main
from lmsmith.debias.config import DebiasConfig

from .conftest import bbq_rows, write_jsonl

ROOT = Path(__file__).parents[2]
SMALL = [
    "--test-limit", "4", "--search-rows", "4", "--eval-instructions", "2",
    "--n-instances", "2", "--attr-instructions", "1", "--search-max", "12",
    "--guard-top-k", "3", "--heldout-rows", "2", "--retention-nll-rows", "2",
    "--progress", "false",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from lmsmith.models import tiny_causal_lm, tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny")
    tiny_causal_lm(seed=0).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.mark.parametrize("path", sorted((ROOT / "configs/debias").glob("*.yaml")))
def test_every_config_file_parses(path):
    from lmsmith.debias.config import TestbedConfig

    cls = TestbedConfig if path.stem == "testbed" else DebiasConfig
    assert isinstance(config.load(cls, str(path)), cls)


def test_config_validation_names_the_field():
    with pytest.raises(Exception, match="eval_instructions"):
        config.load(DebiasConfig, None, {"eval_instructions": "0"})
    with pytest.raises(Exception, match="methods"):
        config.load(DebiasConfig, None, {"methods": "cc,platt"})
    with pytest.raises(Exception, match="logprob"):
        config.load(DebiasConfig, None, {"methods": "cc", "mode": "generate"})


def test_run_end_to_end_on_a_tiny_model(tiny_dir, bbq_file, instruct_file, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        ["debias", "run", "--model", str(tiny_dir), "--data", str(bbq_file),
         "--output-dir", str(out), "--methods", "cc,dc,random", *SMALL,
         "--heldout-data", str(instruct_file), "--retention-data", str(instruct_file),
         "--retention-rows", "2", "--retention-tokens", "3"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert s["verdict"] in ("improved", "no-feasible-pruning", "degenerate")
    assert rc == (1 if s["verdict"] == "degenerate" else 0)
    assert printed.startswith(f"verdict: {s['verdict']}")
    assert "| original |" in printed and "| CRISPR |" in printed and "| CC |" in printed
    assert 0 <= s["n_pruned"] <= 12
    for part in ("before", "after"):
        for k in ("accuracy", "accuracy_ambig", "accuracy_disambig", "bias_ambig", "bias_disambig",
                  "answers_ambig", "answers_disambig", "n_counted_disambig", "ci", "nll"):  # fmt: skip
            assert k in s[part], k
    assert set(s["before"]["answers_ambig"]) >= {"target", "other", "unknown"}
    assert {"CC", "DC"} <= set(s["baselines"])
    assert ("random units" in s["baselines"]) == (s["n_pruned"] > 0)
    assert s["retention_rougeL"]["n_rows"] == 2 and "retention ROUGE-L" in printed
    assert s["retention_nll"]["n_texts"] == 2
    assert s["search"][0]["n"] == 0 and {"feasible", "why", "nll"} <= set(s["search"][0])
    units = json.loads((out / "pruned_units.json").read_text())
    assert len(units) == s["n_pruned"]
    for f in ("config.json", "metrics.jsonl", "attribution.safetensors", "search.json",
              "guard.json"):  # fmt: skip
        assert (out / f).is_file(), f
    assert (out / "model").exists() == (s["verdict"] == "improved")


def test_show_run_exits_nonzero_on_degenerate(capsys):
    from lmsmith.debias.cli import show_run

    summary = {
        "verdict": "degenerate", "verdict_reasons": ["97% of answers are unknown"],
        "table": "T", "answers_table": "A", "guard": {}, "search_table": "",
        "retention_nll": {"n_texts": 2, "before": 2.0, "after": 9.0}, "retention_rougeL": None,
        "n_test_rows_scored": 4, "instructions_per_row": 2, "n_pruned": 5, "model_dir": None,
        "wall_time_s": 1.0, "run_dir": "r",
    }  # fmt: skip
    assert show_run(None, summary) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("verdict: degenerate")
    assert captured.err.strip().count("\n") == 0 and "97% of answers are unknown" in captured.err


def test_attribute_then_prune_fixed_n_then_eval(tiny_dir, bbq_file, instruct_file, tmp_path):
    a, p, e = tmp_path / "a", tmp_path / "p", tmp_path / "e"
    common = ["--data", str(bbq_file), *SMALL, "--heldout-data", str(instruct_file),
              "--retention-data", str(instruct_file)]  # fmt: skip
    assert (
        main(["debias", "attribute", "--model", str(tiny_dir), "--output-dir", str(a), *common])
        == 0
    )
    assert (a / "attribution.safetensors").is_file()
    assert main(["debias", "prune", "--model", str(tiny_dir), "--scores", str(a),
                 "--n", "7", "--output-dir", str(p), *common, "--guard-top-k", "0"]) == 0  # fmt: skip
    units = json.loads((p / "pruned_units.json").read_text())
    assert len(units) == 7
    top = json.loads((a / "top_units.json").read_text())[:7]
    assert [(u["module"], u["index"]) for u in units] == [(u["module"], u["index"]) for u in top]
    assert (
        main(["debias", "eval", "--model", str(p / "model"), "--output-dir", str(e), *common]) == 0
    )
    assert "accuracy" in json.loads((e / "summary.json").read_text())


def test_user_errors_exit_2(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "dolly.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "input": "", "output": "y"}) + "\n")
    assert main(["debias", "run", "--model", str(tiny_dir), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1" in err and "question_polarity" in err and len(err.strip().splitlines()) == 1

    good = write_jsonl(tmp_path / "ok.jsonl", bbq_rows())
    assert main(["debias", "run", "--model", "no-such-model", "--data", str(good)]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err

    one = write_jsonl(tmp_path / "one.jsonl", bbq_rows(n_templates=1))
    assert main(["debias", "run", "--model", str(tiny_dir), "--data", str(one)]) == 2
    assert "no dev rows" in capsys.readouterr().err

    assert main(["debias", "frobnicate"]) == 2


def test_testbed_trains_on_a_folder_and_writes_a_model(tiny_dir, tmp_path):
    data = tmp_path / "train-categories"
    data.mkdir()
    write_jsonl(data / "A.jsonl", bbq_rows(category="Nationality"))
    write_jsonl(data / "B.jsonl", bbq_rows(category="Physical_appearance"))
    out = tmp_path / "tb"
    rc = main(["debias", "testbed", "--model", str(tiny_dir), "--data", str(data),
               "--steps", "3", "--batch-size", "2", "--dev-rows", "8", "--train-layers", "1",
               "--pairs", "true", "--eval-every", "2",
               "--output-dir", str(out), "--progress", "false"])  # fmt: skip
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["categories"] == ["Nationality", "Physical_appearance"]
    assert s["n_dev_rows_scored"] == 8 and s["steps"] == 3
    assert {"accuracy_disambig", "unknown_rate"} <= set(s["dev_after"])
    assert (out / "model" / "config.json").is_file() and (out / "config.json").is_file()
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert any("loss" in r for r in steps)
    assert [r["step"] for r in steps if r.get("split") == "dev"] == [0, 2, 3]  # --eval-every 2
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    # the bottom layer stayed frozen: only the top layer (and the final norm) changed
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if ".layers.0." in k or "embed" in k)
    assert any(not torch.equal(a[k], b[k]) for k in a if ".layers.1." in k)


def test_testbed_refuses_a_foreign_output_folder_before_loading(tiny_dir, tmp_path, capsys):
    out = tmp_path / "tb"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc = main(["debias", "testbed", "--model", str(tmp_path / "no-such-model"), "--data",
               str(tmp_path), "--output-dir", str(out), "--progress", "false"])  # fmt: skip
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_testbed_pairs_are_the_two_polarities_of_one_context():
    from lmsmith.data.bbq import load_bbq
    from lmsmith.debias.testbed import training_units

    path = Path(__file__).parents[2] / ".." / "shared" / "data" / "bbq" / "train-categories"
    if not path.is_dir():
        pytest.skip("the shared BBQ data is not here")
    rows = load_bbq(str(path / "Physical_appearance.jsonl"))
    units = training_units(rows, pairs=True)
    assert len(units) >= 0.99 * len(rows) / 2  # nearly every row has its partner
    for a, b in units:
        assert a.context == b.context and a.negative and not b.negative
        assert a.ambiguous == b.ambiguous
        # the answer flips with the question where the context tells; "unknown" both where not
        assert (a.label != b.label) if not a.ambiguous else (a.label == b.label == a.unknown_idx)
    assert training_units(rows, pairs=False) == [[r] for r in rows]


def test_testbed_pairs_need_an_even_batch(tiny_dir, tmp_path, capsys):
    rc = main(["debias", "testbed", "--model", str(tiny_dir), "--data", str(tmp_path),
               "--pairs", "true", "--batch-size", "3", "--output-dir", str(tmp_path / "o")])  # fmt: skip
    assert rc == 2 and "must be even" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
