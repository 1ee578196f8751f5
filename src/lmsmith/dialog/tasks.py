"""One function per ``lmsmith dialog`` command: read what the config names, call the library,
write the outputs, return what the CLI prints.

``index`` · ``search`` · ``eval_retrieval`` · ``train_retriever`` · ``train_reader`` ·
``train_generator`` · ``answer`` · ``evaluate`` · ``serve`` (returns a bound server).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from lmsmith import config
from lmsmith.dialog.config import (
    AnswerConfig,
    DialogEvalConfig,
    EvalRetrievalConfig,
    IndexConfig,
    SearchConfig,
    ServeConfig,
    TrainGeneratorConfig,
    TrainReaderConfig,
    TrainRetrieverConfig,
)
from lmsmith.dialog.corpus import docs_passages, load_set
from lmsmith.dialog.pipeline import (
    build_pipeline,
    history_pairs,
    load_items,
    prompt_kw,
    reader_examples,
    training_examples,
)
from lmsmith.errors import UserError
from lmsmith.runs import (
    MetricsSink,
    atomic_dir,
    check_output_file,
    check_writable,
    prepare_output,
    write_json,
    write_jsonl,
)


def is_index(folder) -> bool:
    """Whether ``folder`` holds an index written by ``lmsmith dialog index``."""
    folder = Path(folder)
    return (folder / "meta.json").is_file() and (folder / "passages.jsonl").is_file()


def check_index_output(output, overwrite: bool = False) -> None:
    """``dialog index --out``: a new or empty folder, or an index to replace; never a file,
    never a folder of something else (unless ``overwrite``)."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file, not an index folder; choose another path")
    check_writable(out)
    if out.is_dir() and any(out.iterdir()) and not is_index(out) and not overwrite:
        raise UserError(
            f"--out '{out}' exists and is not an lmsmith index (no meta.json); choose another "
            "folder, or pass --overwrite to replace its contents"
        )


