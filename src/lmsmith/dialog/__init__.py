"""Document-grounded dialogue (MultiDoc2Dial): passages, retrieval, grounding, generation.

``corpus`` turns documents into passages and retrieval sets, ``retrieve`` holds BM25, dense,
hybrid and reranking retrievers (``build_retriever``, ``save_index`` / ``load_index``),
``train`` fine-tunes bi- and cross-encoders, ``ground`` finds the span a reply rests on,
``generate`` writes replies (``load_generator``, ``train_generator``), ``pipeline`` puts one
turn together (``Pipeline``, ``evaluate``), ``serve`` answers over HTTP, ``tasks`` has one
function per ``lmsmith dialog`` command and ``cli`` what each prints::

    from lmsmith import dialog

    index = dialog.load_index("runs/my-index")
    model, tok, seq2seq = dialog.load_generator("smollm2-135m-instruct")
    pipe = dialog.Pipeline(index, model, tok, seq2seq=seq2seq)

Names are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmsmith._lazy import lazy_exports

_CONFIGS = (
    "RetrieverConfig",
    "IndexConfig",
    "SearchConfig",
    "EvalRetrievalConfig",
    "TrainRetrieverConfig",
    "AnswerConfig",
    "DialogEvalConfig",
    "TrainGeneratorConfig",
    "TrainReaderConfig",
    "ServeConfig",
)
_EXPORTS = {
    **dict.fromkeys(_CONFIGS, "lmsmith.dialog.config"),
    "build_retriever": "lmsmith.dialog.retrieve",
    "save_index": "lmsmith.dialog.retrieve",
    "load_index": "lmsmith.dialog.retrieve",
    "load_generator": "lmsmith.dialog.generate",
    "train_generator": "lmsmith.dialog.generate",
    "DialogExample": "lmsmith.dialog.generate",
    "ExtractiveReader": "lmsmith.dialog.ground",
    "Pipeline": "lmsmith.dialog.pipeline",
    "evaluate": "lmsmith.dialog.pipeline",
    "make_server": "lmsmith.dialog.serve",
}
__all__ = [
    "AnswerConfig",
    "DialogEvalConfig",
    "EvalRetrievalConfig",
    "IndexConfig",
    "RetrieverConfig",
    "SearchConfig",
    "ServeConfig",
    "TrainGeneratorConfig",
    "TrainReaderConfig",
    "TrainRetrieverConfig",
    "DialogExample",
    "load_generator",
    "train_generator",
    "ExtractiveReader",
    "Pipeline",
    "evaluate",
    "build_retriever",
    "load_index",
    "save_index",
    "make_server",
]

if TYPE_CHECKING:
    from lmsmith.dialog.config import (
        AnswerConfig,
        DialogEvalConfig,
        EvalRetrievalConfig,
        IndexConfig,
        RetrieverConfig,
        SearchConfig,
        ServeConfig,
        TrainGeneratorConfig,
        TrainReaderConfig,
        TrainRetrieverConfig,
    )
    from lmsmith.dialog.generate import DialogExample, load_generator, train_generator
    from lmsmith.dialog.ground import ExtractiveReader
    from lmsmith.dialog.pipeline import Pipeline, evaluate
    from lmsmith.dialog.retrieve import build_retriever, load_index, save_index
    from lmsmith.dialog.serve import make_server


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
