"""The one jsonl reader every loader uses: (line number, object) pairs, errors with file:line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from lmsmith.errors import DataError

MAX_ROW_BYTES = 1 << 20  # 1 MiB; the environment variable LMSMITH_MAX_ROW_BYTES overrides it


def max_row_bytes() -> int:
    """The largest jsonl line accepted, in bytes (``LMSMITH_MAX_ROW_BYTES`` or 1 MiB)."""
    raw = os.environ.get("LMSMITH_MAX_ROW_BYTES", "")
    return int(raw) if raw.strip().isdigit() and int(raw) > 0 else MAX_ROW_BYTES


def read_jsonl(path, max_bytes: int | None = None) -> Iterator[tuple[int, object]]:
    """Yield ``(lineno, parsed object)`` for each non-blank line.

    DataError (naming file and line) on a missing file, a line that is not UTF-8 or not JSON,
    or a line longer than ``max_bytes`` (default :func:`max_row_bytes`): a row that size is a
    mistake, and would cost minutes and gigabytes to tokenize.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "no such file")
    limit = max_row_bytes() if max_bytes is None else max_bytes
    with path.open("rb") as f:
        lineno = 0
        while True:
            raw = f.readline(limit + 1)
            if not raw:
                break
            lineno += 1
            if len(raw) > limit and not (len(raw) == limit + 1 and raw.endswith(b"\n")):
                raise DataError(
                    path,
                    lineno,
                    None,
                    f"row longer than {limit} bytes (set LMSMITH_MAX_ROW_BYTES to allow more)",
                )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    path, lineno, None, f"not UTF-8 text (byte {e.start} of the line)"
                ) from None
            if not text.strip():
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(
                    path, lineno, None, f"not valid JSON ({e.msg} at column {e.colno})"
                ) from None
