"""CRISPR end to end: setup → evaluate → attribute → search n → prune → evaluate → save.

One function per ``lmsmith debias`` command, each writing a run folder and returning what the
CLI prints: :func:`attribute`, :func:`prune`, :func:`evaluate`, and :func:`run_pipeline`, which
calls every step, plus the baselines (CC, DC, random units) and the retention check, and writes
``summary.json``.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from lmsmith import config
from lmsmith.data import shared_data_dir
from lmsmith.data.bbq import BBQExample, load_bbq, split_dev_test, subsample
from lmsmith.debias.attribution import AttributionResult, candidate_layers, rank_units
from lmsmith.debias.attribution import attribute as attribute_units
from lmsmith.debias.calibrate import calibrate, cc_prior, dc_prior
from lmsmith.debias.config import DebiasConfig
from lmsmith.debias.prompts import INSTRUCTIONS
from lmsmith.debias.prune import (
    Pruner,
    golden_section_search,
    random_units,
    save_pruned,
    units_record,
)
from lmsmith.debias.scoring import bbq_metrics, generate_bbq, score_bbq
from lmsmith.errors import UserError
from lmsmith.runs import MetricsSink, prepare_output, write_json

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("accuracy", "accuracy_ambig", "accuracy_disambig", "bias_ambig", "bias_disambig")


def load_model(spec: str):
    """A causal LM or an encoder-decoder (T5, BART...) and its tokenizer, in eval mode."""
    from lmsmith.models import load_causal_or_seq2seq

    model, tok, _ = load_causal_or_seq2seq(spec)
    return model, tok


def load_split(cfg: DebiasConfig) -> tuple[list[BBQExample], list[BBQExample]]:
    """(dev, test-to-score): the template-disjoint split, test subsampled to ``test_limit``."""
    rows = load_bbq(cfg.data, cfg.categories or None)
    dev, test = split_dev_test(rows, cfg.split.dev_frac, cfg.split.split_seed)
    scored = subsample(test, cfg.split.test_limit, cfg.split.split_seed)
    log.info("%d rows: %d dev, %d test (%d scored)", len(rows), len(dev), len(test), len(scored))
    return dev, scored


def instructions(k: int) -> list[str]:
    return list(INSTRUCTIONS[:k])


@dataclass
class Scored:
    metrics: dict
    preds: torch.Tensor  # (N, I)
    logscores: torch.Tensor | None  # (N, I, 3); None in generate mode


def evaluate_model(model, tok, rows, cfg: DebiasConfig, n_instr: int, desc="evaluate") -> Scored:
    ins = instructions(n_instr)
    t0 = time.perf_counter()
    if cfg.prompt.mode == "generate":
        preds, _ = generate_bbq(model, tok, rows, ins, cfg.prompt, cfg.progress)
        logs = None
    else:
        logs = score_bbq(model, tok, rows, ins, cfg.prompt, cfg.progress, desc)
        preds = logs.argmax(-1)
    m = bbq_metrics(rows, preds)
    m["wall_time_s"] = time.perf_counter() - t0
    return Scored(m, preds, logs)


def save_attribution(res: AttributionResult, run: Path, top: int = 500) -> None:
    from safetensors.torch import save_file

    tensors = {f"score/{k}": v.contiguous() for k, v in res.scores.items()}
    tensors |= {f"bias/{k}": v.contiguous() for k, v in res.bias.items()}
    tensors |= {f"skill/{k}": v.contiguous() for k, v in res.skill.items()}
    tmp = run / ".attribution.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"n_samples": str(res.n_samples)})
    tmp.replace(run / "attribution.safetensors")
    write_json(run / "top_units.json", units_record(rank_units(res.scores, top), top))


def scores_file(path: str) -> Path:
    """The attribution file ``path`` names (a file, or a run folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "attribution.safetensors"
    if not p.is_file():
        raise UserError(f"scores file '{path}' does not exist (run `lmsmith debias attribute`)")
    return p


def load_scores(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = scores_file(path)
    try:
        raw = load_file(str(p))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{p}: not a readable safetensors file ({e})") from None
    scores = {k[len("score/") :]: v for k, v in raw.items() if k.startswith("score/")}
    if not scores:
        raise UserError(f"{p}: holds no 'score/' tensors (not written by lmsmith debias)")
    return scores


def run_attribution(model, tok, dev, cfg: DebiasConfig) -> AttributionResult:
    a = cfg.attribution
    ins = instructions(a.attr_instructions)
    res = attribute_units(model, tok, dev, ins, a, cfg.prompt, cfg.progress)
    log.info("attribution over %d samples, mean α %.3f", res.n_samples, res.mean_alpha)
    return res


def check_scores(model, scores: dict[str, torch.Tensor]) -> None:
    layers = candidate_layers(model)
    unknown = [k for k in scores if k not in layers]
    if unknown:
        raise UserError(
            f"the scores name layers this model lacks (e.g. {unknown[0]!r}): "
            "were they computed for another model?"
        )


def search_n(
    model, tok, ranked, dev, cfg: DebiasConfig, sink: MetricsSink | None = None
) -> tuple[int, list[tuple[int, float]]]:
    """Golden-section search of n on dev accuracy; the model is left unpruned."""
    rows = subsample(dev, cfg.split.search_rows, cfg.split.split_seed + 1)
    pruner = Pruner(model)
    hi = min(cfg.prune.search_max, len(ranked))

    def dev_accuracy(n: int) -> float:
        pruner.set([(m, i) for m, i, _ in ranked[:n]])
        s = evaluate_model(model, tok, rows, cfg, cfg.prune.search_instructions, f"search n={n}")
        pruner.restore()
        acc = s.metrics["accuracy"]
        log.info("search: n=%d dev accuracy %.2f", n, acc)
        if sink:
            sink.log(
                step="search", n=n, dev_accuracy=acc, **{k: s.metrics[k] for k in SUMMARY_KEYS}
            )
        return acc

    best, history = golden_section_search(
        dev_accuracy, 0, hi, cfg.prune.search_tol, cfg.prune.max_evals
    )
    return best, history


def unit_histogram(units: list[dict]) -> dict[str, dict[str, int]]:
    """Counts of pruned units by layer index and by module type (the name's last part)."""
    by_layer: Counter = Counter()
    by_type: Counter = Counter()
    for u in units:
        m = re.search(r"\.(\d+)\.", "." + u["module"] + ".")
        by_layer[m.group(1) if m else "other"] += 1
        by_type[u["module"].split(".")[-1]] += 1
    key = lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0)  # noqa: E731
    return {
        "by_layer": dict(sorted(by_layer.items(), key=key)),
        "by_module": dict(by_type.most_common()),
    }


def plot_histogram(hist: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, (key, label) in zip(axes, (("by_layer", "layer"), ("by_module", "module"))):
        d = hist[key]
        ax.bar(list(d), list(d.values()))
        ax.set_xlabel(label)
        ax.set_ylabel("pruned units")
        ax.tick_params(axis="x", rotation=90 if len(d) > 12 else 0, labelsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def retention(model, tok, cfg: DebiasConfig) -> dict | None:
    """Greedy ROUGE-L on instruction rows the pruning never saw."""
    r = cfg.retention
    if r.retention_rows == 0:
        return None
    from lmsmith.data.instruct import load_instruct
    from lmsmith.evaluate import EvalConfig, evaluate_rows

    path = r.retention_data
    if not path:
        base = shared_data_dir()
        if base is None:
            raise UserError("retention check needs --retention-data FILE (no ../shared/data)")
        path = str(base / "instruct/dolly/valid.jsonl")
    rows = load_instruct(path, limit=r.retention_rows)
    ecfg = EvalConfig(
        model=cfg.model,
        data=path,
        greedy=True,
        max_new_tokens=r.retention_tokens,
        chat_template=bool(getattr(tok, "chat_template", None)),
        progress=cfg.progress,
    )
    metrics, _ = evaluate_rows(model, tok, rows, ecfg)
    return {"rougeL": metrics["rougeL_mean"], "n_rows": len(rows), "data": path}


def format_table(results: dict[str, dict]) -> str:
    """A Markdown table of methods × metrics."""
    cols = [
        ("accuracy", "acc"),
        ("accuracy_ambig", "acc amb"),
        ("accuracy_disambig", "acc dis"),
        ("bias_ambig", "s_AMB"),
        ("bias_disambig", "s_DIS"),
        ("accuracy_std", "std(acc) over instr."),
        ("unknown_rate", "answers 'unknown' %"),
    ]
    lines = [
        "| method | " + " | ".join(c[1] for c in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name, m in results.items():
        vals = [m.get(k, float("nan")) for k, _ in cols]
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    return "\n".join(lines)


def calibrated(logs: torch.Tensor, prior: torch.Tensor, rows) -> dict:
    """BBQ metrics of the option scores ``logs`` (N, I, 3) calibrated by ``prior``."""
    preds = calibrate(logs, prior).argmax(-1)
    return bbq_metrics(rows, preds)


def _start(cfg: DebiasConfig, command: str):
    """(dev, test, model, tokenizer, checked output folder) of one command: the output folder
    and the scores file are checked before the data and the model load."""
    out = prepare_output(cfg.output_dir, command, cfg.overwrite)
    if cfg.scores and command in ("debias prune", "debias run"):
        scores_file(cfg.scores)
    dev, test = load_split(cfg)
    model, tok = load_model(cfg.model)
    return dev, test, model, tok, out


def _scores(model, tok, dev, cfg: DebiasConfig, run: Path) -> dict[str, torch.Tensor]:
    """The attribution scores: loaded from ``cfg.scores``, else computed (and saved in run)."""
    if cfg.scores:
        scores = load_scores(cfg.scores)
        check_scores(model, scores)
        return scores
    res = run_attribution(model, tok, dev, cfg)
    save_attribution(res, run)
    return res.scores


def _choose_n(model, tok, ranked, dev, cfg: DebiasConfig, sink) -> tuple[int, list]:
    """``cfg.prune.n`` if set, else the golden-section search's choice (and its history)."""
    if cfg.prune.n is not None:
        return min(cfg.prune.n, len(ranked)), []
    return search_n(model, tok, ranked, dev, cfg, sink)


def attribute(cfg: DebiasConfig) -> dict:
    """``lmsmith debias attribute``: score every unit on sampled dev rows; the summary
    (also in summary.json) plus ``run_dir``."""
    t0 = time.perf_counter()
    dev, _, model, tok, out = _start(cfg, "debias attribute")
    with out.writing(config.to_dict(cfg)) as run:
        res = run_attribution(model, tok, dev, cfg)
        save_attribution(res, run)
        summary = {
            "n_samples": res.n_samples,
            "mean_alpha": res.mean_alpha,
            "n_units": sum(v.numel() for v in res.scores.values()),
            "top10": [
                {"module": m, "index": i, "score": s} for m, i, s in rank_units(res.scores, 10)
            ],
            "wall_time_s": time.perf_counter() - t0,
        }
        write_json(run / "summary.json", summary)
        return {**summary, "run_dir": str(run)}


def prune(cfg: DebiasConfig) -> dict:
    """``lmsmith debias prune``: choose n, prune, save the model; the summary plus
    ``model_dir`` and ``run_dir``."""
    dev, _, model, tok, out = _start(cfg, "debias prune")
    with out.writing(config.to_dict(cfg)) as run:
        scores = _scores(model, tok, dev, cfg, run)
        ranked = rank_units(scores, top=max(cfg.prune.search_max, cfg.prune.n or 0))
        n, history = _choose_n(model, tok, ranked, dev, cfg, MetricsSink(run / "metrics.jsonl"))
        units = units_record(ranked, n)
        Pruner(model).apply([(u["module"], u["index"]) for u in units])
        write_json(run / "pruned_units.json", units)
        save_pruned(model, tok, units, run / "model")
        summary = {"n_pruned": n, "search": [{"n": a, "dev_accuracy": b} for a, b in history]}
        write_json(run / "summary.json", summary)
        return {**summary, "model_dir": str(run / "model"), "run_dir": str(run)}


def evaluate(cfg: DebiasConfig) -> dict:
    """``lmsmith debias eval``: BBQ metrics of the model on the test split, plus the CC / DC
    baselines named in ``cfg.baselines.methods``; {"results", "n_test_rows_scored",
    "instructions_per_row", "run_dir"}."""
    _, test, model, tok, out = _start(cfg, "debias eval")
    with out.writing(config.to_dict(cfg)) as run:
        k = cfg.prompt.eval_instructions
        s = evaluate_model(model, tok, test, cfg, k, "test")
        results = {cfg.model: s.metrics}
        if "cc" in cfg.baselines.methods:
            prior = cc_prior(
                model, tok, test, instructions(k), cfg.prompt, cfg.baselines.content_free,
                cfg.progress,
            )  # fmt: skip
            results["CC"] = calibrated(s.logscores, prior, test)
        if "dc" in cfg.baselines.methods:
            prior = dc_prior(
                model, tok, test, instructions(k), cfg.prompt, cfg.baselines.dc_draws,
                cfg.split.split_seed, cfg.progress,
            )  # fmt: skip
            results["DC"] = calibrated(s.logscores, prior, test)
        write_json(run / "metrics.json", results)
        write_json(run / "summary.json", {key: s.metrics[key] for key in SUMMARY_KEYS})
        return {
            "results": results,
            "n_test_rows_scored": len(test),
            "instructions_per_row": k,
            "run_dir": str(run),
        }


def run_pipeline(cfg: DebiasConfig) -> dict:
    """The whole pipeline; returns the summary (also written to the run folder)."""
    t0 = time.perf_counter()
    dev, test, model, tok, out = _start(cfg, "debias run")
    with out.writing(config.to_dict(cfg)) as run:
        sink = MetricsSink(run / "metrics.jsonl")
        k_eval = cfg.prompt.eval_instructions
        log.info("run folder %s", run)

        before = evaluate_model(model, tok, test, cfg, k_eval, "test: original")
        sink.log(step="before", **before.metrics)
        results: dict[str, dict] = {"original": before.metrics}
        methods = cfg.baselines.methods
        if "cc" in methods:
            prior = cc_prior(
                model, tok, test, instructions(k_eval), cfg.prompt, cfg.baselines.content_free,
                cfg.progress,
            )  # fmt: skip
            results["CC"] = calibrated(before.logscores, prior, test)
            sink.log(step="cc", **results["CC"])
        if "dc" in methods:
            prior = dc_prior(
                model, tok, test, instructions(k_eval), cfg.prompt, cfg.baselines.dc_draws,
                cfg.split.split_seed, cfg.progress,
            )  # fmt: skip
            results["DC"] = calibrated(before.logscores, prior, test)
            sink.log(step="dc", **results["DC"])
        keep_before = retention(model, tok, cfg)

        scores = _scores(model, tok, dev, cfg, run)
        ranked = rank_units(scores, top=max(cfg.prune.search_max, cfg.prune.n or 0))
        n, history = _choose_n(model, tok, ranked, dev, cfg, sink)
        write_json(run / "search.json", [{"n": a, "dev_accuracy": b} for a, b in history])

        pruner = Pruner(model)
        if "random" in methods:
            layers = candidate_layers(model)
            rand_runs = []
            for seed in cfg.baselines.random_seeds:
                pruner.set(random_units(layers, n, seed))
                s = evaluate_model(model, tok, test, cfg, k_eval, f"test: random seed {seed}")
                rand_runs.append(s.metrics)
                pruner.restore()
            results["random units"] = _mean_metrics(rand_runs)
            sink.log(step="random", **results["random units"])

        units = units_record(ranked, n)
        pruner.set([(u["module"], u["index"]) for u in units])
        after = evaluate_model(model, tok, test, cfg, k_eval, "test: CRISPR")
        results["CRISPR"] = after.metrics
        sink.log(step="after", n_pruned=n, **after.metrics)
        keep_after = retention(model, tok, cfg)
        write_json(run / "pruned_units.json", units)
        save_pruned(model, tok, units, run / "model")
        hist = unit_histogram(units)
        if units:
            plot_histogram(hist, run / "pruned_units.png", f"{n} pruned units: {cfg.model}")

        summary = {
            "model": cfg.model,
            "data": cfg.data,
            "categories": sorted({r.category for r in test}),
            "n_dev_rows": len(dev),
            "n_test_rows_scored": len(test),
            "instructions_per_row": k_eval,
            "n_pruned": n,
            "before": {
                k: before.metrics[k] for k in (*SUMMARY_KEYS, "accuracy_std", "unknown_rate")
            },
            "after": {k: after.metrics[k] for k in (*SUMMARY_KEYS, "accuracy_std", "unknown_rate")},
            "baselines": {k: v for k, v in results.items() if k not in ("original", "CRISPR")},
            "retention_rougeL": (
                {
                    "before": keep_before["rougeL"],
                    "after": keep_after["rougeL"],
                    **_drop(keep_before),
                }
                if keep_before
                else None
            ),
            "search": [{"n": a, "dev_accuracy": b} for a, b in history],
            "pruned_histogram": hist,
            "wall_time_s": time.perf_counter() - t0,
            "run_dir": str(run),
        }
        write_json(run / "results.json", results)
        write_json(run / "summary.json", summary)
        summary["table"] = format_table(results)
        return summary


def _drop(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "rougeL"}


def _mean_metrics(runs: list[dict]) -> dict:
    out = {}
    for k, v in runs[0].items():
        if isinstance(v, (int, float)):
            out[k] = sum(r[k] for r in runs) / len(runs)
    out["n_seeds"] = len(runs)
    return out
