"""Grounding: span targets, the sentence baseline, the best-span search, the extractive reader."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    BertConfig,
    BertForQuestionAnswering,
)

from lmsmith.dialog.corpus import Passage
from lmsmith.dialog.ground import (
    DenseGrounder,
    ExtractiveReader,
    ReaderExample,
    _best_span,
    passage_body,
    sentence_ground,
    sentences,
    target_span,
    train_reader,
)

BODY = (
    "You must report a change of address within ten days. "
    "Renewals can be done online. The fee is twenty dollars!"
)


def test_sentences_and_body():
    spans = sentences(BODY)
    assert [BODY[s:e] for s, e in spans] == [
        "You must report a change of address within ten days.",
        "Renewals can be done online.",
        "The fee is twenty dollars!",
    ]
    assert passage_body("Title // the body") == ("the body", 9)
    assert passage_body("no title here") == ("no title here", 0)
    # times and abbreviations do not end a sentence; a capital after them does
    text = "Open from 9 a.m. to 3 p.m. on Saturdays. Bring e.g. a lease. Call 311."
    assert [text[s:e] for s, e in sentences(text)] == [
        "Open from 9 a.m. to 3 p.m. on Saturdays.",
        "Bring e.g. a lease.",
        "Call 311.",
    ]


def test_dense_grounder_picks_the_answering_sentence_and_caches_vectors(bow_encoder, pages):
    PAGES = pages
    enc = bow_encoder()
    g = DenseGrounder(enc, PAGES, unknown_penalty=0.0)
    out = g.ground("report change of address days", [], PAGES)
    assert out.pid == "m::1" and out.text == "You must report a change of address within ten days."
    body = passage_body(PAGES[0].text)[0]
    assert body[out.start : out.end] == out.text
    n = enc.calls
    g.ground("free reporting", [], PAGES)
    assert enc.calls == n + 1  # only the question was encoded: sentence vectors are cached
    # a follow-up naming no topic leans on the previous user turn
    out = g.ground("and dvds", [("agent", "21 days."), ("user", "how long are books lent")], PAGES)
    assert out.text == "DVDs are lent for 7 days."
    assert g.ground("anything", [], []) is None


def test_unknown_words_lower_the_abstention_score(bow_encoder, pages):
    PAGES = pages
    g0 = DenseGrounder(bow_encoder(), PAGES, unknown_penalty=0.0)
    g1 = DenseGrounder(bow_encoder(), PAGES, unknown_penalty=0.25)
    assert g1.unknown_words("How much does a lifeguard permits cost?") == [
        "cost", "lifeguard", "permit",
    ]  # fmt: skip
    assert g1.unknown_words("How many books can I borrow?") == ["borrow"]
    q = "are books lent to lifeguards"
    assert g1.ground(q, [], PAGES).score == pytest.approx(g0.ground(q, [], PAGES).score - 0.25)
    assert g1.ground(q, [], PAGES).text == g0.ground(q, [], PAGES).text


def test_target_span_exact_then_best_sentence():
    s, e = target_span(BODY, "RENEWALS can be done")
    assert BODY[s:e] == "Renewals can be done"
    s, e = target_span(BODY, "It costs twenty dollars.")  # paraphrase: best token-F1 sentence
    assert BODY[s:e] == "The fee is twenty dollars!"
    assert target_span(BODY, "zebra giraffe") is None
    assert target_span(BODY, "   ") is None


def test_sentence_ground_prefers_overlap_then_rank():
    ps = [
        Passage("a", "Fees // The fee is twenty dollars."),
        Passage("b", "Moving // You must report a change of address within ten days."),
    ]
    g = sentence_ground("How many days do I have to report my address change?", ps)
    assert g.pid == "b" and g.text.startswith("You must report")
    body = passage_body(ps[1].text)[0]
    assert body[g.start : g.end] == g.text
    # no overlap anywhere: the first sentence of the best-ranked passage
    assert sentence_ground("zebra", ps).pid == "a"
    assert sentence_ground("anything", []) is None


def test_best_span_respects_order_length_and_context():
    start = torch.tensor([0.0, 5.0, 1.0, 9.0, 0.0])
    end = torch.tensor([0.0, 0.0, 4.0, 0.0, 8.0])
    ctx = torch.tensor([False, True, True, True, True])
    assert _best_span(start, end, ctx, max_len=4)[:2] == (3, 4)  # 9 + 8
    assert _best_span(start, end, ctx, max_len=1)[:2] == (3, 3)  # i == j only: 9 + 0 > 0 + 8
    ctx2 = torch.tensor([False, True, True, False, False])
    i, j, score = _best_span(start, end, ctx2, max_len=4)
    assert (i, j) == (1, 2) and score == 9.0  # the [CLS]/query position 0 is never chosen


def _reader(tiny_encoder, fresh: bool = False) -> ExtractiveReader:
    """The session's tiny BERT with a new QA head, or (``fresh``) a freshly initialised one
    without dropout, which a few dozen steps can fit."""
    tok = AutoTokenizer.from_pretrained(tiny_encoder)
    torch.manual_seed(0)
    if fresh:
        cfg = BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return ExtractiveReader(BertForQuestionAnswering(cfg), tok, max_length=64)
    model = AutoModelForQuestionAnswering.from_pretrained(tiny_encoder, num_labels=2)
    return ExtractiveReader(model, tok, max_length=64)


def test_reader_labels_cover_the_gold_characters(tiny_encoder):
    r = _reader(tiny_encoder)
    s, e = target_span(BODY, "renewals can be done online")
    x = ReaderExample("can i renew online", BODY, (s, e))
    batch = r.labels([x, ReaderExample("q", BODY, None)])
    enc = r.encode([x.query], [BODY])
    off = enc["offset_mapping"][0]
    i, j = int(batch["start_positions"][0]), int(batch["end_positions"][0])
    assert 0 < i <= j
    assert BODY[int(off[i, 0]) : int(off[j, 1])].lower() == "renewals can be done online"
    assert int(batch["start_positions"][1]) == 0 and int(batch["end_positions"][1]) == 0


def test_reader_learns_to_point_at_the_span(tiny_encoder):
    r = _reader(tiny_encoder, fresh=True)
    qa = [
        ("how long to report an address change", "within ten days"),
        ("can i renew online", "done online"),
        ("what is the fee", "twenty dollars"),
    ]
    ex = [ReaderExample(q, BODY, target_span(BODY, a)) for q, a in qa]
    s = train_reader(r, ex * 4, epochs=10, batch_size=4, lr=1e-2, progress=False)
    assert s["last_loss"] < 0.5 * s["first_loss"]
    p = [Passage("p1", "Moving // " + BODY)]
    hits = 0
    for q, a in qa:
        g = r.ground(q, p)
        assert g.pid == "p1" and BODY[g.start : g.end] == g.text
        hits += a in g.text.lower()
    assert hits >= 2
