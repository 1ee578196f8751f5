"""What ``lmsmith dialog <command>`` prints: one function per command, given its config and
the result of its :mod:`lmsmith.dialog.tasks` function (the table in :mod:`lmsmith.cli`)."""

from __future__ import annotations


def show_index(cfg, s: dict) -> None:
    print(
        f"indexed {s['n_passages']} passages ({s['retriever']}, {s['segmentation']}) "
        f"in {s['time_s']:.1f}s → {s['output']}"
    )


def show_search(cfg, hits: list) -> None:
    for i, h in enumerate(hits, start=1):
        text = " ".join(h.text.split())
        more = "..." if len(text) > 200 else ""
        print(f"{i:>2}. [{h.score:.4f}] {h.pid}\n    {text[:200]}{more}")


def show_eval_retrieval(cfg, out: dict) -> None:
    print(
        f"{out['retriever']}: R@1 {100 * out['r@1']:.1f}  R@5 {100 * out['r@5']:.1f}  "
        f"R@10 {100 * out['r@10']:.1f}  MRR {100 * out['mrr']:.1f}  "
        f"({out['n_queries']} queries, {out['n_passages']} passages; "
        f"index {out['index_time_s']:.1f}s, search {out['search_time_s']:.1f}s)"
    )


def show_train_retriever(cfg, s: dict) -> None:
    losses = ", ".join(f"{x:.4f}" for x in s["epoch_losses"])
    print(
        f"trained {s['model']} on {s['n_queries']} queries / {s['n_passages']} passages, "
        f"{s['steps']} steps in {s['train_time_s']}s; mean loss per epoch: {losses}\n"
        f"model: {cfg.output}"
    )


def show_answer(cfg, out: dict) -> None:
    print(out["reply"] + ("  [abstained: the documents do not answer]" if out["abstained"] else ""))
    if out["grounding"]:
        print(f"\ngrounding [{out['grounding']['passage_id']}]: {out['grounding']['text']}")
    for i, c in enumerate(out["citations"], start=1):
        text = " ".join(c["text"].split())
        print(f"[{i}] {c['passage_id']} ({c['score']:.3f}) {text[:160]}")


def show_eval(cfg, m: dict) -> None:
    g = (
        f"grounding EM {m['grounding_em']:.1f} F1 {m['grounding_f1']:.1f}  "
        if "grounding_f1" in m
        else ""
    )
    print(
        f"{m['retriever']} + {m['grounder']} + {m['generator']}: {g}reply F1 {m['reply_f1']:.1f} "
        f"SacreBLEU {m['reply_sacrebleu']:.1f} ROUGE-L {m['reply_rougeL']:.1f} "
        f"(sum without METEOR {m['reply_sum_no_meteor']:.1f}; {m['n']} turns, "
        f"{m['abstained_pct']:.1f}% abstained, {m['wall_time_s']}s)"
    )


def show_train_generator(cfg, s: dict) -> None:
    print(
        f"trained {'multi-task' if cfg.multitask else 'reply-only'} LoRA on {s['n_pairs']} "
        f"sequences, {s['steps']} steps in {s['train_time_s']}s; loss (first/last 10 steps) "
        f"{s['mean_loss_first_10']:.3f} → {s['mean_loss_last_10']:.3f}\nmodel: {cfg.output}"
    )


def show_train_reader(cfg, s: dict) -> None:
    print(
        f"trained reader on {s['n_examples']} passages, {s['steps']} steps in "
        f"{s['train_time_s']}s; loss {s['first_loss']:.3f} → {s['last_loss']:.3f}\n"
        f"model: {cfg.output}"
    )


def show_serve(cfg, server) -> None:
    """Print the address, then serve until Ctrl-C."""
    host, port = server.server_address[:2]
    n = len(server.pipeline.retriever.passages)
    print(
        f"serving {n} passages on http://{host}:{port}/ (API docs /docs; Ctrl-C stops)",
        flush=True,
    )
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.allowed_hosts:
        print(
            "note: only requests addressed to localhost are answered; name the host clients "
            "use with --allowed-hosts NAME",
            flush=True,
        )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
