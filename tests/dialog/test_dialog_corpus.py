"""Passage segmentation (structure / token), gold mapping, and the retrieval-set builders."""

from __future__ import annotations

import json

import pytest

from lmsmith.data.md2d import load_docs
from lmsmith.dialog.corpus import (
    dpr_sample_set,
    instruct_set,
    load_passages,
    md2d_set,
    save_passages,
    sniff,
    structure_passages,
    token_passages,
)
from lmsmith.errors import DataError


def test_structure_passages_one_per_section_with_parent_titles(md2d_dir):
    docs = list(load_docs(md2d_dir / "multidoc2dial_doc.json").values())
    ps = structure_passages(docs)
    assert len(ps) == 8  # two sections per document
    assert len({p.pid for p in ps}) == len(ps)
    first = ps[0]
    assert first.pid == "Renew your driver license#1_0::1"
    # the official "#1_0" suffix is dropped from the title; section text keeps its heading
    assert first.text.startswith(
        "Renew your driver license // Renew your driver license You can renew"
    )
    assert first.span_ids == ["1", "2", "3"]
    nested = next(p for p in ps if "Yellow Ribbon" in p.text)
    assert nested.text.startswith("Education benefits / GI Bill // Yellow Ribbon program Private")


def test_passage_ids_do_not_depend_on_corpus_order(md2d_dir):
    docs = list(load_docs(md2d_dir / "multidoc2dial_doc.json").values())
    a = {p.pid: p.text for p in structure_passages(docs)}
    b = {p.pid: p.text for p in structure_passages(list(reversed(docs))[:2])}
    assert all(a[k] == v for k, v in b.items())
    ta = {p.pid: p.text for p in token_passages(docs, 8, 4)}
    tb = {p.pid: p.text for p in token_passages(docs[1:2], 8, 4)}
    assert tb and all(ta[k] == v for k, v in tb.items())


def test_token_passages_cover_every_token_with_overlap(md2d_dir):
    docs = list(load_docs(md2d_dir / "multidoc2dial_doc.json").values())
    doc = docs[0]
    n_tok = len(doc.text.split())
    ps = token_passages([doc], size=10, stride=6)
    bodies = [p.text.split(" // ", 1)[1].split() for p in ps]
    assert all(len(b) <= 10 for b in bodies)
    assert [int(p.pid.rsplit("::w", 1)[1]) for p in ps] == list(range(0, 6 * len(ps), 6))
    covered = set()
    for p in ps:
        start = int(p.pid.rsplit("::w", 1)[1])
        covered |= set(range(start, start + len(p.text.split(" // ", 1)[1].split())))
    assert covered == set(range(n_tok))
    # a passage lists exactly the spans overlapping its characters
    assert ps[0].span_ids[0] == "1" and "5" in ps[-1].span_ids and "1" not in ps[-1].span_ids
    with pytest.raises(ValueError, match="stride"):
        token_passages([doc], size=10, stride=11)


def test_md2d_set_gold_passages_hold_the_reference_spans(md2d_dir):
    s = md2d_set(md2d_dir / "multidoc2dial_dial_train.json", md2d_dir / "multidoc2dial_doc.json")
    by_id = {p.pid: p for p in s.passages}
    assert len(s.queries) == 6
    q = s.queries[3]  # "Does my car registration change too?" → span 4 of the address doc
    assert q.relevant == ["Change your address#1_0::3"]
    assert "4" in by_id[q.relevant[0]].span_ids
    tok = md2d_set(
        md2d_dir / "multidoc2dial_dial_train.json",
        md2d_dir / "multidoc2dial_doc.json",
        "token",
        6,
        6,
    )
    tb = {p.pid: p for p in tok.passages}
    for q in tok.queries:
        assert q.relevant and all(
            tb[pid].doc_id == q.relevant[0].split("::")[0] for pid in q.relevant
        )


def test_unknown_reference_is_a_data_error(md2d_dir, tmp_path):
    data = json.loads((md2d_dir / "multidoc2dial_dial_test.json").read_text())
    data["dial_data"]["va"][0]["turns"][1]["references"][0]["doc_id"] = "No such doc"
    bad = tmp_path / "dial.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"dial_id=te-va-1.*No such doc"):
        md2d_set(bad, md2d_dir / "multidoc2dial_doc.json")


def test_instruct_set_dedupes_contexts_and_uses_only_query_files(tmp_path):
    q = tmp_path / "valid.jsonl"
    d = tmp_path / "dev.jsonl"
    rows_q = [
        {"instruction": "Who?", "input": "Alice  went home.", "output": "x"},
        {"instruction": "No context", "input": "", "output": "x"},
        {"instruction": "Where?", "input": "Alice went home.", "output": "x"},
    ]
    rows_d = [{"instruction": "Train q", "input": "Bob stayed.", "output": "y"}]
    q.write_text("\n".join(json.dumps(r) for r in rows_q))
    d.write_text("\n".join(json.dumps(r) for r in rows_d))
    s = instruct_set([q], [d])
    assert len(s.passages) == 2  # "Alice  went home." and "Alice went home." are one
    assert [x.text for x in s.queries] == ["Who?", "Where?"]
    assert s.queries[0].relevant == s.queries[1].relevant
    assert sniff(q) == "instruct"


def test_dpr_sample_union_and_roundtrip(tmp_path):
    rows = []
    for i in range(3):
        rows.append(
            {
                "question": f"q{i}[SEP]",
                "positive_passage": f"T // p{i}",
                "positive_passage_id": i,
                "found_at_rank": 0,
                "DPR_result": [
                    {
                        "rank": 0,
                        "passage_id": i,
                        "is_target": True,
                        "is_positive": True,
                        "score": 1,
                        "text": f"T // p{i}",
                    },
                    {
                        "rank": 1,
                        "passage_id": 10,
                        "is_target": False,
                        "is_positive": None,
                        "score": 0,
                        "text": "T // shared",
                    },
                ],
            }
        )
    f = tmp_path / "sample.json"
    f.write_text(json.dumps(rows))
    assert sniff(f) == "dpr-sample"
    s = dpr_sample_set(f)
    assert sorted(p.pid for p in s.passages) == ["0", "1", "10", "2"]
    assert [q.text for q in s.queries] == ["q0", "q1", "q2"]
    save_passages(s.passages, tmp_path / "p.jsonl")
    assert load_passages(tmp_path / "p.jsonl") == s.passages
