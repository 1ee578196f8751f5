"""The one jsonl reader every loader uses: (line number, object) pairs, errors with file:line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from lmsmith.errors import DataError


def read_jsonl(path) -> Iterator[tuple[int, object]]:
    """Yield ``(lineno, parsed object)`` for each non-blank line; DataError on a missing file or
    a line that is not JSON."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "no such file")
    with path.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(
                    path, lineno, None, f"not valid JSON ({e.msg} at column {e.colno})"
                ) from None
