"""The distillation loop: setup → train (rollout → loss → step) → evaluate → save.

One class, read top to bottom. Every method is (who writes the sequences) × (which divergence);
``DistillConfig.policy`` and ``DistillConfig.divergence`` pick both from the method name.

Scaling out runs on ``accelerate`` (``accelerate launch`` with DDP, FSDP or DeepSpeed). Row j of
the run is the j-th row of a stream of seeded epoch permutations, and its rollout noise is keyed
by j; each optimiser step takes the next ``batch_size × grad_accum × processes`` rows, and each
process trains on its own micro-batches of them. So the rows, the rollouts and (up to float
rounding) the updates do not depend on the number of processes, and a resumed run sees exactly
what an uninterrupted one would. The loss is the mean over every response token of the global
batch (token counts are summed over micro-batches and processes before the backward). One writer,
the main process, writes the run folder, metrics, checkpoints and the final student.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import re
import shutil
import time
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
    _mix,
    generate,
    lean_supported,
    left_pad,
    prepare_weights,
    sample_rollout,
)
from lmsmith.metrics.rouge import rouge_l
from lmsmith.precision import hardware, resolve_precision, torch_dtype
from lmsmith.runs import (
    MetricsSink,
    atomic_dir,
    prepare_output,
    write_json,
    write_jsonl,
)

log = logging.getLogger(__name__)

POSITION_BUCKETS = [(0, 15), (16, 31), (32, 63), (64, 127), (128, 10**9)]

# What makes a checkpoint part of *this* run: --resume refuses a checkpoint whose recorded
# config differs in any of these (max_steps, lr, logging, eval and output settings may change).
RESUME_KEYS = (
    "model.teacher", "model.student", "model.lora_rank", "model.lora_alpha",
    "data.data", "data.limit", "data.max_prompt_tokens", "data.max_total_tokens",
    "data.chat_template", "data.long_prompts", "data.max_response_tokens",
    "rollout.distillm_val_data", "rollout.distillm_val_rows", "rollout.distillm_eps",
    "train.method", "train.divergence", "train.batch_size", "train.grad_accum", "train.seed",
)  # fmt: skip
_STEP = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^\.?step-\d+\.tmp-")  # a checkpoint write that was killed
STATE = "trainer_state.json"  # lmsmith's own part of a checkpoint (accelerate writes the rest)
# the policies in which the teacher writes tokens (it decodes during rollouts)
TEACHER_DECODES = ("teacher", "switch", "skd", "adaswitch")


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
        if cfg.train.report_to == "tensorboard":
            _require("tensorboard", "--report-to tensorboard", "lmsmith[tensorboard]")
        if cfg.train.report_to == "wandb":
            _require("wandb", "--report-to wandb", "wandb")
        # the engine first: under `accelerate launch` this joins the process group. Gradient
        # accumulation goes through it (no gradient sync on the inner micro-batches); the
        # scheduler steps once per optimiser step whatever the number of processes.
        self.accelerator = acc = Accelerator(
            cpu=not torch.cuda.is_available(),
            gradient_accumulation_steps=cfg.train.grad_accum,
            step_scheduler_with_optimizer=False,
        )
        self.device = acc.device
        self.world = acc.num_processes
        self.is_main = acc.is_main_process
        # the output folder and the checkpoint to resume are checked before any model loads, by
        # every process alike (read-only); the main process alone creates the folder, later
        out_dir = cfg.train.output_dir
        if not out_dir and self.world > 1:  # one default name for all, the main process's
            out_dir = self._broadcast(
                str(prepare_output(None, "distill").path) if self.is_main else None
            )
        self.out = prepare_output(
            out_dir, "distill", cfg.train.overwrite, cfg.train.resume, can_resume=True
        )
        self._resume_from = check_resume(self.out.path, cfg) if cfg.train.resume else []
        acc.wait_for_everyone()  # nobody creates the folder before everyone has checked it
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
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
        self.val_examples = self.examples[: cfg.train.batch_size]
        if cfg.policy == "adaptive" and cfg.rollout.distillm_val_data:
            self.val_examples = self._load_examples(
                cfg.rollout.distillm_val_data, cfg.rollout.distillm_val_rows, need_refs=True
            )
        from accelerate.utils import DistributedType

        if acc.distributed_type == DistributedType.DEEPSPEED:  # no data loader to read them from
            acc.state.deepspeed_plugin.deepspeed_config.update(
                train_micro_batch_size_per_gpu=cfg.train.batch_size,
                gradient_accumulation_steps=cfg.train.grad_accum,
                gradient_clipping=cfg.train.max_grad_norm,  # DeepSpeed clips inside its step
            )
        params = [p for p in student.parameters() if p.requires_grad]
        optim = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        t = cfg.train
        sched = warmup_schedule(optim, t.warmup_steps, t.lr_schedule, t.max_steps)
        self.student, self.optim, self.sched = acc.prepare(student, optim, sched)
        self.teacher = self._place_teacher(teacher)
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
        self.metrics = None
        if self.is_main:
            self.out.create(C.to_dict(cfg))
            self.metrics = MetricsSink(
                self.run_dir / "metrics.jsonl", truncate=not cfg.train.resume
            )
            if cfg.train.resume:  # rows of steps after the checkpoint are logged again
                rows = _read_rows(self.metrics.path)
                write_jsonl(self.metrics.path, [r for r in rows if r.get("step", 0) <= self.step])
        self.tracker = None  # TensorBoard / W&B, through accelerate's trackers, main process only
        if cfg.train.report_to != "none" and self.is_main:
            from accelerate.tracking import TensorBoardTracker, WandBTracker

            if cfg.train.report_to == "tensorboard":
                self.tracker = TensorBoardTracker("tensorboard", str(self.run_dir))
            else:
                self.tracker = WandBTracker(
                    "lmsmith-distill", dir=str(self.run_dir), name=self.run_dir.name
                )
            self.tracker.start()
            self.tracker.store_init_configuration(_scalars(_flat(C.to_dict(cfg))))
        acc.wait_for_everyone()

    def _broadcast(self, obj):
        """The main process's ``obj`` on every process."""
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]

    def _place_teacher(self, teacher):
        """The frozen teacher: no gradients, eval mode, a full copy on each device, or sharded
        for inference through the FSDP / DeepSpeed ZeRO-3 engine (``train.teacher_placement``)."""
        from accelerate.utils import DistributedType

        teacher = teacher.eval().requires_grad_(False)
        engine = self.accelerator.distributed_type
        sharded_engine = engine == DistributedType.FSDP or (
            engine == DistributedType.DEEPSPEED
            and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        )
        place = self.cfg.train.teacher_placement
        if place == "auto":
            place = (
                "shard" if sharded_engine and _over_half_of_free_memory(teacher) else "replicate"
            )
        self.teacher_sharded = place == "shard"
        if not self.teacher_sharded:
            return teacher.to(self.device)
        if not sharded_engine:
            raise UserError(
                "train.teacher_placement shard needs accelerate configured with FSDP or DeepSpeed "
                "ZeRO-3 (accelerate launch --config_file configs/accelerate/fsdp.yaml or zero3.yaml)"
            )
        if engine == DistributedType.DEEPSPEED:
            return _deepspeed_inference(teacher, self.accelerator)
        # FSDP: wrapped like the student, then taken off the list of models the engine
        # checkpoints (the teacher is an input of the run, not part of its state)
        wrapped = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        self.accelerator._models.remove(wrapped)
        return wrapped.eval()

    def _load_examples(
        self, path: str | None = None, limit: int | None = None, need_refs: bool | None = None
    ) -> list[Example]:
        """The training rows (or, given ``path``, another file's rows tokenised the same way)."""
        cfg = self.cfg.data
        training = path is None
        path, limit = (cfg.data, cfg.limit) if training else (path, limit)
        rows = load_instruct(path, limit=limit) if path else builtin_prompts()
        if need_refs is None:
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
                if cfg.max_response_tokens is not None:
                    room = min(room, cfg.max_response_tokens)
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
        if training:
            self.n_skipped = skipped
        if not out:
            raise UserError(
                f"no {'training ' if training else ''}rows left in "
                f"{path or 'the built-in prompts'} "
                f"({skipped} prompts longer than {cfg.max_prompt_tokens} tokens)"
            )
        return out

    # ------------------------------------------------------------------ data order
    def rows(self, step: int, micro: int) -> list[int]:
        """Global ids of this process's rows in micro-batch ``micro`` of optimiser step ``step``.

        Step s takes rows [s·G, (s+1)·G) of the run's stream, G = batch_size × grad_accum ×
        processes; micro-batch m of process r holds chunk m·processes + r of batch_size rows. One
        process with grad_accum k·g and k processes with grad_accum g see the same micro-batches.
        """
        bs = self.cfg.train.batch_size
        start = (step * self.cfg.train.grad_accum + micro) * self.world * bs
        start += self.accelerator.process_index * bs
        return list(range(start, start + bs))

    def example(self, j: int) -> Example:
        """Row ``j`` of the run's stream: epochs of seeded permutations, a function of j only."""
        epoch, k = divmod(j, len(self.examples))
        return self.examples[self._order(epoch)[k]]

    @functools.lru_cache(maxsize=4)  # noqa: B019 (one trainer per run; a few epochs cached)
    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.cfg.train.seed * 100_003 + epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def _uniform(self, stream: int, j: int) -> float:
        """A uniform in [0, 1) for row ``j`` of the stream: a function of (seed, stream, j)."""
        return _mix(self.cfg.train.seed, stream, j) / 2.0**64

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

    def rollout(self, batch: list[Example], rows: list[int]) -> Rollout:
        """The policy's sequences for ``batch``, whose global row ids are ``rows``."""
        cfg, r = self.cfg, self.cfg.rollout
        ids, pmask = left_pad([e.prompt for e in batch], self.pad_id)
        ids, pmask = ids.to(self.device), pmask.to(self.device)
        # keyed by the global row: a row's sequence is the same whichever process draws it
        noise = Noise(_mix(cfg.train.seed, 1_000_003), tuple(rows))
        # rollouts decode in the training precision; the frozen teacher's decode weights are
        # prepared once, the student's at every rollout (they change every step)
        dtype = torch_dtype(self.precision)
        policy = cfg.policy
        if policy == "ground_truth":
            return self._ground_truth(batch)
        with self._decoding(policy in TEACHER_DECODES, dtype) as (student, teacher, t_weights):
            if policy == "teacher":
                return sample_rollout(
                    teacher,
                    ids,
                    pmask,
                    r.max_new_tokens,
                    noise,
                    self.eos_id,
                    self.pad_id,
                    r.temperature,
                    stream="teacher",
                    dtype=dtype,
                    weights=t_weights,
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
                return self._mixed(batch, rows, student, noise, dtype)
            rule = {
                "switch": lambda: SwitchRule(r.tau0, r.decay, r.schedule),
                "skd": lambda: SKDRule(r.skd_top_k),
                "adaswitch": lambda: AdaSwitchRule(len(batch), r.ada_window, r.ada_factor),
            }[policy]()
            return switch_rollout(
                student,
                teacher,
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
                teacher_weights=t_weights,
            )

    @contextlib.contextmanager
    def _decoding(self, teacher_decodes: bool, dtype):
        """(student, teacher, the teacher's lean-decoder weights) for a rollout: unwrapped from
        the engine with their full weights present (gathered for the duration under FSDP /
        ZeRO-3), the student in eval mode until the rollout ends."""
        with contextlib.ExitStack() as stack:
            student = stack.enter_context(full_weights(self.accelerator, self.student))
            teacher, t_weights = self.teacher, None
            if teacher_decodes:
                teacher = stack.enter_context(full_weights(self.accelerator, self.teacher))
                t_weights = self._teacher_weights
                if t_weights is None and lean_supported(teacher):
                    t_weights = prepare_weights(teacher, dtype)
                    if not self.teacher_sharded:  # a sharded teacher is gathered each time
                        self._teacher_weights = t_weights
            was_training = student.training
            student.eval()
            try:
                yield student, teacher, t_weights
            finally:
                student.train(was_training)

    def _mixed(self, batch, rows, student, noise, dtype) -> Rollout:
        """GKD: each sequence is student-written with probability ``rollout.student_share``
        (the paper's λ), else the reference. DistiLLM: the same with the adaptive
        ``self.distillm_share``, and student sequences partly replayed from the buffer as it
        stood at the start of the step (so no row depends on another process's rows). Every
        choice is keyed by the global row."""
        r = self.cfg.rollout
        on = [self._uniform(7_919, j) < self.distillm_share for j in rows]
        reuse = [self._uniform(7_927, j) < r.replay_reuse for j in rows]
        out: list[Example] = list(batch)
        fresh = [i for i in range(len(batch)) if on[i]]
        if self.cfg.policy == "adaptive" and len(self.replay) >= 2 * self.cfg.train.batch_size:
            for i in [i for i in fresh if reuse[i]]:
                p, y = self.replay[int(self._uniform(7_933, rows[i]) * len(self.replay))]
                out[i] = Example(p, y, batch[i].row)
            fresh = [i for i in fresh if not reuse[i]]
        written = []
        if fresh:
            ids, pmask = left_pad([out[i].prompt for i in fresh], self.pad_id)
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
            for k, i in enumerate(fresh):
                y = gen.tokens[k][gen.mask[k]].tolist()
                out[i] = Example(out[i].prompt, y, batch[i].row)
                written.append((rows[i], out[i].prompt, y))
        ro = self._ground_truth(out)
        ro.stats["student_rows"] = sum(on)
        ro.stats["replay_new"] = written  # added to the buffer at the end of the step
        return ro

    # ------------------------------------------------------------------ loss
    def loss(
        self, ro: Rollout, batch: list[Example], counts: tuple[float, float] | None = None
    ) -> torch.Tensor:
        """Divergence (or cross-entropy) over the response positions of the rollout.

        Without ``counts``: the mean over this batch's response tokens (plus ``sft_weight`` × the
        mean cross-entropy over its reference tokens). With ``counts`` = (response tokens,
        reference tokens) of the whole global batch: the sums over this micro-batch divided by
        those counts, so the micro-batches' losses add up to the mean over every token of the
        global batch, however it is split into micro-batches and processes."""
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
            if counts is not None:  # the masked mean → its share of the global mean
                loss = loss * (int(ro.mask.sum()) / max(counts[0], 1.0))
            if cfg.train.sft_weight > 0:
                ce, gt = self._reference_ce(batch)
                if counts is not None:
                    ce = ce * (int(gt.mask.sum()) / max(counts[1], 1.0))
                loss = loss + cfg.train.sft_weight * ce
        return loss

    def _reference_ce(self, batch: list[Example]) -> tuple[torch.Tensor, Rollout]:
        """The student's mean cross-entropy on the batch's reference responses, and those
        references as a rollout."""
        gt = self._ground_truth(batch)
        ids, attn, _ = gt.sequences()
        logits = self.student(
            input_ids=ids.to(self.device),
            attention_mask=attn.to(self.device),
            position_ids=(attn.cumsum(-1) - 1).clamp_min(0).to(self.device),
            logits_to_keep=gt.tokens.shape[1] + 1,
        ).logits[:, :-1]
        return sequence_ce(logits, gt.tokens.to(self.device), gt.mask.to(self.device)), gt

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
            disable=not cfg.progress or not self.is_main,
        )
        last = {}
        tok_total, time_total = 0, 0.0
        if self.cfg.policy == "adaptive" and self.best_val is None:
            self._distillm_schedule()  # the reference: validation loss before training
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            last = self.train_step()
            dt = time.perf_counter() - t0
            tok_total += last["response_tokens"]
            time_total += dt
            last.update(tokens_per_s=last["response_tokens"] / dt, step_time_s=dt)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self.log(**last)
            bar.set_postfix(loss=f"{last['loss']:.4f}")
            bar.update(1)
            if self.cfg.policy == "adaptive" and self.step % max(1, cfg.max_steps // 10) == 0:
                self._distillm_schedule()
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.eval_rows:
                self.log(step=self.step, eval_rougeL=self.evaluate())
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                self.save_checkpoint()
        bar.close()
        self.tokens_per_s = tok_total / time_total if time_total else 0.0
        self.wall_time = time.perf_counter() - t_start
        return last

    def train_step(self) -> dict:
        """One optimiser step over this process's micro-batches of the global batch.

        Rollouts first: the loss is the mean over every response token of the global batch, and
        how many tokens the rollouts write is known only once they are written; their count, summed
        over micro-batches and processes, divides each micro-batch's token sum before its backward.
        The engine divides each backward by grad_accum and averages gradients over the processes;
        both are undone here, so the update is the gradient of the global token mean."""
        cfg, acc = self.cfg.train, self.accelerator
        work = []
        for m in range(cfg.grad_accum):
            rows = self.rows(self.step, m)
            batch = [self.example(j) for j in rows]
            work.append((rows, batch, self.rollout(batch, rows)))
        n_ref = (
            sum(int(self._ground_truth(b).mask.sum()) for _, b, _ in work)
            if self.cfg.train.sft_weight > 0
            else 0
        )
        n_resp = sum(int(ro.mask.sum()) for _, _, ro in work)
        counts = self._sum([n_resp, n_ref]).tolist()
        self.student.train()
        loss_sum = 0.0
        for _, batch, ro in work:
            with acc.accumulate(self.student):
                loss = self.loss(ro, batch, counts)
                acc.backward(loss * cfg.grad_accum * self.world)
                loss_sum += loss.item()
        stats = self._sum([loss_sum] + _rollout_stats([ro for _, _, ro in work], self.cfg))
        loss_sum = float(stats[0])
        if not math.isfinite(loss_sum):
            raise TrainingDiverged(
                f"loss became {loss_sum} at step {self.step + 1} (method {cfg.method}, "
                f"lr {cfg.lr}); nothing was saved for this step; lower train.lr or check the data"
            )
        if cfg.max_grad_norm > 0:
            acc.clip_grad_norm_(self.student.parameters(), cfg.max_grad_norm)
        self.optim.step()
        self.sched.step()
        self.optim.zero_grad(set_to_none=True)
        if self.cfg.policy == "adaptive":  # the buffer grows by the step's student rows, all ranks'
            new = [x for _, _, ro in work for x in ro.stats.get("replay_new", [])]
            if self.world > 1:
                from accelerate.utils import gather_object

                new = gather_object([new])
                new = [x for part in new for x in part]
            self.replay += [(p, y) for _, p, y in sorted(new, key=lambda x: x[0])]
            self.replay = self.replay[-self.cfg.rollout.replay_size :]
        self.step += 1
        out = {
            "step": self.step,
            "loss": loss_sum,
            "lr": self.sched.get_last_lr()[0],
            "response_tokens": int(counts[0]),
        }
        out.update(_rollout_metrics(stats[1:].tolist(), self.cfg, self.distillm_share))
        return out

    def _sum(self, values: list[float]) -> torch.Tensor:
        """``values`` summed over the processes (float64, on the CPU)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return t.cpu()

    def log(self, **row) -> None:
        """One metrics row: metrics.jsonl, and the ``report_to`` tracker (main process only)."""
        if self.is_main:
            self.metrics.log(**row)
        if self.tracker is not None:
            self.tracker.log(_scalars(_flat(row), drop_none=True), step=row.get("step"))

    def _distillm_schedule(self) -> None:
        """DistiLLM's adaptive off-policy, as its official code does it: the student-data share
        rises by ``distillm_share_step`` (up to ``distillm_share_max``) when the validation loss
        is at least ``distillm_eps`` above the loss at the last raise; the first reference is
        the loss before training (``best_val`` holds the reference)."""
        r = self.cfg.rollout
        val = self.validation_loss()
        if self.best_val is None:
            self.best_val = val
        elif val >= self.best_val + r.distillm_eps:
            self.distillm_share = min(
                r.distillm_share_max, self.distillm_share + r.distillm_share_step
            )
            self.best_val = val
        self.log(step=self.step, val_loss=val, student_share=self.distillm_share)

    @torch.no_grad()
    def validation_loss(self) -> float:
        """The student's mean cross-entropy on the reference responses of the validation rows
        (``rollout.distillm_val_data``, else the first batch of training rows). Each process
        scores its share of the rows and the sums are added up, so every process gets the same
        value and takes the same decision."""
        self.student.eval()
        tot = n = 0.0
        bs = self.cfg.train.batch_size
        mine = self.val_examples[self.accelerator.process_index :: self.world]
        for i in range(0, len(mine), bs):
            with self._autocast():
                ce, gt = self._reference_ce(mine[i : i + bs])
            k = float(gt.mask.sum())
            tot, n = tot + float(ce) * k, n + k
        self.student.train()
        tot, n = self._sum([tot, n]).tolist()
        return tot / max(n, 1.0)

    @torch.no_grad()
    def evaluate(self, seed: int = 0) -> float:
        """Sampled ROUGE-L of the student on data.eval_data (eval_limit rows; every process
        computes the same figure)."""
        prompts = [build_prompt(r, self.tok, self.cfg.data.chat_template) for r in self.eval_rows]
        with full_weights(self.accelerator, self.student) as student:
            answers = generate(
                student,
                self.tok,
                prompts,
                max_new_tokens=self.cfg.rollout.max_new_tokens,
                seed=seed,
                batch_size=self.cfg.train.batch_size,
                max_prompt_tokens=self.cfg.data.max_prompt_tokens,
            )
        self.student.train()
        return sum(rouge_l(a, r.references) for a, r in zip(answers, self.eval_rows)) / len(answers)

    # ------------------------------------------------------------------ checkpoints
    def _ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Everything needed to continue, written by the engine (``save_state``: the student as
        safetensors, optimiser and scheduler states, sharded as the engine shards them) into a
        temporary folder that the main process renames into place once complete, beside
        lmsmith's own state and the config as JSON."""
        acc = self.accelerator
        final = self._ckpt_dir() / f"step-{self.step:07d}"
        tmp = final.with_name(f".{final.name}.tmp-{self.run_nonce}")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()
        if self.is_main:
            write_json(
                tmp / STATE,
                {
                    "step": self.step,
                    "world_size": self.world,
                    "distillm_share": self.distillm_share,
                    "best_val": self.best_val,
                    "replay": self.replay,
                },
            )
            write_json(tmp / "config.json", C.to_dict(self.cfg))  # what --resume checks against
            if final.exists():  # an unusable checkpoint of the same step, skipped on resume
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in checkpoints(self.run_dir)[2:]:  # keep the two newest
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    @functools.cached_property
    def run_nonce(self) -> str:
        """A name part shared by every process of this run (the main process's id)."""
        return str(self._broadcast(os.getpid()) if self.world > 1 else os.getpid())

    def _load_checkpoint(self) -> None:
        """The newest usable checkpoint (an unreadable or unfitting one is skipped with a
        warning). Only safe formats are read: JSON, safetensors, and ``torch.load`` with
        ``weights_only=True`` (accelerate's loader) for the optimiser, scheduler and RNG states.
        Every process must find a checkpoint usable, or all skip it."""
        student = self.accelerator.unwrap_model(self.student)
        problems = []
        for ck in self._resume_from:
            try:
                state = _read_config(ck / STATE)
                if state is None or not isinstance(state.get("step"), int):
                    raise ValueError(
                        "not an lmsmith distill checkpoint"
                        + (
                            " (state.pt: written by lmsmith before 0.2)"
                            if (ck / "state.pt").exists()
                            else ""
                        )
                    )
                if state.get("world_size") != self.world:
                    raise ValueError(
                        f"written by {state.get('world_size')} processes, {self.world} now "
                        "(resume with the same number)"
                    )
                recorded = _read_config(ck / "config.json")
                diff = recorded and config_differences(recorded, C.to_dict(self.cfg))
                if diff:
                    raise ValueError(f"written by another config ({'; '.join(diff)})")
                weights = ck / "model.safetensors"
                if weights.exists():  # a full state dict (single process or DDP)
                    unfit = _unfit_file(student.state_dict(), weights)
                    if unfit:
                        raise ValueError(f"written for another student architecture ({unfit})")
                self.accelerator.load_state(str(ck))
                ok = True
            except Exception as e:  # noqa: BLE001 (any unreadable checkpoint: try the older one)
                why = " ".join(str(e).split())[:300] or type(e).__name__
                ok = False
            if self._sum([0.0 if ok else 1.0])[0] == 0:  # usable on every process
                break
            if ok:
                why = "unusable on another process"
            problems.append(f"{ck.name}: {why}")
            log.warning("checkpoint %s is unusable (%s); trying the one before it", ck, why)
        else:
            raise UserError(
                f"--resume: no usable checkpoint under {self._ckpt_dir()}: " + " | ".join(problems)
            )
        self.step = state["step"]
        self.distillm_share = state["distillm_share"]
        self.best_val = state["best_val"]
        self.replay = [(list(p), list(y)) for p, y in state["replay"]]
        if problems:
            log.warning("resumed from the older checkpoint %s (step %d)", ck, self.step)
        if self.is_main:
            for left in self._ckpt_dir().iterdir():  # folders of checkpoint writes that were killed
                if _LEFTOVER.match(left.name):
                    shutil.rmtree(left, ignore_errors=True)
        log.info("resumed from %s (step %d)", ck, self.step)

    def save_student(self) -> Path:
        """The final student as a plain HF folder (merged LoRA too, and the adapter beside it),
        written by the main process from the full state dict (gathered under FSDP / ZeRO-3)."""
        final = self.run_dir / "student"
        state = self.accelerator.get_state_dict(self.student)  # every process takes part
        model = self.accelerator.unwrap_model(self.student)
        if self.is_main:
            if self.cfg.model.lora_rank > 0:
                with atomic_dir(self.run_dir / "adapter") as tmp:
                    model.save_pretrained(tmp)
                import copy

                model = copy.deepcopy(model).merge_and_unload()
                state = None
            with atomic_dir(final) as tmp:
                model.save_pretrained(tmp, state_dict=state)
                self.tok.save_pretrained(tmp)
        self.accelerator.wait_for_everyone()
        return final


def warmup_schedule(
    optim: torch.optim.Optimizer, warmup_steps: int, kind: str = "constant", total: int = 0
):
    """Linear warm-up to the peak rate: update k (0-based) runs at min(1, (k + 1) / warmup_steps)
    x lr, so the first update already moves the weights; then constant, or (``kind`` linear or
    cosine) decaying from 1 at update W towards 0 at update ``total``, the last update still
    moving the weights (``lr_factor``)."""
    warm = max(warmup_steps, 0)
    return torch.optim.lr_scheduler.LambdaLR(
        optim, functools.partial(lr_factor, warm=warm, total=total, kind=kind)
    )


def lr_factor(k: int, warm: int, total: int, kind: str) -> float:
    """The rate of update k (0-based) as a share of the peak (``warmup_schedule``)."""
    if warm and k < warm:
        return (k + 1) / warm
    if kind == "constant" or total <= warm:
        return 1.0
    frac = (k - warm) / (total - warm)  # 0 at the first update after the warm-up
    if kind == "linear":
        return 1.0 - frac
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown lr schedule {kind!r}")


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
        if trainer.is_main:
            trainer.out.discard(keep=("checkpoints",))  # a run with checkpoints stays resumable
        raise
    finally:
        if trainer.tracker is not None:
            trainer.tracker.finish()
    if trainer.is_main:
        trainer.out.finish()
    trainer.accelerator.wait_for_everyone()
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
        "teacher_token_share": None,
        "train_rows": len(trainer.examples),
        "rows_skipped_long_prompt": trainer.n_skipped,
        "wall_time_s": getattr(trainer, "wall_time", None),
        "seed": cfg.train.seed,
        "precision": trainer.precision,
        "world_size": trainer.world,
        "global_batch": cfg.train.batch_size * cfg.train.grad_accum * trainer.world,
        "hardware": hardware(trainer.device),
    }
    if trainer.is_main:
        summary["teacher_token_share"] = _mean_share(trainer.metrics.read())
    if trainer.eval_rows:
        summary["eval_rougeL"] = trainer.evaluate()
        trainer.log(step=trainer.step, eval_rougeL=summary["eval_rougeL"])
    summary["student_dir"] = str(trainer.save_student())
    summary["run_dir"] = str(trainer.run_dir)
    if trainer.is_main:
        write_json(trainer.run_dir / "summary.json", summary)
    if trainer.world > 1:  # the main process's figures everywhere
        summary = trainer._broadcast(summary if trainer.is_main else None)
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


