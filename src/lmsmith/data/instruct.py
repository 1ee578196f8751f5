"""Instruction data: the jsonl format of the KD benchmarks (Dolly, Self-Instruct...).

A row has ``instruction`` (str), ``input`` (str, may be empty), ``output`` (a reference string
or a list of them) and optionally ``prompt`` (the template already filled in).

``hf:NAME[:split]`` instead of a file loads a dataset through ``datasets.load_dataset`` (a Hub
id when online, or a local folder of data files); Dolly's column names ``context`` and
``response`` are read as ``input`` and ``output``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from lmsmith.data.jsonl import read_jsonl
from lmsmith.errors import DataError
from lmsmith.runs import write_jsonl

log = logging.getLogger(__name__)

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class InstructExample:
    instruction: str
    input: str = ""
    references: list[str] = field(default_factory=list)
    prompt: str | None = None
    source: str = ""  # "file:line", for messages
    category: str = ""


def _check_str(obj, key, path, line, required=True):
    if key not in obj:
        if required:
            raise DataError(path, line, key, "missing (expected a string)")
        return None
    val = obj[key]
    if val is None and not required:
        return None
    if not isinstance(val, str):
        raise DataError(path, line, key, f"expected a string, got {type(val).__name__}")
    return val


def parse_row(obj: object, path, line: int, need_output: bool = True) -> InstructExample:
    """Check one record and turn it into an ``InstructExample``.

    Args:
        obj: the decoded JSON value of the line (or a dataset row as a dict).
        path: the file (or ``hf:`` source), for messages.
        line: its line (row) number, for messages.
        need_output: a missing ``output`` is an error.

    Returns:
        The row, ``source`` set to ``path:line``.

    Raises:
        DataError: a missing or mistyped field, naming file, line and field.
    """
    if not isinstance(obj, dict):
        raise DataError(path, line, None, f"expected a JSON object, got {type(obj).__name__}")
    instruction = _check_str(obj, "instruction", path, line)
    if not instruction.strip():
        raise DataError(path, line, "instruction", "is empty")
    inp = _check_str(obj, "input", path, line, required=False) or ""
    prompt = _check_str(obj, "prompt", path, line, required=False)
    refs: list[str] = []
    if "output" in obj:
        out = obj["output"]
        if isinstance(out, str):
            refs = [out]
        elif isinstance(out, list) and out and all(isinstance(o, str) for o in out):
            refs = list(out)
        else:
            raise DataError(
                path, line, "output", "expected a string or a non-empty list of strings"
            )
    elif need_output:
        raise DataError(path, line, "output", "missing (expected a reference string or a list)")
    return InstructExample(
        instruction=instruction,
        input=inp,
        references=refs,
        prompt=prompt,
        source=f"{path}:{line}",
        category=str(obj.get("category", "")),
    )


def load_instruct(
    path: str | Path, limit: int | None = None, need_output: bool = True
) -> list[InstructExample]:
    """Read instruction rows from a jsonl file or a ``datasets`` dataset.

    Args:
        path: a jsonl file, or ``hf:NAME[:split]`` (split ``train`` by default) for
            ``datasets.load_dataset(NAME, split=split)``.
        limit: keep the first N rows only.
        need_output: a row without ``output`` is an error (else it gets no references).

    Returns:
        The rows, in file order; ``source`` is ``file:line`` (or ``hf:NAME:split:row``).

    Raises:
        DataError: a bad row (naming file, line and field), or no rows at all.
    """
    if str(path).startswith("hf:"):
        return _load_hf(str(path)[3:], limit, need_output)
    path = Path(path)
    rows: list[InstructExample] = []
    for lineno, obj in read_jsonl(path):
        rows.append(parse_row(obj, path, lineno, need_output))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise DataError(path, None, None, "contains no rows")
    return rows


_HF_ALIASES = {"input": "context", "output": "response"}  # Dolly's column names


def _load_hf(spec: str, limit: int | None, need_output: bool) -> list[InstructExample]:
    """``NAME[:split]`` through ``datasets.load_dataset``; rows are numbered from 1."""
    name, _, split = spec.partition(":")
    split = split or "train"
    if not name:
        raise DataError(f"hf:{spec}", None, None, "expected hf:NAME or hf:NAME:split")
    import datasets

    source = f"hf:{name}:{split}"
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types (missing, offline, bad split)
        raise DataError(source, None, None, f"could not load the dataset: {e}") from e
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    rows = []
    for i, obj in enumerate(ds, start=1):
        obj = dict(obj)
        for key, alias in _HF_ALIASES.items():
            if key not in obj and alias in obj:
                obj[key] = obj[alias]
        rows.append(parse_row(obj, source, i, need_output))
    if not rows:
        raise DataError(source, None, None, "contains no rows")
    log.info("loaded %d rows from %s", len(rows), source)
    return rows


def builtin_prompts() -> list[InstructExample]:
    """The instructions written for lmsmith, shipped as package data.

    Returns:
        At least 100 rows across several categories, without references.
    """
    ref = resources.files("lmsmith.data").joinpath("builtin_prompts.jsonl")
    with resources.as_file(ref) as p:
        return load_instruct(p, need_output=False)


def save_instruct(rows: list[InstructExample], path) -> None:
    """Write rows back as jsonl, atomically (e.g. teacher-written references).

    Args:
        rows: the rows; a single reference is written as a string, several as a list.
        path: the file to (over)write; its folder is created.
    """
    recs = []
    for r in rows:
        out = r.references[0] if len(r.references) == 1 else r.references
        rec = {"instruction": r.instruction, "input": r.input, "output": out}
        if r.prompt is not None:
            rec["prompt"] = r.prompt
        recs.append(rec)
    write_jsonl(path, recs)


def build_prompt(ex: InstructExample, tokenizer=None, chat_template: bool = False) -> str:
    """The text the model continues.

    Args:
        ex: the row.
        tokenizer: needed for ``chat_template``.
        chat_template: wrap instruction and input as one user turn of the tokenizer's template.

    Returns:
        The chat-templated prompt, else the row's own ``prompt``, else the Alpaca template.

    Raises:
        DataError: ``chat_template`` with a tokenizer that has none.
    """
    if chat_template:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError(
                ex.source, None, None, "chat_template requested but the tokenizer has none"
            )
        user = ex.instruction if not ex.input else f"{ex.instruction}\n\n{ex.input}"
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    if ex.prompt:
        return ex.prompt
    tpl = ALPACA_WITH_INPUT if ex.input else ALPACA_NO_INPUT
    return tpl.format(instruction=ex.instruction, input=ex.input)


def tokenize_prompt(tokenizer, text: str, max_prompt: int) -> tuple[list[int], bool]:
    """Tokenise a prompt, keeping its last ``max_prompt`` tokens (the end matters most).

    Args:
        tokenizer: a ``transformers`` tokenizer (no special tokens are added).
        text: the prompt.
        max_prompt: the most tokens kept.

    Returns:
        ``(ids, truncated)``.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) > max_prompt:
        return ids[-max_prompt:], True
    return ids, False
