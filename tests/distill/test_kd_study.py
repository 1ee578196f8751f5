"""The SWITCH study's bookkeeping and statistics (benchmarks/kd_study.py)."""

import importlib.util
import json
import random
import shutil
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kd_study.py"


@pytest.fixture
def ks(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("kd_study", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(mod, "WORK", tmp_path / "work")
    yield mod
    sys.modules.pop("kd_repro", None)


def test_rows_are_disjoint_and_cover_the_budget(ks):
    spans = sorted(ks.ROWS.values())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no row in two roles
    n_distill = ks.ROWS["distill"][1] - ks.ROWS["distill"][0]
    p = ks.PHASES["main"]
    assert p["steps"] * p["batch_size"] <= n_distill  # every prompt of a cell is fresh
    assert ks.WARMUP["steps"] * ks.WARMUP["batch_size"] <= ks.ROWS["warmup"][1]


def test_split_rows_writes_the_slices(ks):
    if not (ks.DATA / "dolly" / "dev.jsonl").is_file():
        pytest.skip("the shared data is not here")
    files = ks.split_rows()
    src = (ks.DATA / "dolly" / "dev.jsonl").read_text().splitlines()
    for name, (a, b) in ks.ROWS.items():
        assert files[name].read_text().splitlines() == src[a:b]


def test_one_token_budget_and_one_template_for_every_arm(ks, tmp_path):
    from lmsmith import config as C
    from lmsmith.distill.config import DistillConfig

    files = {k: tmp_path / f"{k}.jsonl" for k in ks.ROWS}
    for tag in ks.ARMS:
        cfg = C.load(DistillConfig, None, ks.train_config(tag, 3, "main", files))
        assert cfg.data.max_response_tokens == cfg.rollout.max_new_tokens == 64
        assert cfg.data.chat_template and cfg.train.precision == "fp32" and cfg.train.seed == 3
        assert cfg.data.data == str(files["distill"])
        assert cfg.model.student == f"layers:{ks.LAYERS}"  # the record names the real student
    fast = C.load(DistillConfig, None, ks.train_config("switch-fast", 0, "main", files))
    assert (
        fast.rollout.decay
        > C.load(DistillConfig, None, ks.train_config("switch", 0, "main", files)).rollout.decay
    )


def test_grid_runs_the_pilot_first_and_every_arm_for_every_seed(ks):
    cells = ks.grid_cells("main", 6)
    assert len(cells) == len(set(cells))
    assert cells[0] == ("warmup", 0) and cells[-1] == ("teacher", 0)
    assert [t for t, s in cells[1:6]] == [*ks.PILOT, "sft", "distillm", "switch-fast"]
    assert all(s == 0 for _, s in cells[1:6])  # one seed of every arm first
    assert cells[6:10] == [("switch", 1), ("switch", 2), ("gkd", 1), ("gkd", 2)]  # the pilot
    assert {(t, s) for t in ks.ARMS for s in range(6)} <= set(cells)


def test_paired_interval_finds_a_shift_and_not_noise(ks):
    rng = random.Random(0)
    base = [[100 * rng.random() for _ in range(200)] for _ in range(4)]
    same = ks.paired_interval(base, base)
    assert same == (0, 0, 0, 1.0)
    shifted = [[x + 5.0 for x in r] for r in base]
    est, lo, hi, p = ks.paired_interval(shifted, base)
    assert est == pytest.approx(5.0) and lo == pytest.approx(5.0) and p == 0.0
    noisy = [[x + rng.gauss(0, 20.0) for x in r] for r in base]
    est, lo, hi, p = ks.paired_interval(noisy, base)
    assert lo < est < hi and lo < 0 < hi and p > 0.05


def test_few_seeds_give_a_wide_interval_not_a_row_only_one(ks):
    """Two seeds 2 points apart in their difference: the seed spread, not the 200 rows, sets the
    width (the session-10 bootstrap gave p 0.001 on data like this)."""
    rng = random.Random(1)
    base = [[50 + rng.gauss(0, 10) for _ in range(200)] for _ in range(2)]
    a = [[x - 1.0 + 2.0 * s + rng.gauss(0, 1) for x in r] for s, r in enumerate(base)]
    est, lo, hi, p = ks.paired_interval(a, base)
    assert est == pytest.approx(0.0, abs=0.2)
    assert hi - lo > 10  # t with about one df: 12.7 x 1.0 on each side
    noise = [rng.gauss(0, 1) for _ in range(200)]  # the same rows' noise in both seeds
    a = [[x + 1.0 + e for x, e in zip(r, noise)] for r in base]
    est, lo, hi, p = ks.paired_interval(a, base)  # the seeds agree: the rows set the width
    assert 0.7 < lo < est < hi < 1.3 and p < 0.001


def test_holm_and_seeds_needed(ks):
    adj = ks.holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adj == {"a": pytest.approx(0.03), "c": pytest.approx(0.06), "b": pytest.approx(0.06)}
    # t quantiles: n = 9 needs (2.306 + 0.889)^2 = 10.2 > 9; n = 10 needs 9.9
    assert ks.seeds_needed(1.0, 1.0) == 10
    assert ks.seeds_needed(0.5, 1.0) == 5  # (2.776 + 0.941)^2 / 4 = 3.5 <= 5; n = 4: 4.3 > 4
    assert ks.seeds_needed(1.0, 0.5) == 34  # t quantiles past 30 df too: n = 33 needs 33.4
    assert ks.holm({"a": 0.3, "b": 0.6}) == {"a": 0.6, "b": 0.6}
    assert ks.holm({"a": 0.7, "b": 0.8}) == {"a": 1.0, "b": 1.0}  # capped at 1
    assert ks._p(0.0004) == "<0.001" and ks._p(0.0123) == "0.012" and ks._p(None) == "–"
    assert ks.seeds_needed(2.0, 1.0) > ks.seeds_needed(1.0, 1.0)


def _cell(tag, seed, dolly, si, share=None):
    def bench(scores):
        return {"rougeL": sum(scores) / len(scores), "by_length": {}, "rows": [],
                "row_rougeL": scores, "gen_tokens": [10, 128, 40, 5],
                "ref_words": [5, 20, 70, 200], "eval_s": 3.0}  # fmt: skip

    c = {"tag": tag, "seed": seed, "eval": {"dolly": bench(dolly), "self-inst": bench(si)}}
    if share is not None:
        c["train"] = {"teacher_token_share": share, "wall_time_s": 100.0}
        c["teacher_share_by_position"] = {"0-15": share / 2, "16-63": share}
    return c


def test_aggregate_tables_from_cells(ks, tmp_path, capsys):
    folder = tmp_path / "results" / "main"
    folder.mkdir(parents=True)
    for s in range(3):
        for tag, off in (("switch", 0.02), ("gkd", 0.0), ("distillm", -0.01), ("sft", -0.02)):
            d = [100 * x for x in (0.1 + off + 0.001 * s, 0.2 + off, 0.3 + off, 0.15 + off)]
            c = _cell(tag, s, d, [x / 2 for x in d], share=0.4 if "switch" in tag else None)
            for e in c["eval"].values():  # SWITCH s1 loops on the last row, GKD s2 on the first
                e["repeat_share"] = [0.0, 0.1, 0.0, 0.9 if (tag, s) == ("switch", 1) else 0.0]
                e["repeat_share"][0] = 0.8 if (tag, s) == ("gkd", 2) else 0.0
            (folder / f"{tag}-s{s}.json").write_text(json.dumps(c))
    doc = tmp_path / "r.md"
    doc.write_text(
        "x\n<!-- kd-study-main: begin -->\nSTALE-BLOCK\n<!-- kd-study-main: end -->\ny\n"
    )
    assert (
        ks.main(["aggregate", "--results-dir", str(tmp_path / "results"), "--doc", str(doc)]) == 0
    )
    text = capsys.readouterr().out
    assert "| gkd (primary) | dolly | 3 | +2.00 |" in text  # GKD beats DistiLLM here
    assert "| sft | dolly | 3 | +4.00 |" in text
    assert "| gkd | dolly | 3 | 2/4 | 27.00 | 25.00 | +2.00 |" in text  # rows 1-2 only
    assert "| sft | dolly | 3 | 3/4 |" in text  # SFT never loops: only SWITCH's loop drops
    assert "sd of SWITCH − gkd over them" in text and "| 0-15 | 16-63 |" in text
    assert "(primary) | dolly | 3 | +2.00 | [+2.00, +2.00] | <0.001 | <0.001 |" in text
    assert (
        "| switch | 3 | unknown ×3 | 20.78 ± 0.03 |" in text
    )  # (0.12+0.22+0.32+0.17)/4 + 0.00025 s
    assert "− gkd (primary) | greedy | dolly | 3 | +2.00 | [+2.00, +2.00] | <0.001 | held |" in text
    assert "− distillm | greedy | dolly | 3 | +3.00 | [+3.00, +3.00] | <0.001 | held |" in text
    # the same margin on short and long references of each benchmark (+2 Dolly, +1
    # Self-Instruct): no growth, and the benchmarks' different margins do not leak in
    (line, _) = [x for x in text.splitlines() if x.startswith("| (b)")]  # GKD, then DistiLLM
    assert "gkd (primary) on references" in line
    assert "| both, weighted by rows | 3 | " in line and line.endswith("| not established |")
    assert abs(float(line.split(" | ")[-4])) < 0.005  # rounding noise only
    (other,) = [x for x in text.splitlines() if x.startswith("(b) against gkd, split at")]
    assert "over 16 words" in other and "over 128 words" in other and "over 64" not in other
    body = doc.read_text()
    assert body.startswith("x\n") and body.endswith("y\n") and "STALE-BLOCK" not in body
    assert "![every cell, and SWITCH − gkd by reference length](kd_study_main.png)" in body
    assert (tmp_path / "kd_study_main.png").stat().st_size > 10_000  # drawn beside the doc


def test_claim_b_contrasts_the_margin_on_long_and_short_references(ks):
    """Rows 2-3 of ``_cell`` have references over 64 words: SWITCH trails GKD by 2 on the short
    rows and leads by 1 on the long ones, so its margin grows by 3 with length."""
    rng = random.Random(3)
    cells = {"switch": {}, "gkd": {}}
    for s in range(4):
        g = [30 + rng.gauss(0, 5) for _ in range(4)]
        sw = [x + d + rng.gauss(0, 0.3) for x, d in zip(g, (-2, -2, 1, 1))]
        cells["gkd"][(s, "avx2")] = _cell("gkd", s, g, g)
        cells["switch"][(s, "avx2")] = _cell("switch", s, sw, sw)
    n_short, n_long, est, lo, hi, p = ks.length_contrast(cells, "gkd")
    assert (n_short, n_long) == (4, 4)  # two rows of each benchmark on each side
    assert lo < est < hi and est == pytest.approx(3.0, abs=0.5) and p < 0.05
    assert ks.verdict(4, est, p) == "held"
    assert ks.length_contrast(cells, "gkd", split=500) is None  # no long rows
    flat = {t: {k: _cell(t, k[0], [30.0] * 4, [30.0] * 4) for k in cs} for t, cs in cells.items()}
    assert ks.length_contrast(flat, "gkd")[2:] == (0.0, 0.0, 0.0, 1.0)
    assert ks.verdict(4, -1.0, 0.01) == "contradicted"
    assert ks.verdict(4, -1.0, 0.2) == "not established"
    assert ks.verdict(2, 5.0, None).startswith("too few seeds")
    # a p that rounds to 0.050 shows which side of the line it is on
    assert ks._claim_row("c", "g", "b", 5, 1.2, 0.0, 2.4, 0.0496).endswith("| 0.0496 | held |")
    row = ks._claim_row("c", "g", "b", 5, 1.2, -0.01, 2.4, 0.0504)
    assert row.endswith("| 0.0504 | not established |")
    assert ks._claim_row("c", "g", "b", 1, 1.2, 0.1, 2.4, 0.01).endswith(
        "| [+0.10, +2.40] rows only | – | too few seeds (p from 3) |"
    )
    # the other splits' line follows the same rules: no p below three seeds
    got = (10, 20, -2.09, -3.73, -0.45, 0.013)
    assert ks._split_text(128, got, 1) == "over 128 words -2.09 [-3.73, -0.45] rows only"
    assert ks._split_text(128, got, 2) == "over 128 words -2.09 [-3.73, -0.45]"
    assert ks._split_text(128, got, 3) == "over 128 words -2.09 [-3.73, -0.45], p 0.013"


def test_the_long_phase_compares_switchs_margin_with_the_main_phases(ks, tmp_path, capsys):
    """SWITCH trails GKD by 2 in the main phase and by 1 (give or take a seed's 0.1) in the long
    one: claim (b)'s cross-phase row finds the +1, paired by seed and machine type, Holm over
    the two benchmarks; seed 3 has no main cell, and seed 1's AVX512 long cells (SWITCH 10
    ahead) have no main-phase partner of their type."""
    g = [20.0, 30.0, 25.0, 35.0]
    for phase, gap in (("main", -2.0), ("long", -1.0)):
        folder = tmp_path / "results" / phase
        folder.mkdir(parents=True)
        for s in range(3 if phase == "main" else 4):
            sw = [x + gap + (0.1 * s if phase == "long" else 0) for x in g]
            for tag, d in (("gkd", g), ("switch", sw)):
                (folder / f"{tag}-s{s}.json").write_text(json.dumps(_cell(tag, s, d, d)))
    for tag, d in (("gkd", g), ("switch", [x + 10 for x in g])):
        c = {**_cell(tag, 1, d, d), "hardware": {"cpu_capability": "AVX512"}}
        (tmp_path / "results" / "long" / f"{tag}-s1-avx512.json").write_text(json.dumps(c))
    assert (
        ks.main(["aggregate", "--phase", "long", "--results-dir", str(tmp_path / "results")]) == 0
    )
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if "main phase) | greedy | dolly" in x]
    assert line.endswith("| dolly | 3 | +1.10 | [+0.85, +1.35] | 0.005 | held |")
    assert "difference 4 seeds detect" in out  # the long phase plans four seeds, not six
    assert ks.main(["aggregate", "--results-dir", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "main phase)" not in out  # the main phase has no other to compare
    assert "difference 6 seeds detect" in out
    for phase, order in (("long", (0, 1, 2, 3)), ("main", (3, 2, 1, 0))):
        c = _cell("gkd", 0, [20.0] * 4, [20.0] * 4)
        c["eval"]["dolly"]["rows"] = [f"dolly/valid.jsonl:{i}" for i in order]
        (tmp_path / "results" / phase / "gkd-s0.json").write_text(json.dumps(c))
    with pytest.raises(SystemExit, match="rows differ"):  # another order: margins cannot pair
        ks.main(["aggregate", "--phase", "long", "--results-dir", str(tmp_path / "results")])


def test_noise_from_one_arm_sizes_the_study(ks, tmp_path, capsys):
    folder = tmp_path / "results" / "main"
    folder.mkdir(parents=True)
    for s, off in enumerate((0.0, 1.0)):  # two SWITCH seeds 1 point apart: sd 0.71
        d = [10.0 + off, 20.0 + off, 30.0 + off, 15.0 + off]
        (folder / f"switch-s{s}.json").write_text(json.dumps(_cell("switch", s, d, d, share=0.3)))
    assert ks.main(["aggregate", "--results-dir", str(tmp_path / "results")]) == 0
    text = capsys.readouterr().out
    # sd 0.71 -> difference sd 1.00 -> 10 seeds at delta 1.0 (t quantiles); no GKD seeds
    # six seeds detect (t_0.975 + t_0.80 at 5 df) × 1.00 / √6 = (2.571 + 0.920) / 2.449 = 1.42
    assert "| dolly | 2 (1) | 0.71 | 1.00 | 0 | – (needs 3) | 1.00 | 52 / 19 / 10 | 1.42 |" in text


def test_the_primary_comparators_paired_noise_can_set_the_plan(ks, tmp_path, capsys):
    folder = tmp_path / "results" / "main"
    folder.mkdir(parents=True)
    for s in range(3):
        for tag, off in (("switch", 0.1 * s), ("gkd", 0.5 + 0.1 * s), ("distillm", 2.0 + s)):
            d = [10.0 + off, 20.0 + off, 30.0 + off, 15.0 + off]
            (folder / f"{tag}-s{s}.json").write_text(json.dumps(_cell(tag, s, d, d)))
    assert ks.main(["aggregate", "--results-dir", str(tmp_path / "results")]) == 0
    text = capsys.readouterr().out
    # SWITCH's sd 0.10 (√2: 0.14); SWITCH − gkd is -0.5 every seed (sd 0); SWITCH − distillm is
    # -2.0, -2.9, -3.8 (sd 0.90): the primary comparator's paired sd is the plan
    assert "| dolly | 3 (2) | 0.10 | 0.14 | 3 | 0.00 | 3 | 0.90 | 0.90 |" in text
    assert "sd of SWITCH − distillm over them" in text


def test_looping_answers_are_found_and_a_degenerate_start_is_refused(ks, tmp_path, capsys):
    assert ks.repeat_share("The capital of France is Paris.") == 0.0
    loop = "the fish, a fish, " * 20
    assert ks.repeat_share(loop) > 0.9
    here = ks.this_machine()  # the grid checks this machine type's warm-up
    warm = _on(here, _cell("warmup", 0, [1.0] * 4, [1.0] * 4))
    warm["protocol"] = ks.protocol("main", "warmup")
    for e in warm["eval"].values():
        e["repeat_share"] = [0.95, 0.9, 0.8, 0.0]  # 3 of 4 answers loop
    assert ks.looping_rate(warm) == (0.75, "rows")
    folder = tmp_path / "results" / "main"
    folder.mkdir(parents=True)
    (folder / f"warmup-s0-{here}.json").write_text(json.dumps(warm))
    assert ks.main(["grid", "--dry-run"]) == 2  # refuses before running anything
    assert "warm-up student's answers loop (75%" in capsys.readouterr().err
    assert ks.main(["aggregate", "--results-dir", str(tmp_path / "results")]) == 0
    assert "**DEGENERATE: warmup**" in capsys.readouterr().out
    for e in warm["eval"].values():
        e["repeat_share"] = [0.0, 0.1, 0.0, 0.9]
    (folder / f"warmup-s0-{here}.json").write_text(json.dumps(warm))
    assert ks.main(["grid", "--dry-run"]) == 0


def test_a_new_warmup_recipe_gets_a_new_folder_and_old_cells_are_refused(ks, tmp_path, capsys):
    name = ks.warmup_name()
    assert name.startswith(f"warmup-L{ks.LAYERS}-")
    old = json.loads(json.dumps(ks.protocol("main", "switch")))
    ks.WARMUP = {**ks.WARMUP, "steps": ks.WARMUP["steps"] + 1}
    assert ks.warmup_name() != name  # a changed recipe never reuses the old student
    folder = tmp_path / "results" / "main"
    folder.mkdir(parents=True)
    stale = _cell("switch", 0, [1.0] * 4, [1.0] * 4)
    stale["protocol"] = old
    (folder / "switch-s0.json").write_text(json.dumps(stale))
    teacher = _cell("teacher", 0, [1.0] * 4, [1.0] * 4)
    teacher["protocol"] = {**ks.protocol("main", "teacher"), "warmup": "anything"}
    (folder / "teacher-s0.json").write_text(json.dumps(teacher))  # the warm-up is not its input
    assert ks.stale_cells(folder, "main") == [str(folder / "switch-s0.json")]
    assert ks.main(["grid", "--dry-run"]) == 2
    assert "switch-s0.json" in capsys.readouterr().err
    stale["protocol"] = ks.protocol("main", "switch")
    (folder / "switch-s0.json").write_text(json.dumps(stale))
    assert ks.stale_cells(folder, "main") == []


def test_a_new_teacher_recipe_stales_only_the_cells_that_read_the_teacher(ks, tmp_path):
    name = ks.teacher_name()
    assert name.startswith(f"teacher-L{ks.TEACHER_LAYERS}-") and name != ks.warmup_name()
    folder = tmp_path / "main"
    folder.mkdir()
    for tag in ("teacher", "warmup", "sft", "gkd", "distillm", "switch", "switch-fast"):
        c = _cell(tag, 0, [1.0] * 4, [1.0] * 4)
        c["protocol"] = ks.protocol("main", tag)
        (folder / f"{tag}-s0.json").write_text(json.dumps(c))
    assert ks.stale_cells(folder, "main") == []
    ks.TEACHER = {**ks.TEACHER, "lr": ks.TEACHER["lr"] * 2}
    assert ks.teacher_name() != name  # a changed recipe never reuses the old teacher
    stale = {Path(x).name for x in ks.stale_cells(folder, "main")}
    assert stale == {
        f"{t}-s0.json" for t in ("teacher", "gkd", "distillm", "switch", "switch-fast")
    }


def test_sampled_protocol_table_and_its_preconditions(ks, tmp_path, capsys):
    with pytest.raises(SystemExit, match="greedy cell comes first"):
        ks.main(["sampled", "--method", "gkd", "--results-dir", str(tmp_path / "results")])
    folder = tmp_path / "results" / "main-sampled"
    folder.mkdir(parents=True)
    for s, v in enumerate((10.0, 12.0)):
        c = {"tag": "gkd", "seed": s, "sampled": {**ks.SAMPLED, "no_repeat_ngram_size": 0}}
        e = {"rougeL": v, "row_rougeL": [v, v], "repeat_share": [0.9, 0.0, 0.0, 0.0]}
        c["eval"] = {b: dict(e) for b in ks.BENCHES}  # 2 rows × 2 samples
        (folder / f"gkd-s{s}.json").write_text(json.dumps(c))
    lines = ks._sampled_table(folder)
    assert "sampling seeds 10, 20, 30, 40, 50" in lines[1]
    assert "| unknown | gkd | 2 | 11.00 ± 1.41 | 11.00 ± 1.41 | 25% | off |" in lines
    other = {**json.loads(json.dumps(c)), "hardware": {"cpu_capability": "AVX512"}}
    (folder / "gkd-s1-avx512.json").write_text(json.dumps(other))  # another type: its own row
    lines = ks._sampled_table(folder)
    assert "| avx512 | gkd | 1 | 12.00 | 12.00 | 25% | off |" in lines
    c["sampled"]["rows"] += 1
    (folder / "gkd-s1.json").write_text(json.dumps(c))
    with pytest.raises(SystemExit, match="one table cannot mix them"):
        ks._sampled_table(folder)


def test_sampled_cells_are_compared_paired_by_seed_and_row(ks, tmp_path):
    folder = tmp_path / "results" / "main-sampled"
    folder.mkdir(parents=True)
    rows = [f"dolly/valid.jsonl:{i}" for i in range(4)]
    for s in range(3):
        for tag, off in (("switch", -1.0), ("distillm", 0.0), ("gkd", 0.5)):
            c = {"tag": tag, "seed": s, "sampled": {**ks.SAMPLED, "no_repeat_ngram_size": 0}}
            row = [10.0 + i + 0.1 * s + off for i in range(4)]
            # five samples a row: repeat_share is longer than the row list, and that is fine
            e = {
                "rougeL": sum(row) / 4,
                "rows": rows,
                "row_rougeL": row,
                "repeat_share": [0.0] * 20,
            }
            c["eval"] = {b: dict(e) for b in ks.BENCHES}
            (folder / f"{tag}-s{s}.json").write_text(json.dumps(c))
    # a SWITCH cell of another machine type has no partner there: seeds stay 3, values as before
    other = {**c, "tag": "switch", "seed": 0, "hardware": {"cpu_capability": "AVX2"}}
    (folder / "switch-s0-avx2.json").write_text(json.dumps(other))
    lines = ks._sampled_table(folder, best="distillm")
    assert "| distillm (primary) | dolly | 3 | -1.00 | [-1.00, -1.00] | <0.001 | <0.001 |" in lines
    assert any(x.startswith("| gkd | self-inst | 3 | -1.50 |") for x in lines)
    res, _ = ks.comparison_stats(ks.load_cells(folder), "distillm", ["switch-fast"])
    assert ("switch-fast", "dolly") not in res and ("distillm", "dolly") in res  # no cells
    assert not any("against the other arms" in x for x in ks._sampled_table(folder))  # no best
    claims = ks._claims({}, "distillm", ks.load_cells(folder))  # no greedy cells: sampled only
    assert [x for x in claims if x.startswith("| (a)")] == [
        f"| (a) SWITCH beats the better of GKD and DistiLLM: SWITCH − {t} | sampled | {b} "
        f"| 3 | {d} | [{d}, {d}] | <0.001 | contradicted |"
        for t, d in (("distillm (primary)", "-1.00"), ("gkd", "-1.50"))
        for b in ks.BENCHES
    ]
    assert not any(x.startswith("| (b)") for x in claims)
    c["eval"]["dolly"]["rows"] = rows[::-1]  # another order: not pairable
    (folder / "gkd-s2.json").write_text(json.dumps(c))
    with pytest.raises(SystemExit, match="rows differ"):
        ks._sampled_table(folder, best="distillm")


def test_grid_stops_when_the_warmup_it_just_made_loops(ks, tmp_path, monkeypatch, capsys):
    import subprocess

    made = []

    def fake_call(cmd, **kw):  # stands in for running one cell
        tag, seed = cmd[cmd.index("--method") + 1], int(cmd[cmd.index("--seed") + 1])
        made.append((tag, seed))
        c = _cell(tag, seed, [1.0] * 4, [1.0] * 4)
        c["protocol"] = ks.protocol("main", tag)
        for e in c["eval"].values():
            e["repeat_share"] = [0.9, 0.9, 0.9, 0.0]
        path = ks.cell_path(ks.RESULTS, "main", tag, seed, ks.this_machine())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(c))
        return 0

    monkeypatch.setattr(subprocess, "call", fake_call)
    assert ks.main(["grid", "--seeds", "3"]) == 2
    assert made == [("warmup", 0)]  # no distillation cell from the degenerate start
    assert "warm-up student's answers loop (75%" in capsys.readouterr().err


def test_sampled_evaluation_scores_five_seeds_per_row(ks, tiny, instruct_file, monkeypatch):
    model, tok = tiny
    if getattr(tok, "chat_template", None) is None:
        tok.chat_template = (
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}"
        )
    monkeypatch.setattr(ks, "BENCHES", {"dolly": instruct_file, "self-inst": instruct_file})
    phase = {**ks.PHASES["main"], "eval_max_new_tokens": 6, "eval_batch_size": 2}
    out = ks.evaluate_sampled(model, tok, phase, rows_per_bench=2, no_repeat=0)
    e = out["dolly"]
    assert list(e["per_seed"]) == [str(s) for s in ks.SAMPLED["seeds"]]
    assert len(e["row_rougeL"]) == 2 and len(e["repeat_share"]) == 2 * len(ks.SAMPLED["seeds"])
    assert e["rougeL"] == pytest.approx(sum(e["row_rougeL"]) / 2)
    assert "sample(T=1.0" in e["decoding"] and "engine=lean" in e["decoding"]
    blocked = ks.evaluate_sampled(model, tok, phase, rows_per_bench=2, no_repeat=3)["dolly"]
    assert "no_repeat_ngram_size=3" in blocked["decoding"]


def test_compare_cells_finds_a_changed_row_and_passes_a_copy(ks):
    cell = {
        "eval": {
            "dolly": {
                "rougeL": 0.2,
                "rows": ["a", "b", "c"],
                "row_rougeL": [0.1, 0.2, 0.3],
                "gen_tokens": [5, 64, 12],
            }
        }
    }
    assert ks.compare_cells(cell, json.loads(json.dumps(cell))) == []
    again = json.loads(json.dumps(cell))
    again["eval"]["dolly"]["gen_tokens"][1] = 63
    (diff,) = ks.compare_cells(cell, again)
    assert "gen_tokens differs on 1 of 3 rows" in diff and "row 1, b: 64 vs 63" in diff
    again = json.loads(json.dumps(cell))
    again["eval"]["dolly"]["rows"] = ["a", "c", "b"]
    assert ks.compare_cells(cell, again) == ["dolly: different rows (or row order)"]
    assert ks.compare_cells(cell, {"eval": {}}) == ["dolly: missing from the re-created cell"]


def test_verify_never_wipes_a_folder_it_did_not_make(ks, tmp_path):
    committed = ks.cell_path(ks.RESULTS, "main", "sft", 0, ks.this_machine())
    committed.parent.mkdir(parents=True)
    committed.write_text("{}")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    args = ks.argparse.Namespace(method="sft", seed=0, phase="main", work_dir=str(mine))
    with pytest.raises(SystemExit, match="not a verification folder"):
        ks.verify(args)
    assert (mine / "notes.txt").read_text() == "keep me"
    args.method = "gkd"  # no committed cell: nothing to verify
    with pytest.raises(SystemExit, match="nothing to verify"):
        ks.verify(args)


def test_teacher_targets_keep_only_answers_that_end_and_do_not_loop(ks, tmp_path, monkeypatch):
    import lmsmith.evaluate as ev

    rows = [{"instruction": f"q{i}", "input": "", "output": f"reference {i}"} for i in range(4)]
    src = tmp_path / "warmup.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cap = 256
    answers = [
        "a short answer that ends.",
        " ".join(f"w{i}" for i in range(cap)),  # ran to the cap
        "the fish, a fish, " * 20,  # loops
        "another good answer.",
    ]

    def fake_rows(model, tok, rs, cfg):
        assert cfg.greedy and cfg.max_new_tokens == cap and cfg.chat_template
        return {}, [{"prediction": a} for a in answers[: len(rs)]]

    class Tok:  # one token per word
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

    monkeypatch.setattr(ev, "evaluate_rows", fake_rows)
    out = tmp_path / "teacher.jsonl"
    counts = ks.teacher_targets(None, Tok(), src, out, cap)
    assert counts == {"rows": 4, "at_cap": 1, "looping": 1, "empty": 0, "kept": 2}
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert [k["output"] for k in kept] == [answers[0], answers[3]]
    assert [k["reference"] for k in kept] == ["reference 0", "reference 3"]  # kept for reading

    answers[3] = ""  # fewer than half usable: refuse rather than train on a sliver
    with pytest.raises(RuntimeError, match="unusable"):
        ks.teacher_targets(None, Tok(), src, tmp_path / "again.jsonl", cap)
    assert not (tmp_path / "again.jsonl").exists()


def test_loop_onset_separates_kept_loops_from_new_ones(ks, tmp_path, capsys):
    folder = tmp_path / "results" / "main"
    folder.mkdir(parents=True)
    for tag, dolly in (("warmup", [0.9, 0.9, 0.0, 0.0]), ("gkd", [0.9, 0.0, 0.9, 0.9])):
        c = _cell(tag, 0, [1.0] * 4, [1.0] * 4)
        c["eval"]["dolly"]["repeat_share"] = dolly
        c["eval"]["self-inst"]["repeat_share"] = [0.0] * 4
        (folder / f"{tag}-s0.json").write_text(json.dumps(c))
    assert ks.main(["loop-onset", "--tags", "gkd"]) == 0
    out = capsys.readouterr().out
    assert "| gkd | 0 | unknown | dolly | 1/2 (50%) | 2/2 (100%) |" in out
    assert "| gkd | 0 | unknown | self-inst | 0/0 (0%) | 0/4 (0%) |" in out


def test_the_tuned_teacher_is_trained_once_on_the_warmup_rows_and_frozen(
    ks, tiny, instruct_file, tmp_path, monkeypatch
):
    import torch

    model, tok = tiny
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    monkeypatch.setattr(ks, "TEACHER", {**ks.TEACHER, "steps": 2, "batch_size": 2, "lr": 1e-2})
    monkeypatch.setattr(ks, "TEACHER_LAYERS", 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = ks.tuned_teacher(model, tok, {"warmup": instruct_file}, tmp_path)
    weights = tmp_path / ks.teacher_name() / "student" / "model.safetensors"
    assert weights.exists()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    trained = teacher.state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before)  # it was fine-tuned
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # base kept
    stamp = weights.stat().st_mtime_ns
    again = ks.tuned_teacher(model, tok, {"warmup": instruct_file}, tmp_path)
    assert weights.stat().st_mtime_ns == stamp  # built once, then loaded
    assert all(torch.equal(trained[k], v) for k, v in again.state_dict().items())


def test_stop_prob_reads_the_eos_probability_after_short_references(
    ks, tiny, instruct_file, monkeypatch, capsys
):
    import torch

    model, tok = tiny
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    monkeypatch.setattr(ks, "_lm", lambda: (model, tok))
    monkeypatch.setattr(ks, "BENCHES", {"dolly": instruct_file})

    class AlwaysEOS(torch.nn.Module):  # puts all its mass on EOS after any text
        def forward(self, ids):
            logits = torch.zeros(1, ids.shape[1], 100)
            logits[..., tok.eos_token_id] = 50.0
            return type("Out", (), {"logits": logits})()

    models = {"teacher": AlwaysEOS(), "warmup": model}
    monkeypatch.setattr(ks, "cell_model", lambda phase, tag, seed, base, tok: models[tag])
    assert ks.main(["stop-prob", "--tags", "teacher", "warmup", "--rows", "2"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| teacher")]
    # the 2 first rows that fit the budget; all mass on EOS: no entropy, and the reference's
    # tokens (never EOS) cost 50 nats each
    assert lines == ["| teacher | 2 | 1.00 | 100% | 0.00 | 1.00 | 50.00 |"]


def test_cells_that_cannot_be_paired_row_by_row_are_refused(ks, tmp_path):
    folder = tmp_path / "results" / "main"
    folder.mkdir(parents=True)
    for s in range(2):
        c = _cell("switch", s, [1.0, 2.0, 3.0, 4.0], [1.0] * 4, share=0.2)
        for e in c["eval"].values():
            e["rows"] = [f"/data/dolly/valid.jsonl:{i}" for i in range(1, 5)]
        (folder / f"switch-s{s}.json").write_text(json.dumps(c))
    other = json.loads((folder / "switch-s1.json").read_text())
    other["eval"]["dolly"]["rows"] = [f"/elsewhere/dolly/valid.jsonl:{i}" for i in range(1, 5)]
    (folder / "switch-s1.json").write_text(json.dumps(other))  # another folder, same rows: fine
    ks.check_rows(ks.load_cells(folder), folder)
    other["eval"]["dolly"]["rows"] = other["eval"]["dolly"]["rows"][::-1]
    (folder / "switch-s1.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="switch-s1.json: dolly's rows differ from .*switch-s0"):
        ks.check_rows(ks.load_cells(folder), folder)
    other["eval"]["dolly"]["rows"] = other["eval"]["dolly"]["rows"][::-1]
    del other["eval"]["self-inst"]
    (folder / "switch-s1.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="no 'self-inst' evaluation"):
        ks.check_rows(ks.load_cells(folder), folder)
    (folder / "copy.json").write_text((folder / "switch-s0.json").read_text())
    with pytest.raises(SystemExit, match="both switch seed 0"):
        ks.load_cells(folder)


def test_the_primary_comparator_is_chosen_on_shared_seeds(ks):
    cells = {
        "gkd": {
            (0, "avx2"): _cell("gkd", 0, [10.0] * 4, [10.0] * 4),
            (1, "avx2"): _cell("gkd", 1, [30.0] * 4, [30.0] * 4),
            (0, "avx512"): _cell("gkd", 0, [40.0] * 4, [40.0] * 4),
        },
        "distillm": {(0, "avx2"): _cell("distillm", 0, [12.0] * 4, [12.0] * 4)},
    }
    # GKD's seed 1, and its seed 0 on another machine type, do not count
    assert ks.best_baseline(cells) == "distillm"
    # a partner cell the long grid made for claim (b) pairs the two on AVX512 but does not
    # re-choose the comparator (with it, GKD's 40 would win)
    partner = {**_cell("distillm", 0, [11.0] * 4, [11.0] * 4), "partner": True}
    cells["distillm"][(0, "avx512")] = partner
    assert ks.best_baseline(cells) == "distillm"
    partner["partner"] = False
    assert ks.best_baseline(cells) == "gkd"
    del cells["distillm"]
    assert ks.best_baseline(cells) == "gkd"


def _on(machine, c, sha=None):
    c["hardware"] = {"cpu_capability": machine.upper()}
    if sha:
        c["warmup_start"] = {"folder": "warmup-L20-x", "sha256": sha, "cpu_capability": machine}
    return c


def test_arms_are_paired_only_within_one_machine_type(ks, tmp_path, capsys):
    """SWITCH seed 1 exists on avx2 only, GKD seed 1 on avx512 only: not a pair. Seed 0 on both
    types counts once, each arm averaged over the two, so its difference is the mean of the
    within-type differences (+1 on avx2, +3 on avx512: +2), not of a cross-type one."""
    folder = tmp_path / "results" / "main"
    folder.mkdir(parents=True)
    cells = {
        ("switch", 0, "avx2"): 11.0, ("gkd", 0, "avx2"): 10.0,
        ("switch", 0, "avx512"): 23.0, ("gkd", 0, "avx512"): 20.0,
        ("switch", 1, "avx2"): 50.0, ("gkd", 1, "avx512"): 0.0,
        ("switch", 2, "avx2"): 12.0, ("gkd", 2, "avx2"): 10.0,
    }  # fmt: skip
    for (tag, seed, m), x in cells.items():
        c = _on(m, _cell(tag, seed, [x] * 4, [x] * 4))
        (folder / f"{tag}-s{seed}-{m}.json").write_text(json.dumps(c))
    loaded = ks.load_cells(folder)
    assert set(loaded["gkd"]) == {(0, "avx2"), (0, "avx512"), (1, "avx512"), (2, "avx2")}
    assert ks.shared_seeds(loaded["switch"], loaded["gkd"]) == {0: ["avx2", "avx512"], 2: ["avx2"]}
    seeds, a, b = ks.paired_rows(loaded["switch"], loaded["gkd"], "dolly")
    assert seeds == [0, 2] and a == [[17.0] * 4, [12.0] * 4] and b == [[15.0] * 4, [10.0] * 4]
    assert ks.main(["aggregate", "--results-dir", str(tmp_path / "results")]) == 0
    text = capsys.readouterr().out
    assert "| gkd (primary) | dolly | 2 | +2.00 |" in text
    assert "| switch | 4 | avx2 ×3, avx512 ×1 |" in text


def test_cells_of_one_machine_type_from_different_starts_are_refused(ks, tmp_path):
    folder = tmp_path / "main"
    folder.mkdir()
    a = _on("avx512", _cell("switch", 0, [1.0] * 4, [1.0] * 4), sha="aaaa")
    (folder / "switch-s0-avx512.json").write_text(json.dumps(a))
    b = _on("avx512", _cell("gkd", 0, [1.0] * 4, [1.0] * 4), sha="bbbb")
    (folder / "gkd-s0-avx512.json").write_text(json.dumps(b))
    with pytest.raises(SystemExit, match="different warmup weights"):
        ks.load_cells(folder)
    (folder / "gkd-s0-avx512.json").unlink()
    (folder / "gkd-s0-avx2.json").write_text(json.dumps(_on("avx2", b)))  # another type: fine
    assert set(ks.load_cells(folder)) == {"switch", "gkd"}
    start = {"folder": "warmup-L20-x", "sha256": "cccc", "cpu_capability": "AVX512"}
    with pytest.raises(SystemExit, match="started from aaaa"):  # found before training
        ks.same_machine(start, "avx512", "warmup_start", folder)
    with pytest.raises(SystemExit, match="trained on a avx512 machine and this one is avx2"):
        ks.same_machine(start, "avx2", "warmup_start", folder)
    assert ks.same_machine({**start, "sha256": "aaaa"}, "avx512", "warmup_start", folder)
    empty = tmp_path / "another-phase"  # a phase with no cell of this type yet is checked
    with pytest.raises(SystemExit, match="started from aaaa"):  # against the other phases'
        ks.same_machine(start, "avx512", "warmup_start", empty, folder)


def test_the_long_phase_takes_the_seeds_the_main_phase_paired_on_this_machine_type(ks):
    main = {
        "switch": {(0, "avx2"): {}, (1, "avx2"): {}, (2, "avx512"): {}, (3, "avx512"): {}},
        "gkd": {(0, "avx2"): {}, (1, "avx2"): {}, (2, "avx512"): {}, (3, "avx512"): {}},
    }
    main["switch"][(4, "avx512")] = main["gkd"][(4, "avx512")] = {}
    main["switch"][(5, "avx512")] = {}  # no GKD seed 5: not a pair
    # AVX512 first: its three pairs, then one seed no type has
    assert ks.long_seeds(main, {}, "gkd", "avx512", 4) == [2, 3, 4, 0]
    made = {t: {(s, "avx512"): {} for s in (2, 3, 4, 0)} for t in ("switch", "gkd")}
    # four long seeds paired: AVX2 makes no long cell; seed 0's main-phase partners are made
    # on AVX512, where its long pair is (two main cells, not two more long ones on AVX2)
    assert ks.long_seeds(main, made, "gkd", "avx2", 4) == []
    assert ks.main_partners(main, made, "gkd", "avx2", 4) == []
    assert ks.main_partners(main, made, "gkd", "avx512", 4) == [("switch", 0), ("gkd", 0)]
    assert ks.main_partners(main, made, "gkd", "avx512", 3) == []  # three cross pairs: enough
    # AVX2 first: its two pairs and two fillers, whose partners it makes too; AVX512 then
    # makes nothing
    assert ks.long_seeds(main, {}, "gkd", "avx2", 4) == [0, 1, 2, 3]
    made = {t: {(s, "avx2"): {} for s in (0, 1, 2, 3)} for t in ("switch", "gkd")}
    assert ks.long_seeds(main, made, "gkd", "avx512", 4) == []
    assert ks.main_partners(main, made, "gkd", "avx2", 4) == [
        ("switch", 2), ("gkd", 2), ("switch", 3), ("gkd", 3)
    ]  # fmt: skip
    assert ks.main_partners(main, made, "gkd", "avx512", 4) == []
    # a pair begun here is finished first, before the phase counts as short of seeds; another
    # type leaves it alone (its cells would not pair with these) and takes no seed for it
    made["gkd"].pop((3, "avx2"))
    assert ks.long_seeds(main, made, "gkd", "avx2", 4) == [3]
    assert ks.long_seeds(main, made, "gkd", "avx2", 3) == [3]
    assert ks.long_seeds(main, made, "gkd", "avx512", 4) == []
    assert ks.long_seeds(main, made, "gkd", "avx512", 5) == [4]
    made["gkd"][(3, "avx512")] = made["switch"][(3, "avx512")] = {}  # paired on the other type
    assert ks.long_seeds(main, made, "gkd", "avx2", 4) == []  # nothing left to finish here
    assert ks.long_seeds(main, {}, "gkd", "avx512", 2) == [2, 3]
    assert ks.long_seeds({}, {}, "gkd", "avx512", 2) == [0, 1]
    cells = ks.grid_cells("long", 0, [2, 4])
    assert cells == [("switch", 2), ("best", 2), ("switch", 4), ("best", 4)]
    assert ks.grid_cells("long", 2) == [("switch", 0), ("best", 0), ("switch", 1), ("best", 1)]
    # against both baselines: the seeds where SWITCH has both partners on this type first
    main["distillm"] = {(s, "avx512"): {} for s in (3, 4, 5)}
    assert ks.long_seeds(main, {}, ("gkd", "distillm"), "avx512", 4) == [3, 4, 0, 1]
    assert ks.grid_cells("long", 0, [3], ("gkd", "distillm")) == [
        ("switch", 3), ("gkd", 3), ("distillm", 3)
    ]  # fmt: skip


def test_the_long_grid_makes_the_main_phase_partners_of_its_long_seeds(
    ks, tmp_path, capsys, monkeypatch
):
    """This type's main phase pairs SWITCH with both baselines on seed 0; the long phase has a
    filler pair on seed 1. With two seeds asked for, the grid makes the long seed 0 (its main
    partners exist) and seed 1's three main-phase cells, so both seeds pair across phases."""
    here = ks.this_machine()
    main, long = (tmp_path / "results" / ph for ph in ("main", "long"))
    main.mkdir(parents=True)
    long.mkdir()
    warm = _on(here, _cell("warmup", 0, [1.0] * 4, [1.0] * 4))
    warm["protocol"] = ks.protocol("main", "warmup")
    for e in warm["eval"].values():
        e["repeat_share"] = [0.0] * 4  # a start that does not loop
    (main / f"warmup-s0-{here}.json").write_text(json.dumps(warm))
    for tag in ("switch", "gkd", "distillm"):
        c = _on(here, _cell(tag, 0, [1.0] * 4, [1.0] * 4))
        c["protocol"] = ks.protocol("main", tag)
        (main / f"{tag}-s0-{here}.json").write_text(json.dumps(c))
        c = _on(here, _cell(tag, 1, [1.0] * 4, [1.0] * 4))
        c["protocol"] = ks.protocol("long", tag)
        (long / f"{tag}-s1-{here}.json").write_text(json.dumps(c))
    argv = ["grid", "--phase", "long", "--seeds", "2", "--against", "both", "--dry-run"]
    assert ks.main(argv) == 0
    out = capsys.readouterr().out
    assert f"this machine: {here}; 6 of the grid's 6 cells to make here" in out
    assert "[1/6] switch s0 (to make)" in out and "[3/6] distillm s0 (to make)" in out
    assert "[4/6] switch s1 (main phase: claim (b)'s partner) (to make)" in out
    assert "[6/6] distillm s1 (main phase: claim (b)'s partner) (to make)" in out
    calls = []
    monkeypatch.setattr("subprocess.call", lambda cmd, **kw: calls.append(cmd[3:]) or 0)
    assert ks.main(argv[:-1]) == 0  # each cell in its own process, partners marked as such
    assert calls[0] == ["--phase", "long", "--method", "switch", "--seed", "0"]
    assert calls[3] == ["--phase", "main", "--method", "switch", "--seed", "1", "--partner"]
    assert len(calls) == 6 and (tmp_path / "work" / "logs" / "main-distillm-s1.log").exists()
    capsys.readouterr()
    for tag in ("switch", "gkd", "distillm"):  # once they exist, nothing is left to make
        for ph, folder in (("long", long), ("main", main)):
            s = 0 if ph == "long" else 1
            c = _on(here, _cell(tag, s, [1.0] * 4, [1.0] * 4))
            c["protocol"] = ks.protocol(ph, tag)
            (folder / f"{tag}-s{s}-{here}.json").write_text(json.dumps(c))
    assert ks.main(argv) == 0
    assert f"this machine: {here}; 0 of the grid's 0 cells to make here" in capsys.readouterr().out


def test_the_long_phase_keeps_the_main_phases_comparator_and_tests_b_against_both(
    ks, tmp_path, capsys
):
    """DistiLLM beats GKD in the main phase and GKD beats DistiLLM in the long one: the long
    phase's primary comparator stays the main phase's, and claim (b)'s cross-phase row is
    given against both baselines (SWITCH's margin grows by 2.1 over DistiLLM and shrinks by
    1.9 over GKD)."""
    g = [20.0, 30.0, 25.0, 35.0]
    arms = {
        "main": {"gkd": 0.0, "distillm": 1.0, "switch": -2.0},
        "long": {"gkd": 3.0, "distillm": 0.0, "switch": -1.0},
    }
    for phase, offsets in arms.items():
        folder = tmp_path / "results" / phase
        folder.mkdir(parents=True)
        for s in range(3):
            for tag, off in offsets.items():
                noise = 0.1 * s if (phase, tag) == ("long", "switch") else 0.0
                d = [x + off + noise for x in g]
                (folder / f"{tag}-s{s}.json").write_text(json.dumps(_cell(tag, s, d, d)))
    results = str(tmp_path / "results")
    assert ks.main(["aggregate", "--phase", "long", "--results-dir", results]) == 0
    out = capsys.readouterr().out
    assert "here **distillm**" in out  # not gkd, the long phase's own better baseline
    rows = [x for x in out.splitlines() if "main phase) | greedy | dolly" in x]
    (dl,) = [x for x in rows if "SWITCH − distillm (primary), this phase" in x]
    (gk,) = [x for x in rows if "SWITCH − gkd, this phase" in x]
    assert dl.endswith("| dolly | 3 | +2.10 | [+1.85, +2.35] | 0.002 | held |")
    assert "| dolly | 3 | -1.90 |" in gk and gk.endswith("| contradicted |")


def test_the_grid_makes_only_the_pairs_no_machine_type_has(ks):
    cells = ks.grid_cells("main", 3)
    have = {
        "warmup": {(0, "avx2"): {}},
        "teacher": {(0, "avx2"): {}},
        **{t: {(0, "avx2"): {}} for t in ks.ARMS},  # seed 0 complete on avx2
        "switch": {(0, "avx2"): {}, (1, "avx2"): {}, (2, "avx2"): {}},
        "gkd": {(0, "avx2"): {}, (1, "avx2"): {}, (2, "avx512"): {}},
        "sft": {(0, "avx2"): {}, (1, "avx512"): {}},
    }
    plan = ks.grid_plan(cells, have, "avx512")
    # seed 0 is paired on avx2; seed 1: SWITCH here pairs the SFT cell made here, GKD is paired
    # on avx2; seed 2: SWITCH and the arms not yet made
    assert ("warmup", 0) in plan and ("teacher", 0) not in plan
    assert not [c for c in plan if c[1] == 0 and c[0] != "warmup"]
    assert ("switch", 1) in plan and ("gkd", 1) not in plan and ("sft", 1) not in plan
    assert {("distillm", 1), ("switch-fast", 1)} <= set(plan)
    assert ("switch", 2) in plan and ("gkd", 2) not in plan and ("sft", 2) in plan
    everything = {t: {(s, "avx2"): {} for s in range(3)} for t in [*ks.ARMS, "teacher"]}
    assert ks.grid_plan(cells, everything, "avx512") == []  # not even a warm-up to no purpose
    assert set(ks.grid_plan(cells, have, "avx2")) == {  # GKD s2 was made on avx512 only
        ("gkd", 2),
        *((t, s) for t in ("sft", "distillm", "switch-fast") for s in (1, 2)),
    }


def test_seed_noise_is_pooled_within_machine_types(ks):
    """Two types whose starts differ by 10 points: the pooled sd sees only the seed spread."""
    cs = {
        (0, "avx2"): _cell("switch", 0, [10.0] * 4, [5.0] * 4),
        (1, "avx2"): _cell("switch", 1, [12.0] * 4, [5.0] * 4),
        (2, "avx512"): _cell("switch", 2, [20.0] * 4, [5.0] * 4),
        (3, "avx512"): _cell("switch", 3, [22.0] * 4, [5.0] * 4),
    }
    sd, df = ks.within_type_sd(cs, "dolly")
    assert df == 2 and sd == pytest.approx(2**0.5)  # each type: 1 apart twice -> var 2
    assert ks.within_type_sd({k: cs[k] for k in [(0, "avx2"), (2, "avx512")]}, "dolly") == (None, 0)


def test_the_long_phase_needs_this_types_warmup_cell(ks, capsys):
    for tag, x in (("gkd", 10.0), ("distillm", 12.0)):
        c = _cell(tag, 0, [x] * 4, [x] * 4)
        c["protocol"] = ks.protocol("main", tag)
        path = ks.cell_path(ks.RESULTS, "main", tag, 0, ks.this_machine())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(c))
    assert ks.main(["grid", "--phase", "long", "--dry-run"]) == 2
    assert "no main-phase warm-up cell made on this" in capsys.readouterr().err


def test_start_digest_compares_with_the_cells_of_this_machine_type(
    ks, tmp_path, monkeypatch, capsys
):
    from lmsmith.precision import hardware

    built = tmp_path / "w" / "warmup-x" / "student"

    def fake_warmup(base, tok, files, work):  # stands in for training the warm-up
        built.mkdir(parents=True)
        (built / "model.safetensors").write_bytes(b"weights")
        (built.parent / "summary.json").write_text(json.dumps({"hardware": hardware()}))
        return built

    monkeypatch.setattr(ks, "split_rows", lambda work: {})
    monkeypatch.setattr(ks, "_lm", lambda: (None, None))
    monkeypatch.setattr(ks, "warmup", fake_warmup)
    here = ks.this_machine()
    mine = ks.built_from(fake_warmup(None, None, {}, None))
    shutil.rmtree(tmp_path / "w")
    folder = ks.RESULTS / "main"
    folder.mkdir(parents=True)
    c = _on(here, _cell("switch", 0, [1.0] * 4, [1.0] * 4), sha=mine["sha256"])
    (folder / f"switch-s0-{here}.json").write_text(json.dumps(c))
    assert ks.main(["start-digest", "--work-dir", str(tmp_path / "w")]) == 0
    assert f"{mine['sha256']}: the same" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "w")
    c["warmup_start"]["sha256"] = "0123"
    (folder / f"switch-s0-{here}.json").write_text(json.dumps(c))
    assert ks.main(["start-digest", "--work-dir", str(tmp_path / "w")]) == 1
    assert "DIFFERENT from ['0123']" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not empty"):
        ks.main(["start-digest", "--work-dir", str(tmp_path / "w")])
