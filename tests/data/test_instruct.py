import json
from dataclasses import dataclass

import pytest

from lmsmith.data.instruct import (
    ALPACA_NO_INPUT,
    InstructExample,
    build_prompt,
    builtin_prompts,
    load_instruct,
    tokenize_prompt,
)
from lmsmith.errors import DataError


@dataclass
class TokenizedSet:
    """Token ids of prompt+response with the prompt masked out of the loss."""

    input_ids: list[list[int]]
    labels: list[list[int]]  # -100 on prompt tokens
    prompt_lens: list[int]
    n_prompt_truncated: int = 0
    n_total_truncated: int = 0


def tokenize_examples(
    rows: list[InstructExample],
    tokenizer,
    max_prompt: int = 256,
    max_total: int = 512,
    chat_template: bool = False,
    add_eos: bool = True,
) -> TokenizedSet:
    """Tokenise prompt + first reference with ``tokenize_prompt``; labels are -100 on the
    prompt. Counts truncations. (A test helper: what a supervised loop builds from a row.)"""
    out = TokenizedSet([], [], [])
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    for r in rows:
        p_ids, cut = tokenize_prompt(
            tokenizer, build_prompt(r, tokenizer, chat_template), max_prompt
        )
        out.n_prompt_truncated += cut
        ref = r.references[0] if r.references else ""
        y_ids = tokenizer(ref, add_special_tokens=False)["input_ids"] + eos
        room = max_total - len(p_ids)
        if len(y_ids) > room:
            y_ids = y_ids[:room]
            out.n_total_truncated += 1
        out.input_ids.append(p_ids + y_ids)
        out.labels.append([-100] * len(p_ids) + y_ids)
        out.prompt_lens.append(len(p_ids))
    return out


def test_load_reads_strings_and_lists(instruct_file):
    rows = load_instruct(instruct_file)
    assert [r.references for r in rows] == [["hi"], ["apple", "an apple"], ["one two three"]]
    assert rows[2].prompt == "Count:\n"
    assert rows[1].source.endswith(":2")


@pytest.mark.parametrize(
    "line, field, fragment",
    [
        ('{"instruction": "x", "input": "", "output": 3}', "output", "string or a non-empty list"),
        ('{"input": "", "output": "y"}', "instruction", "missing"),
        ('{"instruction": 5, "output": "y"}', "instruction", "expected a string"),
        ("{not json", None, "not valid JSON"),
        ("[1, 2]", None, "expected a JSON object"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, line, field, fragment):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "ok", "input": "", "output": "fine"}\n' + line + "\n")
    with pytest.raises(DataError) as e:
        load_instruct(p)
    assert e.value.line == 2 and e.value.field == field
    assert f"{p}:2" in str(e.value) and fragment in str(e.value)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_instruct(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="no such file"):
        load_instruct(tmp_path / "nope.jsonl")


def test_prompt_building(instruct_file, tiny):
    rows = load_instruct(instruct_file)
    assert build_prompt(rows[0]) == ALPACA_NO_INPUT.format(instruction="Say hi.")
    assert "### Input:\napple" in build_prompt(rows[1])
    assert build_prompt(rows[2]) == "Count:\n"  # the row's own prompt wins
    with pytest.raises(DataError, match="chat_template"):
        build_prompt(rows[0], tiny[1], chat_template=True)


def test_prompt_is_masked_and_truncation_counted(instruct_file, tiny):
    _, tok = tiny
    rows = load_instruct(instruct_file)
    ts = tokenize_examples(rows, tok, max_prompt=16, max_total=20)
    for ids, labels, n in zip(ts.input_ids, ts.labels, ts.prompt_lens):
        assert len(ids) == len(labels) <= 20
        assert all(x == -100 for x in labels[:n])
        assert labels[n:] == ids[n:]
    # Alpaca prompts are far longer than 16 characters; "Count:\n" (7) is not.
    assert ts.n_prompt_truncated == 2
    assert ts.prompt_lens[2] == 7
    # 16 + "hi"+EOS = 19 fits; 16 + "apple"+EOS = 22 and 7 + "one two three"+EOS = 21 do not.
    assert ts.n_total_truncated == 2
    assert len(ts.input_ids[0]) == 19
    full = tokenize_examples(rows[2:], tok, max_prompt=256, max_total=512)
    assert full.input_ids[0][-1] == tok.eos_token_id and full.n_total_truncated == 0


def test_builtin_prompts_cover_the_categories():
    rows = builtin_prompts()
    assert len(rows) >= 100
    cats = {r.category for r in rows}
    assert {
        "open_qa",
        "brainstorming",
        "classification",
        "summarization",
        "rewriting",
        "creative_writing",
        "reasoning",
    } <= cats
    assert all(r.input for r in rows if r.category == "summarization")


def test_load_limit(tmp_path):
    p = tmp_path / "many.jsonl"
    p.write_text(
        "".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(10))
    )
    assert len(load_instruct(p, limit=4)) == 4


def test_hf_datasets_load_through_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split=None):
        calls.append((name, split))
        return datasets.Dataset.from_list(
            [
                {"instruction": "Say hi.", "context": "", "response": "hi", "category": "qa"},
                {"instruction": "Add.", "context": "1 and 2", "response": "3", "category": "qa"},
                {"instruction": "Stop.", "context": "", "response": "ok", "category": "qa"},
            ]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_instruct("hf:databricks/databricks-dolly-15k", limit=2)
    assert calls == [("databricks/databricks-dolly-15k", "train")]
    assert [(r.instruction, r.input, r.references) for r in rows] == [
        ("Say hi.", "", ["hi"]),
        ("Add.", "1 and 2", ["3"]),
    ]
    assert rows[1].source == "hf:databricks/databricks-dolly-15k:train:2"
    load_instruct("hf:someone/data:validation")
    assert calls[-1] == ("someone/data", "validation")


def test_hf_local_dataset_folder_loads_offline(tmp_path):
    folder = tmp_path / "mydata"
    folder.mkdir()
    (folder / "test.jsonl").write_text(
        json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"})
        + "\n"
        + json.dumps({"instruction": "Say yes.", "input": ""})  # no output: null in the table
        + "\n"
    )
    with pytest.raises(DataError) as e:
        load_instruct(f"hf:{folder}:test")
    assert e.value.field == "output" and ":test:2" in str(e.value)
    rows = load_instruct(f"hf:{folder}:test", limit=1)
    assert rows[0].references == ["hi"]
    with pytest.raises(DataError, match="could not load"):
        load_instruct(f"hf:{tmp_path / 'nothing-here'}")
