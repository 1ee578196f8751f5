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
        80, help="score a seeded subset of N test rows (none = the whole test split)"
    )
    search_rows: int | None = field(
        24, help="dev rows (half ambiguous, half disambiguated) scoring each n of the search"
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
        2, help=f"paraphrases each test row is scored with (1-{len(INSTRUCTIONS)})"
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
    n_instances: int = field(10, help="dev instances sampled per seed (half ambiguous)")
    attr_instructions: int = field(2, help="paraphrases each sampled instance is attributed with")
    seeds: list[int] = field([0], help="seeds of the instance sampling (scores are averaged)")
    lam: float = field(1.0, help="λ, weight of the skill penalty max(0, α·skill)")
    batch_size: int = field(4, help="(instance, option) sequences per forward/backward pass")
    positions: Literal["answer", "all"] = field(
        "answer",
        help="max over: answer = the positions that predict the option (causal LM: last prompt "
        "token + option; encoder: input, decoder: option), all = every token (old behaviour)",
    )
    alpha: Literal["prob", "softmax"] = field(
        "prob", help="α: prob = raw P(ŷ|x) (official code), softmax = over the three options"
    )

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
    n: int | None = field(None, help="prune exactly N units (none = the constrained search)")
    search_max: int = field(512, help="the search grid is 0, 1, 2, 4, ... up to search_max")
    search_instructions: int = field(2, help="paraphrases each dev row is scored with in search")
    objective: Literal["ambig", "bias"] = field(
        "ambig",
        help="what the search improves: ambig = ambiguous accuracy, bias = -(|s_AMB| + |s_DIS|)",
    )
    min_gain: float = field(
        2.0, help="a pruning must beat n=0 on the dev objective by this much (points)"
    )
    max_dis_drop: float = field(
        5.0, help="δ: disambiguated accuracy may fall at most this much below n=0 (points)"
    )
    max_unknown_rise: float = field(
        10.0, help="'unknown' rate on disambiguated rows may rise at most this much (points)"
    )
    max_nll_rise: float = field(
        0.05, help="held-out next-token NLL may rise at most this fraction over n=0"
    )
    max_one_kind: float = field(
        90.0, help="a model giving >= this % of its answers to one option kind is degenerate"
    )
    refine: int = field(1, help="rounds of local refinement around the best feasible grid n")
    patience: int = field(2, help="stop the grid after this many infeasible n in a row")
    guard_top_k: int = field(12, help="guard: ablate each of the top K units alone (0 = off)")
    guard_max_rise: float = field(
        0.02, help="guard: drop a unit whose lone ablation raises held-out NLL by this fraction"
    )
    allow_degenerate: bool = field(False, help="write model/ even when the verdict is degenerate")

    def __post_init__(self):
        if self.n is not None and self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")
        if self.search_max < 1:
            raise ValueError(f"search_max must be >= 1, got {self.search_max}")
        if not 2 <= self.search_instructions <= len(INSTRUCTIONS):
            raise ValueError(
                f"search_instructions must be in [2, {len(INSTRUCTIONS)}], "
                f"got {self.search_instructions}"
            )
        for name in ("min_gain", "max_dis_drop", "max_unknown_rise", "max_nll_rise",
                     "guard_max_rise"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.max_one_kind <= 100:
            raise ValueError(f"max_one_kind must be in (0, 100], got {self.max_one_kind}")
        if self.refine < 0 or self.patience < 1 or self.guard_top_k < 0:
            raise ValueError("refine and guard_top_k must be >= 0, patience >= 1")


@dataclass
class BaselineConfig:
    methods: list[str] = field(
        ["random"], help="baselines run on the test split too: any of cc, dc, random"
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
    heldout_data: str = field(
        "", help="instruction jsonl for the guard and the search's NLL (default dolly dev)"
    )
    heldout_rows: int = field(16, help="rows of heldout_data scored by next-token NLL")
    retention_data: str = field(
        "", help="instruction jsonl for the reported retention (default dolly valid)"
    )
    retention_nll_rows: int = field(24, help="rows of retention_data: NLL before/after")
    nll_tokens: int = field(64, help="each NLL text is cut to its first N tokens")
    retention_rows: int = field(0, help="ROUGE-L on N retention_data rows before/after (0 = off)")
    retention_tokens: int = field(64, help="greedy tokens generated per retention answer")

    def __post_init__(self):
        for name in ("retention_rows",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("heldout_rows", "retention_nll_rows", "retention_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.nll_tokens < 2:
            raise ValueError(f"nll_tokens must be >= 2, got {self.nll_tokens}")


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


@dataclass
class TestbedConfig:
    """``lmsmith debias testbed``: fine-tune a causal LM into a BBQ-style multiple-choice reader
    on categories that CRISPR is never evaluated on."""

    __test__ = False  # not a pytest class

    model: str = field("smollm2-135m-instruct", help="alias, local HF folder or Hub id")
    data: str = field(
        "", help="BBQ jsonl file(s) or folder(s) to train on, comma-separated", required=True
    )
    output_dir: str | None = field(None, help="run folder (default runs/debias-testbed-<time>)")
    overwrite: bool = field(
        False, help="replace an existing output folder that is not a finished testbed run"
    )
    dev_frac: float = field(0.2, help="share of each category's rows (whole templates) for dev")
    split_seed: int = field(0, help="seed of the template-disjoint train/dev split")
    dev_rows: int = field(120, help="dev rows scored before and after (half ambiguous)")
    eval_instructions: int = field(2, help="paraphrases each dev row is scored with")
    steps: int = field(200, help="optimizer steps")
    batch_size: int = field(4, help="rows per step (each scores its three options)")
    lr: float = field(5e-5, help="AdamW peak learning rate (linear warm-up then decay)")
    warmup: int = field(10, help="warm-up steps")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    train_layers: int = field(
        12, help="train only the top N decoder layers and the final norm (0 = all weights)"
    )
    gold_nll: float = field(
        0.1, help="weight of the gold option's per-token NLL added to the option cross-entropy"
    )
    pairs: bool = field(
        False,
        help="train both question polarities of a context in the same step (the answer flips "
        "with the question, so a pair is solved only by reading it)",
    )
    eval_every: int = field(0, help="score the dev rows every N steps too (0 = before/after only)")
    seed: int = field(0, help="seed of the row order, the paraphrase draws and torch")
    log_every: int = field(10, help="log the mean loss every N steps")
    max_prompt_tokens: int = field(512, help="prompts are cut to their last N tokens")
    progress: bool = field(True, help="show progress bars")

    def __post_init__(self):
        if not 0 < self.dev_frac < 1:
            raise ValueError(f"dev_frac must be in (0, 1), got {self.dev_frac}")
        for name in ("dev_rows", "steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.eval_instructions <= len(INSTRUCTIONS):
            raise ValueError(
                f"eval_instructions must be in [1, {len(INSTRUCTIONS)}], "
                f"got {self.eval_instructions}"
            )
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup < 0 or self.train_layers < 0 or self.gold_nll < 0:
            raise ValueError("warmup, train_layers and gold_nll must be >= 0")
