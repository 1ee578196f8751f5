"""Run folders: resolved config, metrics.jsonl sink, atomic JSON writes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path


def _default(o):
    if is_dataclass(o):
        return asdict(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_text(path, text: str) -> None:
    """Write through a temporary file and a rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path, obj) -> None:
    """Write JSON atomically (see write_text)."""
    write_text(path, json.dumps(obj, indent=2, default=_default, ensure_ascii=False) + "\n")


def write_jsonl(path, rows) -> None:
    """Write one JSON object a line, atomically (see write_text)."""
    write_text(
        path, "".join(json.dumps(r, default=_default, ensure_ascii=False) + "\n" for r in rows)
    )


def make_run_dir(output_dir: str | None, kind: str) -> Path:
    """The given folder, or ``runs/<kind>-<timestamp>``."""
    path = (
        Path(output_dir)
        if output_dir
        else Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    path.mkdir(parents=True, exist_ok=True)
    return path


class MetricsSink:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (flushed each time)."""

    def __init__(self, path, truncate: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate and self.path.exists():
            self.path.unlink()

    def log(self, **row) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=_default) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def atomic_dir(final):
    """Yield a temporary sibling folder; on success it replaces ``final``, on error it is removed.

    Readers never see a half-written folder: the old one stays until the new one is complete."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
