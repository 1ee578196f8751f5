"""Run folders: resolved config, metrics.jsonl sink, atomic JSON writes.

The rule every command follows (README, "What lmsmith promises"): a command never deletes or
overwrites anything it did not create. :func:`prepare_output` checks an output folder *before*
any model loads: a folder that exists and is not a finished run of the same command is refused
(exit 2) unless ``--overwrite`` is given; ``--resume`` needs an unfinished run of the same
command. :class:`Output` then creates the folder when the work starts, marks it finished at the
end, and removes what it wrote when the command fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

from lmsmith.errors import UserError

MARKER = "run.json"  # {"command": ..., "status": "running" | "finished"}


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
    if final.exists() and not final.is_dir():
        raise UserError(f"'{final}' is a file; a folder was to be written there (nothing written)")
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


# ------------------------------------------------------------------ output folders


def check_writable(path) -> None:
    """UserError unless ``path`` can be created (or written, when it exists): the nearest
    existing ancestor must be a writable folder."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe != path and not probe.is_dir():
        raise UserError(f"cannot create '{path}': '{probe}' is a file")
    if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to '{probe}': permission denied")


def check_output_file(path) -> None:
    """An output *file* (``--json``): its folder must be writable and it must not be a folder."""
    if not path:
        return
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output file '{path}' is a folder")
    check_writable(path if path.exists() else path.parent)


def read_marker(folder) -> dict | None:
    """The run marker of a folder lmsmith wrote (None when absent or unreadable)."""
    try:
        m = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("command"), str) else None


@dataclass
class Output:
    """A checked output folder (see :func:`prepare_output`); nothing exists on disk yet.

    ``state``: ``new`` (absent), ``empty`` (an empty folder), ``replace`` (a finished run of the
    same command, or ``--overwrite``), ``resume`` (an unfinished run, continued).
    """

    path: Path
    command: str
    state: str

    def _mark(self, status: str) -> None:
        write_json(self.path / MARKER, {"command": self.command, "status": status})

    def create(self, config: dict | None = None) -> Path:
        """Make the folder (clearing the run it replaces), mark it running, write config.json."""
        if self.state == "replace" and self.path.is_dir():
            _clear(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._mark("running")
        if config is not None:
            write_json(self.path / "config.json", config)
        return self.path

    def finish(self) -> None:
        self._mark("finished")

    def discard(self, keep: tuple[str, ...] = ()) -> None:
        """After a failure: remove what this command wrote. A resumed run, or one that has
        written any of ``keep`` (its checkpoints), stays so that ``--resume`` can continue it."""
        if self.state == "resume" or not self.path.is_dir():
            return
        if any((self.path / k).exists() for k in keep):
            return
        if self.state == "empty":
            _clear(self.path)
        else:
            shutil.rmtree(self.path, ignore_errors=True)

    @contextlib.contextmanager
    def writing(self, config: dict | None = None, keep: tuple[str, ...] = ()):
        """``create`` → the caller writes → ``finish``; ``discard`` on any failure."""
        self.create(config)
        try:
            yield self.path
        except BaseException:
            self.discard(keep)
            raise
        self.finish()


def _clear(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def prepare_output(
    path,
    command: str,
    overwrite: bool = False,
    resume: bool = False,
    can_resume: bool = False,
) -> Output:
    """Check an output folder before any model loads; see the module docstring for the rule.

    Args:
        path: the folder, or None/"" for ``runs/<command>-<time>``.
        command: the command's name (``"eval"``, ``"debias prune"``), recorded in ``run.json``.
        overwrite: take over an existing folder whatever it holds (its contents are removed
            when the work starts).
        resume: continue an unfinished run of the same command in place.
        can_resume: the command supports ``--resume`` (named in the refusal message).

    Raises:
        UserError: a file in the way, an unwritable place, a folder that is not a finished run
            of ``command``, or ``resume`` without a run to continue.
    """
    if not path:
        stem = Path("runs") / f"{command.replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
        p, n = stem, 1
        while p.exists():
            n += 1
            p = stem.with_name(f"{stem.name}-{n}")
        check_writable(p)
        return Output(p, command, "new")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"output '{p}' is a file, not a folder; choose another path")
    check_writable(p)
    entries = list(p.iterdir()) if p.is_dir() else []
    marker = read_marker(p) if entries else None
    ours = marker is not None and marker["command"] == command
    if resume and marker is None and (p / "checkpoints").is_dir() and (p / "config.json").is_file():
        ours = True  # a run written before run.json existed; its checkpoints are checked later
    if resume:
        if not ours:
            raise UserError(
                f"--resume: '{p}' holds no `lmsmith {command}` run to continue"
                + (f" (it is a `{marker['command']}` run)" if marker else "")
            )
        return Output(p, command, "resume")
    if not entries:
        return Output(p, command, "new" if not p.exists() else "empty")
    if overwrite or (ours and marker.get("status") == "finished"):
        return Output(p, command, "replace")
    if ours:
        how = "--resume to continue it or --overwrite" if can_resume else "--overwrite"
        raise UserError(
            f"'{p}' holds an unfinished `lmsmith {command}` run; pass {how} to start over"
        )
    what = f"a `lmsmith {marker['command']}` run" if marker else "not an lmsmith run folder"
    raise UserError(
        f"output folder '{p}' exists and is {what}: choose another folder, or pass --overwrite "
        "to replace its contents"
    )
