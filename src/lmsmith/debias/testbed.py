"""A CRISPR testbed: fine-tune a small LM into a BBQ-style multiple-choice reader.

SmolLM2-135M answers disambiguated BBQ questions at chance and almost never says "unknown", so
it has no skill for CRISPR to protect and no bias worth the name to remove. This recipe teaches
it the *task* on BBQ categories that are never used to report CRISPR results (by default
Nationality and Physical_appearance), then ``lmsmith debias run --model <testbed>/model`` measures
and prunes its bias on the evaluated categories (Age, Disability_status).

Objective: the exact score ``lmsmith debias`` evaluates with. For each row, the three options'
summed log-probabilities after the chat prompt (one prompt encoding, options from its KV cache,
:func:`lmsmith.debias.scoring.option_logprobs_grad`) are the logits of a 3-way cross-entropy,
plus ``gold_nll`` x the gold option's per-token NLL so that the gold answer stays a likely
*generation*, not only the largest of three small numbers. Each row gets a random paraphrase of
the 12 instructions. Only the top ``train_layers`` decoder layers (and the final norm) train:
backward stops there, which is what makes a few hundred steps fit in CPU minutes.

setup → evaluate dev → train → evaluate dev → save (model/ written atomically).
"""

from __future__ import annotations

import logging
import math
import random
import time

import torch
from tqdm.auto import tqdm

from lmsmith import config
from lmsmith.data.bbq import load_bbq, split_dev_test, subsample_balanced
from lmsmith.debias.config import PromptConfig, TestbedConfig
from lmsmith.debias.prompts import INSTRUCTIONS, example_prompt, option_text, uses_chat
from lmsmith.debias.scoring import (
    bbq_metrics,
    encode,
    option_logprobs_grad,
    pad_id,
    score_bbq,
)
from lmsmith.errors import UserError
from lmsmith.runs import MetricsSink, atomic_dir, prepare_output, write_json

log = logging.getLogger(__name__)


