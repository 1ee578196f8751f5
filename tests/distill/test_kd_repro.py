"""The reproduction study's bookkeeping: which cells the grid runs, and the aggregate tables."""

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kd_repro.py"


@pytest.fixture
def kd(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("kd_repro", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RESULTS", tmp_path / "results" / "kd")
    monkeypatch.setattr(mod, "DOCS", tmp_path / "docs")
    (tmp_path / "docs").mkdir()
    return mod


def test_grid_covers_the_done_when(kd):
    cells = [dict(zip(c[::2], c[1::2])) for c in kd.grid_cells()]
    keys = {(c.get("--tag", c["--method"]), c["--layers"], c.get("--seed", "0")) for c in cells}
    assert len(keys) == len(cells)  # no cell twice
    for seed in "012":
        assert all((m, "10", seed) in keys for m in kd.METHODS)
        assert all((m, "5", seed) in keys for m in ("switch", "gkd", "distillm"))
        assert all((t, "10", seed) in keys for t in kd.ABLATION)
    assert ("teacher", "30", "0") in keys and ("warmup", "5", "0") in keys
    # the ablation's later seeds come after every main cell
    last_main = max(i for i, c in enumerate(cells) if c.get("--tag") is None)
    assert all(i > last_main for i, c in enumerate(cells) if c.get("--tag") and c["--seed"] != "0")


def _cell(tag, layers, seed, dolly, share=None):
    by_len = {"<=16": {"n": 3, "rougeL": dolly - 1}, ">128": {"n": 1, "rougeL": dolly + 3}}
    c = {
        "tag": tag,
        "method": tag.split("-")[0],
        "layers": layers,
        "seed": seed,
        "eval": {"dolly": {"rougeL": dolly, "by_length": by_len}},
    }
    if share is not None:
        c["train"] = {"teacher_token_share": share, "wall_time_s": 10.0}
        c["teacher_share_by_position"] = {"0-15": share / 2, "16-31": share}
        c["config"] = {"rollout": {"schedule": "exponential", "tau0": 0.6, "decay": 0.02}}
    return c


def test_aggregate_means_margins_and_plots(kd, tmp_path, capsys):
    kd.RESULTS.mkdir(parents=True)
    rows = [_cell("switch", 10, s, v, 0.4) for s, v in enumerate([8.0, 9.0, 10.0])]
    rows += [_cell("gkd", 10, s, v, 0.0) for s, v in enumerate([7.0, 7.5, 8.0])]
    for i, c in enumerate(rows):
        (kd.RESULTS / f"{i}.json").write_text(json.dumps(c))
    assert kd.main(["aggregate", "--out", str(tmp_path / "t.md")]) == 0
    text = (tmp_path / "t.md").read_text()
    sd = statistics.stdev([8.0, 9.0, 10.0])
    assert f"| switch | 10 | 3 | 9.00 ± {sd:.2f} |" in text
    assert "SWITCH − best other method (gkd) = +1.50" in text
    # pooled buckets: (dolly - 1) in <=16, (dolly + 3) in >128; the margin row follows
    assert "| switch | 10 | 8.00 | 12.00 |" in text
    assert "| SWITCH − best other | 10 | +1.50 | +1.50 |" in text
    assert "| switch | 10 | 20.0% | 40.0% | 40.0 ± 0.0% |" in text
    assert (tmp_path / "docs" / "kd_rouge_by_length.png").stat().st_size > 0
    assert (tmp_path / "docs" / "kd_intervention_by_position.png").stat().st_size > 0


def test_aggregate_without_cells_says_so(kd, capsys):
    assert kd.main(["aggregate"]) == 1
    assert "no cells" in capsys.readouterr().out
