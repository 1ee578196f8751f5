"""Typed configs of the ``lmsmith dialog`` commands: shared blocks, then one class per command.

A field shared by several commands is declared once, in a block the commands compose with
:func:`lmsmith.config.nested`: ``corpus`` (the documents and how they become passages),
``settings`` (the retrievers), ``gen`` (the reply model), ``grounding``. Blocks are addressed
with dots or, where the name is unique, directly: ``--bm25.k1 1.2`` or ``--k1 1.2``;
``--docs PATH``; ``--encoder PATH``; ``--reranker PATH``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmsmith.config import check_min, field, nested

RetrieverKind = Literal["bm25", "dense", "hybrid", "rerank"]


def progress_switch(default: bool = True):
    """The ``progress`` switch every long-running command has."""
    return field(default, help="show progress bars")


def overwrite_switch(what: str = "output folder"):
    """The ``overwrite`` switch of every command that writes a folder."""
    return field(False, help=f"replace an existing {what} that this command did not write")


@dataclass
class CorpusConfig:
    docs: str | None = field(
        None,
        help="documents: folder (md/txt/html), MD2D doc file, DPR sample or jsonl "
        "(with --data: the MD2D doc file, default beside the dial file)",
    )
    segmentation: Literal["structure", "token"] = field(
        "structure", help="passages by document sections or by fixed token windows"
    )
    size: int = field(100, help="token segmentation: whitespace tokens per passage")
    stride: int | None = field(None, help="token segmentation: step between windows (default size)")
    max_history: int | None = field(
        None, help="earlier dialogue turns kept in the query, most recent first (None: all)"
    )

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if self.stride is not None and not 1 <= self.stride <= self.size:
            raise ValueError(f"stride must be in [1, size={self.size}], got {self.stride}")
        if self.max_history is not None and self.max_history < 0:
            raise ValueError(f"max_history must be >= 0 or None, got {self.max_history}")


@dataclass
class BM25Config:
    k1: float = field(1.5, help="BM25 term-frequency saturation")
    b: float = field(0.75, help="BM25 length normalisation, in [0, 1]")
    stopwords: bool = field(True, help="drop English stopwords before indexing")

    def __post_init__(self):
        if self.k1 < 0:
            raise ValueError(f"k1 must be >= 0, got {self.k1}")
        if not 0 <= self.b <= 1:
            raise ValueError(f"b must be in [0, 1], got {self.b}")


@dataclass
class DenseConfig:
    encoder: str = field("minilm-l6", help="bi-encoder: embedded alias, HF folder or Hub id")
    max_length: int = field(256, help="passage tokens kept by the encoder")
    query_max_length: int = field(128, help="query tokens kept (the current turn comes first)")
    batch_size: int = field(32, help="texts encoded together")

    def __post_init__(self):
        check_min(self, 1, "max_length", "query_max_length", "batch_size")


@dataclass
class FusionConfig:
    method: Literal["rrf", "weighted"] = field(
        "rrf", help="reciprocal-rank fusion, or a weighted sum of min-max normalised scores"
    )
    rrf_k: int = field(60, help="RRF constant: score = sum 1 / (rrf_k + rank)")
    alpha: float = field(0.5, help="weighted: weight of the dense score (1 - alpha for BM25)")
    depth: int = field(100, help="candidates taken from each retriever before fusing")
    sparse_query: Literal["full", "current"] = field(
        "current", help="what BM25 sees: the whole query, or only the current turn (before [SEP])"
    )

    def __post_init__(self):
        if self.rrf_k < 0:
            raise ValueError(f"rrf_k must be >= 0, got {self.rrf_k}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")


@dataclass
class RerankConfig:
    reranker: str = field("", help="cross-encoder: HF folder (e.g. from train-retriever) or Hub id")
    first_stage: Literal["bm25", "dense", "hybrid"] = field(
        "hybrid", help="retriever whose candidates are reranked"
    )
    rerank_depth: int = field(20, help="candidates rescored by the cross-encoder")
    rerank_max_length: int = field(320, help="tokens of query + passage")
    rerank_batch_size: int = field(16, help="pairs scored together")

    def __post_init__(self):
        check_min(self, 1, "rerank_depth", "rerank_max_length", "rerank_batch_size")


@dataclass
class RetrieverConfig:
    bm25: BM25Config = nested(BM25Config)
    dense: DenseConfig = nested(DenseConfig)
    fusion: FusionConfig = nested(FusionConfig)
    rerank: RerankConfig = nested(RerankConfig)


@dataclass
class IndexConfig:
    corpus: CorpusConfig = nested(CorpusConfig, required=("docs",))
    output: str = field(
        "", help="index folder to write (replaced atomically)", required=True, aliases=("out",)
    )
    overwrite: bool = overwrite_switch("output folder")
    retriever: RetrieverKind = field("hybrid", help="which retriever to build")
    progress: bool = progress_switch()
    settings: RetrieverConfig = nested(RetrieverConfig)


@dataclass
class SearchConfig:
    index: str | None = field(
        None, help="index folder written by `lmsmith dialog index`", required=True
    )
    query: str = field("", help="the question (current turn first)", required=True)
    k: int = field(5, help="passages returned")
    json: str | None = field(None, help="also write the hits to this JSON file")

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")


@dataclass
class EvalRetrievalConfig:
    data: str = field(
        "",
        help="queries: MD2D dial file, DPR sample json, or instruction jsonl (contexts)",
        required=True,
    )
    extra_docs: list[str] = field([], help="instruction jsonl whose contexts join the corpus")
    retriever: RetrieverKind = field("bm25", help="retriever to evaluate")
    index: str | None = field(None, help="reuse this index folder instead of building one")
    json: str | None = field(None, help="write the metrics here")
    run_dir: str | None = field(None, help="also write per-query rankings here")
    overwrite: bool = overwrite_switch("run_dir")
    depth: int = field(100, help="passages retrieved per query (MRR cut-off)")
    limit: int | None = field(None, help="evaluate the first N queries only")
    progress: bool = progress_switch()
    corpus: CorpusConfig = nested(CorpusConfig)
    settings: RetrieverConfig = nested(RetrieverConfig)

    def __post_init__(self):
        if self.depth < 10:
            raise ValueError(f"depth must be >= 10 (R@10 needs it), got {self.depth}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


@dataclass
class TrainRetrieverConfig:
    data: str = field(
        "", help="training queries: MD2D dial file or instruction jsonl", required=True
    )
    model: Literal["bi-encoder", "cross-encoder"] = field(
        "bi-encoder", help="DPR-style bi-encoder, or a cross-encoder reranker"
    )
    init: str = field("minilm-l6", help="starting encoder: alias, HF folder or Hub id")
    output: str = field("", help="folder for the trained HF model (+ metrics.jsonl)", required=True)
    overwrite: bool = overwrite_switch("output folder")
    epochs: int = field(2, help="passes over the training queries")
    batch_size: int = field(16, help="queries per step (bi-encoder: in-batch negatives)")
    lr: float = field(2e-5, help="AdamW learning rate")
    warmup: float = field(0.1, help="share of steps with a linear warm-up")
    head_lr: float | None = field(
        None, help="cross-encoder: learning rate of the new head (pooler + classifier); None: lr"
    )
    scale: float = field(20.0, help="bi-encoder: cosine similarities are multiplied by this")
    hard_negatives: int = field(1, help="BM25-mined hard negatives per query")
    neg_rank_min: int = field(5, help="hard negatives come from BM25 ranks >= this (1-based)")
    neg_rank_max: int = field(15, help="... and <= this; the gold passage is never one")
    max_length: int = field(256, help="passage tokens (cross-encoder: query + passage)")
    query_max_length: int = field(128, help="bi-encoder query tokens")
    max_queries: int | None = field(None, help="train on the first N queries only")
    seed: int = field(0, help="random seed")
    progress: bool = progress_switch()
    corpus: CorpusConfig = nested(CorpusConfig)

    def __post_init__(self):
        check_min(self, 1, "epochs", "batch_size", "max_length", "query_max_length")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.head_lr is not None and self.head_lr <= 0:
            raise ValueError(f"head_lr must be > 0 or None, got {self.head_lr}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if self.hard_negatives < 0:
            raise ValueError(f"hard_negatives must be >= 0, got {self.hard_negatives}")
        if not 1 <= self.neg_rank_min <= self.neg_rank_max:
            raise ValueError(
                f"neg_rank_min/neg_rank_max must satisfy 1 <= min <= max, "
                f"got {self.neg_rank_min}, {self.neg_rank_max}"
            )
        if self.max_queries is not None and self.max_queries < 1:
            raise ValueError(f"max_queries must be >= 1, got {self.max_queries}")


@dataclass
class GenConfig:
    generator: str = field(
        "smollm2-135m-instruct", help="reply model: alias, HF folder (causal or seq2seq) or Hub id"
    )
    max_new_tokens: int = field(64, help="reply tokens generated (greedy)")
    max_prompt_tokens: int = field(1024, help="prompts are cut to their last N tokens")
    gen_batch_size: int = field(4, help="prompts generated together")
    passage_words: int = field(120, help="words of each passage put in the prompt")
    max_turns: int = field(4, help="earlier dialogue turns put in the prompt")
    reply_mode: Literal["extract", "generate", "phrase"] = field(
        "extract",
        help="reply = the grounding sentence (no LM), the LM's reply to the chat prompt, or "
        "the LM's rewrite of the grounding sentence (kept only if its figures match)",
    )

    def __post_init__(self):
        check_min(self, 1, "max_new_tokens", "max_prompt_tokens", "gen_batch_size", "passage_words")
        if self.max_turns < 0:
            raise ValueError(f"max_turns must be >= 0, got {self.max_turns}")


# Calibrated on the dev half of benchmarks/assets/grounded-qa (docs/methods.md, "Abstention")
DENSE_ABSTAIN_THRESHOLD = 0.537
DENSE_UNKNOWN_PENALTY = 0.05


@dataclass
class GroundConfig:
    grounder: Literal["dense", "reader", "sentence", "lm", "none"] = field(
        "dense",
        help="span picker: sentence closest in meaning (bi-encoder), trained extractive "
        "reader, query-overlap sentence, the generator itself (multi-task models), or none",
    )
    ground_encoder: str = field(
        "minilm-l6", help="dense grounder: bi-encoder (the index's own when it is the same)"
    )
    history_weight: float = field(
        0.5, help="dense grounder: weight of the similarity to the previous user turn"
    )
    unknown_penalty: float = field(
        DENSE_UNKNOWN_PENALTY,
        help="dense grounder: abstention score lost per question word the documents never use",
    )
    abstain_threshold: float | None = field(
        None,
        help="grounding score under which the reply says the documents do not answer "
        "(None: the calibrated value for grounder dense, no abstention for the others; "
        "-inf: never)",
    )
    reader: str = field("", help="reader folder (from train-reader); needed by grounder=reader")
    reader_max_length: int = field(256, help="reader tokens of query + passage")
    max_answer_tokens: int = field(64, help="longest span the reader may pick, in tokens")

    def __post_init__(self):
        if self.grounder == "reader" and not self.reader:
            raise ValueError("reader must name a reader folder when grounder is 'reader'")
        check_min(self, 1, "reader_max_length", "max_answer_tokens")
        for name in ("history_weight", "unknown_penalty"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def threshold(self) -> float | None:
        """The abstention threshold in force (None: never abstain)."""
        if self.abstain_threshold is not None:
            return None if self.abstain_threshold == float("-inf") else self.abstain_threshold
        return DENSE_ABSTAIN_THRESHOLD if self.grounder == "dense" else None


@dataclass
class AnswerConfig:
    index: str | None = field(
        None, help="index folder written by `lmsmith dialog index`", required=True
    )
    query: str = field("", help="the user's message", required=True)
    history: list[str] = field(
        [], help="earlier turns, oldest first, alternating user/agent (comma-separated)"
    )
    k: int = field(3, help="passages retrieved and put in the prompt")
    json: str | None = field(None, help="also write the answer to this JSON file")
    progress: bool = progress_switch(False)
    gen: GenConfig = nested(GenConfig)
    grounding: GroundConfig = nested(GroundConfig)

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")


@dataclass
class DialogEvalConfig:
    data: str = field(
        "", help="MD2D dial file, or instruction jsonl (rows with a context)", required=True
    )
    extra_docs: list[str] = field([], help="instruction jsonl whose contexts join the corpus")
    retriever: RetrieverKind = field("bm25", help="retriever built over the corpus")
    no_retrieval: bool = field(False, help="baseline: no documents in the prompt at all")
    index: str | None = field(None, help="reuse this index folder instead of building one")
    k: int = field(3, help="passages retrieved and put in the prompt")
    limit: int | None = field(None, help="evaluate the first N turns only")
    json: str | None = field(None, help="write the metrics here")
    run_dir: str | None = field(None, help="also write config, metrics and predictions here")
    overwrite: bool = overwrite_switch("run_dir")
    progress: bool = progress_switch()
    corpus: CorpusConfig = nested(CorpusConfig)
    settings: RetrieverConfig = nested(RetrieverConfig)
    gen: GenConfig = nested(GenConfig)
    grounding: GroundConfig = nested(GroundConfig)

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.no_retrieval and self.grounding.grounder != "none":
            raise ValueError("grounder must be 'none' when no_retrieval is set (nothing to ground)")


@dataclass
class TrainGeneratorConfig:
    data: str = field("", help="training turns: MD2D dial file or instruction jsonl", required=True)
    output: str = field("", help="folder for the merged HF model (+ metrics.jsonl)", required=True)
    overwrite: bool = overwrite_switch("output folder")
    multitask: bool = field(
        False, help="also train grounding-span copying in the same model (else reply only)"
    )
    steps: int = field(40, help="optimizer steps")
    batch_size: int = field(4, help="sequences per step")
    lr: float = field(2e-4, help="AdamW learning rate of the LoRA weights")
    lora_rank: int = field(16, help="LoRA rank (alpha = 2 x rank)")
    max_total_tokens: int = field(896, help="prompt + target tokens kept")
    gradient_checkpointing: bool = field(True, help="recompute activations: far less memory")
    limit: int | None = field(None, help="train on the first N turns only")
    seed: int = field(0, help="random seed")
    progress: bool = progress_switch()
    corpus: CorpusConfig = nested(CorpusConfig)
    gen: GenConfig = nested(GenConfig)

    def __post_init__(self):
        check_min(self, 1, "steps", "batch_size", "lora_rank", "max_total_tokens")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


@dataclass
class TrainReaderConfig:
    data: str = field("", help="training turns: MD2D dial file or instruction jsonl", required=True)
    init: str = field("minilm-l6", help="starting encoder: alias, HF folder or Hub id")
    output: str = field("", help="folder for the trained reader (HF QA model)", required=True)
    overwrite: bool = overwrite_switch("output folder")
    epochs: int = field(2, help="passes over the training turns")
    batch_size: int = field(8, help="examples per step")
    lr: float = field(5e-5, help="AdamW learning rate")
    max_length: int = field(256, help="tokens of query + passage")
    limit: int | None = field(None, help="train on the first N turns only")
    seed: int = field(0, help="random seed")
    progress: bool = progress_switch()
    corpus: CorpusConfig = nested(CorpusConfig)

    def __post_init__(self):
        check_min(self, 1, "epochs", "batch_size", "max_length")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


@dataclass
class ServeConfig:
    index: str | None = field(
        None, help="index folder written by `lmsmith dialog index`", required=True
    )
    host: str = field("127.0.0.1", help="address to listen on (0.0.0.0 exposes it)")
    port: int = field(8000, help="TCP port (0: any free port)")
    allowed_hosts: list[str] = field(
        [], help="Host header values accepted (empty: localhost, 127.0.0.1, [::1]; '*': any)"
    )
    k: int = field(3, help="passages retrieved and cited per reply")
    max_body_bytes: int = field(16384, help="largest request body accepted (else 413)")
    max_message_chars: int = field(2000, help="longest message accepted (else 413)")
    max_conversations: int = field(1000, help="conversations kept in memory (oldest dropped)")
    max_queue: int = field(8, help="turns admitted at once, waiting or running (else 429)")
    queue_timeout_s: float = field(60.0, help="a turn that waited longer gets 503")
    max_connections: int = field(64, help="open connections at once (else 503)")
    timeout_keep_alive_s: int = field(5, help="idle keep-alive connections are closed after")
    timeout_request_s: float = field(
        10.0,
        help="a request's head, and each piece of its body, must arrive within (else closed / 408)",
    )
    gen: GenConfig = nested(GenConfig)
    grounding: GroundConfig = nested(GroundConfig)

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        check_min(
            self,
            1,
            "k",
            "max_body_bytes",
            "max_message_chars",
            "max_conversations",
            "max_queue",
            "max_connections",
            "timeout_keep_alive_s",
        )
        for name in ("queue_timeout_s", "timeout_request_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