def open_index(folder):
    """:func:`~lmsmith.dialog.retrieve.load_index`, with a damaged folder reported in one line."""
    from lmsmith.dialog.retrieve import load_index

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"index '{folder}' does not exist; build one with `lmsmith dialog index`")
    meta = folder / "meta.json"
    if meta.is_file():
        try:
            json.loads(meta.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise UserError(f"{meta}: damaged index metadata ({e}); rebuild the index") from None
    try:
        return load_index(folder)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(
            f"index '{folder}' is damaged ({type(e).__name__}: {why}); rebuild it with "
            "`lmsmith dialog index`"
        ) from None


def index(cfg: IndexConfig) -> dict:
    """Segment the documents, build the retriever, save it; a summary of what was done."""
    from lmsmith.dialog.retrieve import build_retriever

    c = cfg.corpus
    check_index_output(cfg.output, cfg.overwrite)
    passages = docs_passages(c.docs, c.segmentation, c.size, c.stride)
    r = build_retriever(cfg.retriever, cfg.settings)
    t0 = time.perf_counter()
    r.index(passages, progress=cfg.progress)
    r.save(cfg.output)
    return {
        "n_passages": len(passages),
        "retriever": cfg.retriever,
        "segmentation": c.segmentation,
        "time_s": time.perf_counter() - t0,
        "output": cfg.output,
    }


def search(cfg: SearchConfig) -> list:
    """The top-k hits of the query (also written to ``cfg.json``)."""
    check_output_file(cfg.json)
    hits = open_index(cfg.index).search(cfg.query, cfg.k)
    if cfg.json:
        write_json(
            cfg.json,
            [
                {"rank": i, "pid": h.pid, "score": h.score, "text": h.text}
                for i, h in enumerate(hits, 1)
            ],
        )
    return hits


def eval_retrieval(cfg: EvalRetrievalConfig) -> dict:
    """R@1/5/10 and MRR of a retriever (built, or loaded from ``cfg.index``) on a query set."""
    from lmsmith.dialog.retrieve import build_retriever
    from lmsmith.metrics.retrieval import first_relevant_rank, retrieval_metrics

    check_output_file(cfg.json)
    out_dir = (
        prepare_output(cfg.run_dir, "dialog eval-retrieval", cfg.overwrite) if cfg.run_dir else None
    )
    data = load_set(cfg.data, cfg.corpus, cfg.extra_docs)
    queries = [q for q in data.queries if q.relevant]
    if cfg.limit is not None:
        queries = queries[: cfg.limit]
    if not queries:
        raise UserError(f"{cfg.data}: no query with a gold passage")
    t0 = time.perf_counter()
    if cfg.index:
        r = open_index(cfg.index)
        known = {p.pid for p in r.passages}
        missing = sum(1 for q in queries if not set(q.relevant) & known)
        if missing:
            raise UserError(
                f"index '{cfg.index}' lacks the gold passages of {missing} queries "
                "(built from other documents?)"
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
    if out_dir is not None:
        with out_dir.writing(config.to_dict(cfg)) as run:
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
    return out


def train_retriever(cfg: TrainRetrieverConfig) -> dict:
    """Fine-tune a bi-encoder or a cross-encoder; the training summary."""
    from lmsmith.dialog.train import train_bi_encoder, train_cross_encoder

    out = (
        prepare_output(cfg.output, "dialog train-retriever", cfg.overwrite) if cfg.output else None
    )
    data = load_set(cfg.data, cfg.corpus)
    fn = train_bi_encoder if cfg.model == "bi-encoder" else train_cross_encoder
    summary = fn(cfg, data)  # writes the folder atomically (replacing what was checked above)
    if out is not None:
        out.finish()
    return summary


def answer(cfg: AnswerConfig) -> dict:
    """Retrieve, ground and generate a reply to one message (also written to ``cfg.json``)."""
    check_output_file(cfg.json)
    pipe = build_pipeline(open_index(cfg.index), cfg.gen, cfg.grounding, cfg.k)
    out = pipe.answer(cfg.query, history_pairs(cfg.history))
    if cfg.json:
        write_json(cfg.json, out)
    return out


def evaluate(cfg: DialogEvalConfig) -> dict:
    """Grounding and reply metrics of the pipeline on a set of turns."""
    from lmsmith.dialog.pipeline import evaluate as evaluate_pipeline
    from lmsmith.dialog.retrieve import build_retriever

    check_output_file(cfg.json)
    out_dir = prepare_output(cfg.run_dir, "dialog eval", cfg.overwrite) if cfg.run_dir else None
    items, passages = load_items(cfg.data, cfg.corpus, cfg.extra_docs)
    if cfg.limit is not None:
        items = items[: cfg.limit]
    if not items:
        raise UserError(f"{cfg.data}: no turn to evaluate")
    if cfg.no_retrieval:
        r = None
    elif cfg.index:
        r = open_index(cfg.index)
    else:
        r = build_retriever(cfg.retriever, cfg.settings)
        r.index(passages, progress=cfg.progress)
    pipe = build_pipeline(r, cfg.gen, cfg.grounding, cfg.k)
    m, rows = evaluate_pipeline(pipe, items, cfg.progress)
    m.update(
        data=cfg.data,
        retriever="none" if r is None else r.kind,
        grounder=cfg.grounding.grounder,
        generator="none (extract)" if cfg.gen.reply_mode == "extract" else cfg.gen.generator,
        reply_mode=cfg.gen.reply_mode,
        k=cfg.k,
    )
    if cfg.json:
        write_json(cfg.json, m)
    if out_dir is not None:
        with out_dir.writing(config.to_dict(cfg)) as run:
            write_json(run / "metrics.json", m)
            write_jsonl(run / "predictions.jsonl", rows)
    return m


def save_model_dir(model, tokenizer, output: str, extra: dict) -> None:
    """save_pretrained into a temporary sibling, then rename into place (metrics.jsonl and the
    run marker written during training are carried over)."""
    final = Path(output)
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name in ("metrics.jsonl", "run.json"):
            if (final / name).is_file():
                shutil.copy(final / name, tmp / name)
        write_json(tmp / "summary.json", extra)


def train_generator(cfg: TrainGeneratorConfig) -> dict:
    """LoRA-tune the reply LM (optionally multi-task), merge and save it; the summary."""
    from lmsmith.dialog.generate import load_generator
    from lmsmith.dialog.generate import train_generator as train

    out = prepare_output(cfg.output, "dialog train-generator", cfg.overwrite)
    items, _ = load_items(cfg.data, cfg.corpus)
    items = items[: cfg.limit] if cfg.limit else items
    model, tok, seq2seq = load_generator(cfg.gen.generator)
    if seq2seq:
        raise UserError("train-generator fine-tunes causal LMs; seq2seq models load for eval only")
    with out.writing():
        return _train_generator(cfg, model, tok, items, train)


def _train_generator(cfg: TrainGeneratorConfig, model, tok, items, train) -> dict:
    merged, s = train(
        model,
        tok,
        training_examples(items),
        multitask=cfg.multitask,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        lora_rank=cfg.lora_rank,
        max_prompt_tokens=cfg.gen.max_prompt_tokens,
        max_total_tokens=cfg.max_total_tokens,
        seed=cfg.seed,
        progress=cfg.progress,
        sink=MetricsSink(Path(cfg.output) / "metrics.jsonl"),
        prompt_kw=prompt_kw(cfg.gen),
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    s.update(base=cfg.gen.generator, data=cfg.data, config=config.to_dict(cfg))
    save_model_dir(merged, tok, cfg.output, s)
    return s


def train_reader(cfg: TrainReaderConfig) -> dict:
    """Fine-tune an extractive grounding reader from an encoder and save it; the summary."""
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from lmsmith.dialog.ground import ExtractiveReader
    from lmsmith.dialog.ground import train_reader as train
    from lmsmith.models import resolve

    out = prepare_output(cfg.output, "dialog train-reader", cfg.overwrite)
    items, _ = load_items(cfg.data, cfg.corpus)
    items = items[: cfg.limit] if cfg.limit else items
    path = resolve(cfg.init)
    reader = ExtractiveReader(
        AutoModelForQuestionAnswering.from_pretrained(path, num_labels=2),
        AutoTokenizer.from_pretrained(path),
        cfg.max_length,
    )
    with out.writing() as folder:
        s = train(
            reader,
            reader_examples(items),
            cfg.epochs,
            cfg.batch_size,
            cfg.lr,
            cfg.seed,
            cfg.progress,
            MetricsSink(folder / "metrics.jsonl"),
        )
        s.update(init=cfg.init, data=cfg.data, config=config.to_dict(cfg))
        save_model_dir(reader.model, reader.tokenizer, cfg.output, s)
    return s


def serve(cfg: ServeConfig):
    """A bound (not yet serving) FastAPI + uvicorn server over the index; ``server.pipeline``
    is its :class:`~lmsmith.dialog.pipeline.Pipeline`."""
    try:
        from lmsmith.dialog.serve import make_server
    except ImportError as e:
        raise UserError(
            f"serving needs the 'serve' extra: pip install 'lmsmith[serve]' ({e})"
        ) from None
    server = make_server(None, cfg)  # bind first: a port in use is reported before models load
    try:
        pipe = build_pipeline(open_index(cfg.index), cfg.gen, cfg.grounding, cfg.k)
    except BaseException:
        server.server_close()
        raise
    server.service.pipeline = server.pipeline = pipe
    return server
