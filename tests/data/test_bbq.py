import json
from pathlib import Path

import pytest

from lmsmith.data.bbq import find_target, load_bbq, split_dev_test, subsample
from lmsmith.errors import DataError, UserError

ASSET = Path(__file__).parents[1] / "assets" / "bbq" / "Age_mini.jsonl"


def rows_of(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def write(tmp_path, rows, name="bad.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_loads_official_schema():
    rows = load_bbq(ASSET)
    assert len(rows) == 40
    r = rows[0]
    assert r.answers[r.unknown_idx] == "Not known"
    assert r.groups[r.target_idx] == "old"  # stereotyped_groups = ["old"]
    assert r.ambiguous and r.negative and r.label == r.unknown_idx
    assert r.source.endswith("Age_mini.jsonl:1")


def test_other_category_in_same_schema_loads_unchanged(tmp_path):
    raw = rows_of(ASSET)
    for r in raw:
        r["category"] = "Disability_status"
        r["additional_metadata"]["stereotyped_groups"] = ["Disabled", "physically disabled"]
        for k in range(3):
            g = r["answer_info"][f"ans{k}"][1]
            r["answer_info"][f"ans{k}"][1] = {"old": "disabled", "nonOld": "nonDisabled"}.get(g, g)
    rows = load_bbq(write(tmp_path, raw))
    assert all(r.target_idx is not None for r in rows)
    assert all(r.groups[r.target_idx] == "disabled" for r in rows)


@pytest.mark.parametrize(
    "mutate, line, field",
    [
        (lambda r: r.pop("context_condition"), 3, "context_condition"),
        (lambda r: r.__setitem__("label", 5), 3, "label"),
        (lambda r: r.__setitem__("question_polarity", "positive"), 3, "question_polarity"),
        (lambda r: r["answer_info"].__setitem__("ans1", ["x"]), 3, "answer_info.ans1"),
        (lambda r: r.__setitem__("ans2", 7), 3, "ans2"),
    ],
)
def test_wrong_schema_names_file_line_field(tmp_path, mutate, line, field):
    raw = rows_of(ASSET)
    mutate(raw[line - 1])
    p = write(tmp_path, raw)
    with pytest.raises(DataError) as e:
        load_bbq(p)
    assert e.value.line == line and e.value.field == field
    assert f"{p}:{line}" in str(e.value)


def test_instruction_file_is_refused(tmp_path):
    p = tmp_path / "dolly.jsonl"
    p.write_text(json.dumps({"instruction": "hi", "input": "", "output": "x"}) + "\n")
    with pytest.raises(DataError, match="question_polarity"):
        load_bbq(p)


def test_bad_json_and_missing_file(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(ASSET.read_text().splitlines()[0] + "\n{oops\n")
    with pytest.raises(DataError, match=":2: not valid JSON"):
        load_bbq(p)
    with pytest.raises(DataError, match="no such file"):
        load_bbq(tmp_path / "missing.jsonl")


def test_split_is_template_disjoint_seeded_and_about_ten_percent():
    rows = load_bbq(ASSET)
    dev, test = split_dev_test(rows, 0.1, seed=3)
    assert {r.template for r in dev}.isdisjoint({r.template for r in test})
    assert len(dev) + len(test) == len(rows)
    assert 0.1 * len(rows) <= len(dev) < 0.1 * len(rows) + 4  # whole templates of 4 rows
    again, _ = split_dev_test(rows, 0.1, seed=3)
    assert [r.example_id for r in again] == [r.example_id for r in dev]
    other = {tuple(r.example_id for r in split_dev_test(rows, 0.1, seed=s)[0]) for s in range(6)}
    assert len(other) > 1


def test_split_per_category_and_no_dev_rows_is_an_error(tmp_path):
    raw = rows_of(ASSET)
    single = [dict(r, category="Tiny", question_index="1") for r in raw[:4]]
    rows = load_bbq(write(tmp_path, raw + single))
    with pytest.raises(UserError, match="category 'Tiny' has no dev rows"):
        split_dev_test(rows)
    dev, test = split_dev_test(load_bbq(ASSET))
    assert dev and test


def test_find_target_requires_exactly_one_match():
    info = [("grandfather", "old"), ("grandson", "nonOld"), ("Unknown", "unknown")]
    assert find_target(info, ["old"], 2) == 0
    assert find_target(info, ["nonOld"], 2) == 1
    assert find_target(info, ["Grand-son"], 2) == 1  # text match, normalised
    assert find_target(info, ["teen"], 2) is None
    assert find_target(info, ["old", "nonOld"], 2) is None


def test_subsample_seeded_in_order():
    rows = list(range(100))
    a = subsample(rows, 10, 1)
    assert a == sorted(a) and len(set(a)) == 10 and a == subsample(rows, 10, 1)
    assert subsample(rows, None) == rows
