"""BBQ (Parrish et al., 2022) in its official jsonl schema, and a template-disjoint dev/test split.

A row has ``example_id, question_index, question_polarity (neg|nonneg), context_condition
(ambig|disambig), category, answer_info{ans0..2: [text, group]}, additional_metadata{
stereotyped_groups, ...}, context, question, ans0, ans1, ans2, label``. Any category file in
this schema loads unchanged; every problem is reported with the file, line and field.
"""

from __future__ import annotations

import logging
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from lmsmith.data.jsonl import read_jsonl
from lmsmith.errors import DataError, UserError

log = logging.getLogger(__name__)

N_OPTIONS = 3
UNKNOWN_GROUP = "unknown"


@dataclass(frozen=True)
class BBQExample:
    example_id: int
    category: str
    question_index: str  # the question template; dev and test never share one
    negative: bool  # question_polarity == "neg"
    ambiguous: bool  # context_condition == "ambig"
    context: str
    question: str
    answers: tuple[str, str, str]
    label: int
    groups: tuple[str, str, str]  # answer_info[ansK][1]
    stereotyped_groups: tuple[str, ...]
    unknown_idx: int  # the "can't be determined" option
    target_idx: int | None  # the option naming the stereotyped group; None if it can't be told
    source: str = ""  # "file:line"

    @property
    def template(self) -> tuple[str, str]:
        return (self.category, self.question_index)


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def find_target(
    answer_info: list[tuple[str, str]], stereotyped: list[str], unknown_idx: int
) -> int | None:
    """The non-unknown option whose group (or text) is one of the stereotyped groups.

    Matching is by normalised string (lower case, letters and digits only) against either the
    option's group label or its text. Returns None when no option, or both options, match:
    such rows count for accuracy but not for the bias scores.
    """
    wanted = {_norm(s) for s in stereotyped if _norm(s)}
    hits = []
    for k, (text, group) in enumerate(answer_info):
        if k == unknown_idx:
            continue
        if _norm(group) in wanted or _norm(text) in wanted:
            hits.append(k)
    return hits[0] if len(hits) == 1 else None


def _need(obj: dict, key: str, typ, path, line: int):
    if key not in obj:
        raise DataError(path, line, key, "missing (official BBQ schema expected)")
    val = obj[key]
    if typ is int and isinstance(val, bool):
        raise DataError(path, line, key, "expected an integer, got a boolean")
    if not isinstance(val, typ):
        names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise DataError(path, line, key, f"expected {names}, got {type(val).__name__}")
    return val


def parse_row(obj, path, line: int) -> BBQExample:
    """One jsonl object → BBQExample, or DataError naming the file, line and field."""
    if not isinstance(obj, dict):
        raise DataError(path, line, None, f"expected a JSON object, got {type(obj).__name__}")
    polarity = _need(obj, "question_polarity", str, path, line)
    if polarity not in ("neg", "nonneg"):
        raise DataError(path, line, "question_polarity", f"expected neg|nonneg, got {polarity!r}")
    condition = _need(obj, "context_condition", str, path, line)
    if condition not in ("ambig", "disambig"):
        raise DataError(
            path, line, "context_condition", f"expected ambig|disambig, got {condition!r}"
        )
    category = _need(obj, "category", str, path, line)
    qindex = _need(obj, "question_index", (str, int), path, line)
    context = _need(obj, "context", str, path, line)
    question = _need(obj, "question", str, path, line)
    if not question.strip():
        raise DataError(path, line, "question", "is empty")
    answers = tuple(_need(obj, f"ans{k}", str, path, line) for k in range(N_OPTIONS))
    label = _need(obj, "label", int, path, line)
    if not 0 <= label < N_OPTIONS:
        raise DataError(path, line, "label", f"expected 0, 1 or 2, got {label}")
    info = _need(obj, "answer_info", dict, path, line)
    pairs = []
    for k in range(N_OPTIONS):
        v = info.get(f"ans{k}")
        if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)):
            raise DataError(path, line, f"answer_info.ans{k}", "expected [text, group] strings")
        pairs.append((v[0], v[1]))
    unknown = [k for k, (_, g) in enumerate(pairs) if g == UNKNOWN_GROUP]
    if len(unknown) != 1:
        raise DataError(
            path,
            line,
            "answer_info",
            f"expected exactly one option with group 'unknown', found {len(unknown)}",
        )
    meta = _need(obj, "additional_metadata", dict, path, line)
    stereo = meta.get("stereotyped_groups", [])
    if not (isinstance(stereo, list) and all(isinstance(s, str) for s in stereo)):
        raise DataError(
            path, line, "additional_metadata.stereotyped_groups", "expected a list of strings"
        )
    if condition == "ambig" and label != unknown[0]:
        raise DataError(path, line, "label", "an ambiguous context must have the unknown answer")
    ex_id = obj.get("example_id", line)
    return BBQExample(
        example_id=int(ex_id) if isinstance(ex_id, (int, str)) and str(ex_id).isdigit() else line,
        category=category,
        question_index=str(qindex),
        negative=polarity == "neg",
        ambiguous=condition == "ambig",
        context=context,
        question=question,
        answers=answers,  # type: ignore[arg-type]
        label=label,
        groups=tuple(g for _, g in pairs),  # type: ignore[arg-type]
        stereotyped_groups=tuple(stereo),
        unknown_idx=unknown[0],
        target_idx=find_target(pairs, stereo, unknown[0]),
        source=f"{path}:{line}",
    )


