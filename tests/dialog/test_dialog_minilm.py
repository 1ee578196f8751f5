"""The one slow test: the real embedded all-MiniLM-L6-v2 retrieves the fixture's gold passages."""

from __future__ import annotations

import json

import pytest

from lmsmith.cli import main as lmsmith_main


@pytest.mark.slow
def test_minilm_dense_and_hybrid_find_the_gold(md2d_dir, tmp_path):
    data = str(md2d_dir / "multidoc2dial_dial_validation.json")
    out = {}
    for kind in ("dense", "hybrid"):
        f = tmp_path / f"{kind}.json"
        argv = [
            "dialog",
            "eval-retrieval",
            "--data",
            data,
            "--retriever",
            kind,
            "--json",
            str(f),
            "--progress",
            "false",
        ]
        assert lmsmith_main(argv) == 0
        out[kind] = json.loads(f.read_text())
    # three unambiguous questions over eight passages: the sentence encoder ranks each gold first
    assert out["dense"]["n_queries"] == 3 and out["dense"]["r@1"] == 1.0
    # fusing with BM25 (which misses one at rank 1) keeps every gold in the top 2
    assert out["hybrid"]["r@5"] == 1.0 and out["hybrid"]["mrr"] >= 0.75
