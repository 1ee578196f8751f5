"""Typed configuration of a distillation run. YAML presets live in configs/distill/."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmsmith.config import field, nested
from lmsmith.distill.losses import Divergence
from lmsmith.distill.rollout import Schedule
from lmsmith.precision import Precision

Method = Literal["sft", "kd", "seqkd", "imitkd", "gkd", "distillm", "skd", "switch", "adaswitch"]

# Each method's data source and default divergence (docs/methods.md gives the reasons).
METHOD_DEFAULTS: dict[str, dict] = {
    "sft": {"policy": "ground_truth", "divergence": None},
    "kd": {"policy": "ground_truth", "divergence": "fkl"},
    "seqkd": {"policy": "teacher", "divergence": None},
    "imitkd": {"policy": "student", "divergence": "fkl"},
    "gkd": {"policy": "mixed", "divergence": "jsd"},
    "distillm": {"policy": "adaptive", "divergence": "srkl"},
    "skd": {"policy": "skd", "divergence": "fkl"},
    "switch": {"policy": "switch", "divergence": "srkl"},
    "adaswitch": {"policy": "adaswitch", "divergence": "fkl"},
}


@dataclass
class ModelConfig:
    teacher: str = field("smollm2-135m-instruct", help="teacher spec: alias, folder or Hub id")
    student: str = field(
        "layers:10", help="student spec: alias, folder, Hub id or layers:N of the teacher"
    )
    lora_rank: int = field(0, help="LoRA rank for the student (0 = train all weights)")
    lora_alpha: int = field(16, help="LoRA alpha")

    def __post_init__(self):
        if self.lora_rank < 0:
            raise ValueError(f"model.lora_rank must be >= 0, got {self.lora_rank}")


@dataclass
class DataConfig:
    data: str = field(
        "",
        help="training jsonl (instruction/input/output) or hf:NAME[:split]; empty = built-in "
        "prompts",
    )
    eval_data: str = field(
        "", help="held-out jsonl or hf:NAME[:split] for ROUGE-L during training (empty = none)"
    )
    eval_limit: int = field(32, help="rows of eval_data scored at each evaluation")
    max_prompt_tokens: int = field(256, help="prompts are cut to their last N tokens")
    max_total_tokens: int = field(512, help="prompt + response tokens for ground-truth sequences")
    max_response_tokens: int | None = field(
        None,
        help="cut reference responses to their first N tokens (e.g. the rollout length, so "
        "that every method trains on the same number of response positions; None = no cut)",
    )
    chat_template: bool = field(False, help="wrap instructions in the tokenizer's chat template")
    limit: int | None = field(None, help="use the first N training rows only")
    long_prompts: Literal["skip", "truncate", "error"] = field(
        "skip", help="prompts over max_prompt_tokens: drop the row (counted), keep the end, or stop"
    )

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"data.limit must be >= 1 (or None for all rows), got {self.limit}")
        if self.eval_limit < 1:
            raise ValueError(f"data.eval_limit must be >= 1, got {self.eval_limit}")
        if self.max_response_tokens is not None and self.max_response_tokens < 1:
            raise ValueError(
                f"data.max_response_tokens must be >= 1 (or None), got {self.max_response_tokens}"
            )
        if self.max_prompt_tokens < 1 or self.max_total_tokens <= self.max_prompt_tokens:
            raise ValueError(
                f"data.max_total_tokens ({self.max_total_tokens}) must exceed "
                f"data.max_prompt_tokens ({self.max_prompt_tokens}) >= 1"
            )


@dataclass
class RolloutConfig:
    max_new_tokens: int = field(128, help="tokens generated per rollout")
    temperature: float = field(1.0, help="sampling temperature of rollouts")
    student_share: float = field(
        0.5, help="GKD: probability that a sequence is student-written (the paper's lambda)"
    )
    tau0: float = field(0.6, help="SWITCH: JSD threshold at position 0 (nats, JSD <= ln 2)")
    decay: float = field(0.02, help="SWITCH: decay rate of the threshold per position")
    schedule: Schedule = field("exponential", help="SWITCH: constant | linear | exponential")
    teacher_greedy: bool = field(False, help="SWITCH/SKD: the intervening teacher takes the argmax")
    block_size: int = field(4, help="draft length for draft-and-verify (1 = token by token)")
    adaptive_block: bool = field(True, help="adapt the draft length to the observed acceptance")
    skd_top_k: int = field(25, help="SKD: the student's token must be in the teacher's top-K")
    ada_window: int = field(5, help="AdaSwitch: sliding window length L")
    ada_factor: float = field(
        1.5, help="AdaSwitch: switch when the window mean exceeds K x the earlier mean"
    )
    distillm_share_max: float = field(1.0, help="DistiLLM: largest student-data share")
    distillm_share_step: float = field(
        0.1, help="DistiLLM: raise of the share when validation loss rises"
    )
    distillm_eps: float = field(
        0.1,
        help="DistiLLM: raise the share when the validation loss is at least this much above the "
        "loss at the last raise (the first reference is the loss before training)",
    )
    distillm_val_data: str = field(
        "",
        help="DistiLLM: held-out jsonl whose references give the validation loss (empty = the "
        "first batch of training rows)",
    )
    distillm_val_rows: int = field(64, help="DistiLLM: rows of distillm_val_data used")
    replay_size: int = field(256, help="DistiLLM: replay buffer capacity (sequences)")
    replay_reuse: float = field(
        0.5, help="DistiLLM: share of student data taken from the buffer when it is full enough"
    )

    def __post_init__(self):
        if self.distillm_val_rows < 1:
            raise ValueError(
                f"rollout.distillm_val_rows must be >= 1, got {self.distillm_val_rows}"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.student_share <= 1:
            raise ValueError(f"rollout.student_share must be in [0, 1], got {self.student_share}")
        if self.tau0 < 0 or self.decay < 0:
            raise ValueError(
                f"rollout.tau0 and rollout.decay must be >= 0, got {self.tau0}, {self.decay}"
            )
        if self.block_size < 1:
            raise ValueError(f"rollout.block_size must be >= 1, got {self.block_size}")
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0, got {self.temperature}")


@dataclass
class TrainConfig:
    method: Method = field(
        "switch", help="sft | kd | seqkd | imitkd | gkd | distillm | skd | switch | adaswitch"
    )
    divergence: Divergence | None = field(
        None, help="fkl | rkl | jsd | tv | sfkl | srkl (default: the method's)"
    )
    beta: float = field(0.5, help="JSD(beta) interpolation")
    alpha: float = field(0.1, help="skew KL mixing weight")
    kd_temperature: float = field(1.0, help="temperature of the divergence")
    sft_weight: float = field(0.0, help="add this x cross-entropy on ground-truth sequences")
    lr: float = field(5e-5, help="peak learning rate (AdamW)")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    warmup_steps: int = field(0, help="linear warm-up steps")
    lr_schedule: Literal["constant", "linear", "cosine"] = field(
        "constant",
        help="after the warm-up: constant, or decaying to 0 at max_steps (linear or cosine)",
    )
    batch_size: int = field(8, help="sequences per micro-batch on each process")
    grad_accum: int = field(
        1,
        help="micro-batches per optimiser step; the global batch is batch_size x grad_accum x "
        "processes",
    )
    max_steps: int = field(100, help="optimiser steps")
    max_grad_norm: float = field(1.0, help="gradient clipping (0 = off)")
    precision: Precision = field(
        "auto",
        help="precision of forward passes (autocast) and of rollout decoding: auto = bf16 where "
        "the device computes it natively, else fp32; fp32 rollouts are token-exact against the "
        "naive loop",
    )
    seed: int = field(0, help="seed of data order, rollouts and initialisation")
    log_every: int = field(1, help="write metrics.jsonl every N steps")
    eval_every: int = field(
        0, help="ROUGE-L on data.eval_data every N steps (0 = end only if eval_data)"
    )
    save_every: int = field(0, help="checkpoint every N steps (0 = end only)")
    output_dir: str | None = field(None, help="run folder (default runs/distill-<time>)")
    resume: bool = field(False, help="continue from the newest checkpoint in output_dir")
    overwrite: bool = field(
        False, help="replace an existing output_dir that is not a finished distill run"
    )
    progress: bool = field(True, help="show progress bars")
    report_to: Literal["none", "tensorboard", "wandb"] = field(
        "none",
        help="also log metrics to TensorBoard (run folder/tensorboard; pip install "
        "'lmsmith[tensorboard]') or Weights & Biases; metrics.jsonl is always written",
    )
    teacher_placement: Literal["auto", "replicate", "shard"] = field(
        "auto",
        help="the frozen teacher: a full copy on each device, or sharded through the FSDP / "
        "DeepSpeed ZeRO-3 engine that accelerate is configured with; auto shards only under "
        "those engines and when the teacher takes over half of a GPU's free memory",
    )

    def __post_init__(self):
        for name in ("lr", "batch_size", "grad_accum", "max_steps"):
            if not getattr(self, name) > 0:  # also rejects NaN
                raise ValueError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if self.log_every < 1:
            raise ValueError(f"train.log_every must be >= 1, got {self.log_every}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.resume and self.overwrite:
            raise ValueError("train.resume and train.overwrite exclude each other")
        if not 0 <= self.beta <= 1:
            raise ValueError(f"train.beta must be in [0, 1], got {self.beta}")
        if not 0 <= self.alpha < 1:
            raise ValueError(f"train.alpha must be in [0, 1), got {self.alpha}")
        if self.method == "sft" and self.divergence is not None:
            raise ValueError("train.divergence does not apply to method 'sft' (cross-entropy)")


@dataclass
class DistillConfig:
    model: ModelConfig = nested(ModelConfig)
    data: DataConfig = nested(DataConfig)
    rollout: RolloutConfig = nested(RolloutConfig)
    train: TrainConfig = nested(TrainConfig)

    @property
    def policy(self) -> str:
        return METHOD_DEFAULTS[self.train.method]["policy"]

    @property
    def divergence(self) -> str | None:
        return self.train.divergence or METHOD_DEFAULTS[self.train.method]["divergence"]
