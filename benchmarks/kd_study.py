"""SWITCH against its strongest baselines: the fair, powered study (issue 18).

    python benchmarks/kd_study.py grid --phase main            # every missing cell, in order
    python benchmarks/kd_study.py cell --method switch --seed 0 # one cell
    python benchmarks/kd_study.py aggregate --doc docs/results.md
    python benchmarks/kd_study.py verify --method sft --seed 0  # re-create a cell from scratch

The 12-step cells of ``kd_repro.py`` stay the pilot they were. This study fixes their protocol
(docs/methods.md, "The SWITCH study"):

- one token budget for all: rollouts are 64 tokens and references are cut to their first 64
  tokens (``data.max_response_tokens``), so every method trains on at most 64 response positions
  per prompt, and every method sees the same 48 x 8 prompts per cell;
- the chat template everywhere (warm-up, distillation, evaluation, teacher);
- disjoint rows of ``dolly/dev.jsonl``: warm-up 0-479, distillation 480-935, DistiLLM's
  validation 936-999 (``runs/kd-study/data/``, written by the first cell);
- DistiLLM's schedule as its official code: held-out validation loss, eps 0.1, step 0.1, cap 1.0;
- fp32 throughout (a study never mixes precisions);
- greedy evaluation on all 500 Dolly-valid and 242 Self-Instruct rows, every row's ROUGE-L and
  generation length stored, so methods can be compared paired by seed and by row.

A cell is ``benchmarks/results/kd-study/<phase>/<tag>-s<seed>-<machine>.json``; finished cells
are skipped, so the study accumulates over runs; each cell records its commit, config, hardware
and the digests of the weights it started from. ``<machine>`` is the CPU kernel level torch used
(``avx2``, ``avx512``): the same recipe trains to different weights on machines whose kernels
differ, so a cell is made end to end on one machine type and arms are paired within one type.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kd_repro  # noqa: E402  (the pilot's helpers: commit, share by position, splice)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "kd-study"
WORK = ROOT / "runs" / "kd-study"
DOCS = ROOT / "docs"
DATA = ROOT.parent / "shared" / "data" / "instruct"

# the student: 20 of the teacher's 30 layers, evenly spaced (first and last kept). Not 10: the
# warm-up probe (docs/results.md) could not make a 10- or 15-layer cut a working language model
# from the 480 warm-up rows (its greedy answers loop); 20 layers after 60 SFT steps can.
LAYERS = 20
ROWS = {"warmup": (0, 480), "distill": (480, 936), "val": (936, 1000)}  # of dolly/dev.jsonl
# the warm-up every cell starts from (SFT on the warm-up rows, references cut like the study's);
# its folder is named by this recipe, so a changed recipe never reuses an old student
WARMUP = {"method": "sft", "steps": 60, "batch_size": 8, "lr": 5e-4, "max_response_tokens": 64}
# the teacher every distilling arm learns from: SmolLM2-135M-Instruct fine-tuned on the same
# warm-up rows at a tenth of the student's rate (MiniLLM/DistiLLM distil from a teacher tuned on
# the task; the untuned one writes long answers the student cannot end, docs/results.md)
TEACHER = {**WARMUP, "lr": 5e-5}
TEACHER_LAYERS = 30  # all of them
PHASES = {
    "main": {
        "precision": "fp32",
        "steps": 48,
        "batch_size": 8,
        "lr": 5e-5,
        "max_new_tokens": 64,  # rollouts, and the reference cut
        "eval_max_new_tokens": 128,
        "eval_batch_size": 32,
    },
}
PHASES["long"] = {**PHASES["main"], "max_new_tokens": 128, "eval_max_new_tokens": 256}
SEEDS = {"main": 6, "long": 4}  # training seeds per arm the grid makes (issue 18: >= 6, >= 4)
BENCHES = {"dolly": DATA / "dolly" / "valid.jsonl", "self-inst": DATA / "self-inst" / "valid.jsonl"}
# the cells: tag -> (method, config overrides)
ARMS = {
    "sft": ("sft", []),
    "gkd": ("gkd", []),
    "distillm": ("distillm", []),
    "switch": ("switch", []),
    "switch-fast": ("switch", ["rollout.decay=0.05"]),
}
PILOT = ["switch", "gkd"]  # the first three seeds of these measure the noise
PRIMARY = "switch"
BASELINES = ["gkd", "distillm"]  # SWITCH is compared first with the better of these


# ------------------------------------------------------------------------------- data


def split_rows(work: Path | None = None) -> dict[str, Path]:
    """The disjoint row files (deterministic: the same bytes on every machine)."""
    work = work or WORK
    from lmsmith.runs import write_text

    src = (DATA / "dolly" / "dev.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    out = {}
    for name, (a, b) in ROWS.items():
        p = work / "data" / f"{name}.jsonl"
        text = "".join(src[a:b])
        if not p.exists() or p.read_text(encoding="utf-8") != text:
            p.parent.mkdir(parents=True, exist_ok=True)
            write_text(p, text)
        out[name] = p
    return out


# ------------------------------------------------------------------------------- cells


def _lm():
    from lmsmith.models import load_lm

    return load_lm("smollm2-135m-instruct")


def _recipe_name(kind: str, layers: int, recipe: dict) -> str:
    import hashlib

    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    return f"{kind}-L{layers}-{digest}"


def warmup_name() -> str:
    """The warm-up's folder: the student's size and a digest of the recipe."""
    return _recipe_name("warmup", LAYERS, WARMUP)


def teacher_name() -> str:
    """The tuned teacher's folder, named by its recipe like the warm-up's."""
    return _recipe_name("teacher", TEACHER_LAYERS, TEACHER)


def warmup_values(
    files: dict[str, Path], out: Path, recipe: dict | None = None, layers: int = LAYERS
) -> dict:
    """The trainer settings of a warm-up recipe (default: the study's ``WARMUP``)."""
    r = recipe or WARMUP
    return {
        "method": r["method"],
        "student": f"layers:{layers}",  # a record: the pruned student is passed in
        "max_response_tokens": r["max_response_tokens"],
        "data": str(files["warmup"]),
        "chat_template": True,
        "max_steps": r["steps"],
        "batch_size": r["batch_size"],
        "lr": r["lr"],
        "lr_schedule": r.get("lr_schedule", "constant"),
        "output_dir": str(out),
        "overwrite": True,
        "seed": 0,
        "precision": "fp32",
        "progress": False,
    }


def teacher_targets(teacher, tok, rows_file: Path, out: Path, cap: int) -> dict:
    """Write the teacher's own greedy answers (at most ``cap`` new tokens) to ``rows_file``'s
    prompts as SFT targets in ``out`` (same rows, ``output`` replaced, the reference kept as
    ``reference``), keeping only answers that end before the cap and do not loop: one cut at the
    cap would teach the student to stop mid-sentence, a looping one to loop. Returns the counts
    of what was kept and dropped."""
    from lmsmith.data.instruct import load_instruct
    from lmsmith.evaluate import EvalConfig, evaluate_rows
    from lmsmith.runs import write_text

    cfg = EvalConfig(
        data=str(rows_file),
        greedy=True,
        max_new_tokens=cap,
        batch_size=32,
        engine="lean",
        precision="fp32",
        chat_template=True,
        progress=True,
    )
    rows = load_instruct(rows_file)
    src = [json.loads(x) for x in rows_file.read_text(encoding="utf-8").splitlines() if x.strip()]
    assert len(src) == len(rows), "a row of the warm-up file did not load"
    _, preds = evaluate_rows(teacher, tok, rows, cfg)
    kept, counts = [], {"rows": len(rows), "at_cap": 0, "looping": 0, "empty": 0}
    for obj, p in zip(src, preds):
        text = p["prediction"].strip()
        if not text:
            counts["empty"] += 1
        elif len(tok(text, add_special_tokens=False)["input_ids"]) >= cap - 1:
            counts["at_cap"] += 1
        elif repeat_share(text) > LOOPING:
            counts["looping"] += 1
        else:
            kept.append(json.dumps({**obj, "output": text, "reference": obj["output"]}) + "\n")
    counts["kept"] = len(kept)
    if len(kept) < len(rows) // 2:
        raise RuntimeError(f"the teacher's answers are unusable as targets: {counts}")
    write_text(out, "".join(kept))
    return counts


def warmup_files(
    teacher, tok, files: dict[str, Path], work: Path, recipe: dict | None = None
) -> dict[str, Path]:
    """``files`` with the warm-up rows a recipe (default ``WARMUP``) trains on: its ``targets``
    are the references, or the teacher's answers (written once per work folder)."""
    r = recipe or WARMUP
    if r.get("targets", "references") == "references":
        return files
    cap = r["teacher_max_new_tokens"]
    out = work / "data" / f"warmup-teacher-{cap}.jsonl"
    if not out.exists():
        counts = teacher_targets(teacher, tok, files["warmup"], out, cap)
        print(f"teacher targets: {counts}", flush=True)
    return {**files, "warmup": out}


def _tuned(base, tok, files, out: Path, recipe: dict, layers: int) -> Path:
    """``layers`` evenly spaced layers of ``base`` trained by ``recipe`` on the warm-up rows,
    saved once in ``out`` (the trainer writes the model under a temporary name and renames it
    into place, so a crash leaves no half model to be reused)."""
    from lmsmith import config as C
    from lmsmith.distill.config import DistillConfig
    from lmsmith.distill.trainer import run
    from lmsmith.models import layer_pruned

    if not (out / "student" / "config.json").exists():
        cfg = C.load(DistillConfig, None, warmup_values(files, out, recipe, layers))
        run(cfg, base, layer_pruned(base, layers), tok)
    return out / "student"


def warmup(base, tok, files: dict[str, Path], work: Path | None = None) -> Path:
    """The SFT-warmed student every cell starts from (built once per ``work`` folder, on the
    warm-up rows only; cut from the untuned model, so it does not depend on ``TEACHER``)."""
    files = warmup_files(base, tok, files, work or WORK)
    return _tuned(base, tok, files, (work or WORK) / warmup_name(), WARMUP, LAYERS)


def tuned_teacher(base, tok, files: dict[str, Path], work: Path | None = None):
    """The teacher of every distilling arm: ``base`` fine-tuned by ``TEACHER`` on the warm-up
    rows (built once per ``work`` folder), loaded in fp32 and frozen."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = _tuned(base, tok, files, (work or WORK) / teacher_name(), TEACHER, TEACHER_LAYERS)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model.requires_grad_(False)


def built_from(folder: Path) -> dict:
    """What a cell started from: the folder's name, a digest of its weights and the CPU kernel
    level it was trained on. Folders are named by their recipe, but the same recipe trained on
    CPUs with different kernels (AVX2, AVX512) gives different weights, so cells that share a
    folder name need not share a start (docs/results.md, session 12)."""
    import hashlib

    h = hashlib.sha256()
    with open(folder / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    summary = folder.parent / "summary.json"
    made = json.loads(summary.read_text()).get("hardware", {}) if summary.exists() else {}
    return {
        "folder": folder.parent.name,
        "sha256": h.hexdigest()[:16],
        "cpu_capability": made.get("cpu_capability"),
    }


def same_machine(start: dict, here: str, kind: str, *folders: Path) -> dict:
    """``start`` (``built_from``), refused when it was trained on another machine type than
    this one (a cell is made end to end on one machine type), or when the cells in ``folders``
    made on this type started from other weights (this type does not reproduce the start:
    found before training, not by ``aggregate`` afterwards)."""
    made = str(start["cpu_capability"] or "unknown").lower()
    if made != here:
        raise SystemExit(
            f"{start['folder']} was trained on a {made} machine and this one is {here}: cells "
            "are made end to end on one machine type. Move the folder aside (or pass another "
            "--work-dir) so that it is rebuilt here"
        )
    recorded = {}
    for folder in folders:
        recorded = {**recorded_digests(folder, here, kind), **recorded}
    for theirs, p in recorded.items():
        if theirs != start["sha256"]:
            raise SystemExit(
                f"{start['folder']} here has weights {start['sha256']}, but {p} (also {here}) "
                f"started from {theirs}: this machine type does not reproduce the study's "
                'start, so its cells cannot be pooled with those (docs/methods.md, "Machine '
                'types")'
            )
    return start


def recorded_digests(folder: Path, machine: str, kind: str) -> dict[str, Path]:
    """The start digests (``kind``: "warmup_start" or "teacher_start") that the cells in
    ``folder`` made on ``machine`` record, each with the first cell that records it."""
    out: dict[str, Path] = {}
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        c = json.loads(p.read_text())
        digest = (c.get(kind) or {}).get("sha256")
        if digest and machine_of(c.get("hardware")) == machine:
            out.setdefault(digest, p)
    return out


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (None where unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def evaluate(model, tok, phase: dict, limit: int | None = None) -> dict:
    """Greedy ROUGE-L on every row of both benchmarks (or their first ``limit`` rows), with each
    row's score and length."""
    from lmsmith.data.instruct import load_instruct
    from lmsmith.evaluate import EvalConfig, evaluate_rows

    out = {}
    for name, path in BENCHES.items():
        cfg = EvalConfig(
            data=str(path),
            greedy=True,
            max_new_tokens=phase["eval_max_new_tokens"],
            batch_size=phase["eval_batch_size"],
            engine="lean",
            precision=phase["precision"],
            chat_template=True,
            progress=False,
        )
        rows = load_instruct(path, limit=limit)
        metrics, preds = evaluate_rows(model, tok, rows, cfg)
        lengths = [len(tok(p["prediction"], add_special_tokens=False)["input_ids"]) for p in preds]
        out[name] = {
            "rougeL": metrics["rougeL_mean"],
            "by_length": metrics["by_length"],
            "rows": [p["source"] for p in preds],
            "row_rougeL": [p["rougeL"] for p in preds],
            "gen_tokens": lengths,
            "repeat_share": [repeat_share(p["prediction"]) for p in preds],
            "ref_words": [len(r.references[0].split()) for r in rows],
            # a few answers to read (the scores alone cannot show a degenerate model)
            "samples": [
                {"source": p["source"], "prediction": p["prediction"], "rougeL": p["rougeL"]}
                for p in preds[:8]
            ],
            "eval_s": metrics["wall_time_s"],
        }
    return out


# 50 rows: five sampled passes over them cost about one greedy evaluation of a cell (6.5-11 min)
SAMPLED = {"seeds": [10, 20, 30, 40, 50], "temperature": 1.0, "top_p": 1.0, "rows": 50}


def evaluate_sampled(model, tok, phase: dict, rows_per_bench: int, no_repeat: int) -> dict:
    """The secondary protocol (the KD benchmark's, as MiniLLM/DistiLLM report): ROUGE-L of
    answers sampled at T = 1 with five seeds on each benchmark's first rows; per-seed means and
    each row's mean over the seeds."""
    from lmsmith.data.instruct import load_instruct
    from lmsmith.evaluate import EvalConfig, evaluate_rows

    out = {}
    for name, path in BENCHES.items():
        cfg = EvalConfig(
            data=str(path),
            seeds=SAMPLED["seeds"],
            temperature=SAMPLED["temperature"],
            top_p=SAMPLED["top_p"],
            max_new_tokens=phase["eval_max_new_tokens"],
            batch_size=phase["eval_batch_size"],
            # the lean engine samples the same distribution faster; n-gram blocking is hf's
            engine="hf" if no_repeat else "lean",
            precision=phase["precision"],
            no_repeat_ngram_size=no_repeat,
            chat_template=True,
            progress=False,
        )
        rows = load_instruct(path, limit=rows_per_bench)
        metrics, preds = evaluate_rows(model, tok, rows, cfg)
        per_row: dict[str, list[float]] = {}
        for p in preds:
            per_row.setdefault(p["source"], []).append(p["rougeL"])
        out[name] = {
            "rougeL": metrics["rougeL_mean"],
            "rougeL_std_over_sampling_seeds": metrics["rougeL_std"],
            "per_seed": metrics["rougeL_per_seed"],
            "rows": list(per_row),
            "row_rougeL": [statistics.fmean(v) for v in per_row.values()],
            "repeat_share": [repeat_share(p["prediction"]) for p in preds],
            "decoding": metrics["decoding"],
            "eval_s": metrics["wall_time_s"],
        }
    return out


def repeat_share(text: str, n: int = 4) -> float:
    """Share of the answer's word n-grams that already occurred earlier in it: 0 for an answer
    that never repeats itself, near 1 for one stuck in a loop ("the fish, a fish, a fish, ...")."""
    w = text.split()
    grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    if not grams:
        return 0.0
    seen, rep = set(), 0
    for g in grams:
        rep += g in seen
        seen.add(g)
    return rep / len(grams)


LOOPING = 0.5  # an answer whose repeat_share is above this is a loop
DEGENERATE = 0.5  # an arm whose answers loop this often is degenerate


def looping_rate(cell: dict) -> tuple[float | None, str]:
    """Share of a cell's answers that loop, from every row (or from its 8 samples in cells
    written before per-row repetition was stored; None if it has neither)."""
    rows, src = [], "rows"
    for e in cell["eval"].values():
        if "repeat_share" in e:
            rows += e["repeat_share"]
        elif e.get("samples"):
            rows += [repeat_share(x["prediction"]) for x in e["samples"]]
            src = "samples"
    if not rows:
        return None, "none"
    return sum(r > LOOPING for r in rows) / len(rows), src


def uses_teacher(tag: str) -> bool:
    """Whether a cell's result depends on the teacher (SFT and the warm-up learn from
    references only)."""
    return tag == "teacher" or (tag != "warmup" and ARMS[tag][0] != "sft")


def protocol(phase_name: str, tag: str) -> dict:
    """What a cell's result depends on besides its arm and seed."""
    out = {"phase": PHASES[phase_name], "rows": ROWS}
    if tag != "teacher":
        out.update(warmup=WARMUP, layers=LAYERS)
    if uses_teacher(tag):
        out["teacher"] = TEACHER
    return out


def stale_cells(folder: Path, phase_name: str) -> list[str]:
    """Cells in ``folder`` whose recorded protocol differs from the current one."""
    out = []
    for p in sorted(folder.glob("*.json")):
        c = json.loads(p.read_text())
        want = json.loads(json.dumps(protocol(phase_name, c["tag"])))  # tuples -> lists
        got = {k: c.get("protocol", {}).get(k) for k in want}
        if got != want:
            out.append(str(p))
    return out


def machine_of(hw: dict | None) -> str:
    """A cell's machine type: the CPU kernel level torch used (``avx2``, ``avx512``), lower
    case. The same recipe and seed give different weights on machines whose kernels differ
    (their fp32 sums round differently), so cells are made end to end on one machine type and
    are keyed and paired by it (docs/methods.md, "Machine types")."""
    return str((hw or {}).get("cpu_capability") or "unknown").lower()


def this_machine() -> str:
    from lmsmith.precision import hardware

    return machine_of(hardware())


def cell_path(results: Path, phase: str, tag: str, seed: int, machine: str) -> Path:
    return results / phase / f"{tag}-s{seed}-{machine}.json"


def train_config(
    tag: str,
    seed: int,
    phase_name: str,
    files: dict[str, Path],
    extra=(),
    work: Path | None = None,
) -> dict:
    phase = PHASES[phase_name]
    method, sets = ARMS[tag]
    values = {
        "method": method,
        "data": str(files["distill"]),
        "chat_template": True,
        "max_steps": phase["steps"],
        "batch_size": phase["batch_size"],
        "lr": phase["lr"],
        "max_new_tokens": phase["max_new_tokens"],
        "max_response_tokens": phase["max_new_tokens"],
        "distillm_val_data": str(files["val"]),
        "student": f"layers:{LAYERS}",  # a record: the warm-up student is passed in
        "seed": seed,
        "precision": phase["precision"],
        "progress": False,
        "overwrite": True,
        "output_dir": str((work or WORK) / "runs" / f"{phase_name}-{tag}-s{seed}"),
    }
    for kv in [*sets, *extra]:
        k, v = kv.split("=", 1)
        values[k] = v
    return values


def cell(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from lmsmith import config as C
    from lmsmith.distill.config import DistillConfig
    from lmsmith.distill.trainer import run
    from lmsmith.precision import hardware
    from lmsmith.runs import write_json

    results = Path(args.results_dir) if args.results_dir else RESULTS
    work = Path(args.work_dir) if args.work_dir else WORK
    phase = PHASES[args.phase]
    tag = args.method
    here = this_machine()
    path = cell_path(results, args.phase, tag, args.seed, here)
    phase_dirs = [results / ph for ph in PHASES]  # a type's start is one across the phases
    if path.exists():
        print(f"skip: {path} exists")
        return 0
    t0 = time.perf_counter()
    commit = kd_repro._commit()  # the code this cell runs (HEAD may move while it trains)
    files = split_rows(work)
    base, tok = _lm()
    teacher = tuned_teacher(base, tok, files, work) if uses_teacher(tag) else base
    result: dict = {}
    if uses_teacher(tag):
        got = built_from(work / teacher_name() / "student")
        result["teacher_start"] = same_machine(got, here, "teacher_start", *phase_dirs)
    if tag == "teacher":
        result["eval"] = evaluate(teacher, tok, phase)
    else:
        start = warmup(base, tok, files, work)
        result["warmup_start"] = same_machine(built_from(start), here, "warmup_start", *phase_dirs)
        student = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
        if tag != "warmup":
            values = train_config(tag, args.seed, args.phase, files, work=work)
            cfg = C.load(DistillConfig, None, values)
            summary = run(cfg, teacher, student, tok)  # SFT never reads the teacher
            metrics = [
                json.loads(x)
                for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()
            ]
            result["train"] = summary
            result["config"] = C.to_dict(cfg)
            result["teacher_share_by_position"] = kd_repro._share_by_position(metrics)
            result["distillm_share"] = [
                (m["step"], m["student_share"]) for m in metrics if "val_loss" in m
            ]
        result["eval"] = evaluate(student, tok, phase)
    result.update(
        tag=tag,
        seed=args.seed,
        phase=args.phase,
        protocol=protocol(args.phase, tag),
        warmup_folder=None if tag == "teacher" else warmup_name(),
        teacher_folder=teacher_name() if uses_teacher(tag) else None,
        wall_time_s=time.perf_counter() - t0,
        commit=commit,
        partner=bool(getattr(args, "partner", False)),
        hardware=hardware(),
        cpu_model=cpu_model(),
    )
    write_json(path, result)
    print(json.dumps({k: round(v["rougeL"], 3) for k, v in result["eval"].items()}), f"→ {path}")
    return 0


def cell_command(phase: str, tag: str, seed: int, *extra: str) -> list[str]:
    """The command line that runs one cell in its own process."""
    return [sys.executable, __file__, "cell", "--phase", phase, "--method", tag,
            "--seed", str(seed), *extra]  # fmt: skip


def compare_cells(committed: dict, again: dict) -> list[str]:
    """How a re-created cell differs from the committed one, row by row (empty: identical).
    Compared: every row's source, ROUGE-L and generation length, and the mean."""
    out = []
    for bench, e in committed["eval"].items():
        f = again["eval"].get(bench)
        if f is None:
            out.append(f"{bench}: missing from the re-created cell")
            continue
        if e["rows"] != f["rows"]:
            out.append(f"{bench}: different rows (or row order)")
            continue
        for key in ("row_rougeL", "gen_tokens"):
            diff = [i for i, (x, y) in enumerate(zip(e[key], f[key])) if x != y]
            if diff:
                i = diff[0]
                out.append(
                    f"{bench}: {key} differs on {len(diff)} of {len(e[key])} rows "
                    f"(first: row {i}, {e['rows'][i]}: {e[key][i]} vs {f[key][i]})"
                )
        if e["rougeL"] != f["rougeL"]:
            out.append(f"{bench}: mean ROUGE-L {e['rougeL']!r} vs {f['rougeL']!r}")
    return out


def verify(args) -> int:
    """Re-create a committed cell in a fresh work folder (the warm-up is rebuilt there too, from
    the base model) and compare its per-row greedy scores with the committed ones."""
    import subprocess

    here = this_machine()
    committed = cell_path(RESULTS, args.phase, args.method, args.seed, here)
    if not committed.exists():
        elsewhere = sorted(committed.parent.glob(f"{args.method}-s{args.seed}-*.json"))
        raise SystemExit(
            f"{committed} does not exist: nothing to verify on this {here} machine"
            + (f" (made on another machine type: {', '.join(p.name for p in elsewhere)}; "
               "verify it on that type)" if elsewhere else "")
        )  # fmt: skip
    work = Path(args.work_dir)
    marker = work / ".kd-study-verify"
    if work.exists() and any(work.iterdir()) and not marker.exists():
        raise SystemExit(f"{work} is not empty and not a verification folder: pick another")
    if work.exists():
        shutil.rmtree(work)  # from scratch: the warm-up too
    work.mkdir(parents=True)
    marker.touch()
    results = work / "results"
    again = cell_path(results, args.phase, args.method, args.seed, here)
    extra = ["--results-dir", str(results), "--work-dir", str(work)]
    rc = subprocess.call(cell_command(args.phase, args.method, args.seed, *extra))
    if rc:
        return rc
    a, b = json.loads(committed.read_text()), json.loads(again.read_text())
    diffs = compare_cells(a, b)
    same = (
        "the same commit"
        if a.get("commit") == b.get("commit")
        else (f"commits {a.get('commit')} (committed) and {b.get('commit')} (now)")
    )
    cpu = [c.get("hardware", {}).get("cpu_capability") for c in (a, b)]
    print(f"{committed} against {again} ({same}; CPU capability {cpu[0]} vs {cpu[1]}):")
    if diffs:
        print("  DIFFERENT:", *diffs, sep="\n  ")
        return 1
    n = sum(len(e["rows"]) for e in a["eval"].values())
    print(f"  identical: every one of {n} rows' ROUGE-L and generation length")
    return 0


def start_digest(args) -> int:
    """Build the warm-up (and with ``--teacher`` the tuned teacher) in ``--work-dir`` and compare
    the digests of their weights with those the committed cells of this machine type record:
    does this machine reproduce the start its type's cells trained from?"""
    work = Path(args.work_dir)
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"{work} is not empty: the check builds from scratch in a new folder")
    here = this_machine()
    files = split_rows(work)
    base, tok = _lm()
    got = {"warmup_start": built_from(warmup(base, tok, files, work))}
    if args.teacher:
        tuned_teacher(base, tok, files, work)
        got["teacher_start"] = built_from(work / teacher_name() / "student")
    bad = 0
    for kind, start in got.items():
        theirs = sorted(recorded_digests(RESULTS / "main", here, kind))
        verdict = (
            "no committed cell of this type records one"
            if not theirs
            else ("the same" if theirs == [start["sha256"]] else f"DIFFERENT from {theirs}")
        )
        bad += verdict.startswith("DIFFERENT")
        print(f"{kind.split('_')[0]} built here ({here}): {start['sha256']}: {verdict}")
    return 1 if bad else 0


def cell_model(phase_name: str, tag: str, seed: int, base, tok):
    """The model a stored cell evaluated: the tuned teacher (built from ``base``), the warm-up
    student, or the arm's trained student kept in its run folder."""
    import torch
    from transformers import AutoModelForCausalLM

    if tag == "teacher":
        return tuned_teacher(base, tok, split_rows())
    if tag == "warmup":
        folder = WORK / warmup_name() / "student"
    else:
        folder = WORK / "runs" / f"{phase_name}-{tag}-s{seed}" / "student"
    if not (folder / "config.json").exists():
        raise SystemExit(
            f"no trained model at {folder}: run `kd_study.py cell --method {tag} --seed {seed}` "
            "on this machine first"
        )
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def sampled(args) -> int:
    """Score a finished cell's model under the secondary (sampled) protocol."""
    from lmsmith.precision import hardware
    from lmsmith.runs import write_json

    results = Path(args.results_dir) if args.results_dir else RESULTS
    here = this_machine()
    primary = cell_path(results, args.phase, args.method, args.seed, here)
    if not primary.exists():
        raise SystemExit(f"{primary} does not exist: the greedy cell comes first")
    c = json.loads(primary.read_text())
    if c.get("protocol") != json.loads(json.dumps(protocol(args.phase, args.method))):
        raise SystemExit(f"{primary} was made under another protocol; rerun it first")
    path = cell_path(results, f"{args.phase}-sampled", args.method, args.seed, here)
    if path.exists():
        print(f"skip: {path} exists")
        return 0
    t0 = time.perf_counter()
    base, tok = _lm()
    model = cell_model(args.phase, args.method, args.seed, base, tok)
    result = {
        "eval": evaluate_sampled(model, tok, PHASES[args.phase], args.rows, args.no_repeat),
        "tag": args.method,
        "seed": args.seed,
        "phase": args.phase,
        "protocol": protocol(args.phase, args.method),
        "sampled": {**SAMPLED, "rows": args.rows, "no_repeat_ngram_size": args.no_repeat},
        "wall_time_s": time.perf_counter() - t0,
        "commit": kd_repro._commit(),
        "hardware": hardware(),
        "cpu_model": cpu_model(),
    }
    write_json(path, result)
    print(json.dumps({k: round(v["rougeL"], 3) for k, v in result["eval"].items()}), f"→ {path}")
    return 0


def prompt_ids(row, tok) -> list[int]:
    """A row's prompt in the chat template, as token ids (what every cell's models read)."""
    from lmsmith.data.instruct import build_prompt

    return tok(build_prompt(row, tok, True), add_special_tokens=False)["input_ids"]


def teacher_on_loops(args) -> int:
    """Does the teacher endorse a student's loop? For every stored answer (each cell keeps 8 per
    benchmark) of at least 40 tokens, the teacher reads prompt + answer; over the answer's second
    half, how often its argmax is the answer's next token and the mean probability it gives that
    token, for looping and for other answers. On-policy distillation trains on the teacher's
    distribution at exactly these positions."""
    import torch

    from lmsmith.data.instruct import load_instruct

    folder = (Path(args.results_dir) if args.results_dir else RESULTS) / args.phase
    base, tok = _lm()
    teacher = base.eval() if args.untuned else tuned_teacher(base, tok, split_rows())
    rows = {b: {r.source: r for r in load_instruct(p)} for b, p in BENCHES.items()}
    out = ["| cells | answers | looping | teacher's argmax = the next token | its probability |",
           "|---|---|---|---|---|"]  # fmt: skip
    for tag in args.tags:
        stats: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for c in load_cells(folder).get(tag, {}).values():
            for bench, e in c["eval"].items():
                for x in e.get("samples", []):
                    row = rows[bench][x["source"]]
                    p = prompt_ids(row, tok)
                    a = tok(x["prediction"], add_special_tokens=False)["input_ids"]
                    if len(a) < 40:
                        continue
                    with torch.no_grad():
                        logits = teacher(torch.tensor([p + a])).logits[0, len(p) - 1 : -1]
                    half = torch.arange(len(a) // 2, len(a))
                    nxt = torch.tensor(a)[half]
                    agree = (logits[half].argmax(-1) == nxt).float().mean().item()
                    prob = logits[half].softmax(-1).gather(1, nxt[:, None]).mean().item()
                    stats[repeat_share(x["prediction"]) > LOOPING].append((agree, prob))
        for loop, v in stats.items():
            if v:
                out.append(
                    f"| {tag} | {len(v)} | {'yes' if loop else 'no'} | "
                    f"{statistics.fmean(a for a, _ in v):.2f} | "
                    f"{statistics.fmean(q for _, q in v):.2f} |"
                )
    print("\n".join(out))
    return 0


def stop_prob(args) -> int:
    """Does an arm still know where an answer ends, and how sharp has it become? On the first
    Dolly-valid rows whose whole reference fits the study's token budget, each model reads
    prompt + reference and gives the probability of the end-of-sequence token right after it
    (the target SFT trains to 1 there; distilling arms train towards the teacher's value), the
    share of rows where EOS is its argmax and, over the reference's tokens, its mean entropy,
    its mean top-1 probability and the reference's negative log-likelihood (nats per token)."""
    import torch

    from lmsmith.data.instruct import load_instruct

    base, tok = _lm()
    budget = PHASES[args.phase]["max_new_tokens"]
    rows = []
    for r in load_instruct(BENCHES["dolly"]):
        a = tok(r.references[0], add_special_tokens=False)["input_ids"]
        if len(a) < budget:
            rows.append((prompt_ids(r, tok), a))
        if len(rows) == args.rows:
            break
    out = [
        "| model | rows | P(EOS) after the reference | EOS is the argmax "
        "| entropy on the reference (nats) | top-1 probability | NLL of the reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for tag in args.tags:
        model = cell_model(args.phase, tag, args.seed, base, tok).eval()
        probs, top, ent, top1, nll = [], [], [], [], []
        with torch.no_grad():
            for p, a in rows:
                logp = model(torch.tensor([p + a])).logits[0].float().log_softmax(-1)
                last = logp[-1].exp()
                probs.append(last[tok.eos_token_id].item())
                top.append(int(last.argmax().item() == tok.eos_token_id))
                ans = logp[len(p) - 1 : -1]  # the positions that predict the reference's tokens
                ent += (-(ans.exp() * ans).sum(-1)).tolist()
                top1 += ans.max(-1).values.exp().tolist()
                nll += (-ans.gather(1, torch.tensor(a)[:, None])[:, 0]).tolist()
        out.append(
            f"| {tag} | {len(rows)} | {statistics.fmean(probs):.2f} | {statistics.fmean(top):.0%} "
            f"| {statistics.fmean(ent):.2f} | {statistics.fmean(top1):.2f} "
            f"| {statistics.fmean(nll):.2f} |"
        )
    print("\n".join(out))
    return 0


def _arms(best: str | tuple[str, ...]) -> tuple[str, ...]:
    """SWITCH and the arm(s) ``best`` names."""
    return (PRIMARY, *((best,) if isinstance(best, str) else best))


def _pairs(cells: Cells, best: str | tuple[str, ...], machine: str | None = None) -> set[int]:
    """Seeds with SWITCH and ``best`` (every arm of it, when a tuple) on one machine type
    (``machine``, or any)."""
    keys = set(cells.get(PRIMARY, {}))
    for t in _arms(best)[1:]:
        keys &= set(cells.get(t, {}))
    return {s for s, m in keys if machine in (None, m)}


def long_seeds(
    main: Cells, long: Cells, best: str | tuple[str, ...], here: str, n: int
) -> list[int]:
    """The seeds the long phase makes on machine type ``here``: first those it has begun here (a
    long cell of some arm but not of every arm) and no type has paired, so a started pair is
    finished; then, while the long phase has fewer than ``n`` seeds paired or begun on some
    type, the seeds the main phase paired with SWITCH and ``best`` (all of its arms, when a
    tuple) on this type, whose partners for claim (b)'s long-against-main margin (it pairs
    within one type only) exist already; then the lowest seeds the long phase has not begun
    anywhere (``main_partners`` makes their main-phase cells). A seed another type has begun is
    left to that type: the cells of one seed pair only within one type. The price: a type whose
    long pairs lack main-phase partners makes them only when it is lent again."""
    started = {(s, m) for t in _arms(best) for s, m in long.get(t, {})}
    begun = {s for s, m in started if m == here} - _pairs(long, best)
    have = _pairs(long, best) | {s for s, _ in started}
    mine = [s for s in sorted(_pairs(main, best, here)) if s not in have]
    fill = [s for s in range(n + len(have) + len(mine)) if s not in have and s not in mine]
    return sorted(begun) + (mine + fill)[: max(0, n - len(have))]


def main_partners(
    main: Cells, long: Cells, best: str | tuple[str, ...], here: str, n: int
) -> list[tuple[str, int]]:
    """The main-phase cells machine type ``here`` makes so that claim (b)'s long-against-main
    margin has ``n`` seeds: while fewer than ``n`` seeds are paired across the phases on one type
    (SWITCH and every arm of ``best`` in both phases), the seeds the long phase paired on this
    type, lowest first, get their missing main-phase cells here. A main-phase cell costs about
    half a long one, so a long seed without partners gets them rather than another long seed
    being made where the main phase has them."""
    types = {m for cs in (*main.values(), *long.values()) for _, m in cs}
    cross = {s for m in types for s in _pairs(long, best, m) & _pairs(main, best, m)}
    out = []
    for s in sorted(_pairs(long, best, here) - cross):
        if len(cross) >= n:
            break
        out += [(t, s) for t in _arms(best) if (s, here) not in main.get(t, {})]
        cross.add(s)
    return out


def grid_cells(
    phase: str, seeds: int, order: list[int] | None = None, against: tuple[str, ...] = ("best",)
) -> list[tuple[str, int]]:
    """Cells in the order they run: the warm-up; seed 0 of every arm (the first SWITCH cell
    made its student worse than the warm-up: whether every arm does is the first question);
    the pilot (SWITCH's and GKD's seeds 1-2: with seed 0 they measure the noise); the other
    arms' seeds 1-2; then seed by seed up to ``seeds``; the teacher last (a reference, not a
    comparison). The long phase: SWITCH and the best baseline (or the arms ``against``
    names) for the seeds ``order`` lists (``long_seeds``; 0 to ``seeds`` − 1 without it)."""
    if phase == "long":
        return [(t, s) for s in (order or range(seeds)) for t in ("switch", *against)]
    first = [*PILOT, *(t for t in ARMS if t not in PILOT)]
    cells = [("warmup", 0)]
    cells += [(t, 0) for t in first]
    cells += [(t, s) for t in PILOT for s in (1, 2)]
    cells += [(t, s) for s in (1, 2) for t in first if t not in PILOT]
    cells += [(t, s) for s in range(3, seeds) for t in first]
    return cells + [("teacher", 0)]


def degenerate_start(machine: str) -> bool:
    """True (and says why) when this machine type's warm-up cell exists and its answers loop:
    distilling from a degenerate start cannot rank methods."""
    start = cell_path(RESULTS, "main", "warmup", 0, machine)
    if not start.exists():
        return False
    rate, src = looping_rate(json.loads(start.read_text()))
    if rate is not None and rate < DEGENERATE:
        return False
    shown = "unknown" if rate is None else f"{rate:.0%}"
    print(
        f"refused: the warm-up student's answers loop ({shown} of {src}; or its cell predates "
        "the check): distillation from a degenerate start cannot rank methods. Strengthen the "
        f"warm-up, delete {start} and rerun, or pass --force",
        file=sys.stderr,
    )
    return True


def grid_plan(cells: list[tuple[str, int]], have: dict, here: str) -> list[tuple[str, int]]:
    """The cells of ``cells`` (``grid_cells``' order, "best" resolved) this machine type still
    makes, given the cells ``have`` (``load_cells``) made on any type. Comparisons pair SWITCH
    with an arm only within one machine type, so for each seed this machine makes every arm
    that is not yet paired with SWITCH on some type, and SWITCH itself where such an arm is
    left; a seed already paired everywhere is not made again. The warm-up cell is made once
    per machine type that makes anything else (its loops are checked before any cell there
    trains from it), the teacher's once in all."""

    def on(t, s, m):
        return (s, m) in have.get(t, {})

    def paired(t, s):
        return any(on(PRIMARY, s, m) for (x, m) in have.get(t, {}) if x == s)

    arms = {t for t, _ in cells if t not in ("warmup", "teacher", PRIMARY)}
    out = []
    for t, s in cells:
        if on(t, s, here):
            continue
        if t == "teacher":
            todo = not have.get("teacher")
        elif t == "warmup":
            todo = None  # decided below: only where this type makes other cells
        elif t == PRIMARY:
            todo = any(not paired(x, s) for x in arms)
        else:
            todo = not paired(t, s)
        if todo or todo is None:
            out.append((t, s))
    if [c for c in out if c[0] != "warmup"]:
        return out
    return []  # nothing to distil here: a warm-up cell alone would be wasted


def grid(args) -> int:
    import subprocess

    failed = []
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    here = this_machine()
    folder = RESULTS / args.phase
    have = load_cells(folder) if folder.is_dir() else {}
    if args.phase == "long":
        main = load_cells(RESULTS / "main")
        best = best_baseline(main)
        if best is None:
            print("the long phase needs the main phase's GKD and DistiLLM cells first")
            return 2
        against = (best,) if args.against == "best" else tuple(BASELINES)
        n = args.seeds or SEEDS["long"]
        order = long_seeds(main, have, against, here, n)
        made = grid_cells("long", 0, order, against)
        # long_seeds chose for this type: a seed another type made does not pair here
        new = [(t, s) for t, s in made if (s, here) not in have.get(t, {})]
        after = {t: {**cs} for t, cs in have.items()}  # the partners of the seeds made here too
        for t, s in new:
            after.setdefault(t, {})[(s, here)] = {}
        partners = [("main", t, s) for t, s in main_partners(main, after, against, here, n)]
        cells = [("long", t, s) for t, s in made] + partners
        todo = [("long", t, s) for t, s in new] + partners
    else:
        cells = [
            (args.phase, t, s) for t, s in grid_cells(args.phase, args.seeds or SEEDS[args.phase])
        ]
        todo = [(args.phase, t, s) for t, s in grid_plan([c[1:] for c in cells], have, here)]
    phases = [args.phase] + (["main"] if any(c[0] != args.phase for c in todo) else [])
    stale = [c for ph in phases for c in stale_cells(RESULTS / ph, ph)]
    if stale and not args.force:
        print(
            "refused: these cells were made under another protocol (warm-up recipe, rows, "
            "student size or phase settings differ from kd_study.py's); a study cannot mix "
            "them. Move them out of the folder (or pass --force):",
            *stale,
            sep="\n  ",
            file=sys.stderr,
        )
        return 2
    if args.phase != "main" and not cell_path(RESULTS, "main", "warmup", 0, here).exists():
        print(
            f"refused: no main-phase warm-up cell made on this {here} machine type, so its "
            "start's loops are unchecked: run `kd_study.py cell --phase main --method warmup` "
            "first",
            file=sys.stderr,
        )
        return 2
    if not args.force and degenerate_start(here):
        return 2
    print(f"this machine: {here}; {len(todo)} of the grid's {len(cells)} cells to make here")
    for i, (phase, tag, seed) in enumerate(cells, 1):
        done = cell_path(RESULTS, phase, tag, seed, here).exists()
        state = (
            "done here"
            if done
            else ("to make" if (phase, tag, seed) in todo else "not needed here")
        )
        what = f"{tag} s{seed}" + (
            f" ({phase} phase: claim (b)'s partner)" if phase != args.phase else ""
        )
        print(f"[{i}/{len(cells)}] {what} ({state})", flush=True)
        if args.dry_run or (phase, tag, seed) not in todo:
            continue
        if tag not in ("warmup", "teacher") and not args.force and degenerate_start(here):
            return 2  # the warm-up cell this run just made failed the check
        with open(logs / f"{phase}-{tag}-s{seed}.log", "w") as log:
            extra = ["--partner"] if phase != args.phase else []
            rc = subprocess.call(
                cell_command(phase, tag, seed, *extra), stdout=log, stderr=subprocess.STDOUT
            )
        if rc:
            failed.append(f"{phase} {tag} s{seed}")
            print(f"  failed (exit {rc}), log: {logs}/{phase}-{tag}-s{seed}.log", flush=True)
    if failed:
        print(f"{len(failed)} cells failed:", *failed, sep="\n  ")
    return 1 if failed else 0


# ------------------------------------------------------------------------------- analysis


Cells = dict[str, dict[tuple[int, str], dict]]  # tag -> (seed, machine type) -> cell


def load_cells(folder: Path) -> Cells:
    """Every cell in ``folder`` by tag, then (seed, machine type). Refused: two files for one
    cell, and cells of one machine type that started from different weights (a warm-up or
    teacher digest that differs: the type does not pin the numerics, so they cannot share a
    key)."""
    out: Cells = {}
    where: dict[tuple, Path] = {}
    starts: dict[tuple, tuple[str, Path]] = {}
    for p in sorted(folder.glob("*.json")):
        c = json.loads(p.read_text())
        m = machine_of(c.get("hardware"))
        key = (c["tag"], c["seed"], m)
        if key in where:
            raise SystemExit(
                f"{p} and {where[key]} are both {c['tag']} seed {c['seed']} made on {m}"
            )
        where[key] = p
        for kind in ("warmup_start", "teacher_start"):
            digest = (c.get(kind) or {}).get("sha256")
            if digest is None:
                continue
            first = starts.setdefault((kind, m), (digest, p))
            if first[0] != digest:
                raise SystemExit(
                    f"{p} and {first[1]} were both made on {m} machines but from different "
                    f"{kind.split('_')[0]} weights ({digest} against {first[0]}): this machine "
                    "type does not reproduce the start, so its cells cannot be pooled"
                )
        c["_file"] = str(p)
        out.setdefault(c["tag"], {})[(c["seed"], m)] = c
    return out


def _row_key(row_id: str) -> str:
    """A row id without the folder the data lay in: benchmark folder, file and line."""
    return "/".join(row_id.replace("\\", "/").split("/")[-2:])


def check_rows(
    cells: Cells,
    folder: Path,
    per_row: tuple[str, ...] = ("gen_tokens", "repeat_share", "ref_words"),
) -> None:
    """Refuse cells that cannot be paired row by row: a benchmark missing, per-row lists (the
    ``per_row`` keys) of the wrong length, or rows that are not the same rows in the same order
    as the other cells'."""
    first: dict[str, tuple[str, list[str]]] = {}
    for tag, by_seed in cells.items():
        for (seed, m), c in by_seed.items():
            name = c.get("_file") or folder / f"{tag}-s{seed}-{m}.json"
            for b in BENCHES:
                e = c["eval"].get(b)
                if e is None:
                    raise SystemExit(f"{name}: no {b!r} evaluation (expected {list(BENCHES)})")
                if "row_rougeL" not in e:
                    raise SystemExit(f"{name}: {b} has no per-row scores (row_rougeL) to pair")
                n = len(e["row_rougeL"])
                for k in per_row:
                    if k in e and len(e[k]) != n:
                        raise SystemExit(f"{name}: {b}.{k} has {len(e[k])} rows, row_rougeL {n}")
                ids = [_row_key(r) for r in e.get("rows") or []]
                if not ids:
                    continue
                if len(ids) != n:
                    raise SystemExit(f"{name}: {b}.rows has {len(ids)} ids, row_rougeL {n}")
                seen = first.setdefault(b, (str(name), ids))
                if seen[1] != ids:
                    raise SystemExit(
                        f"{name}: {b}'s rows differ from {seen[0]}'s (order or content); "
                        "cells are compared row by row"
                    )


def shared_seeds(a: dict, b: dict) -> dict[int, list[str]]:
    """The seeds two arms' cells share on one machine type: seed -> the types both have."""
    out: dict[int, list[str]] = {}
    for s, m in sorted(set(a) & set(b)):
        out.setdefault(s, []).append(m)
    return out


def _avg_rows(lists: list[list[float]]) -> list[float]:
    return [statistics.fmean(xs) for xs in zip(*lists, strict=True)]


def paired_rows(a: dict, b: dict, bench: str, key: str = "row_rougeL"):
    """Two arms' per-row values on their shared seeds: (seeds, A, B), A and B seeds × rows. A
    seed both arms have on several machine types counts once, each arm's rows averaged over
    those types, so every difference A − B is taken within one machine type (the types start
    from different warm-up weights) and a seed's data order is not counted twice."""
    seeds = shared_seeds(a, b)
    rows = [
        [_avg_rows([x[(s, m)]["eval"][bench][key] for m in ms]) for s, ms in seeds.items()]
        for x in (a, b)
    ]
    return list(seeds), rows[0], rows[1]


def _diff_means(a: list[list[float]], b: list[list[float]]):
    """The paired differences A − B (seeds × rows) averaged two ways: per seed, per row."""
    d = [[x - y for x, y in zip(ra, rb, strict=True)] for ra, rb in zip(a, b, strict=True)]
    return [statistics.fmean(r) for r in d], [statistics.fmean(c) for c in zip(*d)]


def paired_interval(a: list[list[float]], b: list[list[float]]):
    """Mean of A − B (ROUGE-L points) over seeds and rows, a 95% interval and a two-sided p for
    a new draw of both training seeds and evaluation rows. ``a``/``b``: seeds × rows, paired.

    Two variance components, each from the paired differences: the spread of the per-seed means
    over seeds (sd² / n seeds) and the spread of the seed-averaged row differences over rows
    (sd² / n rows); their sum is the squared standard error (a little conservative: the
    seed-by-row interaction counts in both). Student t with Welch–Satterthwaite degrees of
    freedom, so that few seeds give a wide interval. With one seed there is no seed component:
    the interval covers rows only and the caller must say so. Returns (mean, low, high, p)."""
    seed_means, row_means = _diff_means(a, b)
    return _t_interval(statistics.fmean(seed_means), [seed_means, row_means])


def _t_interval(est: float, samples: list[list[float]]):
    """``est`` with a 95% t interval and a two-sided p, its squared standard error the sum of
    each sample's variance of the mean (a sample of one adds nothing), the degrees of freedom
    Welch–Satterthwaite's. Returns (est, low, high, p)."""
    from scipy import stats

    parts = [(statistics.variance(x) / len(x), len(x) - 1) for x in samples if len(x) > 1]
    parts = [(v, k) for v, k in parts if v > 0]
    se = math.sqrt(sum(v for v, _ in parts))
    if se == 0:
        return est, est, est, (0.0 if est else 1.0)
    df = se**4 / sum(v * v / k for v, k in parts)
    q = float(stats.t.ppf(0.975, df))
    p = float(2 * stats.t.sf(abs(est) / se, df))
    return est, est - q * se, est + q * se, p


def holm(pvals: dict) -> dict:
    """Holm-adjusted p-values (step-down, monotone, capped at 1)."""
    order = sorted(pvals, key=pvals.get)
    out, run = {}, 0.0
    for i, k in enumerate(order):
        run = max(run, min(1.0, (len(order) - i) * pvals[k]))
        out[k] = run
    return out


def _p(p: float | None) -> str:
    if p is None:
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _power_t(n: int) -> float:
    """t_0.975 + t_0.80 at n − 1 df: a paired t-test on n per-seed differences, two-sided 5%,
    has 80% power at Δ = this × sd / √n."""
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.80, n - 1))


def seeds_needed(sd: float, delta: float) -> int:
    """Seeds for a paired t-test on per-seed differences to detect ``delta`` at 80% power,
    two-sided 5%, given the standard deviation ``sd`` of the per-seed difference: the smallest n
    with n >= ((t_0.975 + t_0.80 at n - 1 df) sd / delta)^2. The evaluation rows are fixed;
    the interval of ``paired_interval``, which also counts rows, is wider."""

    if delta <= 0:
        return math.inf  # type: ignore[return-value]
    for n in range(2, 100_000):
        if n >= (_power_t(n) * sd / delta) ** 2:
            return n
    return math.inf  # type: ignore[return-value]


def best_baseline(cells: Cells) -> str | None:
    """The better of GKD and DistiLLM by mean greedy ROUGE-L (the mean over cells of the
    benchmarks' means), on the seeds both have (all of each one's seeds while they share none),
    so that an arm's extra seeds do not pick the comparator. Cells the long grid made as claim
    (b)'s main-phase partners (``partner``) are left out: the comparator is chosen by the main
    phase's own grid, before the long phase starts, and cells added for another test must not
    re-choose it halfway."""
    own = {
        t: {k: c for k, c in cells.get(t, {}).items() if not c.get("partner")} for t in BASELINES
    }
    have = [t for t in BASELINES if own[t]]
    shared = set.intersection(*(set(own[t]) for t in have)) if have else set()
    means = {}
    for t in have:  # (seed, machine type) keys: the cells the two made on one type
        cs = [c for k, c in own[t].items() if k in shared or not shared]
        means[t] = statistics.fmean(c["eval"][b]["rougeL"] for c in cs for b in BENCHES)
    return max(means, key=means.get) if means else None


def looping(cs) -> float | None:
    rates = [looping_rate(c)[0] for c in cs]
    rates = [r for r in rates if r is not None]
    return statistics.fmean(rates) if rates else None


def loop_text(cs) -> str:
    rates = [looping_rate(c) for c in cs]
    got = [r for r, _ in rates if r is not None]
    if not got:
        return "–"
    note = " (8 samples)" if any(src == "samples" for _, src in rates) else ""
    return f"{100 * statistics.fmean(got):.0f}%{note}"


def copy_baseline() -> dict[str, float]:
    """ROUGE-L of answering with the prompt itself (instruction, then input): the trivial
    baseline every arm is read against (Dolly's closed-QA and summarisation rows put much of the
    answer in the input)."""
    from lmsmith.data.instruct import load_instruct
    from lmsmith.metrics.rouge import rouge_l

    out = {}
    for name, path in BENCHES.items():
        rows = load_instruct(path)
        texts = [f"{r.instruction} {r.input or ''}".strip() for r in rows]
        out[name] = statistics.fmean(rouge_l(t, r.references) for t, r in zip(texts, rows))
    return out


def table_order(tags) -> list[str]:
    """Tags in the tables' order: the teacher, the warm-up, then the arms; others last."""
    order = ["teacher", "warmup", *ARMS]
    return sorted(tags, key=lambda t: order.index(t) if t in order else len(order))


def _ms(xs, scale=1.0) -> str:
    xs = [scale * x for x in xs]
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.fmean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def within_type_sd(cs: dict, bench: str) -> tuple[float | None, int]:
    """The seed sd of one arm's mean ROUGE-L pooled within machine types (each type's cells
    deviate from that type's own mean, so the types' different starts do not count as seed
    noise), and its degrees of freedom: cells minus types with a cell."""
    groups: dict[str, list[float]] = {}
    for (_, m), c in cs.items():
        groups.setdefault(m, []).append(c["eval"][bench]["rougeL"])
    df = sum(len(v) - 1 for v in groups.values())
    if df < 1:
        return None, 0
    ss = sum((len(v) - 1) * statistics.variance(v) for v in groups.values() if len(v) > 1)
    return math.sqrt(ss / df), df


def detectable(sd: float, n: int) -> float:
    """The smallest difference n seeds detect at 80% power, two-sided 5%, by a paired t-test on
    per-seed differences of sd ``sd``: (t_0.975 + t_0.80 at n − 1 df) sd / √n."""
    return _power_t(n) * sd / math.sqrt(n)


def _noise_table(cells, best: str | None, planned: int) -> list[str]:
    """The seed noise of the primary metric and the seeds a comparison needs. Planned by the
    largest estimate of the sd of a per-seed difference: √2 × SWITCH's seed sd (arms
    uncorrelated; pooled within machine types) and, once SWITCH shares three seeds with it, the
    sd of the paired difference with GKD (the pilot's arm) and with the primary comparator
    (two shared seeds give it one degree of freedom, too few to plan by). ``planned``: the
    seeds per arm the phase makes, for the smallest difference they detect."""
    arms = ["gkd"] + ([best] if best and best != "gkd" else [])
    out = [
        "",
        "**Noise** (ROUGE-L points; SWITCH's seed sd pooled within machine types, so the types' "
        "different starts are not counted as seed noise; the sd of SWITCH − "
        + " and of SWITCH − ".join(arms)
        + " over their shared seeds, each difference taken within one machine type; the planned "
        "sd is the largest of these from three shared seeds on; the last column is the smallest "
        f"difference {planned} seeds detect at 80% power with it):",
        "",
    ]
    sw = cells.get(PRIMARY, {})
    if within_type_sd(sw, next(iter(BENCHES)))[0] is None:
        return out + ["(needs two seeds of SWITCH made on one machine type)"]
    common = {t: shared_seeds(sw, cells.get(t, {})) for t in arms}
    heads = [f"seeds shared with {t} | sd of SWITCH − {t} over them" for t in arms]
    out += [
        "| benchmark | SWITCH cells (df) | sd of SWITCH | √2 × that | "
        + " | ".join(heads)
        + " | planned sd | seeds for 80% power at Δ = 0.4 / 0.7 / 1.0 "
        f"| Δ that {planned} seeds detect |",
        "|---|---|---|---|" + "---|---|" * len(arms) + "---|---|---|",
    ]
    for b in BENCHES:
        sd, df = within_type_sd(sw, b)
        cols, plan = [], math.sqrt(2) * sd
        for t in arms:
            if len(common[t]) >= 3:
                paired = statistics.stdev(_diff_means(*paired_rows(sw, cells[t], b)[1:])[0])
                plan = max(plan, paired)
                cols.append(f"{len(common[t])} | {paired:.2f}")
            else:
                cols.append(f"{len(common[t])} | – (needs 3)")
        need = " / ".join(str(seeds_needed(plan, d)) for d in (0.4, 0.7, 1.0))
        out.append(
            f"| {b} | {len(sw)} ({df}) | {sd:.2f} | {math.sqrt(2) * sd:.2f} | "
            + " | ".join(cols)
            + f" | {plan:.2f} | {need} | {detectable(plan, planned):.2f} |"
        )
    shared = common.get(best, {}) if best else {}  # best is one of ``arms``
    if shared:
        se = []
        for b in BENCHES:
            _, rows = _diff_means(*paired_rows(sw, cells[best], b)[1:])
            se.append(f"{b} {statistics.stdev(rows) / math.sqrt(len(rows)):.2f}")
        out += [
            "",
            f"Standard error that the evaluation rows alone put on SWITCH − {best} (sd of the "
            f"row differences averaged over the {len(shared)} shared seeds, / √rows): "
            + "; ".join(se)
            + ".",
        ]
    return out


MIN_SEEDS_P = 3  # shared seeds before a comparison gets a p-value


def comparison_stats(cells, best: str, others: list[str]):
    """SWITCH − each arm, paired by seed and row (``paired_interval``): {(arm, benchmark): (seeds,
    mean, low, high, p)}, and Holm-adjusted p over the primary's benchmarks and, separately,
    over all the other comparisons (only comparisons with ``MIN_SEEDS_P`` seeds get a p)."""
    res = {}
    arms = [t for t in [best, *others] if t in cells] if PRIMARY in cells else []
    for b in BENCHES:
        for t in arms:
            seeds, a, o = paired_rows(cells[PRIMARY], cells[t], b)
            if seeds:
                res[(t, b)] = (len(seeds), *paired_interval(a, o))
    adj = {}
    for group in ([k for k in res if k[0] == best], [k for k in res if k[0] != best]):
        adj.update(holm({k: res[k][4] for k in group if res[k][0] >= MIN_SEEDS_P}))
    return res, adj


def _comparison_rows(res: dict, adj: dict, best: str) -> list[str]:
    out = [
        "| arm | benchmark | seeds | SWITCH − arm | 95% CI | p | Holm p |",
        "|---|---|---|---|---|---|---|",
    ]
    for (t, b), (n, est, lo, hi, p) in res.items():
        ci = _ci(n, lo, hi)
        out.append(
            f"| {t}{' (primary)' if t == best else ''} | {b} | {n} | {est:+.2f} | {ci} | "
            f"{_p(p if n >= MIN_SEEDS_P else None)} | {_p(adj.get((t, b)))} |"
        )
    return out


def _comparisons(cells, best: str, others: list[str]) -> list[str]:
    """The primary protocol's comparison table (``comparison_stats``)."""
    res, adj = comparison_stats(cells, best, others)
    out = [
        "",
        "**SWITCH against the other arms** (mean of SWITCH − arm in ROUGE-L points, paired by "
        "seed and row; the 95% interval and two-sided p count both the seed-to-seed spread of the "
        "difference and the row-to-row spread, t with Welch–Satterthwaite df (methods.md); with "
        "one shared seed the interval covers the rows only, and p is given from "
        f"{MIN_SEEDS_P} shared seeds on (fewer estimate the seed spread with at most one "
        "degree of freedom). Primary: SWITCH "
        f"against the better of GKD and DistiLLM on their shared seeds, here **{best}**, Holm "
        "over its two benchmarks; Holm over all the other comparisons together):",
        "",
    ]
    return out + _comparison_rows(res, adj, best)


def aggregate(args) -> int:
    folder = (Path(args.results_dir) if args.results_dir else RESULTS) / args.phase
    cells = load_cells(folder)
    if not cells:
        print("no cells yet")
        return 1
    check_rows(cells, folder)
    benches = list(BENCHES)
    tags = table_order(cells)
    out = [
        f"**Cells** ({args.phase} phase; greedy ROUGE-L (×100, as `lmsmith eval` reports it) on all rows, mean ± std over "
        "cells; Dolly generation length in tokens (the answer re-tokenized after "
        "stripping whitespace), mean over rows and seeds; an answer counts as stopped when that "
        "length is below the cap minus one, since an answer cut at the cap re-tokenizes to "
        "about the cap minus one; looping answers over both benchmarks' rows; a cell is one "
        "training seed made end to end on one machine type, the CPU kernel level torch used):",
        "",
        "| arm | cells | machine types | " + " | ".join(benches) + " | gen tokens (Dolly) "
        "| stopped before the cap | looping answers | teacher-written tokens | train s | eval s |",
        "|---|---|---|" + "---|" * len(benches) + "---|---|---|---|---|---|",
    ]
    cap = PHASES[args.phase]["eval_max_new_tokens"]
    for t in tags:
        cs = list(cells[t].values())
        gl = [x for c in cs for x in c["eval"]["dolly"]["gen_tokens"]]
        share = [c["train"]["teacher_token_share"] for c in cs if c.get("train")]
        share = [x for x in share if x is not None]
        tr = [c["train"]["wall_time_s"] for c in cs if c.get("train")]
        ev = [sum(e["eval_s"] for e in c["eval"].values()) for c in cs]
        kinds = collections.Counter(m for _, m in cells[t])
        cols = [
            t,
            str(len(cs)),
            ", ".join(f"{m} ×{n}" for m, n in sorted(kinds.items())),
            *(_ms([c["eval"][b]["rougeL"] for c in cs]) for b in benches),
            f"{statistics.fmean(gl):.1f}",
            f"{100 * sum(x < cap - 1 for x in gl) / len(gl):.0f}%",
            loop_text(cs),
            f"{_ms(share, 100)}%" if share else "–",
            f"{statistics.fmean(tr):.0f}" if tr else "–",
            f"{statistics.fmean(ev):.0f}",
        ]
        out.append("| " + " | ".join(cols) + " |")
    copy = copy_baseline()
    out.append(
        "| *copy the prompt (instruction + input), no model* | – | – | "
        + " | ".join(f"{copy[b]:.2f}" for b in benches)
        + " | – | – | – | – | – | – |"
    )
    bad = [t for t in tags if (looping(cells[t].values()) or 0) >= DEGENERATE]
    if bad:
        out += [
            "",
            f"**DEGENERATE: {', '.join(bad)}** — at least {DEGENERATE:.0%} of their answers loop "
            f"(over {LOOPING:.0%} of an answer's word 4-grams repeat earlier ones). Differences "
            "between such arms do not rank distillation methods.",
        ]
    best = best_baseline(cells)
    main_folder = folder.parent / "main"
    main = load_cells(main_folder) if args.phase != "main" and main_folder.is_dir() else None
    if main is not None:
        # the main phase names the comparator: a later phase's own cells must not pick it
        chosen = best_baseline(main)
        best = chosen if chosen in cells else best
    # the noise, and the seeds it takes
    out += _noise_table(cells, best, SEEDS[args.phase])
    # the comparisons
    margins: list = []
    if PRIMARY in cells and best:
        others = [t for t in ARMS if t not in (PRIMARY, best) and t in cells]
        out += _comparisons(cells, best, others)
        out += _loop_free(cells, [best, *others])
        margins = _bucket_margins(cells, best)
        out += _by_length(margins, best)
    out += _share_table(cells)
    sampled_folder = folder.parent / f"{args.phase}-sampled"
    out += _sampled_table(sampled_folder, best)
    if PRIMARY in cells and best:
        out += _claims(
            cells, best, load_cells(sampled_folder) if sampled_folder.is_dir() else {}, main
        )
    if args.doc:
        plot = Path(args.doc).parent / f"kd_study_{args.phase}.png"
        _study_plot(plot, cells, copy, best, margins)
        alt = "every cell" + (f", and SWITCH − {best} by reference length" if margins else "")
        out += ["", f"![{alt}]({plot.name})"]
    text = "\n".join(out)
    print(text)
    if args.doc:
        kd_repro._splice(Path(args.doc), f"kd-study-{args.phase}", text)
    return 0


BUCKETS = [(0, 16), (17, 64), (65, 128), (129, 10**9)]


def _paired_means(a: list[list[float]], b: list[list[float]]):
    """Means of A and B (seeds x rows) and A − B with its 95% interval (``paired_interval``)."""
    est, lo, hi, _ = paired_interval(a, b)
    flat = [statistics.fmean(x for r in m for x in r) for m in (a, b)]
    return flat[0], flat[1], est, lo, hi


def _loop_free(cells, arms: list[str]) -> list[str]:
    """SWITCH − each arm on the rows where no cell of either loops: whether a difference is
    only loop amplification or also in the answers that stop. The rows are chosen by the
    outcome, so this reads beside the all-rows comparison, not instead of it."""
    out = [
        "",
        "**Without the loops** (SWITCH − arm on the rows where no cell of either arm loops, "
        "paired by seed and row, 95% interval as above):",
        "",
        "| arm | benchmark | seeds | rows kept | SWITCH | arm | SWITCH − arm | 95% CI |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in BENCHES:
        for t in arms:
            shared = shared_seeds(cells[PRIMARY], cells[t])
            evals = [
                cells[x][(s, m)]["eval"][b]
                for x in (PRIMARY, t)
                for s, ms in shared.items()
                for m in ms
            ]
            if not evals or any("repeat_share" not in e for e in evals):
                continue  # cells from before answers were checked for loops
            keep = [
                i
                for i in range(len(evals[0]["repeat_share"]))
                if all(e["repeat_share"][i] <= LOOPING for e in evals)
            ]
            if len(keep) < 2:
                continue
            seeds, a, o = paired_rows(cells[PRIMARY], cells[t], b)
            a, o = ([[r[i] for i in keep] for r in m] for m in (a, o))
            mean_a, mean_o, est, lo, hi = _paired_means(a, o)
            n = len(evals[0]["repeat_share"])
            out.append(
                f"| {t} | {b} | {len(seeds)} | {len(keep)}/{n} | {mean_a:.2f} | {mean_o:.2f} | "
                f"{est:+.2f} | [{lo:+.2f}, {hi:+.2f}] |"
            )
    return out


def _bucket_margins(cells, best: str) -> list[tuple[str, int, float, float, float, float, float]]:
    """SWITCH − best baseline by reference-length bucket (both benchmarks' rows pooled, paired by
    seed and row): (bucket, rows, SWITCH mean, baseline mean, difference, CI low, CI high)."""
    pairs = {bench: paired_rows(cells[PRIMARY], cells[best], bench) for bench in BENCHES}
    words = {  # the same rows in every cell (check_rows)
        bench: next(iter(cells[PRIMARY].values()))["eval"][bench]["ref_words"] for bench in BENCHES
    }
    n_seeds = len(pairs[next(iter(BENCHES))][0])
    out = []
    for lo_w, hi_w in BUCKETS:
        a, b = [], []
        for i in range(n_seeds):
            ra, rb = [], []
            for bench in BENCHES:
                _, pa, pb = pairs[bench]
                for x, y, w in zip(pa[i], pb[i], words[bench], strict=True):
                    if lo_w <= w <= hi_w:
                        ra.append(x)
                        rb.append(y)
            a.append(ra)
            b.append(rb)
        if not a or not a[0]:
            continue
        name = f"{lo_w}–{hi_w}" if hi_w < 10**9 else f">{lo_w - 1}"
        out.append((name, len(a[0]), *_paired_means(a, b)))
    return out


LONG_REF = 64  # words: claim (b)'s split, the length table's middle bucket boundary


def length_contrast(cells, best: str, split: int = LONG_REF):
    """Claim (b) as one test: SWITCH's margin over ``best`` on references longer than ``split``
    words minus its margin on the others, paired by seed and row. The contrast is taken within
    each benchmark (their margins differ, and their rows are not mixed alike on the two sides)
    and averaged over the benchmarks weighted by their rows. Each seed gives one contrast; the
    interval counts the spread of those over seeds and, per benchmark and side, of the
    seed-averaged row margins (``_t_interval``, each part scaled by its benchmark's weight).
    Returns (short rows, long rows, est, low, high, p), or None when a side is empty or the
    arms share no seed."""
    parts = {}
    for bench in BENCHES:
        seeds, a, b = paired_rows(cells[PRIMARY], cells[best], bench)
        if not seeds:
            return None
        words = next(iter(cells[PRIMARY].values()))["eval"][bench]["ref_words"]
        sides = [[[], []] for _ in seeds]  # per seed: [long, short] margins
        for side, ra, rb in zip(sides, a, b, strict=True):
            for x, y, w in zip(ra, rb, words, strict=True):
                side[0 if w > split else 1].append(x - y)
        if not sides[0][0] or not sides[0][1]:
            return None
        parts[bench] = (len(words), sides)
    total = sum(n for n, _ in parts.values())
    n_seeds = len(next(iter(parts.values()))[1])
    per_seed = [0.0] * n_seeds
    samples = []
    for n, sides in parts.values():
        w = n / total
        for i, (lg, sh) in enumerate(sides):
            per_seed[i] += w * (statistics.fmean(lg) - statistics.fmean(sh))
        for k in (0, 1):  # the seed-averaged row margins of each side, weighted
            samples.append([w * statistics.fmean(c) for c in zip(*(sd[k] for sd in sides))])
    n_long = sum(len(sides[0][0]) for _, sides in parts.values())
    est = statistics.fmean(per_seed)
    return (total - n_long, n_long, *_t_interval(est, [per_seed, *samples]))


def margin_cells(cells, best: str) -> dict:
    """SWITCH − ``best`` row by row, as cells keyed (seed, machine type) like ``load_cells``'
    (only the keys both arms have), so that margins pair like scores (``paired_rows``)."""
    out = {}
    for k in set(cells[PRIMARY]) & set(cells[best]):
        a, b = cells[PRIMARY][k]["eval"], cells[best][k]["eval"]
        out[k] = {
            "eval": {
                bench: {
                    "row_rougeL": [
                        x - y for x, y in zip(a[bench]["row_rougeL"], b[bench]["row_rougeL"])
                    ]
                }
                for bench in BENCHES
            }
        }
    return out


def verdict(n: int, est: float, p: float | None) -> str:
    """A claim that SWITCH's difference is positive: held or contradicted when ``p`` (already
    Holm-adjusted where the claim has several tests) is below 0.05, else not established."""
    if n < MIN_SEEDS_P or p is None:
        return f"too few seeds (p from {MIN_SEEDS_P})"
    if p >= 0.05:
        return "not established"
    return "held" if est > 0 else "contradicted"


def _ci(n: int, lo: float, hi: float) -> str:
    """A 95% interval over ``n`` shared seeds, marked when one seed leaves it the rows' spread
    only (``paired_interval``)."""
    return f"[{lo:+.2f}, {hi:+.2f}]" + (" rows only" if n == 1 else "")


def _claim_row(claim: str, proto: str, bench: str, n: int, est, lo, hi, p) -> str:
    ci = _ci(n, lo, hi)
    p = p if n >= MIN_SEEDS_P else None
    # three decimals would hide which side of 0.05 a p in [0.0495, 0.0505) is on
    shown = f"{p:.4f}" if p is not None and 0.0495 <= p < 0.0505 else _p(p)
    return f"| {claim} | {proto} | {bench} | {n} | {est:+.2f} | {ci} | {shown} | {verdict(n, est, p)} |"


def _split_text(words: int, contrast: tuple, seeds: int) -> str:
    """Claim (b) at another split (``length_contrast``'s result), under ``_claim_row``'s rules:
    the interval marked when one seed leaves it the rows' spread only, p from ``MIN_SEEDS_P``
    shared seeds on."""
    est, lo, hi, p = contrast[2:]
    text = f"over {words} words {est:+.2f} {_ci(seeds, lo, hi)}"
    return text + (f", p {_p(p)}" if seeds >= MIN_SEEDS_P else "")


def _claims(cells, best: str, sampled: dict, main: dict | None = None) -> list[str]:
    """The SWITCH paper's claims as this study tests them, each with its interval and a verdict
    by a fixed rule (``verdict``); (c) and (d) are outside the grid. ``main``: the main phase's
    cells, when these are another phase's (the long one): (b) then also compares SWITCH's
    margin over ``best`` here with its margin there, paired by seed and row, per benchmark
    with Holm over the two."""
    out = [
        "",
        "**The paper's claims as this phase tests them** (ROUGE-L points, paired by seed and "
        "row as above; a claim is held or contradicted when its p, Holm-adjusted over the "
        "benchmarks where the claim has a row per benchmark, is below 0.05 — held when "
        "SWITCH's difference is positive — else not established; no p or verdict below "
        f"{MIN_SEEDS_P} shared seeds; against the primary comparator and against the other "
        "baseline, since one seed can tip the choice between them):",
        "",
        "| claim | protocol | benchmark | seeds | difference | 95% CI | p (Holm) | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    # the primary comparator first, then the other baseline: the two can be a near tie that one
    # seed tips, and a verdict should not turn on which of them the rule picked
    arms = [best, *(t for t in BASELINES if t != best)]
    names = {t: f"{t} (primary)" if t == best else t for t in arms}
    for proto, cs in (("greedy", cells), ("sampled", sampled)):
        if PRIMARY not in cs:
            continue
        res, adj = comparison_stats(cs, best, [t for t in arms[1:] if t in cs])
        for t in arms:
            claim = f"(a) SWITCH beats the better of GKD and DistiLLM: SWITCH − {names[t]}"
            for b in BENCHES:
                if (t, b) in res:
                    n, est, lo, hi, _ = res[(t, b)]
                    out.append(_claim_row(claim, proto, b, n, est, lo, hi, adj.get((t, b))))
    other, other_seeds = [], 0
    for t in arms:
        got = length_contrast(cells, t) if t in cells and PRIMARY in cells else None
        if not got:
            continue
        n_short, n_long, est, lo, hi, p = got
        n = len(shared_seeds(cells[PRIMARY], cells[t]))
        claim = (
            f"(b) the margin grows with response length: (SWITCH − {names[t]} on references "
            f"over {LONG_REF} words, {n_long} rows) − (on the other {n_short})"
        )
        out.append(_claim_row(claim, "greedy", "both, weighted by rows", n, est, lo, hi, p))
        if t == best:
            other = [(w, length_contrast(cells, best, w)) for _, w in BUCKETS[:-1]]
            other = [(w, g) for w, g in other if g and w != LONG_REF]
            other_seeds = n
    for t in arms if main and PRIMARY in main and PRIMARY in cells else ():
        if t not in main or t not in cells:
            continue
        both = {f"{a} here": cells[a] for a in (PRIMARY, t)}
        check_rows({**both, **{f"{a} main": main[a] for a in (PRIMARY, t)}}, Path("."), ())
        here, there = margin_cells(cells, t), margin_cells(main, t)
        res = {}
        for b in BENCHES:
            seeds, x, y = paired_rows(here, there, b)
            if seeds:
                res[b] = (len(seeds), *paired_interval(x, y))
        adj = holm({b: r[4] for b, r in res.items() if r[0] >= MIN_SEEDS_P})
        claim = (
            f"(b) the margin grows with the training and evaluation length: (SWITCH − "
            f"{names[t]}, this phase) − (SWITCH − {t}, main phase)"
        )
        for b, (n, est, lo, hi, _) in res.items():
            out.append(_claim_row(claim, "greedy", b, n, est, lo, hi, adj.get(b)))
    if other:
        out += [
            "",
            f"(b) against {best}, split at the length table's other boundaries (not the test; "
            "shown so that the split is not picked after the fact): "
            + "; ".join(_split_text(w, g, other_seeds) for w, g in other)
            + ".",
        ]
    out += [
        "",
        "(c) (an exponential threshold beats constant and linear ones) and (d) (gains grow with "
        "the teacher–student size gap) are outside this grid: every SWITCH arm here decays "
        "exponentially and there is one student size; the pilot's intervals for them are in "
        "the reproduction section.",
    ]
    return out


def _by_length(margins, best: str) -> list[str]:
    out = [
        "",
        f"**By reference length** (words; SWITCH − {best} in ROUGE-L points, both benchmarks' rows pooled, "
        "paired by seed and row, 95% interval as above):",
        "",
        "| reference words | rows | SWITCH | " + best + " | SWITCH − " + best + " | 95% CI |",
        "|---|---|---|---|---|---|",
    ]
    for name, n, mean_a, mean_b, est, lo, hi in margins:
        out.append(
            f"| {name} | {n} | {mean_a:.2f} | {mean_b:.2f} | {est:+.2f} | [{lo:+.2f}, {hi:+.2f}] |"
        )
    return out


def _study_plot(path: Path, cells, copy: dict[str, float], best: str | None, margins) -> None:
    """The study at a glance: every cell's greedy ROUGE-L per arm (a dot per seed, the copy-the-
    prompt baseline dashed, each arm's looping share written under it) and, once SWITCH and a
    baseline exist, SWITCH − that baseline by reference length with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = table_order(cells)
    fig, axes = plt.subplots(1, 2 if margins else 1, figsize=(12 if margins else 7, 4.5))
    ax = axes[0] if margins else axes
    for j, (bench, marker) in enumerate(zip(BENCHES, ("o", "s"))):
        color = f"C{j}"
        for i, t in enumerate(tags):
            ys = [c["eval"][bench]["rougeL"] for c in cells[t].values()]
            xs = [i + (j - 0.5) * 0.25] * len(ys)
            ax.scatter(xs, ys, marker=marker, color=color, alpha=0.7, s=22,
                       label=bench if i == 0 else None)  # fmt: skip
            ax.hlines(statistics.fmean(ys), xs[0] - 0.1, xs[0] + 0.1, color=color, lw=2)
        ax.axhline(copy[bench], color=color, ls="--", lw=1,
                   label=f"copy the prompt ({bench})")  # fmt: skip
    ax.set_xticks(
        range(len(tags)),
        [f"{t}\n{loop_text(cells[t].values())} loop" for t in tags],
        fontsize=8,
    )
    ax.set_ylabel("greedy ROUGE-L (dot: one cell; bar: mean)")
    ax.set_title("Every cell")
    ax.legend(fontsize=7)
    if margins:
        ax = axes[1]
        names = [m[0] for m in margins]
        est = [m[4] for m in margins]
        err = [[m[4] - m[5] for m in margins], [m[6] - m[4] for m in margins]]
        ax.errorbar(range(len(names)), est, yerr=err, fmt="o", capsize=4, color="black")
        ax.axhline(0, color="grey", lw=1)
        ax.set_xticks(range(len(names)), [f"{n}\n({m[1]} rows)" for n, m in zip(names, margins)])
        ax.set_xlabel("reference length (words)")
        ax.set_ylabel(f"SWITCH − {best} (ROUGE-L points, 95% CI)")
        ax.set_title(f"SWITCH against {best} by reference length")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sampled_table(folder: Path, best: str | None = None) -> list[str]:
    """The secondary protocol's tables: sampled ROUGE-L (five sampling seeds) per arm and
    machine type, then SWITCH against the other arms paired by seed and row as for the primary
    protocol (each row's score the mean over the sampling seeds), against the primary
    protocol's comparator ``best``."""
    cells = load_cells(folder) if folder.is_dir() else {}
    if not cells:
        return []
    tags = table_order(cells)
    benches = list(BENCHES)
    first = next(iter(next(iter(cells.values())).values()))
    cfg = first["sampled"]
    same = ("seeds", "temperature", "top_p", "rows")
    for cs in cells.values():
        for c in cs.values():
            if any(c["sampled"][k] != cfg[k] for k in same):
                raise SystemExit(
                    f"{c['_file']} was sampled with {c['sampled']}, another cell with "
                    f"{cfg}: one table cannot mix them (rerun it with the same settings)"
                )
    check_rows(cells, folder, per_row=())  # repeat_share holds one value per sample here
    out = [
        "",
        f"**Secondary protocol** (sampled, T = {cfg['temperature']}, top-p {cfg['top_p']}, "
        f"sampling seeds {', '.join(map(str, cfg['seeds']))}; the first {cfg['rows']} rows of "
        "each benchmark; ROUGE-L ×100, mean over sampling seeds, then mean ± std over cells; "
        "looping answers over all samples; one row per machine type, since the types' starts "
        "differ: compare rows of one type):",
        "",
        "| machine type | arm | cells | "
        + " | ".join(benches)
        + " | looping answers | no-repeat n-gram |",
        "|---|---|---|" + "---|" * len(benches) + "---|---|",
    ]
    for m in sorted({m for cs in cells.values() for _, m in cs}):
        for t in tags:
            cs = [c for (_, mm), c in cells[t].items() if mm == m]
            if not cs:
                continue
            reps = [x for c in cs for e in c["eval"].values() for x in e["repeat_share"]]
            nr = sorted({c["sampled"]["no_repeat_ngram_size"] for c in cs})
            out.append(
                f"| {m} | {t} | {len(cs)} | "
                + " | ".join(_ms([c["eval"][b]["rougeL"] for c in cs]) for b in benches)
                + f" | {100 * sum(r > LOOPING for r in reps) / len(reps):.0f}% | "
                + ", ".join(str(n) if n else "off" for n in nr)
                + " |"
            )
    if best and PRIMARY in cells:
        others = [t for t in ARMS if t not in (PRIMARY, best) and t in cells]
        res, adj = comparison_stats(cells, best, others)
        if res:
            out += [
                "",
                "**Secondary protocol, SWITCH against the other arms** (the same pairing, "
                "interval and Holm groups as the primary table, on the sampled cells: each row's "
                "ROUGE-L is its mean over the five sampling seeds, so the row spread includes "
                f"the sampling noise; primary comparator **{best}**, as above):",
                "",
                *_comparison_rows(res, adj, best),
            ]
    return out


def _share_table(cells) -> list[str]:
    rows = []
    for t, cs in cells.items():
        sp = [
            c["teacher_share_by_position"]
            for c in cs.values()
            if c.get("teacher_share_by_position")
        ]
        if sp:
            keys = list(dict.fromkeys(k for s in sp for k in s))
            rows.append((t, keys, [kd_repro._mean([s.get(k) for s in sp]) for k in keys]))
    if not rows:
        return []
    keys = list(dict.fromkeys(k for _, ks, _ in rows for k in ks))
    out = ["", "**Teacher-written tokens by response position** (mean over steps and seeds):", "",
           "| arm | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]  # fmt: skip
    for t, ks, vals in rows:
        d = dict(zip(ks, vals))
        out.append(
            f"| {t} | "
            + " | ".join("–" if d.get(k) is None else f"{100 * d[k]:.1f}%" for k in keys)
            + " |"
        )
    return out


def loop_onset(args) -> int:
    """Does an arm only keep the warm-up's loops, or start new ones? For each stored cell of
    ``--tags``, the share of rows that loop among the rows where the warm-up (same seed-0 start)
    looped, and among the rows where it did not."""
    folder = (Path(args.results_dir) if args.results_dir else RESULTS) / args.phase
    cells = load_cells(folder)
    warmups = {m: c["eval"] for (s, m), c in cells.get("warmup", {}).items() if s == 0}
    if not warmups:
        print(f"no warm-up cell in {folder}", file=sys.stderr)
        return 2
    print(f"Loops after distillation, by whether the warm-up looped on the row ({folder}):\n")
    print(
        "| arm | seed | machine | benchmark | loops where the warm-up looped | where it did not |"
    )
    print("|---|---|---|---|---|---|")
    for tag in args.tags:
        for (seed, m), c in sorted(cells.get(tag, {}).items()):
            if m not in warmups:
                print(f"{tag} s{seed} ({m}): no warm-up cell of that machine type", file=sys.stderr)
                continue
            warm = warmups[m]
            for bench, e in c["eval"].items():
                w = [r > LOOPING for r in warm[bench]["repeat_share"]]
                x = [r > LOOPING for r in e["repeat_share"]]
                if len(w) != len(x):
                    raise SystemExit(f"{tag}-s{seed} {bench}: {len(x)} rows, warm-up {len(w)}")
                kept = sum(a and b for a, b in zip(w, x))
                new = sum(b and not a for a, b in zip(w, x))
                n1 = sum(w)
                n0 = len(w) - n1
                print(
                    f"| {tag} | {seed} | {m} | {bench} | {kept}/{n1} ({100 * kept / max(n1, 1):.0f}%) "
                    f"| {new}/{n0} ({100 * new / max(n0, 1):.0f}%) |"
                )
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cell", help="run one (arm, seed) cell")
    c.add_argument("--method", required=True, choices=[*ARMS, "teacher", "warmup"])
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--phase", choices=list(PHASES), default="main")
    c.add_argument("--results-dir", default=None, help="write the cell here instead")
    c.add_argument(
        "--partner",
        action="store_true",
        help="a main-phase cell made for claim (b)'s cross-phase pairing (the long grid passes "
        "it): recorded, and left out when the main phase's comparator is chosen",
    )
    c.add_argument(
        "--work-dir",
        default=None,
        help="warm-up, row files and trained students here (default runs/kd-study; a fresh "
        "folder rebuilds the warm-up too)",
    )
    v = sub.add_parser(
        "verify", help="re-create a committed cell from scratch and compare it row by row"
    )
    v.add_argument("--method", required=True, choices=[*ARMS, "teacher", "warmup"])
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--phase", choices=list(PHASES), default="main")
    v.add_argument("--work-dir", default=str(WORK.parent / "kd-study-verify"))
    d = sub.add_parser(
        "start-digest", help="build the start in a new folder and compare its weights' digest"
    )
    d.add_argument("--work-dir", default=str(WORK.parent / "kd-study-digest"))
    d.add_argument("--teacher", action="store_true", help="the tuned teacher too (~15 min)")
    g = sub.add_parser("grid", help="run every missing cell of a phase in turn")
    g.add_argument("--phase", choices=list(PHASES), default="main")
    g.add_argument(
        "--seeds", type=int, default=None, help="training seeds per arm (main 6, long 4)"
    )
    g.add_argument("--dry-run", action="store_true", help="list the cells only")
    g.add_argument("--force", action="store_true", help="run even from a degenerate warm-up")
    g.add_argument(
        "--against",
        choices=["best", "both"],
        default="best",
        help="long phase: SWITCH against the main phase's better baseline, or against both "
        "GKD and DistiLLM on the same seeds",
    )
    sp = sub.add_parser("sampled", help="score a finished cell's model by the sampled protocol")
    sp.add_argument("--method", required=True, choices=[*ARMS, "teacher", "warmup"])
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--phase", choices=list(PHASES), default="main")
    sp.add_argument(
        "--rows", type=int, default=SAMPLED["rows"], help="first N rows of each benchmark"
    )
    sp.add_argument("--no-repeat", type=int, default=0, help="no_repeat_ngram_size (0 = off)")
    sp.add_argument("--results-dir", default=None)
    lp = sub.add_parser("teacher-on-loops", help="does the teacher endorse the stored loops?")
    lp.add_argument("--tags", nargs="+", default=["warmup", "switch"])
    lp.add_argument(
        "--untuned", action="store_true", help="read the loops with the untuned model (cells "
        "made before the study's teacher was fine-tuned)"
    )  # fmt: skip
    lp.add_argument("--phase", choices=list(PHASES), default="main")
    lp.add_argument("--results-dir", default=None)
    st = sub.add_parser(
        "stop-prob", help="P(EOS) right after whole short references, and sharpness on them"
    )
    st.add_argument("--tags", nargs="+", default=["teacher", "warmup", *ARMS])
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--phase", choices=list(PHASES), default="main")
    st.add_argument("--rows", type=int, default=100)
    lo = sub.add_parser("loop-onset", help="loops kept from the warm-up, and new ones")
    lo.add_argument("--tags", nargs="+", default=list(ARMS))
    lo.add_argument("--phase", choices=list(PHASES), default="main")
    lo.add_argument("--results-dir", default=None)
    a = sub.add_parser("aggregate", help="tables from the stored cells")
    a.add_argument("--phase", choices=list(PHASES), default="main")
    a.add_argument("--results-dir", default=None)
    a.add_argument("--doc", default=None, help="replace the phase's block in this Markdown file")
    args = ap.parse_args(argv)
    commands = {"cell": cell, "grid": grid, "sampled": sampled, "aggregate": aggregate}
    commands["verify"] = verify
    commands["start-digest"] = start_digest
    commands["teacher-on-loops"] = teacher_on_loops
    commands["loop-onset"] = loop_onset
    commands["stop-prob"] = stop_prob
    return commands[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
