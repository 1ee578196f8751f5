"""``lmsmith dialog <subcommand>``: index | search | train-retriever | eval-retrieval |
train-reader | train-generator | answer | eval | serve.

Each subcommand takes ``--config FILE.yaml`` and ``--key value`` overrides; ``--help`` lists
the keys. New subcommands (answer, eval, serve) register in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from lmsmith import config as C
from lmsmith.errors import UserError

USAGE = """usage: lmsmith dialog <subcommand> [--config FILE.yaml] [--key value ...]

subcommands:
{lines}

`lmsmith dialog <subcommand> --help` lists its options."""


def _parse(cls, argv: list[str], usage: str):
    from lmsmith.cli import split_config

    if "-h" in argv or "--help" in argv:
        print(f"{usage}\n\noptions:\n{C.describe(cls)}")
        return None
    path, rest = split_config(argv)
    return C.load(cls, path, C.parse_overrides(rest))


def load_set(data: str, docs: str | None, extra_docs: list[str], corpus) -> object:
    """A RetrievalSet from a MD2D dial file, a DPR sample file or an instruction jsonl."""
    from lmsmith.dialog import corpus as K

    if not data:
        raise UserError("needs --data FILE (MD2D dial file, DPR sample json or instruction jsonl)")
    kind = K.sniff(data)
    if kind == "md2d-dials":
        doc_file = docs or str(Path(data).with_name("multidoc2dial_doc.json"))
        if not Path(doc_file).is_file():
            raise UserError(f"MultiDoc2Dial documents not found at '{doc_file}'; pass --docs FILE")
        return K.md2d_set(
            data, doc_file, corpus.segmentation, corpus.size, corpus.stride, corpus.max_history
        )
    if kind == "dpr-sample":
        return K.dpr_sample_set(data, corpus.max_history)
    if kind == "instruct":
        return K.instruct_set([data], list(extra_docs))
    raise UserError(f"{data}: a MultiDoc2Dial doc file has no queries; pass a dial file as --data")


def cmd_index(argv: list[str]) -> int:
    from lmsmith.dialog.config import IndexConfig

    argv = ["--output" if a == "--out" else a for a in argv]  # `--out DIR` is accepted too
    from lmsmith.dialog.corpus import docs_passages
    from lmsmith.dialog.retrieve import build_retriever

    cfg = _parse(
        IndexConfig,
        argv,
        "usage: lmsmith dialog index --docs PATH --output DIR [--retriever bm25|dense|hybrid|rerank]",
    )
    if cfg is None:
        return 0
    if not cfg.docs or not cfg.output:
        raise UserError("index needs --docs PATH and --output DIR")
    c = cfg.corpus
    passages = docs_passages(cfg.docs, c.segmentation, c.size, c.stride)
    r = build_retriever(cfg.retriever, cfg.settings)
    t0 = time.perf_counter()
    r.index(passages, progress=cfg.progress)
    r.save(cfg.output)
    print(
        f"indexed {len(passages)} passages ({cfg.retriever}, {c.segmentation}) in {time.perf_counter() - t0:.1f}s → {cfg.output}"
    )
    return 0


def cmd_search(argv: list[str]) -> int:
    from lmsmith.dialog.config import SearchConfig
    from lmsmith.dialog.retrieve import load_index
    from lmsmith.runs import write_json

    cfg = _parse(
        SearchConfig, argv, 'usage: lmsmith dialog search --index DIR --query "..." [--k 5]'
    )
    if cfg is None:
        return 0
    if not cfg.index or not cfg.query.strip():
        raise UserError("search needs --index DIR and --query TEXT")
    r = load_index(cfg.index)
    hits = r.search(cfg.query, cfg.k)
    for i, h in enumerate(hits, start=1):
        text = " ".join(h.text.split())
        print(
            f"{i:>2}. [{h.score:.4f}] {h.pid}\n    {text[:200]}{'...' if len(text) > 200 else ''}"
        )
    if cfg.json:
        write_json(
            cfg.json,
            [
                {"rank": i, "pid": h.pid, "score": h.score, "text": h.text}
                for i, h in enumerate(hits, 1)
            ],
        )
    return 0


def cmd_train_retriever(argv: list[str]) -> int:
    from lmsmith.dialog.config import TrainRetrieverConfig
    from lmsmith.dialog.train import train_bi_encoder, train_cross_encoder

    cfg = _parse(
        TrainRetrieverConfig,
        argv,
        "usage: lmsmith dialog train-retriever --data FILE --output DIR [--model bi-encoder|cross-encoder]",
    )
    if cfg is None:
        return 0
    data = load_set(cfg.data, cfg.docs, [], cfg.corpus)
    fn = train_bi_encoder if cfg.model == "bi-encoder" else train_cross_encoder
    s = fn(cfg, data)
    losses = ", ".join(f"{x:.4f}" for x in s["epoch_losses"])
    print(
        f"trained {s['model']} on {s['n_queries']} queries / {s['n_passages']} passages, "
        f"{s['steps']} steps in {s['train_time_s']}s; mean loss per epoch: {losses}\n"
        f"model: {cfg.output}"
    )
    return 0


def cmd_eval_retrieval(argv: list[str]) -> int:
    from lmsmith.dialog.config import EvalRetrievalConfig
    from lmsmith.dialog.retrieve import build_retriever, load_index
    from lmsmith.metrics.retrieval import first_relevant_rank, retrieval_metrics
    from lmsmith.runs import make_run_dir, write_json, write_jsonl

    cfg = _parse(
        EvalRetrievalConfig,
        argv,
        "usage: lmsmith dialog eval-retrieval --data FILE --retriever bm25|dense|hybrid|rerank [--json OUT]",
    )
    if cfg is None:
        return 0
    data = load_set(cfg.data, cfg.docs, cfg.extra_docs, cfg.corpus)
    queries = [q for q in data.queries if q.relevant]
    if cfg.limit is not None:
        queries = queries[: cfg.limit]
    if not queries:
        raise UserError(f"{cfg.data}: no query with a gold passage")
    t0 = time.perf_counter()
    if cfg.index:
        r = load_index(cfg.index)
        known = {p.pid for p in r.passages}
        missing = sum(1 for q in queries if not set(q.relevant) & known)
        if missing:
            raise UserError(
                f"index '{cfg.index}' lacks the gold passages of {missing} queries (built from other documents?)"
            )
    else:
        r = build_retriever(cfg.retriever, cfg.settings)
        r.index(data.passages, progress=cfg.progress)
    t_index = time.perf_counter() - t0
    t0 = time.perf_counter()
    hits = r.search_batch([q.text for q in queries], cfg.depth, progress=cfg.progress)
    t_search = time.perf_counter() - t0
    ranked = [[h.pid for h in hs] for hs in hits]
    m = retrieval_metrics(ranked, [q.relevant for q in queries])
    out = {
        "r@1": m["r@1"],
        "r@5": m["r@5"],
        "r@10": m["r@10"],
        "mrr": m["mrr"],
        "n_queries": len(queries),
        "n_passages": len(r.passages),
        "retriever": r.kind,
        "data": cfg.data,
        "index_time_s": round(t_index, 3),
        "search_time_s": round(t_search, 3),
    }
    if cfg.json:
        write_json(cfg.json, out)
    if cfg.run_dir:
        run = make_run_dir(cfg.run_dir, "eval-retrieval")
        write_json(run / "config.json", C.to_dict(cfg))
        write_json(run / "metrics.json", out)
        write_jsonl(
            run / "rankings.jsonl",
            [
                {
                    "qid": q.qid,
                    "query": q.text,
                    "relevant": q.relevant,
                    "rank": first_relevant_rank(rk, q.relevant),
                    "top10": rk[:10],
                }
                for q, rk in zip(queries, ranked)
            ],
        )
    print(
        f"{r.kind}: R@1 {100 * out['r@1']:.1f}  R@5 {100 * out['r@5']:.1f}  R@10 {100 * out['r@10']:.1f}  "
        f"MRR {100 * out['mrr']:.1f}  ({out['n_queries']} queries, {out['n_passages']} passages; "
        f"index {t_index:.1f}s, search {t_search:.1f}s)"
    )
    return 0


# --------------------------------------------------------------------------- part 2: answer


def load_items(data: str, docs: str | None, extra_docs: list[str], corpus):
    """(items, passages) of a MD2D dial file or an instruction jsonl, for eval and training."""
    from lmsmith.data.md2d import load_docs
    from lmsmith.dialog import corpus as K
    from lmsmith.dialog.pipeline import instruct_items, md2d_items

    if not data:
        raise UserError("needs --data FILE (MD2D dial file or instruction jsonl)")
    kind = K.sniff(data)
    if kind == "md2d-dials":
        doc_file = docs or str(Path(data).with_name("multidoc2dial_doc.json"))
        if not Path(doc_file).is_file():
            raise UserError(f"MultiDoc2Dial documents not found at '{doc_file}'; pass --docs FILE")
        passages = K.segment(
            list(load_docs(doc_file).values()), corpus.segmentation, corpus.size, corpus.stride
        )
        return md2d_items(data, doc_file, passages), passages
    if kind == "instruct":
        return instruct_items(data), K.instruct_set([data], list(extra_docs)).passages
    raise UserError(f"{data}: needs a MD2D dial file or an instruction jsonl (got {kind})")


def _prompt_kw(gen) -> dict:
    return {"passage_words": gen.passage_words, "max_history": gen.max_turns}


def build_pipeline(retriever, gen, grounding, k: int):
    """A :class:`Pipeline` from the shared ``gen`` / ``grounding`` config blocks."""
    from lmsmith.dialog.generate import load_generator
    from lmsmith.dialog.ground import ExtractiveReader
    from lmsmith.dialog.pipeline import Pipeline

    model, tok, seq2seq = load_generator(gen.generator)
    reader = None
    if grounding.grounder == "reader":
        reader = ExtractiveReader.load(
            grounding.reader, grounding.reader_max_length, grounding.max_answer_tokens
        )
    return Pipeline(
        retriever,
        model,
        tok,
        grounder=grounding.grounder,
        reader=reader,
        k=k,
        seq2seq=seq2seq,
        max_new_tokens=gen.max_new_tokens,
        max_prompt_tokens=gen.max_prompt_tokens,
        batch_size=gen.gen_batch_size,
        prompt_kw=_prompt_kw(gen),
    )


def _history(turns: list[str]) -> list[tuple[str, str]]:
    """Oldest-first alternating user/agent turns → (role, text) most recent first."""
    roles = ["user", "agent"]
    return list(reversed([(roles[i % 2], t) for i, t in enumerate(turns)]))


def cmd_answer(argv: list[str]) -> int:
    from lmsmith.dialog.config import AnswerConfig
    from lmsmith.dialog.retrieve import load_index
    from lmsmith.runs import write_json

    cfg = _parse(
        AnswerConfig, argv, 'usage: lmsmith dialog answer --index DIR --query "..." [--k 3]'
    )
    if cfg is None:
        return 0
    if not cfg.index or not cfg.query.strip():
        raise UserError("answer needs --index DIR and --query TEXT")
    pipe = build_pipeline(load_index(cfg.index), cfg.gen, cfg.grounding, cfg.k)
    out = pipe.answer(cfg.query, _history(cfg.history))
    print(out["reply"])
    if out["grounding"]:
        print(f"\ngrounding [{out['grounding']['passage_id']}]: {out['grounding']['text']}")
    for i, c in enumerate(out["citations"], start=1):
        text = " ".join(c["text"].split())
        print(f"[{i}] {c['passage_id']} ({c['score']:.3f}) {text[:160]}")
    if cfg.json:
        write_json(cfg.json, out)
    return 0


def cmd_eval(argv: list[str]) -> int:
    from lmsmith.dialog.config import DialogEvalConfig
    from lmsmith.dialog.pipeline import evaluate
    from lmsmith.dialog.retrieve import build_retriever, load_index
    from lmsmith.runs import make_run_dir, write_json, write_jsonl

    cfg = _parse(
        DialogEvalConfig,
        argv,
        "usage: lmsmith dialog eval --data FILE [--retriever bm25|dense|hybrid|rerank | "
        "--no-retrieval] [--grounder reader|sentence|lm|none] [--generator MODEL]",
    )
    if cfg is None:
        return 0
    items, passages = load_items(cfg.data, cfg.docs, cfg.extra_docs, cfg.corpus)
    if cfg.limit is not None:
        items = items[: cfg.limit]
    if not items:
        raise UserError(f"{cfg.data}: no turn to evaluate")
    if cfg.no_retrieval:
        r = None
    elif cfg.index:
        r = load_index(cfg.index)
    else:
        r = build_retriever(cfg.retriever, cfg.settings)
        r.index(passages, progress=cfg.progress)
    pipe = build_pipeline(r, cfg.gen, cfg.grounding, cfg.k)
    m, rows = evaluate(pipe, items, cfg.progress)
    m.update(
        data=cfg.data,
        retriever="none" if r is None else r.kind,
        grounder=cfg.grounding.grounder,
        generator=cfg.gen.generator,
        k=cfg.k,
    )
    if cfg.json:
        write_json(cfg.json, m)
    if cfg.run_dir:
        run = make_run_dir(cfg.run_dir, "dialog-eval")
        write_json(run / "config.json", C.to_dict(cfg))
        write_json(run / "metrics.json", m)
        write_jsonl(run / "predictions.jsonl", rows)
    g = (
        f"grounding EM {m['grounding_em']:.1f} F1 {m['grounding_f1']:.1f}  "
        if "grounding_f1" in m
        else ""
    )
    print(
        f"{m['retriever']} + {m['grounder']} + {m['generator']}: {g}reply F1 {m['reply_f1']:.1f} "
        f"SacreBLEU {m['reply_sacrebleu']:.1f} ROUGE-L {m['reply_rougeL']:.1f} "
        f"(sum without METEOR {m['reply_sum_no_meteor']:.1f}; {m['n']} turns, {m['wall_time_s']}s)"
    )
    return 0


def _training_examples(items):
    """DialogExamples with the gold passages and grounding / reply targets."""
    from lmsmith.dialog.generate import DialogExample
    from lmsmith.dialog.ground import passage_body, target_span

    out = []
    for it in items:
        span = ""
        for p in it.gold_passages:
            body, _ = passage_body(p.text)
            se = target_span(body, it.grounding_refs[0])
            if se is not None:
                span = body[se[0] : se[1]]
                break
        out.append(
            DialogExample(
                it.current,
                list(it.history),
                list(it.gold_passages),
                grounding=span,
                reply=it.reply_refs[0],
                target_grounding=span,
            )
        )
    return out


def _save_model_dir(model, tokenizer, output: str, extra: dict) -> None:
    """save_pretrained into a temporary sibling, then rename into place."""
    import shutil

    from lmsmith.runs import atomic_dir, write_json

    final = Path(output)
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (final / "metrics.jsonl").is_file():
            shutil.copy(final / "metrics.jsonl", tmp / "metrics.jsonl")
        write_json(tmp / "summary.json", extra)


def cmd_train_generator(argv: list[str]) -> int:
    from lmsmith.dialog.config import TrainGeneratorConfig
    from lmsmith.dialog.generate import load_generator, train_generator
    from lmsmith.runs import MetricsSink

    cfg = _parse(
        TrainGeneratorConfig,
        argv,
        "usage: lmsmith dialog train-generator --data FILE --output DIR [--multitask] [--steps N]",
    )
    if cfg is None:
        return 0
    if not cfg.output:
        raise UserError("train-generator needs --output DIR")
    items, _ = load_items(cfg.data, cfg.docs, [], cfg.corpus)
    items = items[: cfg.limit] if cfg.limit else items
    model, tok, seq2seq = load_generator(cfg.gen.generator)
    if seq2seq:
        raise UserError("train-generator fine-tunes causal LMs; seq2seq models load for eval only")
    sink = MetricsSink(Path(cfg.output) / "metrics.jsonl")
    merged, s = train_generator(
        model,
        tok,
        _training_examples(items),
        multitask=cfg.multitask,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        lora_rank=cfg.lora_rank,
        max_prompt_tokens=cfg.gen.max_prompt_tokens,
        max_total_tokens=cfg.max_total_tokens,
        seed=cfg.seed,
        progress=cfg.progress,
        sink=sink,
        prompt_kw=_prompt_kw(cfg.gen),
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    s.update(base=cfg.gen.generator, data=cfg.data, config=C.to_dict(cfg))
    _save_model_dir(merged, tok, cfg.output, s)
    print(
        f"trained {'multi-task' if cfg.multitask else 'reply-only'} LoRA on {s['n_pairs']} "
        f"sequences, {s['steps']} steps in {s['train_time_s']}s; loss (first/last 10 steps) "
        f"{s['mean_loss_first_10']:.3f} → {s['mean_loss_last_10']:.3f}\nmodel: {cfg.output}"
    )
    return 0


def cmd_train_reader(argv: list[str]) -> int:
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from lmsmith.dialog.config import TrainReaderConfig
    from lmsmith.dialog.ground import ExtractiveReader, ReaderExample, passage_body, target_span
    from lmsmith.models import resolve
    from lmsmith.runs import MetricsSink

    cfg = _parse(
        TrainReaderConfig,
        argv,
        "usage: lmsmith dialog train-reader --data FILE --output DIR [--init minilm-l6]",
    )
    if cfg is None:
        return 0
    if not cfg.output:
        raise UserError("train-reader needs --output DIR")
    items, _ = load_items(cfg.data, cfg.docs, [], cfg.corpus)
    items = items[: cfg.limit] if cfg.limit else items
    examples = []
    for it in items:
        for p in it.gold_passages:
            body, _ = passage_body(p.text)
            examples.append(
                ReaderExample(it.current, body, target_span(body, it.grounding_refs[0]))
            )
    path = resolve(cfg.init)
    reader = ExtractiveReader(
        AutoModelForQuestionAnswering.from_pretrained(path, num_labels=2),
        AutoTokenizer.from_pretrained(path),
        cfg.max_length,
    )
    from lmsmith.dialog.ground import train_reader

    sink = MetricsSink(Path(cfg.output) / "metrics.jsonl")
    s = train_reader(
        reader, examples, cfg.epochs, cfg.batch_size, cfg.lr, cfg.seed, cfg.progress, sink
    )
    s.update(init=cfg.init, data=cfg.data, config=C.to_dict(cfg))
    _save_model_dir(reader.model, reader.tokenizer, cfg.output, s)
    print(
        f"trained reader on {s['n_examples']} passages, {s['steps']} steps in "
        f"{s['train_time_s']}s; loss {s['first_loss']:.3f} → {s['last_loss']:.3f}\n"
        f"model: {cfg.output}"
    )
    return 0


def cmd_serve(argv: list[str]) -> int:
    from lmsmith.dialog.config import ServeConfig
    from lmsmith.dialog.retrieve import load_index
    from lmsmith.dialog.serve import make_server

    cfg = _parse(
        ServeConfig, argv, "usage: lmsmith dialog serve --index DIR [--port 8000] [--host H]"
    )
    if cfg is None:
        return 0
    if not cfg.index:
        raise UserError("serve needs --index DIR (build one with `lmsmith dialog index`)")
    pipe = build_pipeline(load_index(cfg.index), cfg.gen, cfg.grounding, cfg.k)
    server = make_server(pipe, cfg)
    host, port = server.server_address[:2]
    print(
        f"serving {len(pipe.retriever.passages)} passages on http://{host}:{port}/ (Ctrl-C stops)",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


SUBCOMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "index": (cmd_index, "build a retriever index over documents (folder, MD2D doc file, ...)"),
    "search": (cmd_search, "query an index and print the top passages"),
    "train-retriever": (cmd_train_retriever, "fine-tune a DPR-style bi-encoder or a cross-encoder"),
    "eval-retrieval": (cmd_eval_retrieval, "R@1/5/10 and MRR of a retriever on a query set"),
    "train-reader": (cmd_train_reader, "fine-tune an extractive grounding reader (start/end)"),
    "train-generator": (cmd_train_generator, "LoRA-tune the reply LM (optionally multi-task)"),
    "answer": (cmd_answer, "retrieve, ground and generate a reply to one message"),
    "eval": (cmd_eval, "grounding EM/F1 and reply F1/SacreBLEU/ROUGE-L of the pipeline"),
    "serve": (cmd_serve, "HTTP JSON API + web page to chat over an index"),
}


def main(argv: list[str]) -> int:
    lines = "\n".join(f"  {name:<16}{help_}" for name, (_, help_) in SUBCOMMANDS.items())
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(lines=lines))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        raise UserError(
            f"unknown dialog subcommand '{name}'; choose one of {', '.join(SUBCOMMANDS)}"
        )
    return SUBCOMMANDS[name][0](rest)
