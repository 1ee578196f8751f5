"""Typed configs for ``lmsmith debias``: one dataclass per concern, validated on creation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmsmith.config import field, nested
from lmsmith.debias.prompts import INSTRUCTIONS

BASELINES = ("cc", "dc", "random")


@dataclass
class SplitConfig:
    dev_frac: float = field(0.1, help="share of each category's rows (whole templates) for dev")
    split_seed: int = field(0, help="seed of the template-disjoint dev/test split")
    test_limit: int | None = field(
        300, help="score a seeded subset of N test rows (none = the whole test split)"
    )
    search_rows: int | None = field(
        100, help="dev rows that score each n of the search (none = all dev rows)"
    )

    def __post_init__(self):
        if not 0 < self.dev_frac < 1:
            raise ValueError(f"dev_frac must be in (0, 1), got {self.dev_frac}")
        for name in ("test_limit", "search_rows"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or none, got {v}")


@dataclass
class PromptConfig:
    mode: Literal["logprob", "generate"] = field(
        "logprob", help="score the options by log-probability, or generate and match"
    )
    chat_template: bool = field(True, help="wrap prompts in the tokenizer's chat template")
    length_norm: Literal["sum", "mean"] = field(
        "sum", help="option score: summed token log-probs, or their mean per token"
    )
    eval_instructions: int = field(
        3, help=f"paraphrases each test row is scored with (1-{len(INSTRUCTIONS)})"
    )
    batch_size: int = field(8, help="prompts scored together")
    max_prompt_tokens: int = field(512, help="prompts are cut to their last N tokens")
    max_new_tokens: int = field(16, help="answer length in generate mode")

    def __post_init__(self):
        if not 1 <= self.eval_instructions <= len(INSTRUCTIONS):
            raise ValueError(
                f"eval_instructions must be in [1, {len(INSTRUCTIONS)}], got {self.eval_instructions}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_prompt_tokens < 8:
            raise ValueError(f"max_prompt_tokens must be >= 8, got {self.max_prompt_tokens}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class AttributionConfig:
    n_instances: int = field(20, help="dev instances sampled per seed")
    attr_instructions: int = field(3, help="paraphrases each sampled instance is attributed with")
    seeds: list[int] = field([0], help="seeds of the instance sampling (scores are averaged)")
    lam: float = field(1.0, help="λ, weight of the skill penalty max(0, α·skill)")
    batch_size: int = field(4, help="(instance, option) sequences per forward/backward pass")

    def __post_init__(self):
        if self.n_instances < 1:
            raise ValueError(f"n_instances must be >= 1, got {self.n_instances}")
        if not 1 <= self.attr_instructions <= len(INSTRUCTIONS):
            raise ValueError(
                f"attr_instructions must be in [1, {len(INSTRUCTIONS)}], got {self.attr_instructions}"
            )
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.batch_size < 2:
            raise ValueError(f"attribution batch_size must be >= 2, got {self.batch_size}")


@dataclass
class PruneConfig:
    n: int | None = field(None, help="prune exactly N units (none = golden-section search)")
    search_max: int = field(500, help="the search runs over n in [0, search_max]")
    search_tol: int = field(4, help="stop when the search bracket is at most this wide")
    search_instructions: int = field(1, help="paraphrases each dev row is scored with in search")
    max_evals: int = field(16, help="at most this many dev evaluations in the search")

    def __post_init__(self):
        if self.n is not None and self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")
        if self.search_max < 1:
            raise ValueError(f"search_max must be >= 1, got {self.search_max}")
        if self.search_tol < 1:
            raise ValueError(f"search_tol must be >= 1, got {self.search_tol}")
        if not 1 <= self.search_instructions <= len(INSTRUCTIONS):
            raise ValueError(
                f"search_instructions must be in [1, {len(INSTRUCTIONS)}], "
                f"got {self.search_instructions}"
            )
        if self.max_evals < 3:
            raise ValueError(f"max_evals must be >= 3, got {self.max_evals}")


@dataclass
class BaselineConfig:
    methods: list[str] = field(
        [], help="baselines run on the test split too: any of cc, dc, random"
    )
    content_free: list[str] = field(["N/A"], help="CC: content-free strings (priors averaged)")
    dc_draws: int = field(2, help="DC: random in-domain texts per row (priors averaged)")
    random_seeds: list[int] = field([0], help="random-units control: one run per seed")

    def __post_init__(self):
        bad = [m for m in self.methods if m not in BASELINES]
        if bad:
            raise ValueError(f"methods: unknown baseline(s) {bad}; allowed {list(BASELINES)}")
        if "cc" in self.methods and not self.content_free:
            raise ValueError("content_free must list at least one string for cc")
        if self.dc_draws < 1:
            raise ValueError(f"dc_draws must be >= 1, got {self.dc_draws}")
        if "random" in self.methods and not self.random_seeds:
            raise ValueError("random_seeds must list at least one seed for random")


@dataclass
class RetentionConfig:
    retention_rows: int = field(0, help="ROUGE-L on N instruction rows before/after (0 = off)")
    retention_data: str = field(
        "", help="instruction jsonl for the retention check (default ../shared dolly valid)"
    )
    retention_tokens: int = field(64, help="greedy tokens generated per retention answer")

    def __post_init__(self):
        if self.retention_rows < 0:
            raise ValueError(f"retention_rows must be >= 0, got {self.retention_rows}")
        if self.retention_tokens < 1:
            raise ValueError(f"retention_tokens must be >= 1, got {self.retention_tokens}")


@dataclass
class DebiasConfig:
    model: str = field("smollm2-135m-instruct", help="alias, local HF folder or Hub id")
    data: str = field(
        "", help="BBQ jsonl file(s) in the official schema, comma-separated", required=True
    )
    categories: list[str] = field([], help="keep only these categories (empty = all)")
    scores: str | None = field(None, help="prune/run: reuse this attribution.safetensors")
    output_dir: str | None = field(None, help="run folder (default runs/debias-<command>-<time>)")
    overwrite: bool = field(
        False, help="replace an existing output folder that is not a finished run of the command"
    )
    progress: bool = field(True, help="show progress bars")
    split: SplitConfig = nested(SplitConfig)
    prompt: PromptConfig = nested(PromptConfig)
    attribution: AttributionConfig = nested(AttributionConfig)
    prune: PruneConfig = nested(PruneConfig)
    baselines: BaselineConfig = nested(BaselineConfig)
    retention: RetentionConfig = nested(RetentionConfig)

    def __post_init__(self):
        if not self.model:
            raise ValueError("model must name a model")
        calib = [m for m in self.baselines.methods if m in ("cc", "dc")]
        if calib and self.prompt.mode != "logprob":
            raise ValueError(f"baselines {calib} calibrate option scores: they need mode logprob")
