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


def _cell(tag, layers, seed, dolly, share=None, rollout=None, self_inst=None):
    by_len = {"<=16": {"n": 3, "rougeL": dolly - 1}, ">128": {"n": 1, "rougeL": dolly + 3}}
    c = {
        "tag": tag,
        "method": tag.split("-")[0],
        "layers": layers,
        "seed": seed,
        "eval": {"dolly": {"rougeL": dolly, "by_length": by_len}},
    }
    if self_inst is not None:
        c["eval"]["self-inst"] = {"rougeL": self_inst, "by_length": {}}
    if share is not None:
        c["train"] = {"teacher_token_share": share, "wall_time_s": 10.0}
        c["teacher_share_by_position"] = {"0-15": share / 2, "16-31": share}
        r = {"schedule": "exponential", "tau0": 0.6, "decay": 0.02, "max_new_tokens": 64}
        c["config"] = {"rollout": {**r, **(rollout or {})}}
    return c


def test_aggregate_means_margins_and_plots(kd, tmp_path):
    kd.RESULTS.mkdir(parents=True)
    rows = [_cell("switch", 10, s, v, 0.4) for s, v in enumerate([8.0, 9.0, 10.0])]
    rows += [_cell("gkd", 10, s, v, 0.0) for s, v in enumerate([7.0, 7.5, 8.0])]
    for i, c in enumerate(rows):
        (kd.RESULTS / f"{i}.json").write_text(json.dumps(c))
    assert kd.main(["aggregate", "--out", str(tmp_path / "t.md")]) == 0
    text = (tmp_path / "t.md").read_text()
    sd = statistics.stdev([8.0, 9.0, 10.0])
    assert f"| switch | 10 | 3 | 9.00 ± {sd:.2f} |" in text
    assert "SWITCH − best other method (gkd) = +1.50; seed std: SWITCH 1.00, gkd 0.50" in text
    # pooled buckets: (dolly - 1) in <=16, (dolly + 3) in >128; the margin row follows
    assert "| switch | 10 | 8.00 | 12.00 |" in text
    assert "| +1.50 (gkd) | +1.50 (gkd) |" in text
    assert "| switch | 10 | 20.0% | 40.0% | 40.0 ± 0.0% |" in text
    assert (tmp_path / "docs" / "kd_rouge_by_length.png").stat().st_size > 0
    assert (tmp_path / "docs" / "kd_intervention_by_position.png").stat().st_size > 0


def test_aggregate_ablation_sizes_and_a_missing_benchmark(kd, tmp_path):
    kd.RESULTS.mkdir(parents=True)
    rows = [
        _cell("switch", 10, 0, 9.0, 0.4, self_inst=5.0),  # the only cell with self-inst
        _cell("switch-constant", 10, 0, 8.0, 0.2, {"schedule": "constant"}),
        _cell("switch-linear0.01", 10, 0, 7.0, 0.3, {"schedule": "linear", "decay": 0.01}),
        _cell("gkd", 10, 0, 8.5, 0.0),
        _cell("switch", 5, 0, 6.0, 0.5),
        _cell("gkd", 5, 0, 4.0, 0.0),
    ]
    for i, c in enumerate(rows):
        (kd.RESULTS / f"{i}.json").write_text(json.dumps(c))
    assert kd.main(["aggregate", "--out", str(tmp_path / "t.md")]) == 0
    text = (tmp_path / "t.md").read_text()
    assert "| gkd | 10 | 1 | 8.50 | – |" in text  # self-inst column kept, gkd has none
    assert "self-inst: SWITCH" not in text  # no margin without a baseline on that benchmark
    # tau at the last of 64 positions: 0.6 constant, 0.6 (1 - 0.63) linear, 0.6 e^-1.26 exp
    assert "| constant | 0.6 | – | 0.600 (t=63) | 1 | 8.00 |" in text
    assert "| linear | 0.6 | 0.01 | 0.222 (t=63) |" in text
    assert "| exponential | 0.6 | 0.02 | 0.170 (t=63) |" in text
    assert "| switch | 9.00 / 5.00 | 6.00 / – |" in text
    assert "| SWITCH − best of gkd | +0.50 / – | +2.00 / – |" in text


