"""retrieve → ground → generate on the MultiDoc2Dial fixture with tiny models; the CLI commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lmsmith import config
from lmsmith.cli import BY_NAME, resolve
from lmsmith.cli import main as lmsmith_main
from lmsmith.data.md2d import load_docs
from lmsmith.dialog.config import DialogEvalConfig, GroundConfig
from lmsmith.dialog.corpus import structure_passages
from lmsmith.dialog.generate import load_generator
from lmsmith.dialog.ground import passage_body
from lmsmith.dialog.pipeline import Pipeline, evaluate, instruct_items, md2d_items
from lmsmith.dialog.retrieve import BM25Retriever
from lmsmith.errors import UserError
from lmsmith.models import tiny_causal_lm, tiny_tokenizer


def dialog_main(argv: list[str]) -> int:
    return lmsmith_main(["dialog", *argv])


CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "dialog"
PART2 = ["answer", "eval", "serve", "train-generator", "train-reader"]


@pytest.fixture(scope="module")
def tiny_gen_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gen")
    tiny_causal_lm(vocab_size=100, seed=0).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture
def fixture_set(md2d_dir):
    passages = structure_passages(list(load_docs(md2d_dir / "multidoc2dial_doc.json").values()))
    items = md2d_items(
        md2d_dir / "multidoc2dial_dial_validation.json",
        md2d_dir / "multidoc2dial_doc.json",
        passages,
    )
    return passages, items


def test_md2d_items_carry_span_text_found_in_the_gold_passage(fixture_set):
    passages, items = fixture_set
    assert [it.reply_refs[0] for it in items] == [
        "Ten days after moving.",
        "Yes, tuition and fees.",
        "The Yellow Ribbon program may cover the rest.",
    ]
    for it in items:
        assert it.gold_pids and all(p.pid in it.gold_pids for p in it.gold_passages)
        span = " ".join(it.grounding_refs[0].split())
        assert any(span in " ".join(p.text.split()) for p in it.gold_passages)
    # the second VA turn has the first turn as history, most recent first
    assert items[2].history == [
        ("agent", "Yes, tuition and fees."),
        ("user", "Does the GI Bill pay for college?"),
    ]


def test_instruct_items_keep_rows_with_context(tmp_path):
    f = tmp_path / "qa.jsonl"
    rows = [
        {"instruction": "Who?", "input": "Ada wrote it.", "output": "Ada."},
        {"instruction": "Poem", "input": "", "output": "Roses."},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = instruct_items(f)
    assert len(items) == 1 and items[0].grounding_refs == ["Ada."]
    assert items[0].gold_passages[0].text == "Ada wrote it."


def _pipe(passages, tiny_gen_dir, grounder="sentence", k=2):
    r = BM25Retriever()
    r.index(passages)
    model, tok, seq2seq = load_generator(tiny_gen_dir)
    return Pipeline(r, model, tok, grounder=grounder, k=k, max_new_tokens=6, seq2seq=seq2seq)


def test_answer_cites_retrieved_passages_and_grounds_inside_them(fixture_set, tiny_gen_dir):
    passages, _ = fixture_set
    pipe = _pipe(passages, tiny_gen_dir)
    out = pipe.answer("How long do I have to report a new address?")
    assert isinstance(out["reply"], str)
    assert len(out["citations"]) == 2
    top = out["citations"][0]
    assert top["passage_id"].startswith("Change your address")
    assert top["score"] >= out["citations"][1]["score"]
    g = out["grounding"]
    cited = {c["passage_id"]: c["text"] for c in out["citations"]}
    assert g["passage_id"] in cited and g["text"] in passage_body(cited[g["passage_id"]])[0]
    assert "ten days" in g["text"]


def test_history_changes_the_prompt(fixture_set, tiny_gen_dir):
    passages, _ = fixture_set
    pipe = _pipe(passages, tiny_gen_dir, grounder="none")
    seen = []
    pipe._gen = lambda prompts, progress=False: seen.extend(prompts) or ["ok"] * len(prompts)
    out = pipe.answer("And the cap?", [("agent", "Yes."), ("user", "Does the GI Bill pay?")])
    assert out["reply"] == "ok" and out["grounding"] is None
    assert "User: Does the GI Bill pay?\n\nAssistant: Yes.\n\nUser: And the cap?" in seen[0]


def test_evaluate_reports_bounded_metrics(fixture_set, tiny_gen_dir):
    passages, items = fixture_set
    pipe = _pipe(passages, tiny_gen_dir, k=3)
    m, rows = evaluate(pipe, items, progress=False)
    assert m["n"] == len(rows) == 3
    for key in ("reply_f1", "reply_sacrebleu", "reply_rougeL", "grounding_em", "grounding_f1"):
        assert 0.0 <= m[key] <= 100.0, key
    assert math.isclose(
        m["reply_sum_no_meteor"], m["reply_f1"] + m["reply_sacrebleu"] + m["reply_rougeL"]
    )
    assert m["retrieval_r@3"] == 100.0  # BM25 finds every gold section among 8 passages
    # an oracle generator scores 100 on the reply metrics
    pipe._gen = lambda prompts, progress=False: [it.reply_refs[0] for it in items]
    m, _ = evaluate(pipe, items, progress=False)
    assert m["reply_f1"] == pytest.approx(100.0) and m["reply_sacrebleu"] == pytest.approx(100.0)


@pytest.mark.parametrize("name", PART2)
def test_part2_presets_parse(name):
    cls = resolve(BY_NAME[f"dialog {name}"].config)
    cfg = config.load(cls, str(CONFIGS / f"{name}.yaml"))
    assert isinstance(cfg, cls)


def test_config_checks_name_the_field():
    with pytest.raises(ValueError, match="reader"):
        GroundConfig(grounder="reader")
    with pytest.raises(ValueError, match="no_retrieval"):
        DialogEvalConfig(no_retrieval=True)
    with pytest.raises(UserError, match="k must be"):
        config.load(DialogEvalConfig, None, {"k": "0"})


def test_cli_index_answer_eval_and_training(md2d_dir, tiny_gen_dir, tiny_encoder, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "moving.md").write_text(
        "# Moving\n\n## Address\n\nReport a change of address within ten days.\n\n"
        "## Fees\n\nThe moving permit costs twenty dollars.\n"
    )
    ix = ["--docs", str(docs), "--out", str(tmp_path / "ix"), "--retriever", "bm25"]
    assert dialog_main(["index", *ix]) == 0
    gen = ["--generator", tiny_gen_dir, "--max-new-tokens", "4", "--reply-mode", "generate"]
    q = ["--query", "when must I report my address change?", "--json", str(tmp_path / "a.json")]
    g = ["--grounder", "sentence"]
    assert dialog_main(["answer", "--index", str(tmp_path / "ix"), *q, *gen, *g]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert "ten days" in a["grounding"]["text"] and a["abstained"] is False
    assert len(a["citations"]) == 2  # k: 3, but "# Moving" alone is no passage

    dial = str(md2d_dir / "multidoc2dial_dial_validation.json")
    ev = ["eval", "--data", dial, "--progress", "false", *gen, *g]
    assert (
        dialog_main([*ev, "--json", str(tmp_path / "m.json"), "--run-dir", str(tmp_path / "r")])
        == 0
    )
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n"] == 3 and m["retriever"] == "bm25" and "grounding_f1" in m
    assert len((tmp_path / "r" / "predictions.jsonl").read_text().splitlines()) == 3
    assert dialog_main([*ev, "--no-retrieval", "--grounder", "none"]) == 0
    assert "none + none" in capsys.readouterr().out

    out = tmp_path / "gen-mt"
    train = ["train-generator", "--data", dial, "--output", str(out), "--steps", "2"]
    assert (
        dialog_main([*train, "--multitask", "--generator", tiny_gen_dir, "--progress", "false"])
        == 0
    )
    s = json.loads((out / "summary.json").read_text())
    assert s["multitask"] and s["n_pairs"] == 6 and (out / "config.json").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    load_generator(str(out))

    rd = tmp_path / "reader"
    tr = ["train-reader", "--data", dial, "--init", tiny_encoder, "--output", str(rd)]
    assert dialog_main([*tr, "--epochs", "1", "--max-length", "64", "--progress", "false"]) == 0
    rg = ["--grounder", "reader", "--reader", str(rd)]
    assert dialog_main([*ev, *rg, "--json", str(tmp_path / "m2.json")]) == 0
    assert 0 <= json.loads((tmp_path / "m2.json").read_text())["grounding_f1"] <= 100

    assert dialog_main(["answer", "--query", "hi"]) == 2
    assert "missing required option --index" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_answers_from_the_fixture(fixture_set):
    passages, _ = fixture_set
    pipe = _pipe(passages, "smollm2-135m-instruct", k=2)
    pipe.max_new_tokens = 12
    out = pipe.answer("How long do I have to report a new address?")
    assert out["reply"].strip() and "Grounding" not in out["reply"]
    assert out["citations"][0]["passage_id"].startswith("Change your address")
    assert "ten days" in out["grounding"]["text"].lower()


def _dense_pipe(bow, pages, tiny_gen_dir=None, reply_mode="extract", threshold=0.5):
    from lmsmith.dialog.ground import DenseGrounder

    r = BM25Retriever()
    r.index(pages)
    model = tok = None
    if tiny_gen_dir is not None:
        model, tok, _ = load_generator(tiny_gen_dir)
    return Pipeline(
        r,
        model,
        tok,
        grounder="dense",
        dense=DenseGrounder(bow(), pages),
        k=2,
        max_new_tokens=6,
        reply_mode=reply_mode,
        abstain_threshold=threshold,
    )


def test_extractive_reply_is_the_grounding_sentence_and_abstention_says_so(bow_encoder, pages):
    from lmsmith.dialog.pipeline import ABSTAIN_REPLY

    pipe = _dense_pipe(bow_encoder, pages)
    out = pipe.answer("How many days to report a change of address?")
    assert out["reply"] == "You must report a change of address within ten days."
    assert out["abstained"] is False and out["grounding"]["passage_id"] == "m::1"
    assert out["citations"][0]["passage_id"] == "m::1"
    out = pipe.answer("Can I get a refund for my parking permit?")
    assert out == {"reply": ABSTAIN_REPLY, "grounding": None, "citations": [], "abstained": True}
    pipe.abstain_threshold = None  # never abstains (but with nothing retrieved)
    assert pipe.answer("Can I get a refund for my parking permit?")["abstained"] is False


@pytest.mark.parametrize("mode", ["extract", "generate", "phrase"])
def test_stream_gives_meta_tokens_and_the_reply_answer_gives(
    bow_encoder, pages, tiny_gen_dir, mode
):
    pipe = _dense_pipe(bow_encoder, pages, tiny_gen_dir, reply_mode=mode)
    for q in ("How many days to report a change of address?", "Refund for a parking permit?"):
        events = list(pipe.stream(q))
        kinds = [k for k, _ in events]
        assert kinds[0] == "meta" and kinds[-1] == "done" and "token" in kinds
        assert "reply" not in events[0][1]
        done = events[-1][1]
        assert done == pipe.answer(q)
        streamed = "".join(p for k, p in events if k == "token")
        replaced = [p for k, p in events if k == "replace"]
        assert (replaced[-1] if replaced else streamed.strip()) == done["reply"]


def test_phrase_mode_keeps_a_rewrite_only_with_the_sentences_figures(
    bow_encoder, pages, tiny_gen_dir
):
    from lmsmith.dialog.pipeline import figures, keeps_facts

    assert figures("Pay $45 by 7 a.m. or 1.25% a month, from 9 to 10.") == {
        "$45", "7 a.m", "1.25%", "9", "10",
    }  # fmt: skip
    src = "A permit costs $45 per year and expires on January 31."
    assert keeps_facts(src, "It costs $45 a year.")
    assert not keeps_facts(src, "It costs $54 a year.")  # a figure the sentence lacks
    assert not keeps_facts(src, "It is cheap.")  # none of the sentence's figures
    assert not keeps_facts(src, "  ")
    assert keeps_facts("The library does not charge late fees.", "There are no late fees.")
    assert not keeps_facts("The library does not charge late fees.", "It charges late fees.")
    pipe = _dense_pipe(bow_encoder, pages, tiny_gen_dir, reply_mode="phrase")
    pipe._gen = lambda prompts, progress=False: ["Within 12 days."] * len(prompts)
    out = pipe.answer("How many days to report a change of address?")
    assert out["reply"] == "You must report a change of address within ten days."
    pipe._gen = lambda prompts, progress=False: ["Report it in ten days."] * len(prompts)
    assert pipe.answer("How many days to report a change of address?")["reply"] == (
        "Report it in ten days."
    )


def test_pipeline_refuses_inconsistent_settings(tiny_gen_dir):
    r = BM25Retriever()
    r.index([_one_passage()])
    model, tok, _ = load_generator(tiny_gen_dir)
    with pytest.raises(ValueError, match="DenseGrounder"):
        Pipeline(r, model, tok, grounder="dense")
    with pytest.raises(ValueError, match="generator"):
        Pipeline(r, None, None, reply_mode="generate")
    with pytest.raises(ValueError, match="extracts"):
        Pipeline(r, model, tok, grounder="none", reply_mode="extract")


def _one_passage():
    from lmsmith.dialog.corpus import Passage

    return Passage("x::1", "T // Some text.", title="T")