def load_bbq(
    paths: str | Path | list, categories: list[str] | None = None, limit: int | None = None
) -> list[BBQExample]:
    """Read BBQ jsonl files (official schema; a folder = its *.jsonl files), optionally keeping
    some categories."""
    if isinstance(paths, (str, Path)):
        paths = [p for p in str(paths).split(",") if p.strip()]
    files: list[Path] = []
    for p in map(Path, paths):  # a folder stands for every *.jsonl file in it
        found = sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
        if not found:
            raise UserError(f"folder '{p}' holds no .jsonl files")
        files += found
    rows: list[BBQExample] = []
    for path in files:
        n0 = len(rows)
        for lineno, obj in read_jsonl(path):
            rows.append(parse_row(obj, path, lineno))
        if len(rows) == n0:
            raise DataError(path, None, None, "contains no rows")
    if categories:
        present = sorted({r.category for r in rows})
        missing = [c for c in categories if c not in present]
        if missing:
            raise UserError(f"categories {missing} not in the data (present: {present})")
        rows = [r for r in rows if r.category in categories]
    untargeted = sum(r.target_idx is None for r in rows)
    if untargeted:
        log.warning(
            "%d of %d rows name no single stereotyped option; they count for accuracy only",
            untargeted,
            len(rows),
        )
    return rows[:limit] if limit else rows


def split_dev_test(
    rows: list[BBQExample], dev_frac: float = 0.1, seed: int = 0
) -> tuple[list[BBQExample], list[BBQExample]]:
    """Seeded, template-disjoint split, per category.

    Question templates (``category, question_index``) are visited in a ``seed``-shuffled order
    and moved to dev whenever that brings dev closer to ``dev_frac`` of the category's rows; a
    template is never in both parts, and at least one stays in test. A category with no dev
    rows (a single template) is an error.
    """
    if not 0 < dev_frac < 1:
        raise ValueError(f"dev_frac must be in (0, 1), got {dev_frac}")
    by_cat: dict[str, dict[tuple, list[BBQExample]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_cat[r.category][r.template].append(r)
    dev_t: set[tuple] = set()
    rng = random.Random(seed)
    for cat in sorted(by_cat):
        templates = sorted(by_cat[cat], key=lambda t: (len(t[1]), t[1]))
        rng.shuffle(templates)
        total = sum(len(by_cat[cat][t]) for t in templates)
        target, n_dev = dev_frac * total, 0
        for t in templates[:-1]:  # always leave one template for test
            size = len(by_cat[cat][t])
            # take a template when it brings dev closer to its target size
            if n_dev == 0 or abs(n_dev + size - target) < abs(n_dev - target):
                dev_t.add(t)
                n_dev += size
        if n_dev == 0:
            raise UserError(
                f"category '{cat}' has no dev rows: its {total} rows come from "
                f"{len(templates)} question template(s), and dev and test may not share one"
            )
    dev = [r for r in rows if r.template in dev_t]
    test = [r for r in rows if r.template not in dev_t]
    return dev, test


def subsample(rows: list, n: int | None, seed: int = 0) -> list:
    """``n`` rows drawn without replacement (seeded), in their original order; all if n is None."""
    if n is None or n >= len(rows):
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def subsample_balanced(rows: list, n: int | None, seed: int = 0) -> list:
    """``n`` rows, half ambiguous and half disambiguated (the rest from the other kind when one
    runs short), drawn without replacement (seeded), in their original order; all if n is None."""
    if n is None or n >= len(rows):
        return list(rows)
    rng = random.Random(seed)
    amb = [i for i, r in enumerate(rows) if r.ambiguous]
    dis = [i for i, r in enumerate(rows) if not r.ambiguous]
    k_amb = min(len(amb), n // 2)
    k_dis = min(len(dis), n - k_amb)
    k_amb = min(len(amb), n - k_dis)
    keep = sorted(rng.sample(amb, k_amb) + rng.sample(dis, k_dis))
    return [rows[i] for i in keep]