def test_aggregate_replaces_only_its_block_of_a_doc(kd, tmp_path):
    kd.RESULTS.mkdir(parents=True)
    (kd.RESULTS / "a.json").write_text(json.dumps(_cell("gkd", 10, 0, 7.0, 0.0)))
    doc = tmp_path / "results.md"
    name = "kd_repro aggregate --budget main"
    doc.write_text(f"intro\n<!-- {name}: begin -->\nold table\n<!-- {name}: end -->\nafter\n")
    assert kd.main(["aggregate", "--doc", str(doc)]) == 0
    body = doc.read_text()
    assert body.startswith("intro\n") and body.endswith("-->\nafter\n")
    assert "old table" not in body and "| gkd | 10 | 1 | 7.00 |" in body
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no '<!-- kd_repro"):
        kd.main(["aggregate", "--doc", str(doc)])


def test_aggregate_without_cells_says_so(kd, capsys):
    assert kd.main(["aggregate"]) == 1
    assert "no cells" in capsys.readouterr().out


def test_claims_get_intervals_paired_by_training_seed(kd, tmp_path):
    kd.RESULTS.mkdir(parents=True)
    rows = [_cell("switch", 10, s, v, 0.4) for s, v in enumerate([8.0, 9.0, 10.0])]
    rows += [_cell("gkd", 10, s, v, 0.0) for s, v in enumerate([7.0, 7.5, 8.0])]
    rows += [_cell("switch-constant", 10, s, 8.0, 0.2, {"schedule": "constant"}) for s in range(3)]
    rows += [_cell("switch", 5, s, 6.0, 0.5) for s in range(3)]
    rows += [_cell("gkd", 5, s, v, 0.0) for s, v in enumerate([4.0, 5.0, 6.0])]
    rows += [_cell("distillm", 5, 7, 9.0, 0.0)]  # a seed nobody else has: never paired
    rows += [_cell("switch-linear0.01", 10, 9, 7.0, 0.3, {"schedule": "linear"})]  # nor this
    for i, c in enumerate(rows):
        (kd.RESULTS / f"{i}.json").write_text(json.dumps(c))
    assert kd.main(["aggregate", "--out", str(tmp_path / "t.md")]) == 0
    text = (tmp_path / "t.md").read_text()
    # differences 1, 1.5, 2: sd 0.5, half-width t(0.975, 2) 4.303 × 0.5 / √3 = 1.24
    assert (
        "| (a) | SWITCH − gkd (best other by mean) | dolly | 3 | +1.50 | [+0.26, +2.74] |" in text
    )
    assert "| (c) | exponential 0.02 − constant | dolly | 3 | +1.00 |" in text
    # distillm's lone seed 7 has the best 5-layer mean but pairs with no SWITCH seed: gkd's
    # gaps are 2, 1, 0 at 5 layers against 1, 1.5, 2 at 10, so the gap changes by 1, -0.5, -2
    assert "| (d) | SWITCH − gkd, 5 layers | dolly | 3 | +1.00 |" in text
    assert "| (d) | gap at 5 layers − gap at 10 layers | dolly | 3 | -0.50 |" in text
    assert "distillm, 5 layers" not in text
    assert "linear0.01" not in text.split("**The claims' differences")[1]  # no row without a pair
    assert kd.seed_diffs(rows[:3], rows[3:6], "dolly") == {0: 1.0, 1: 1.5, 2: 2.0}
    assert kd.t_interval([1.0]) == (1, 1.0, 1.0, 1.0)
    with pytest.raises(SystemExit, match="two gkd cells of 10 layers have seed 0"):
        kd.seed_diffs(rows[:3], rows[3:6] + rows[3:4], "dolly")
