"""Pruning units by zeroing their weight rows (and bias entries), restoring them, choosing how
many by a constrained search, and exporting the pruned model.

Zeroing row j of a Linear's weight and entry j of its bias makes output unit j exactly 0 for
every input, so nothing else in the model changes. (For transformers' ``Conv1D``, whose weight
is stored (in, out), the unit is column j.)
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lmsmith.debias.attribution import Conv1D, n_units
from lmsmith.runs import atomic_dir, write_json

log = logging.getLogger(__name__)

Unit = tuple[str, int]


def _weight_view(layer: nn.Module) -> torch.Tensor:
    """The weight as (units, inputs): a view, so writes reach the parameter."""
    return layer.weight.data.t() if isinstance(layer, Conv1D) else layer.weight.data


class Pruner:
    """Zero units in place and put them back exactly.

    >>> p = Pruner(model); p.apply([("model.layers.0.mlp.up_proj", 7)]); ...; p.restore()
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = dict(model.named_modules())
        self._saved: dict[Unit, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @torch.no_grad()
    def apply(self, units: list[Unit]) -> None:
        for name, j in units:
            if (name, j) in self._saved:
                continue
            layer = self.modules.get(name)
            if layer is None or not hasattr(layer, "weight"):
                raise KeyError(f"no layer named {name!r} in {type(self.model).__name__}")
            if not 0 <= j < n_units(layer):
                raise IndexError(f"{name} has {n_units(layer)} units; got index {j}")
            w = _weight_view(layer)
            bias = getattr(layer, "bias", None)
            self._saved[(name, j)] = (
                w[j].clone(),
                bias.data[j].clone() if bias is not None else None,
            )
            w[j] = 0
            if bias is not None:
                bias.data[j] = 0

    @torch.no_grad()
    def restore(self) -> None:
        for (name, j), (row, b) in self._saved.items():
            layer = self.modules[name]
            _weight_view(layer)[j] = row
            if b is not None:
                layer.bias.data[j] = b
        self._saved.clear()

    def set(self, units: list[Unit]) -> None:
        """Exactly these units pruned (restores first)."""
        self.restore()
        self.apply(units)


def random_units(
    layers: dict[str, nn.Module], n: int, seed: int, exclude: set[Unit] | None = None
) -> list[Unit]:
    """``n`` distinct units drawn uniformly (seeded) from all candidate units."""
    names = sorted(layers)
    sizes = [n_units(layers[k]) for k in names]
    total = sum(sizes)
    rng = random.Random(seed)
    picked: list[Unit] = []
    seen = set(exclude or ())
    if n > total - len(seen):
        raise ValueError(f"cannot draw {n} units from {total - len(seen)}")
    bounds = torch.tensor(sizes).cumsum(0).tolist()
    while len(picked) < n:
        g = rng.randrange(total)
        li = next(i for i, b in enumerate(bounds) if g < b)
        u = (names[li], g - (bounds[li - 1] if li else 0))
        if u not in seen:
            seen.add(u)
            picked.append(u)
    return picked


def log_grid(hi: int) -> list[int]:
    """0, 1, 2, 4, 8, ... up to ``hi`` (``hi`` itself included)."""
    grid, n = [0], 1
    while n < hi:
        grid.append(n)
        n *= 2
    return grid + [hi] if hi > 0 else grid


def objective_value(m: dict, objective: str) -> float:
    """Higher is better: ambiguous accuracy, or −(|s_AMB| + |s_DIS|) (−inf when undefined)."""
    if objective == "ambig":
        return m["accuracy_ambig"]
    total = abs(m["bias_ambig"]) + abs(m["bias_disambig"])
    return -total if math.isfinite(total) else -math.inf


def constraint_check(m: dict, base: dict, bounds) -> list[str]:
    """Why the dev metrics ``m`` of a pruned model break the bounds, relative to n=0 (``base``);
    empty when feasible. ``bounds``: a PruneConfig (max_dis_drop, max_unknown_rise,
    max_nll_rise, max_one_kind). ``m`` and ``base`` hold bbq metrics plus ``nll``."""
    why = []
    if m["accuracy_disambig"] < base["accuracy_disambig"] - bounds.max_dis_drop:
        why.append(
            f"disambiguated accuracy {m['accuracy_disambig']:.1f} < "
            f"{base['accuracy_disambig']:.1f} - {bounds.max_dis_drop:g}"
        )
    if m["unknown_rate_disambig"] > base["unknown_rate_disambig"] + bounds.max_unknown_rise:
        why.append(
            f"'unknown' on {m['unknown_rate_disambig']:.1f}% of disambiguated rows > "
            f"{base['unknown_rate_disambig']:.1f} + {bounds.max_unknown_rise:g}"
        )
    if m.get("nll") is not None and base.get("nll") is not None:
        if m["nll"] > base["nll"] * (1 + bounds.max_nll_rise):
            why.append(
                f"held-out NLL {m['nll']:.3f} > {base['nll']:.3f} x {1 + bounds.max_nll_rise:g}"
            )
    for key in ("answers", "answers_by_position"):
        for kind, share in m.get(key, {}).items():
            if share >= bounds.max_one_kind:
                why.append(f"{share:.0f}% of answers are {kind}")
    return why


def constrained_search(
    evaluate: Callable[[int], dict], hi: int, bounds, objective: str = "ambig"
) -> tuple[int, list[dict]]:
    """Choose n to improve the bias objective subject to the bounds, never by collapse.

    ``evaluate(n)`` returns the dev metrics of the model with the top n units pruned (bbq
    metrics plus ``nll``). The grid 0, 1, 2, 4, ... ``hi`` is walked upward until ``patience``
    grid points in a row are infeasible; then ``refine`` rounds evaluate the midpoints between
    the best feasible n and its nearest evaluated neighbours. The best feasible n > 0 (ties: the
    smaller) is chosen when it beats n = 0 on the objective by at least ``min_gain``; else n = 0.
    ``bounds``: a PruneConfig.
    Returns: (n, one row per evaluated n: n, objective, the constraint values, feasible, why).
    """
    table: dict[int, dict] = {}

    def val(n: int) -> dict:
        if n not in table:
            m = evaluate(n)
            base = table[0]["metrics"] if table else m
            why = constraint_check(m, base, bounds) if n > 0 else []
            table[n] = {"n": n, "objective": objective_value(m, objective), "metrics": m,
                        "feasible": not why, "why": why}  # fmt: skip
        return table[n]

    val(0)
    misses = 0
    for n in log_grid(hi)[1:]:
        misses = 0 if val(n)["feasible"] else misses + 1
        if misses >= bounds.patience:
            break

    def best_feasible():
        ok = [r for r in table.values() if r["n"] > 0 and r["feasible"]]
        return max(ok, key=lambda r: (r["objective"], -r["n"])) if ok else None

    for _ in range(bounds.refine):
        best = best_feasible()
        if best is None:
            break
        seen = sorted(table)
        j = seen.index(best["n"])
        mids = []
        if j > 0:
            mids.append((seen[j - 1] + best["n"]) // 2)
        if j + 1 < len(seen):
            mids.append((best["n"] + seen[j + 1]) // 2)
        mids = [m for m in mids if m not in table and m > 0]
        if not mids:
            break
        for m in mids:
            val(m)
    best = best_feasible()
    chosen = 0
    if best is not None and best["objective"] >= table[0]["objective"] + bounds.min_gain:
        chosen = best["n"]
    return chosen, [table[n] for n in sorted(table)]


def units_record(ranked: list[tuple[str, int, float]], n: int) -> list[dict]:
    return [{"module": m, "index": i, "score": s} for m, i, s in ranked[:n]]


def save_pruned(model, tokenizer, units: list[dict], path: str | Path) -> Path:
    """The pruned model as an HF checkpoint (safetensors) plus ``pruned_units.json``."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / "pruned_units.json", units)
    log.info("saved the pruned model (%d units) to %s", len(units), path)
    return path
