import json

import pytest

from lmsmith.cli import main
from lmsmith.data.instruct import load_instruct
from lmsmith.evaluate import EvalConfig, evaluate_rows, format_table


def test_evaluate_rows_reports_seeds_and_buckets(tiny, instruct_file):
    model, tok = tiny
    rows = load_instruct(instruct_file)
    cfg = EvalConfig(data=str(instruct_file), seeds=[1, 2], max_new_tokens=4, progress=False)
    metrics, preds = evaluate_rows(model, tok, rows, cfg)
    assert len(preds) == 6 and set(metrics["rougeL_per_seed"]) == {"1", "2"}
    assert sum(v["n"] for v in metrics["by_length"].values()) == 3
    assert "ROUGE-L" in format_table(metrics)


def test_eval_config_validates():
    with pytest.raises(ValueError, match="max_new_tokens"):
        EvalConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        EvalConfig(top_p=1.5)
    with pytest.raises(ValueError, match="engine"):
        EvalConfig(engine="vllm")
    with pytest.raises(ValueError, match="top_p must be 1"):
        EvalConfig(engine="lean", top_p=0.9)


def test_lean_engine_reports_itself(tiny, instruct_file):
    model, tok = tiny
    rows = load_instruct(instruct_file)
    cfg = EvalConfig(
        data=str(instruct_file), seeds=[1], max_new_tokens=4, progress=False, engine="lean"
    )
    metrics, preds = evaluate_rows(model, tok, rows, cfg)
    assert metrics["decoding"].endswith("engine=lean") and len(preds) == 3


def test_cli_malformed_jsonl_exits_2_with_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 7}\n')
    assert main(["eval", "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "output" in err and "Traceback" not in err


def test_cli_unknown_model_exits_2(instruct_file, capsys):
    assert main(["eval", "--model", "no-such-model", "--data", str(instruct_file)]) == 2
    assert "smollm2-135m-instruct" in capsys.readouterr().err


def test_cli_eval_writes_run_folder(tmp_path, instruct_file, capsys):
    from lmsmith.models import tiny_causal_lm, tiny_tokenizer

    mdir = tmp_path / "m"
    tiny_causal_lm().save_pretrained(mdir)
    tiny_tokenizer().save_pretrained(mdir)
    out = tmp_path / "run"
    rc = main(
        [
            "eval",
            "--model",
            str(mdir),
            "--data",
            str(instruct_file),
            "--seeds",
            "3",
            "--max-new-tokens",
            "4",
            "--output-dir",
            str(out),
            "--progress",
            "false",
        ]
    )
    assert rc == 0
    assert "ROUGE-L" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_rows"] == 3 and metrics["seeds"] == [3]
    assert json.loads((out / "config.json").read_text())["max_new_tokens"] == 4
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
