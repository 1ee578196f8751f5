"""Retrievers (BM25, dense + FAISS, hybrid, rerank), metrics, index folders, and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lmsmith.cli import main as lmsmith_main
from lmsmith.data.md2d import load_docs
from lmsmith.dialog.config import BM25Config, DenseConfig, RetrieverConfig
from lmsmith.dialog.corpus import Passage, structure_passages
from lmsmith.dialog.retrieve import (
    BM25Retriever,
    DenseRetriever,
    Hit,
    HybridRetriever,
    RerankRetriever,
    bm25_tokenize,
    load_encoder,
    load_index,
    rrf_fuse,
    weighted_fuse,
)
from lmsmith.metrics.retrieval import first_relevant_rank, mrr, recall_at_k, retrieval_metrics

QUERIES = [
    "How do I report a new address?",
    "Does the GI Bill pay tuition?",
    "apply online for compensation",
    "renew license in person",
]


@pytest.fixture
def passages(md2d_dir) -> list[Passage]:
    return structure_passages(list(load_docs(md2d_dir / "multidoc2dial_doc.json").values()))


def _cfg(encoder: str, **rerank) -> RetrieverConfig:
    cfg = RetrieverConfig(dense=DenseConfig(encoder=encoder, max_length=64, batch_size=3))
    for k, v in rerank.items():
        setattr(cfg.rerank, k, v)
    return cfg


# --------------------------------------------------------------------------- metrics


def test_rank_metrics_by_hand():
    ranked = [["a", "b", "c"], ["c", "a", "b"], ["x", "y", "z"]]
    gold = [["a"], ["b", "a"], ["q"]]
    ranks = [first_relevant_rank(r, g) for r, g in zip(ranked, gold)]
    assert ranks == [1, 2, None]
    assert recall_at_k(ranks, 1) == pytest.approx(1 / 3)
    assert recall_at_k(ranks, 2) == pytest.approx(2 / 3)
    assert mrr(ranks) == pytest.approx((1 + 0.5 + 0) / 3)
    assert mrr(ranks, cutoff=1) == pytest.approx(1 / 3)
    m = retrieval_metrics(ranked, gold)
    assert m["r@10"] == pytest.approx(2 / 3) and m["n_queries"] == 3
    with pytest.raises(ValueError):
        retrieval_metrics(ranked, gold[:2])


# --------------------------------------------------------------------------- BM25


def _bm25_reference(docs: list[list[str]], query: list[str], k1=1.5, b=0.75) -> list[float]:
    n = len(docs)
    avgdl = sum(len(d) for d in docs) / n
    out = []
    for d in docs:
        s = 0.0
        for t in query:
            df = sum(1 for x in docs if t in x)
            if df == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf = d.count(t)
            s += idf * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
        out.append(s)
    return out


def test_bm25_matches_the_formula_on_a_hand_checked_case():
    texts = ["apple banana apple", "banana cherry", "cherry durian elderberry fig"]
    r = BM25Retriever(BM25Config(stopwords=False))
    r.index([Passage(str(i), t) for i, t in enumerate(texts)])
    # by hand: idf(cherry) = ln(1 + 1.5 / 2.5) = 0.470004; d1 has tf 1, length 2, avgdl 3:
    # 0.470004 * 1 / (1 + 1.5 * (0.25 + 0.75 * 2 / 3)) = 0.221178
    assert r.scores("cherry")[1] == pytest.approx(0.221178, abs=1e-5)
    ref = _bm25_reference([t.split() for t in texts], ["apple", "cherry"])
    assert r.scores("Apple, cherry!") == pytest.approx(ref, abs=1e-5)
    hits = r.search("apple cherry", 3)
    assert [h.pid for h in hits] == ["0", "1", "2"]
    assert r.scores("unknownword") == pytest.approx([0, 0, 0])


def test_bm25_tokenizer_drops_stopwords_and_single_letters():
    assert bm25_tokenize(["Is the GI Bill a benefit?"]) == [["gi", "bill", "benefit"]]
    assert bm25_tokenize(["What is the GI Bill?"], stopwords=False) == [
        ["what", "is", "the", "gi", "bill"]
    ]


def test_bm25_finds_the_obvious_passages_and_survives_save_load(passages, tmp_path):
    r = BM25Retriever()
    r.index(passages)
    assert r.search("yellow ribbon private school", 1)[0].pid == "Education benefits#1_0::3"
    before = [[h.pid for h in hs] for hs in r.search_batch(QUERIES, 5)]
    r.save(tmp_path / "idx")
    r.save(tmp_path / "idx")  # replacing an index leaves no temporary folders behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    again = load_index(tmp_path / "idx")
    assert isinstance(again, BM25Retriever)
    assert [[h.pid for h in hs] for hs in again.search_batch(QUERIES, 5)] == before


# --------------------------------------------------------------------------- dense


def test_mean_pool_ignores_padding_and_empty_rows(tiny_encoder):
    pool = load_encoder(tiny_encoder)[1]  # sentence-transformers' Pooling, mean mode
    h = torch.tensor(
        [[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 5.0], [0.0, 0.0], [0.0, 0.0]]]
    )
    m = torch.tensor([[1, 1, 0], [0, 0, 0]])
    out = pool({"token_embeddings": h, "attention_mask": m})["sentence_embedding"]
    assert out.tolist() == [[2.0, 3.0], [0.0, 0.0]]


def test_encoding_does_not_depend_on_batch_padding(tiny_encoder):
    model = load_encoder(tiny_encoder, max_length=64)
    alone = model.encode_document(["renew license"])
    batched = model.encode_document(
        ["renew license", "a much longer text about the gi bill " * 3], batch_size=2
    )
    np.testing.assert_allclose(alone[0], batched[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_faiss_search_equals_brute_force(tiny_encoder, passages, tmp_path):
    r = DenseRetriever(DenseConfig(encoder=tiny_encoder, max_length=64, batch_size=3))
    r.index(passages)
    model = load_encoder(tiny_encoder, 64, r.cfg.query_max_length)
    P = model.encode_document([p.text for p in passages])  # (N, H)
    Q = model.encode_query(QUERIES)  # (Q, H)
    S = Q @ P.T
    for qi, hits in enumerate(r.search_batch(QUERIES, 5)):
        order = np.argsort(-S[qi], kind="stable")[:5]
        assert [h.pid for h in hits] == [passages[i].pid for i in order]
        np.testing.assert_allclose([h.score for h in hits], S[qi][order], atol=1e-5)
    single = r.search(QUERIES[0], 5)
    assert [h.pid for h in single] == [h.pid for h in r.search_batch(QUERIES[:1], 5)[0]]
    r.save(tmp_path / "dense")
    again = load_index(tmp_path / "dense")
    assert [h.pid for h in again.search(QUERIES[1], 8)] == [h.pid for h in r.search(QUERIES[1], 8)]


# --------------------------------------------------------------------------- fusion and rerank


def test_rrf_and_weighted_fusion_by_hand():
    a = [Hit("x", 9.0), Hit("y", 5.0), Hit("z", 1.0)]
    b = [Hit("y", 0.9), Hit("w", 0.8), Hit("x", 0.1)]
    fused = dict(rrf_fuse([a, b], rrf_k=0))
    assert fused["y"] == pytest.approx(1 / 2 + 1 / 1)
    assert fused["x"] == pytest.approx(1 / 1 + 1 / 3)
    assert fused["w"] == pytest.approx(1 / 2)
    assert [p for p, _ in rrf_fuse([a, b], 0)][:2] == ["y", "x"]
    assert [p for p, _ in weighted_fuse(a, b, alpha=0.0)][:3] == ["x", "y", "z"]
    assert [p for p, _ in weighted_fuse(a, b, alpha=1.0)][:3] == ["y", "w", "x"]
    half = dict(weighted_fuse(a, b, alpha=0.5))
    assert half["y"] == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)


def test_hybrid_returns_fused_unique_hits_and_reloads(tiny_encoder, passages, tmp_path):
    r = HybridRetriever(_cfg(tiny_encoder))
    r.index(passages)
    hits = r.search(QUERIES[0], 5)
    assert len(hits) == 5 and len({h.pid for h in hits}) == 5
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # the best BM25 passage and the best dense passage both score at least 1/(k+1)
    top_bm25 = r.bm25.search(QUERIES[0], 1)[0].pid
    assert top_bm25 in [h.pid for h in r.search(QUERIES[0], 3)]
    r.save(tmp_path / "h")
    again = load_index(tmp_path / "h")
    assert [h.pid for h in again.search(QUERIES[0], 5)] == [h.pid for h in hits]


def test_rerank_reorders_the_head_and_keeps_the_tail(tiny_encoder, tiny_cross, passages, tmp_path):
    cfg = _cfg(tiny_encoder, reranker=tiny_cross, first_stage="bm25", rerank_depth=3)
    r = RerankRetriever(cfg)
    r.index(passages)
    first = r.first.search(QUERIES[3], 8)
    out = r.search(QUERIES[3], 8)
    assert {h.pid for h in out[:3]} == {h.pid for h in first[:3]}
    assert [h.pid for h in out[3:]] == [h.pid for h in first[3:]]
    cross = r.cross.score(QUERIES[3], [h.text for h in out[:3]])
    assert list(cross) == sorted(cross, reverse=True)
    r.save(tmp_path / "rr")
    again = load_index(tmp_path / "rr")
    assert [h.pid for h in again.search(QUERIES[3], 8)] == [h.pid for h in out]


def test_rerank_without_a_model_is_a_user_error(passages):
    with pytest.raises(Exception, match="needs --reranker"):
        RerankRetriever(RetrieverConfig()).index(passages)


# --------------------------------------------------------------------------- CLI


def test_cli_eval_retrieval_writes_the_metrics(md2d_dir, tmp_path, capsys):
    out = tmp_path / "m.json"
    data = str(md2d_dir / "multidoc2dial_dial_train.json")
    rc = lmsmith_main(
        [
            "dialog",
            "eval-retrieval",
            "--data",
            data,
            "--retriever",
            "bm25",
            "--json",
            str(out),
            "--progress",
            "false",
        ]
    )
    assert rc == 0
    m = json.loads(out.read_text())
    assert {"r@1", "r@5", "r@10", "mrr", "n_queries", "n_passages"} <= set(m)
    assert m["n_queries"] == 6 and m["n_passages"] == 8
    assert m["r@10"] == 1.0  # 8 passages: every gold is in the top 10
    assert 0 < m["r@1"] <= m["r@5"] <= m["r@10"] and m["r@1"] <= m["mrr"] <= 1
    assert "R@1" in capsys.readouterr().out


def test_cli_dense_on_a_dpr_sample_file(tiny_encoder, tmp_path):
    rows = [
        {
            "question": f"question {i}[SEP]user: hello",
            "positive_passage": f"T // passage {i}",
            "positive_passage_id": i,
            "found_at_rank": 0,
            "DPR_result": [
                {
                    "rank": 0,
                    "passage_id": i,
                    "is_target": True,
                    "is_positive": True,
                    "score": 1,
                    "text": f"T // passage {i}",
                }
            ],
        }
        for i in range(12)
    ]
    (tmp_path / "s.json").write_text(json.dumps(rows))
    out = tmp_path / "m.json"
    argv = [
        "dialog",
        "eval-retrieval",
        "--data",
        str(tmp_path / "s.json"),
        "--retriever",
        "dense",
        "--encoder",
        tiny_encoder,
        "--json",
        str(out),
        "--progress",
        "false",
    ]
    assert lmsmith_main(argv) == 0
    m = json.loads(out.read_text())
    assert m["n_queries"] == 12 and m["n_passages"] == 12 and m["retriever"] == "dense"


def test_cli_index_and_search_a_folder_of_documents(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "pets.md").write_text(
        "# Pets\n\n## Cats\n\nCats sleep a lot.\n\n## Dogs\n\nDogs need walks.\n"
    )
    idx = tmp_path / "idx"
    assert (
        lmsmith_main(
            ["dialog", "index", "--docs", str(docs), "--output", str(idx), "--progress", "false"]
            + ["--retriever", "bm25"]
        )
        == 0
    )
    # "# Pets" has no text of its own: no passage; it titles the two sections below it
    assert "indexed 2 passages (bm25, structure)" in capsys.readouterr().out
    assert (
        lmsmith_main(
            ["dialog", "search", "--index", str(idx), "--query", "walks for my dog", "--k", "1"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "pets.md::3" in out and "Pets / Dogs // Dogs need walks." in out


def test_cli_user_errors_exit_2(tmp_path, capsys):
    assert lmsmith_main(["dialog", "eval-retrieval", "--retriever", "bm25"]) == 2
    assert (
        lmsmith_main(["dialog", "eval-retrieval", "--data", "x.json", "--retriever", "bm42"]) == 2
    )
    assert lmsmith_main(["dialog", "search", "--index", str(tmp_path), "--query", "q"]) == 2
    assert lmsmith_main(["dialog", "nope"]) == 2
    err = capsys.readouterr().err
    assert (
        "missing required option --data" in err and "bm42" in err and "not an index folder" in err
    )


def test_hybrid_can_give_bm25_the_current_turn_only(tiny_encoder, passages):
    cfg = _cfg(tiny_encoder)
    cfg.fusion.sparse_query = "current"
    r = HybridRetriever(cfg)
    r.index(passages)
    q = "yellow ribbon private school[SEP]agent: renew your license||user: address change"
    expected = r._fuse(
        r.bm25.search("yellow ribbon private school", 100), r.dense.search(q, 100), 5
    )
    assert [h.pid for h in r.search(q, 5)] == [h.pid for h in expected]
    assert [h.pid for h in r.search_batch([q], 5)[0]] == [h.pid for h in expected]
    cfg.fusion.sparse_query = "full"
    assert r.sparse_query(q) == q
