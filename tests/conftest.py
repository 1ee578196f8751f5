import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tiny():
    """A tiny random Llama and a character-level tokenizer, built in-process."""
    from lmsmith.models import tiny_causal_lm, tiny_tokenizer

    return tiny_causal_lm(seed=0), tiny_tokenizer()


@pytest.fixture
def instruct_file(tmp_path):
    import json

    rows = [
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Repeat the word.", "input": "apple", "output": ["apple", "an apple"]},
        {
            "instruction": "Count to three.",
            "input": "",
            "output": "one two three",
            "prompt": "Count:\n",
        },
    ]
    p = tmp_path / "rows.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p