def _rollout_stats(ros: list[Rollout], cfg: DistillConfig) -> list[float]:
    """The sums a step's rollout metrics are made of, to be added over processes: teacher-written
    and written tokens (overall, then per position bucket), the divergence's sum and count,
    student-written rows and rows."""
    n = cfg.rollout.max_new_tokens
    wrote = torch.cat([_pad_to(r.teacher_wrote.cpu(), n) for r in ros])
    msk = torch.cat([_pad_to(r.mask.cpu(), n) for r in ros])
    out = [float(wrote[msk].sum()), float(msk.sum())]
    for lo, hi in POSITION_BUCKETS:
        m = msk[:, lo : hi + 1]
        out += [float(wrote[:, lo : hi + 1][m].sum()), float(m.sum())]
    div = torch.cat([_pad_to(r.divergence.cpu(), n, math.nan) for r in ros])[msk]
    known = ~torch.isnan(div)
    out += [float(div[known].sum()), float(known.sum())]
    out += [float(sum(r.stats.get("student_rows", 0) for r in ros)), float(len(msk))]
    return out


def _rollout_metrics(stats: list[float], cfg: DistillConfig, share: float) -> dict:
    """The metrics row's rollout fields from the global sums of :func:`_rollout_stats`."""
    out: dict = {}
    if cfg.policy in ("switch", "skd", "adaswitch"):
        k = len(POSITION_BUCKETS)
        out["teacher_share"] = stats[0] / max(stats[1], 1.0)
        out["teacher_share_by_position"] = {
            position_bucket_name(lo, hi): stats[2 + 2 * i] / stats[3 + 2 * i]
            if stats[3 + 2 * i]
            else None
            for i, (lo, hi) in enumerate(POSITION_BUCKETS)
        }
        div_sum, div_n = stats[2 + 2 * k], stats[3 + 2 * k]
        out["mean_jsd"] = div_sum / div_n if div_n else math.nan
    if cfg.policy in ("mixed", "adaptive"):
        out["student_data_share"] = stats[-2] / stats[-1]
        out["student_share"] = share
    return out


