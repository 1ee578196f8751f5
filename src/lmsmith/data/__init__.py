"""One loader per data format: instruct.py (instruction jsonl), bbq.py, md2d.py."""

import os
from pathlib import Path


def shared_data_dir() -> Path | None:
    """The real data kept beside the project (``../shared/data``), or ``$LMSMITH_DATA``."""
    env = os.environ.get("LMSMITH_DATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    # src/lmsmith/data/__init__.py → project root is parents[3]
    candidates += [
        Path.cwd().parent / "shared" / "data",
        here.parents[3].parent / "shared" / "data",
    ]
    for c in candidates:
        if c.is_dir():
            return c
    return None
