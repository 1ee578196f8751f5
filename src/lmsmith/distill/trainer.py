"""The distillation loop: setup → train (rollout → loss → step) → evaluate → save.

One class, read top to bottom. Every method is (who writes the sequences) × (which divergence);
``DistillConfig.policy`` and ``DistillConfig.divergence`` pick both from the method name.
Determinism: the rows of micro-batch i and the random numbers of its rollout are functions of
(seed, i) alone, so a resumed run sees exactly what an uninterrupted one would.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lmsmith import config as C
from lmsmith.data.instruct import (
    InstructExample,
    build_prompt,
    builtin_prompts,
    load_instruct,
    tokenize_prompt,
)
from lmsmith.distill.config import DistillConfig
from lmsmith.distill.losses import divergence, sequence_ce
from lmsmith.distill.rollout import AdaSwitchRule, SKDRule, SwitchRule, switch_rollout
from lmsmith.errors import DataError, UserError
from lmsmith.generation import (
    Noise,
    Rollout,
    generate,
    lean_supported,
    left_pad,
    prepare_weights,
    sample_rollout,
)
from lmsmith.metrics.rouge import rouge_l
from lmsmith.precision import hardware, resolve_precision, torch_dtype
from lmsmith.runs import MetricsSink, atomic_dir, prepare_output, write_json, write_jsonl

log = logging.getLogger(__name__)

POSITION_BUCKETS = [(0, 15), (16, 31), (32, 63), (64, 127), (128, 10**9)]

# What makes a checkpoint part of *this* run: --resume refuses a checkpoint whose recorded
# config differs in any of these (max_steps, lr, logging, eval and output settings may change).
RESUME_KEYS = (
    "model.teacher", "model.student", "model.lora_rank", "model.lora_alpha",
    "data.data", "data.limit", "data.max_prompt_tokens", "data.max_total_tokens",
    "data.chat_template", "data.long_prompts",
    "train.method", "train.divergence", "train.batch_size", "train.grad_accum", "train.seed",
)  # fmt: skip
_STEP = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^\.?step-\d+\.tmp-")  # a checkpoint write that was killed


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


@dataclass
class Example:
    prompt: list[int]  # prompt token ids (at most max_prompt_tokens)
    response: list[int]  # reference response ids + EOS (may be empty for reference-less rows)
    row: InstructExample


def position_bucket_name(lo: int, hi: int) -> str:
    return f"{lo}+" if hi >= 10**9 else f"{lo}-{hi}"


def share_by_position(teacher_wrote: torch.Tensor, mask: torch.Tensor) -> dict[str, float | None]:
    """Share of teacher-written tokens per response-position bucket. (B, N), (B, N) → dict."""
    out = {}
    for lo, hi in POSITION_BUCKETS:
        m = mask[:, lo : hi + 1]
        n = int(m.sum())
        out[position_bucket_name(lo, hi)] = (
            float(teacher_wrote[:, lo : hi + 1][m].sum()) / n if n else None
        )
    return out


class DistillTrainer:
    def __init__(self, cfg: DistillConfig, teacher=None, student=None, tokenizer=None):
        """Models may be passed in (tests, benchmarks); otherwise they load from the config."""
        self.cfg = cfg
        self._given = (teacher, student, tokenizer)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from accelerate import Accelerator

        cfg = self.cfg
        # the output folder and the checkpoint to resume are checked before any model loads
        self.out = prepare_output(
            cfg.train.output_dir, "distill", cfg.train.overwrite, cfg.train.resume, can_resume=True
        )
        self._resume_from = check_resume(self.out.path, cfg) if cfg.train.resume else []
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        # auto → bf16 only where the device computes it natively; the resolved value is what
        # config.json and summary.json record
        self.precision = resolve_precision(cfg.train.precision, self.device)
        cfg.train.precision = self.precision
        teacher, student, tok = self._given
        if teacher is None:
            from lmsmith.models import load_lm

            teacher, tok = load_lm(cfg.model.teacher)
        if student is None:
            from lmsmith.models import load_lm

            student, s_tok = load_lm(cfg.model.student, teacher=teacher)
            if s_tok is not None and len(s_tok) != len(tok):
                raise UserError(
                    f"teacher tokenizer has {len(tok)} tokens, student tokenizer {len(s_tok)}: "
                    "token-level distillation needs one tokenizer"
                )
        from lmsmith.models import check_same_vocab

        check_same_vocab(teacher, student)
        self.tok = tok
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        if cfg.model.lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            student = get_peft_model(
                student,
                LoraConfig(
                    r=cfg.model.lora_rank,
                    lora_alpha=cfg.model.lora_alpha,
                    target_modules="all-linear",
                    task_type="CAUSAL_LM",
                ),
            )
        self.examples = self._load_examples()
        self.eval_rows = (
            load_instruct(cfg.data.eval_data, limit=cfg.data.eval_limit)
            if cfg.data.eval_data
            else []
        )
        params = [p for p in student.parameters() if p.requires_grad]
        optim = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        sched = warmup_schedule(optim, cfg.train.warmup_steps)
        self.student, self.optim, self.sched = self.accelerator.prepare(student, optim, sched)
        self.step = 0
        # the probability that a sequence is student-written: GKD's fixed share, or DistiLLM's
        # adaptive one (starts at 0, raised when validation loss stalls)
        self.distillm_share = 0.0 if cfg.policy == "adaptive" else cfg.rollout.student_share
        self.best_val: float | None = None
        self.replay: list[tuple[list[int], list[int]]] = []
        self._teacher_weights = None  # the frozen teacher's lean-decoder weights, built once
        # the run folder only once models and data have loaded: a bad input leaves nothing behind
        self.run_dir = self.out.path
        if cfg.train.resume:
            self._load_checkpoint()
        self.out.create(C.to_dict(cfg))
        self.metrics = MetricsSink(self.run_dir / "metrics.jsonl", truncate=not cfg.train.resume)
        if cfg.train.resume:  # rows of steps after the checkpoint are logged again
            rows = _read_rows(self.metrics.path)
            write_jsonl(self.metrics.path, [r for r in rows if r.get("step", 0) <= self.step])

    def _load_examples(self) -> list[Example]:
        cfg = self.cfg.data
        rows = load_instruct(cfg.data, limit=cfg.limit) if cfg.data else builtin_prompts()
        need_refs = (
            self.cfg.policy in ("ground_truth", "mixed", "adaptive")
            or self.cfg.train.sft_weight > 0
        )
        out, skipped = [], 0
        for r in rows:
            text = build_prompt(r, self.tok, cfg.chat_template)
            full = self.tok(text, add_special_tokens=False)["input_ids"]
            if len(full) > cfg.max_prompt_tokens:
                if cfg.long_prompts == "error":
                    raise DataError(
                        r.source,
                        None,
                        "prompt",
                        f"{len(full)} tokens, over data.max_prompt_tokens={cfg.max_prompt_tokens} "
                        "(set data.long_prompts to skip or truncate)",
                    )
                if cfg.long_prompts == "skip":
                    skipped += 1
                    continue
            prompt, _ = tokenize_prompt(self.tok, text, cfg.max_prompt_tokens)
            if need_refs and not r.references:
                raise DataError(
                    r.source,
                    None,
                    "output",
                    f"method '{self.cfg.train.method}' trains on references; this row has none",
                )
            resp = []
            if r.references:
                room = cfg.max_total_tokens - len(prompt)
                resp = (
                    self.tok(r.references[0], add_special_tokens=False)["input_ids"] + [self.eos_id]
                )[:room]
            out.append(Example(prompt, resp, r))
        if skipped:
            log.warning(
                "skipped %d of %d rows whose prompt exceeds %d tokens",
                skipped,
                len(rows),
                cfg.max_prompt_tokens,
            )
        self.n_skipped = skipped
        if not out:
            raise UserError(
                f"no training rows left in {cfg.data or 'the built-in prompts'} "
                f"({skipped} prompts longer than {cfg.max_prompt_tokens} tokens)"
            )
        return out

    # ------------------------------------------------------------------ data order
    def micro_batch(self, index: int) -> list[Example]:
        """Rows of micro-batch ``index``: epochs of seeded permutations, a function of index only."""
        bs, n = self.cfg.train.batch_size, len(self.examples)
        out = []
        for j in range(index * bs, (index + 1) * bs):
            epoch, k = divmod(j, n)
            out.append(self.examples[self._order(epoch)[k]])
        return out

    @functools.lru_cache(maxsize=4)  # noqa: B019 (one trainer per run; a few epochs cached)
    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.cfg.train.seed * 100_003 + epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    # ------------------------------------------------------------------ rollouts
    def _ground_truth(self, batch: list[Example]) -> Rollout:
        ids, pmask = left_pad([e.prompt for e in batch], self.pad_id)
        n = max(max(len(e.response) for e in batch), 1)
        toks = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.bool)
        for i, e in enumerate(batch):
            toks[i, : len(e.response)] = torch.tensor(e.response, dtype=torch.long)
            mask[i, : len(e.response)] = True
        return Rollout(
            ids, pmask, toks, mask, torch.zeros_like(mask), torch.full(mask.shape, math.nan)
        )

    def rollout(self, batch: list[Example], index: int) -> Rollout:
        cfg, r = self.cfg, self.cfg.rollout
        ids, pmask = left_pad([e.prompt for e in batch], self.pad_id)
        ids, pmask = ids.to(self.device), pmask.to(self.device)
        noise = Noise.draw(len(batch), seed=cfg.train.seed * 1_000_003 + index)
        student = self.accelerator.unwrap_model(self.student)
        # rollouts decode in the training precision; the frozen teacher's decode weights are
        # prepared once, the student's at every rollout (they change every step)
        dtype = torch_dtype(self.precision)
        policy = cfg.policy
        teacher_decodes = policy in ("teacher", "switch", "skd", "adaswitch")
        if teacher_decodes and self._teacher_weights is None and lean_supported(self.teacher):
            self._teacher_weights = prepare_weights(self.teacher, dtype)
        was_training = student.training
        student.eval()
        try:
            if policy == "ground_truth":
                return self._ground_truth(batch)
            if policy == "teacher":
                return sample_rollout(
                    self.teacher,
                    ids,
                    pmask,
                    r.max_new_tokens,
                    noise,
                    self.eos_id,
                    self.pad_id,
                    r.temperature,
                    stream="teacher",
                    dtype=dtype,
                    weights=self._teacher_weights,
                )
            if policy == "student":
                return sample_rollout(
                    student,
                    ids,
                    pmask,
                    r.max_new_tokens,
                    noise,
                    self.eos_id,
                    self.pad_id,
                    r.temperature,
                    dtype=dtype,
                )
            if policy in ("mixed", "adaptive"):
                return self._mixed(batch, index, student, noise, dtype)
            rule = {
                "switch": lambda: SwitchRule(r.tau0, r.decay, r.schedule),
                "skd": lambda: SKDRule(r.skd_top_k),
                "adaswitch": lambda: AdaSwitchRule(len(batch), r.ada_window, r.ada_factor),
            }[policy]()
            return switch_rollout(
                student,
                self.teacher,
                ids,
                pmask,
                rule,
                r.max_new_tokens,
                noise,
                self.eos_id,
                self.pad_id,
                block_size=r.block_size,
                temperature=r.temperature,
                teacher_greedy=r.teacher_greedy,
                adaptive=r.adaptive_block,
                dtype=dtype,
                teacher_weights=self._teacher_weights,
            )
        finally:
            student.train(was_training)

    def _mixed(self, batch, index, student, noise, dtype) -> Rollout:
        """GKD: each sequence is student-written with probability ``rollout.student_share``
        (the paper's λ), else the reference. DistiLLM: the same with the adaptive
        ``self.distillm_share``, and student sequences partly replayed."""
        r = self.cfg.rollout
        g = torch.Generator().manual_seed(self.cfg.train.seed * 7_919 + index)
        on = (torch.rand(len(batch), generator=g) < self.distillm_share).tolist()
        reuse = (torch.rand(len(batch), generator=g) < r.replay_reuse).tolist()
        rows: list[Example] = list(batch)
        fresh = [i for i in range(len(batch)) if on[i]]
        if self.cfg.policy == "adaptive" and len(self.replay) >= 2 * self.cfg.train.batch_size:
            for i in [i for i in fresh if reuse[i]]:
                p, y = self.replay[int(torch.randint(len(self.replay), (1,), generator=g))]
                rows[i] = Example(p, y, batch[i].row)
            fresh = [i for i in fresh if not reuse[i]]
        if fresh:
            ids, pmask = left_pad([rows[i].prompt for i in fresh], self.pad_id)
            gen = sample_rollout(
                student,
                ids.to(self.device),
                pmask.to(self.device),
                r.max_new_tokens,
                noise.select(fresh),
                self.eos_id,
                self.pad_id,
                r.temperature,
                dtype=dtype,
            )
            for j, i in enumerate(fresh):
                y = gen.tokens[j][gen.mask[j]].tolist()
                rows[i] = Example(rows[i].prompt, y, batch[i].row)
                if self.cfg.policy == "adaptive":
                    self.replay.append((rows[i].prompt, y))
            self.replay = self.replay[-r.replay_size :]
        out = self._ground_truth(rows)
        out.stats["student_rows"] = sum(on)
        return out

    # ------------------------------------------------------------------ loss
    def loss(self, ro: Rollout, batch: list[Example]) -> torch.Tensor:
        """Divergence (or cross-entropy) over the response positions of the rollout."""
        cfg = self.cfg
        ids, attn, _ = ro.sequences()
        ids, attn = ids.to(self.device), attn.to(self.device)
        pos_ids = (attn.cumsum(-1) - 1).clamp_min(0)
        N = ro.tokens.shape[1]
        mask = ro.mask.to(self.device)
        with self._autocast():
            # logits at column c predict column c+1: the N response tokens need the N columns
            # before them, i.e. the last N+1 columns minus the final one.
            s_logits = self.student(
                input_ids=ids, attention_mask=attn, position_ids=pos_ids, logits_to_keep=N + 1
            ).logits[:, :-1]  # (B, N, V)
            if cfg.divergence is None:
                loss = sequence_ce(s_logits, ro.tokens.to(self.device), mask)
            else:
                if ro.teacher_logits is not None:
                    t_logits = ro.teacher_logits.to(self.device)  # kept by the rollout
                else:
                    with torch.no_grad():
                        t_logits = self.teacher(
                            input_ids=ids,
                            attention_mask=attn,
                            position_ids=pos_ids,
                            logits_to_keep=N + 1,
                        ).logits[:, :-1]
                loss = divergence(
                    cfg.divergence,
                    s_logits,
                    t_logits,
                    mask,
                    beta=cfg.train.beta,
                    alpha=cfg.train.alpha,
                    temperature=cfg.train.kd_temperature,
                )
            if cfg.train.sft_weight > 0:
                gt = self._ground_truth(batch)
                g_ids, g_attn, _ = gt.sequences()
                g_logits = self.student(
                    input_ids=g_ids.to(self.device),
                    attention_mask=g_attn.to(self.device),
                    position_ids=(g_attn.cumsum(-1) - 1).clamp_min(0).to(self.device),
                    logits_to_keep=gt.tokens.shape[1] + 1,
                ).logits[:, :-1]
                loss = loss + cfg.train.sft_weight * sequence_ce(
                    g_logits, gt.tokens.to(self.device), gt.mask.to(self.device)
                )
        return loss

    def _autocast(self):
        enabled = self.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    # ------------------------------------------------------------------ train
    def train(self) -> dict:
        cfg = self.cfg.train
        t_start = time.perf_counter()
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc=f"distill {cfg.method}",
            disable=not cfg.progress,
        )
        last = {}
        tok_total, time_total = 0, 0.0
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            self.student.train()
            loss_sum, n_tok, rows_ro = 0.0, 0, []
            for m in range(cfg.grad_accum):
                index = self.step * cfg.grad_accum + m
                batch = self.micro_batch(index)
                ro = self.rollout(batch, index)
                loss = self.loss(ro, batch)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at step {self.step + 1} (method {cfg.method}, lr {cfg.lr}); "
                        f"nothing was saved for this step; lower train.lr or check the data"
                    )
                self.accelerator.backward(loss / cfg.grad_accum)
                loss_sum += loss.item() / cfg.grad_accum
                n_tok += int(ro.mask.sum())
                rows_ro.append(ro)
            if cfg.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(self.student.parameters(), cfg.max_grad_norm)
            self.optim.step()
            self.sched.step()
            self.optim.zero_grad(set_to_none=True)
            self.step += 1
            dt = time.perf_counter() - t0
            tok_total += n_tok
            time_total += dt
            wrote = torch.cat(
                [_pad_to(r.teacher_wrote, self.cfg.rollout.max_new_tokens) for r in rows_ro]
            )
            msk = torch.cat([_pad_to(r.mask, self.cfg.rollout.max_new_tokens) for r in rows_ro])
            share = float(wrote[msk].sum()) / max(int(msk.sum()), 1)
            last = {
                "step": self.step,
                "loss": loss_sum,
                "lr": self.sched.get_last_lr()[0],
                "tokens_per_s": n_tok / dt,
                "step_time_s": dt,
                "response_tokens": n_tok,
            }
            if self.cfg.policy in ("switch", "skd", "adaswitch"):
                div = torch.cat(
                    [
                        _pad_to(r.divergence, self.cfg.rollout.max_new_tokens, math.nan)
                        for r in rows_ro
                    ]
                )
                last.update(
                    teacher_share=share,
                    teacher_share_by_position=share_by_position(wrote, msk),
                    mean_jsd=float(div[msk].nanmean()),
                )
            if self.cfg.policy in ("mixed", "adaptive"):
                last["student_data_share"] = sum(
                    r.stats.get("student_rows", 0) for r in rows_ro
                ) / (cfg.batch_size * cfg.grad_accum)
                last["student_share"] = self.distillm_share
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self.metrics.log(**last)
            bar.set_postfix(loss=f"{loss_sum:.4f}")
            bar.update(1)
            if self.cfg.policy == "adaptive" and self.step % max(1, cfg.max_steps // 10) == 0:
                self._distillm_schedule()
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.eval_rows:
                self.metrics.log(step=self.step, eval_rougeL=self.evaluate())
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                self.save_checkpoint()
        bar.close()
        self.tokens_per_s = tok_total / time_total if time_total else 0.0
        self.wall_time = time.perf_counter() - t_start
        return last

    def _distillm_schedule(self) -> None:
        """DistiLLM's adaptive off-policy: raise the student-data share when validation loss stalls."""
        val = self.validation_loss()
        if self.best_val is not None and val >= self.best_val:
            self.distillm_share = min(
                self.cfg.rollout.distillm_share_max,
                self.distillm_share + self.cfg.rollout.distillm_share_step,
            )
        self.best_val = val if self.best_val is None else min(self.best_val, val)
        self.metrics.log(step=self.step, val_loss=val, student_share=self.distillm_share)

    @torch.no_grad()
    def validation_loss(self) -> float:
        """The method's divergence on the reference responses of a fixed slice of the data."""
        self.student.eval()
        rows = self.examples[: self.cfg.train.batch_size]
        ro = self._ground_truth(rows)
        val = float(self.loss(ro, rows))
        self.student.train()
        return val

    @torch.no_grad()
    def evaluate(self, seed: int = 0) -> float:
        """Sampled ROUGE-L of the student on data.eval_data (eval_limit rows)."""
        student = self.accelerator.unwrap_model(self.student)
        prompts = [build_prompt(r, self.tok, self.cfg.data.chat_template) for r in self.eval_rows]
        answers = generate(
            student,
            self.tok,
            prompts,
            max_new_tokens=self.cfg.rollout.max_new_tokens,
            seed=seed,
            batch_size=self.cfg.train.batch_size,
            max_prompt_tokens=self.cfg.data.max_prompt_tokens,
        )
        return sum(rouge_l(a, r.references) for a, r in zip(answers, self.eval_rows)) / len(answers)

    # ------------------------------------------------------------------ checkpoints
    def _ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Everything needed to continue, written to a temporary name and renamed into place."""
        final = self._ckpt_dir() / f"step-{self.step:07d}"
        state = {
            "model": self.accelerator.unwrap_model(self.student).state_dict(),
            "optim": self.optim.state_dict(),
            "sched": self.sched.state_dict(),
            "step": self.step,
            "distillm_share": self.distillm_share,
            "best_val": self.best_val,
            "replay": self.replay,
        }
        with atomic_dir(final) as tmp:
            torch.save(state, tmp / "state.pt")  # tensors and plain values: weights_only loads it
            write_json(tmp / "config.json", C.to_dict(self.cfg))  # what --resume checks against
        for old in checkpoints(self.run_dir)[2:]:  # keep the two newest
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _load_checkpoint(self) -> None:
        """The newest usable checkpoint (an unreadable or unfitting one is skipped with a
        warning); only tensors and plain values are deserialised (``weights_only=True``)."""
        student = self.accelerator.unwrap_model(self.student)
        problems = []
        for ck in self._resume_from:
            try:
                state = torch.load(ck / "state.pt", map_location="cpu", weights_only=True)
                if not isinstance(state, dict) or "model" not in state or "step" not in state:
                    raise ValueError("not an lmsmith distill checkpoint")
                unfit = _unfit(student.state_dict(), state["model"])
                if unfit:
                    raise ValueError(f"written for another student architecture ({unfit})")
                recorded = _read_config(ck / "config.json")
                diff = recorded and config_differences(recorded, C.to_dict(self.cfg))
                if diff:
                    raise ValueError(f"written by another config ({'; '.join(diff)})")
            except Exception as e:  # noqa: BLE001 (any unreadable checkpoint: try the older one)
                why = " ".join(str(e).split())[:300] or type(e).__name__
                problems.append(f"{ck.name}: {why}")
                log.warning("checkpoint %s is unusable (%s); trying the one before it", ck, why)
                continue
            break
        else:
            raise UserError(
                f"--resume: no usable checkpoint under {self._ckpt_dir()}: " + " | ".join(problems)
            )
        student.load_state_dict(state["model"])
        self.optim.load_state_dict(state["optim"])
        self.sched.load_state_dict(state["sched"])
        self.step = state["step"]
        self.distillm_share = state.get(
            "distillm_share", state.get("lam")
        )  # older checkpoints: "lam"
        self.best_val = state["best_val"]
        self.replay = [(list(p), list(y)) for p, y in state["replay"]]
        if problems:
            log.warning("resumed from the older checkpoint %s (step %d)", ck, self.step)
        for left in self._ckpt_dir().iterdir():  # folders of checkpoint writes that were killed
            if _LEFTOVER.match(left.name):
                shutil.rmtree(left, ignore_errors=True)
        log.info("resumed from %s (step %d)", ck, self.step)

    def save_student(self) -> Path:
        """The final student as a plain HF folder (merged LoRA too, and the adapter beside it)."""
        final = self.run_dir / "student"
        model = self.accelerator.unwrap_model(self.student)
        if self.cfg.model.lora_rank > 0:
            with atomic_dir(self.run_dir / "adapter") as tmp:
                model.save_pretrained(tmp)
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        with atomic_dir(final) as tmp:
            model.save_pretrained(tmp)
            self.tok.save_pretrained(tmp)
        return final


def warmup_schedule(optim: torch.optim.Optimizer, warmup_steps: int):
    """Linear warm-up to the peak rate, then constant: update k (0-based) runs at
    min(1, (k + 1) / warmup_steps) x lr, so the first update already moves the weights.

    transformers' ``constant_with_warmup`` gives update k the factor k / W (0 at the first);
    stepping it once here puts it one update ahead, which is this schedule exactly.
    """
    from transformers import get_scheduler

    warm = max(warmup_steps, 0)
    sched = get_scheduler("constant_with_warmup", optim, num_warmup_steps=warm)
    if warm:
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()"
            warnings.simplefilter("ignore", UserWarning)
            sched.step()
    return sched


def _pad_to(x: torch.Tensor, n: int, value=0) -> torch.Tensor:
    if x.shape[1] >= n:
        return x[:, :n]
    pad = torch.full((x.shape[0], n - x.shape[1]), value, dtype=x.dtype)
    return torch.cat([x, pad], dim=1)


def run(cfg: DistillConfig, teacher=None, student=None, tokenizer=None) -> dict:
    """setup → train → evaluate → save; returns the summary (also written to summary.json)."""
    trainer = DistillTrainer(cfg, teacher, student, tokenizer)
    trainer.setup()
    try:
        summary = _train_and_save(trainer)
    except BaseException:
        trainer.out.discard(keep=("checkpoints",))  # a run with checkpoints stays resumable
        raise
    trainer.out.finish()
    return summary


def _train_and_save(trainer: DistillTrainer) -> dict:
    cfg = trainer.cfg
    last = trainer.train()
    summary = {
        "method": cfg.train.method,
        "policy": cfg.policy,
        "divergence": cfg.divergence,
        "steps": trainer.step,
        "final_loss": last.get("loss"),
        "tokens_per_s": getattr(trainer, "tokens_per_s", None),
        "teacher_token_share": _mean_share(trainer.metrics.read()),
        "train_rows": len(trainer.examples),
        "rows_skipped_long_prompt": trainer.n_skipped,
        "wall_time_s": getattr(trainer, "wall_time", None),
        "seed": cfg.train.seed,
        "precision": trainer.precision,
        "hardware": hardware(trainer.device),
    }
    if trainer.eval_rows:
        summary["eval_rougeL"] = trainer.evaluate()
        trainer.metrics.log(step=trainer.step, eval_rougeL=summary["eval_rougeL"])
    summary["student_dir"] = str(trainer.save_student())
    summary["run_dir"] = str(trainer.run_dir)
    write_json(trainer.run_dir / "summary.json", summary)
    return summary


def checkpoints(run_dir) -> list[Path]:
    """The checkpoint folders of a run, newest first (never the leftovers of killed writes)."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and _STEP.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP.match(p.name).group(1)), reverse=True)


def _read_config(path: Path) -> dict | None:
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _same(a, b) -> bool:
    if a == b:
        return True
    try:  # one file named two ways (relative / absolute)
        return bool(a) and bool(b) and os.path.samefile(str(a), str(b))
    except (OSError, TypeError):
        return False


def config_differences(recorded: dict, current: dict) -> list[str]:
    """``"key: A in the checkpoint, B now"`` for each :data:`RESUME_KEYS` entry that differs."""
    old, new = _flat(recorded), _flat(current)
    return [
        f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now"
        for k in RESUME_KEYS
        if not _same(old.get(k), new.get(k))
    ]


def check_resume(run_dir: Path, cfg: DistillConfig) -> list[Path]:
    """Before any model loads: the checkpoints ``--resume`` may continue from (newest first).

    Raises:
        UserError: no checkpoint, ``max_steps`` not beyond the checkpoint's step, or a
            checkpoint written by another config (what differs is named).
    """
    ckpts = checkpoints(run_dir)
    if not ckpts:
        raise UserError(
            f"--resume: no checkpoint under {Path(run_dir) / 'checkpoints'} "
            "(train.save_every N writes one every N steps)"
        )
    step = int(_STEP.match(ckpts[0].name).group(1))
    if cfg.train.max_steps <= step:
        raise UserError(
            f"--resume: the newest checkpoint ({ckpts[0]}) is at step {step}; "
            f"train.max_steps ({cfg.train.max_steps}) must be larger to train further"
        )
    recorded = _read_config(ckpts[0] / "config.json") or _read_config(Path(run_dir) / "config.json")
    if recorded is None:
        raise UserError(
            f"--resume: {run_dir} records no config.json to check the checkpoint against"
        )
    diff = config_differences(recorded, C.to_dict(cfg))
    if diff:
        raise UserError(
            f"--resume: {ckpts[0]} belongs to another run: {'; '.join(diff)} "
            "(choose another output_dir, or pass --overwrite to start over)"
        )
    return ckpts


def _unfit(own: dict, loaded: dict) -> str:
    """'' when the loaded state dict fits the model's, else what does not fit."""
    if not isinstance(loaded, dict):
        return "no parameter table"
    missing = sorted(set(own) - set(loaded))
    extra = sorted(set(loaded) - set(own))
    if missing:
        return f"{len(missing)} parameters missing, e.g. {missing[0]}"
    if extra:
        return f"{len(extra)} unexpected parameters, e.g. {extra[0]}"
    for k, v in own.items():
        if tuple(v.shape) != tuple(loaded[k].shape):
            return f"{k} has shape {tuple(loaded[k].shape)}, the student {tuple(v.shape)}"
    return ""


def _read_rows(path: Path) -> list[dict]:
    """metrics.jsonl rows; a line cut by a kill is dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _mean_share(rows: list[dict]) -> float | None:
    vals = [r["teacher_share"] for r in rows if "teacher_share" in r]
    return sum(vals) / len(vals) if vals else None