def freeze_below(model, train_layers: int) -> int:
    """Freeze everything but the top ``train_layers`` decoder layers and the final norm
    (0 = train all). Returns the number of trainable parameters."""
    if train_layers > 0:
        layers = model.model.layers
        keep = {id(p) for layer in layers[-train_layers:] for p in layer.parameters()}
        keep |= {id(p) for p in model.model.norm.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def training_units(rows: list, pairs: bool) -> list[list]:
    """What a step draws from: single rows, or (with ``pairs``) the two question polarities of
    one context, which BBQ always writes together. In a disambiguated context the two answers
    differ, so a pair can only be solved by reading the question against the context."""
    if not pairs:
        return [[r] for r in rows]
    by_context: dict[tuple, list] = {}
    for r in rows:
        by_context.setdefault((r.category, r.context), []).append(r)
    units = []
    for group in by_context.values():
        neg = [r for r in group if r.negative]
        pos = [r for r in group if not r.negative]
        units += [[a, b] for a, b in zip(neg, pos)]
    return units


def dev_metrics(model, tok, rows, n_instr: int, progress: bool) -> dict:
    pcfg = PromptConfig(eval_instructions=n_instr, batch_size=8)
    logs = score_bbq(model, tok, rows, list(INSTRUCTIONS[:n_instr]), pcfg, progress, "dev")
    m = bbq_metrics(rows, logs.argmax(-1))
    return {k: v for k, v in m.items() if not isinstance(v, list)}


def run(cfg: TestbedConfig) -> dict:
    """Fine-tune, evaluate on the dev split of the training categories, save ``model/``."""
    from lmsmith.models import load_lm

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    if cfg.pairs and cfg.batch_size % 2:
        raise UserError(f"--batch-size {cfg.batch_size}: with --pairs true it must be even")
    out = prepare_output(cfg.output_dir, "debias testbed", cfg.overwrite)
    rows = load_bbq(cfg.data)
    dev, train = split_dev_test(rows, cfg.dev_frac, cfg.split_seed)  # template-disjoint
    dev_eval = subsample_balanced(dev, cfg.dev_rows, cfg.split_seed)
    units = training_units(train, cfg.pairs)
    if not units:
        raise UserError(f"{cfg.data}: no training rows with both question polarities (--pairs)")
    model, tok = load_lm(cfg.model)
    with out.writing(config.to_dict(cfg)) as run_dir:
        return _train(cfg, model, tok, rows, train, units, dev, dev_eval, run_dir, t0)


def _train(cfg, model, tok, rows, train, units, dev, dev_eval, run_dir, t0) -> dict:
    sink = MetricsSink(run_dir / "metrics.jsonl")
    log.info(
        "%d rows: %d train (%d units), %d dev (%d scored)",
        len(rows), len(train), len(units), len(dev), len(dev_eval),
    )  # fmt: skip

    model.eval()
    before = dev_metrics(model, tok, dev_eval, cfg.eval_instructions, cfg.progress)
    sink.log(step=0, split="dev", **before)
    n_trainable = freeze_below(model, cfg.train_layers)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / (cfg.warmup + 1)
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    chat = uses_chat(tok, True)
    pad = pad_id(tok)
    rng = random.Random(cfg.seed)
    order: list[int] = []
    model.train()
    losses: list[float] = []
    bar = tqdm(total=cfg.steps, desc="testbed", disable=not cfg.progress)
    for step in range(cfg.steps):
        per_unit = len(units[0])
        while len(order) * per_unit < cfg.batch_size:
            more = list(range(len(units)))
            rng.shuffle(more)
            order = more + order  # pop() takes from the end: what is left goes first
        batch = [r for _ in range(cfg.batch_size // per_unit) for r in units[order.pop()]]
        enc = []
        for r in batch:
            ins = rng.choice(INSTRUCTIONS)
            p = example_prompt(r, ins, tok, True)
            opts = [option_text(a, tok, True) for a in r.answers]
            enc.append(encode(tok, p, opts, False, chat, cfg.max_prompt_tokens))
        lp, n_tok = option_logprobs_grad(model, enc, pad, share_prefix=True)  # (B, 3)
        gold = torch.tensor([r.label for r in batch])
        ce = torch.nn.functional.cross_entropy(lp, gold)
        nll = -(lp.gather(1, gold[:, None])[:, 0] / n_tok.gather(1, gold[:, None])[:, 0]).mean()
        loss = ce + cfg.gold_nll * nll
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            recent = losses[-cfg.log_every :]
            sink.log(step=step + 1, loss=sum(recent) / len(recent), lr=sched.get_last_lr()[0],
                     elapsed_s=time.perf_counter() - t0)  # fmt: skip
            log.info("step %d loss %.4f", step + 1, sum(recent) / len(recent))
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            model.eval()
            mid = dev_metrics(model, tok, dev_eval, cfg.eval_instructions, False)
            sink.log(step=step + 1, split="dev", **mid)
            log.info(
                "step %d dev: accuracy %.1f, ambiguous %.1f, disambiguated %.1f",
                step + 1, mid["accuracy"], mid["accuracy_ambig"], mid["accuracy_disambig"],
            )  # fmt: skip
            model.train()
        bar.update(1)
    bar.close()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    after = dev_metrics(model, tok, dev_eval, cfg.eval_instructions, cfg.progress)
    sink.log(step=cfg.steps, split="dev", **after)
    with atomic_dir(run_dir / "model") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    summary = {
        "model": cfg.model,
        "data": cfg.data,
        "categories": sorted({r.category for r in rows}),
        "n_train_rows": len(train),
        "n_train_units": len(units),
        "pairs": cfg.pairs,
        "n_dev_rows": len(dev),
        "n_dev_rows_scored": len(dev_eval),
        "trainable_parameters": n_trainable,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "final_loss": sum(losses[-cfg.log_every :]) / len(losses[-cfg.log_every :]),
        "dev_before": before,
        "dev_after": after,
        "wall_time_s": time.perf_counter() - t0,
        "model_dir": str(run_dir / "model"),
        "run_dir": str(run_dir),
    }
    if not math.isfinite(summary["final_loss"]):
        log.warning("the testbed's training loss is not finite")
    write_json(run_dir / "summary.json", summary)
    return summary
