"""Tiny in-process encoders for the dialog tests: a 2-layer BERT (hidden 32) and a WordPiece
tokenizer whose vocabulary covers the fixture's words (plus letters, so nothing is unknown)."""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest
import torch

from lmsmith.dialog.corpus import Passage

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "md2d"


def _vocab(texts: list[str]) -> list[str]:
    words = sorted({w for t in texts for w in re.findall(r"[a-z0-9]+", t.lower())})
    letters = list(string.ascii_lowercase + string.digits)
    punct = list(string.punctuation)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    seen, out = set(), []
    for tok in specials + punct + letters + ["##" + c for c in letters] + words:
        if tok not in seen:
            seen.add(tok)
            out.append(tok)
    return out


def _fixture_texts() -> list[str]:
    texts = []
    for f in sorted(ASSETS.glob("*.json")):
        texts.append(f.read_text())
    return texts


def build_tiny(folder: Path, head: bool = False, seed: int = 0) -> Path:
    """Save a tiny BERT (encoder, or with a one-logit head) + tokenizer to ``folder``."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = _vocab(_fixture_texts() + ["question answer search retrieval passage"])
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=256,
        num_labels=1,
        initializer_range=0.5,  # spread-out random embeddings: fewer near-ties between passages
    )
    model = BertForSequenceClassification(cfg) if head else BertModel(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> str:
    return str(build_tiny(tmp_path_factory.mktemp("tiny-encoder")))


@pytest.fixture(scope="session")
def tiny_cross(tmp_path_factory) -> str:
    return str(build_tiny(tmp_path_factory.mktemp("tiny-cross"), head=True, seed=1))


@pytest.fixture
def md2d_dir() -> Path:
    return ASSETS


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared CPU the intra-op thread pool
    spins waiting for busy cores (a 1 s test took 40 s): run these tests single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class BowEncoder:
    """Unit bag-of-words vectors: the cosine of two texts is their normalised word overlap
    (a stand-in for MiniLM with the sentence-transformers ``encode_*`` API)."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.calls = 0

    def encode_query(self, texts):
        import re

        import numpy as np

        self.calls += 1
        rows = []
        for t in texts:
            v = np.zeros(512, dtype=np.float32)
            for w in re.findall(r"[a-z0-9]+", t.lower()):
                if w not in {"the", "a", "of", "is", "do", "i", "how", "what", "my", "to"}:
                    v[self.vocab.setdefault(w, len(self.vocab))] += 1
            rows.append(v / max(1e-9, float(np.linalg.norm(v))))
        return np.stack(rows)

    encode_document = encode_query


_PAGES = [
    Passage(
        "m::1",
        "Moving / Address // You must report a change of address within ten days. "
        "Reporting is free.",
        title="Moving / Address",
    ),
    Passage(
        "l::1",
        "Library / Borrowing // Books are lent for 21 days. DVDs are lent for 7 days.",
        title="Library / Borrowing",
    ),
]


@pytest.fixture
def bow_encoder():
    return BowEncoder


@pytest.fixture
def pages():
    return list(_PAGES)
