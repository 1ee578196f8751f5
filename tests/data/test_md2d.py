"""MultiDoc2Dial loaders: official schema, instance construction, DPR sample, user documents."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from lmsmith.data.md2d import (
    build_instances,
    format_query,
    load_dialogues,
    load_docs,
    load_dpr_sample,
    load_user_docs,
    parse_sample_question,
)
from lmsmith.errors import DataError

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "md2d"
DOC = ASSETS / "multidoc2dial_doc.json"
TRAIN = ASSETS / "multidoc2dial_dial_train.json"


def _write(tmp_path, name, obj) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


def test_docs_load_with_offsets_that_match_the_text():
    docs = load_docs(DOC)
    assert len(docs) == 4
    assert {d.domain for d in docs.values()} == {"dmv", "va"}
    for d in docs.values():
        assert [s.start for s in d.spans] == sorted(s.start for s in d.spans)
        for s in d.spans:
            assert d.text[s.start : s.end] == s.text
    nested = docs["Education benefits#1_0"].spans[-1]
    assert nested.parent_titles == ["Education benefits", "GI Bill"]


def test_instances_follow_the_baseline_construction():
    dials = load_dialogues(TRAIN)
    assert [d.dial_id for d in dials] == ["tr-dmv-1", "tr-dmv-2", "tr-va-1"]
    inst = build_instances(dials)
    assert len(inst) == 6  # every agent turn here has references
    second = inst[1]
    assert second.qid == "tr-dmv-1_4"
    assert second.current == "What if I go to an office instead?"
    # earlier turns, most recent first
    assert second.history == [
        ("agent", "Yes, if it expired less than two years ago."),
        ("user", "Can I renew my license online?"),
    ]
    # the target is the *next agent turn's* references, not the user turn's
    moved = inst[2]
    assert moved.current == "I moved last week."
    assert [(r.doc_id, r.id_sp) for r in moved.references] == [("Change your address#1_0", "2")]


def test_agent_turns_without_references_are_dropped_unless_kept():
    dials = load_dialogues(ASSETS / "multidoc2dial_dial_validation.json")
    assert len(build_instances(dials)) == 3
    kept = build_instances(dials, keep_unreferenced=True)
    assert len(kept) == 4 and kept[1].references == []


def test_format_query_and_sample_question_round_trip():
    hist = [("agent", "a b"), ("user", "c")]
    q = format_query("now?", hist)
    assert q == "now?[SEP]agent: a b||user: c"
    assert parse_sample_question(q) == ("now?", hist)
    assert format_query("now?", hist, max_history=1) == "now?[SEP]agent: a b"
    assert format_query("now?", hist, max_history=0) == "now?"


@pytest.mark.parametrize(
    "mutate, field_part",
    [
        (lambda d: d["dial_data"]["dmv"][1]["turns"][2].pop("role"), "turns[2].role"),
        (
            lambda d: d["dial_data"]["dmv"][1]["turns"][0].__setitem__("role", "bot"),
            "turns[0].role",
        ),
        (
            lambda d: d["dial_data"]["dmv"][1]["turns"][1]["references"][0].pop("doc_id"),
            "references[0].doc_id",
        ),
        (
            lambda d: d["dial_data"]["dmv"][1]["turns"][3].__setitem__("turn_id", "4"),
            "turns[3].turn_id",
        ),
    ],
)
def test_dialogue_errors_name_file_dialogue_and_field(tmp_path, mutate, field_part):
    data = json.loads(TRAIN.read_text())
    mutate(data)
    bad = _write(tmp_path, "dial.json", data)
    with pytest.raises(DataError) as e:
        load_dialogues(bad)
    msg = str(e.value)
    assert str(bad) in msg and "dial_id=tr-dmv-2" in msg and field_part in msg


def test_doc_errors_name_the_document_and_field(tmp_path):
    data = json.loads(DOC.read_text())
    broken = copy.deepcopy(data)
    broken["doc_data"]["va"]["Education benefits#1_0"]["spans"]["2"]["end_sp"] = 10_000
    with pytest.raises(DataError, match=r"Education benefits#1_0.*end|start_sp") as e:
        load_docs(_write(tmp_path, "doc.json", broken))
    assert "doc.json" in str(e.value) and "outside doc_text" in str(e.value)
    broken = copy.deepcopy(data)
    del broken["doc_data"]["dmv"]["Change your address#1_0"]["doc_text"]
    with pytest.raises(DataError, match=r"Change your address#1_0\]\.doc_text.*missing"):
        load_docs(_write(tmp_path, "doc.json", broken))
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_docs(tmp_path / "x.json")
    with pytest.raises(DataError, match="no such file"):
        load_dialogues(tmp_path / "missing.json")


def test_dpr_sample_positives_include_is_positive(tmp_path):
    rows = [
        {
            "question": "how do I renew?[SEP]agent: hi||user: hello",
            "positive_passage": "A // a",
            "positive_passage_id": 7,
            "found_at_rank": 0,
            "DPR_result": [
                {
                    "rank": 0,
                    "passage_id": 7,
                    "is_target": True,
                    "is_positive": True,
                    "score": 1.0,
                    "text": "A // a",
                },
                {
                    "rank": 1,
                    "passage_id": 8,
                    "is_target": False,
                    "is_positive": True,
                    "score": 0.9,
                    "text": "B // b",
                },
                {
                    "rank": 2,
                    "passage_id": 9,
                    "is_target": False,
                    "is_positive": None,
                    "score": 0.8,
                    "text": "C // c",
                },
            ],
        }
    ]
    (q,) = load_dpr_sample(_write(tmp_path, "s.json", rows))
    assert q.positives == ["7", "8"]
    assert set(q.passages) == {"7", "8", "9"}
    assert q.current == "how do I renew?" and q.history == [("agent", "hi"), ("user", "hello")]
    del rows[0]["DPR_result"][2]["text"]
    with pytest.raises(DataError, match=r"\[0\]\.DPR_result\[2\]\.text"):
        load_dpr_sample(_write(tmp_path, "s.json", rows))


def test_user_docs_sections_by_headings(tmp_path):
    (tmp_path / "guides").mkdir()
    (tmp_path / "guides" / "renew.md").write_text(
        "# Renewal guide\n\nIntro text.\n\n## Online\n\nUse the portal.\n\n### Fees\n\nTen dollars.\n"
        "```\n# not a heading\n```\n\n## In person\n\nVisit an office.\n"
    )
    (tmp_path / "faq.html").write_text(
        "<html><head><title>FAQ page</title><style>p{}</style></head><body>"
        "<h1>FAQ</h1><p>General answers.</p><script>var x = 1;</script>"
        "<h2>Payments</h2><ul><li>Pay by card.</li><li>Pay by cheque.</li></ul></body></html>"
    )
    (tmp_path / "notes.txt").write_text("First paragraph.\n\nSecond paragraph.\n")
    (tmp_path / "ignored.pdf").write_bytes(b"%PDF")
    docs = {d.doc_id: d for d in load_user_docs(tmp_path)}
    assert set(docs) == {"guides/renew.md", "faq.html", "notes.txt"}
    for d in docs.values():
        for s in d.spans:
            assert d.text[s.start : s.end] == s.text
    md = docs["guides/renew.md"]
    assert md.title == "Renewal guide" and md.domain == "guides"
    fees = next(s for s in md.spans if s.text == "Ten dollars. ``` # not a heading ```")
    assert fees.title == "Fees" and fees.parent_titles == ["Renewal guide", "Online"]
    in_person = next(s for s in md.spans if s.text == "Visit an office.")
    assert in_person.parent_titles == ["Renewal guide"]
    assert len({s.id_sec for s in md.spans}) == 4  # four headings, four sections
    html = docs["faq.html"]
    assert html.title == "FAQ page"
    assert "var x" not in html.text and "p{}" not in html.text
    card = next(s for s in html.spans if s.text == "Pay by card.")
    assert card.title == "Payments"
    txt = docs["notes.txt"]
    assert txt.title == "notes" and [s.text for s in txt.spans] == [
        "First paragraph.",
        "Second paragraph.",
    ]


def test_user_docs_empty_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no .md"):
        load_user_docs(tmp_path)