def _scalars(flat: dict, drop_none: bool = False) -> dict:
    """Values a tracker accepts (numbers, strings, booleans): None dropped or written "none"."""
    out = {}
    for k, v in flat.items():
        if v is None:
            if not drop_none:
                out[k] = "none"
        elif isinstance(v, (bool, int, float, str)):
            out[k] = v
        else:
            out[k] = str(v)
    return out


def _require(module: str, what: str, pip: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"{what} needs the {module} package: pip install '{pip}'")


def _unfit_file(own: dict, path: Path) -> str:
    """'' when the safetensors file's tensors fit the model's state dict, else what does not
    (tensors a save left out as tied to others are not required)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    extra = sorted(set(shapes) - set(own))
    if extra:
        return f"{len(extra)} unexpected parameters, e.g. {extra[0]}"
    for k, shape in shapes.items():
        if tuple(own[k].shape) != shape:
            return f"{k} has shape {shape}, the student {tuple(own[k].shape)}"
    missing = sorted(set(own) - set(shapes))
    tied = {k for k in missing if "lm_head" in k or "embed" in k}
    if set(missing) - tied:
        return f"{len(missing)} parameters missing, e.g. {sorted(set(missing) - tied)[0]}"
    return ""


def _over_half_of_free_memory(model) -> bool:
    if not torch.cuda.is_available():
        return False
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    free, _ = torch.cuda.mem_get_info()
    return size > free / 2


@contextlib.contextmanager
def full_weights(accelerator, model):
    """``model`` unwrapped from its engine, with every weight present on this device for the
    duration: FSDP's ``summon_full_params`` (FSDP2: ``unshard``), DeepSpeed ZeRO-3's
    ``GatheredParameters``; a plain or DDP model as it is. Every process must enter it together
    under FSDP / ZeRO-3 (the gathers are collective)."""
    from accelerate.utils import DistributedType

    engine = accelerator.distributed_type
    if engine == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if isinstance(model, FSDP):
            with FSDP.summon_full_params(model, writeback=False, recurse=True):
                yield model.module
            return
        if hasattr(model, "unshard") and hasattr(model, "reshard"):  # FSDP2 (fully_shard)
            model.unshard()
            try:
                yield model
            finally:
                model.reshard()
            return
    if engine == DistributedType.DEEPSPEED:
        inner = getattr(model, "module", model)
        if any(hasattr(p, "ds_id") for p in inner.parameters()):  # ZeRO-3 partitioned
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(inner.parameters())):
                yield inner
            return
        yield inner
        return
    yield accelerator.unwrap_model(model)


def _deepspeed_inference(model, accelerator):
    """The teacher as a DeepSpeed ZeRO-3 inference engine (parameters partitioned over the
    processes; no optimiser), as TRL prepares its reference and teacher models. Under ZeRO-1/2,
    which partition optimiser state and gradients only, a full copy on each device."""
    import copy

    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    if config.get("zero_optimization", {}).get("stage") != 3:
        log.warning("DeepSpeed ZeRO stage < 3 does not partition parameters: teacher replicated")
        return model.to(accelerator.device)
    hidden = getattr(model.config, "hidden_size", None)
    if hidden:
        config["zero_optimization"].update(
            reduce_bucket_size=hidden * hidden,
            stage3_param_persistence_threshold=10 * hidden,
            stage3_prefetch_bucket_size=0,
        )
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    return engine.eval()
