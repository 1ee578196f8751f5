"""Pruning units by zeroing their weight rows (and bias entries), restoring them, choosing how
many by golden-section search, and exporting the pruned model.

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


INV_PHI = (math.sqrt(5) - 1) / 2  # 0.618...


def golden_section_search(
    f: Callable[[int], float], lo: int, hi: int, tol: int = 4, max_evals: int = 30
) -> tuple[int, list[tuple[int, float]]]:
    """Integer golden-section search for the n in [lo, hi] that maximises f.

    Both ends are evaluated too (n = lo is "prune nothing"), every point at most once, and the
    best point seen wins; ties go to the smaller n. Stops when the bracket is at most ``tol``
    wide or after ``max_evals`` evaluations.
    Returns: (best n, [(n, f(n)) in evaluation order]).
    """
    if lo > hi:
        raise ValueError(f"search range [{lo}, {hi}] is empty")
    seen: dict[int, float] = {}
    history: list[tuple[int, float]] = []

    def val(n: int) -> float:
        n = min(max(int(n), lo), hi)
        if n not in seen:
            seen[n] = float(f(n))
            history.append((n, seen[n]))
        return seen[n]

    val(lo)
    val(hi)
    a, b = lo, hi
    c = round(b - INV_PHI * (b - a))
    d = round(a + INV_PHI * (b - a))
    for _ in range(4 * max_evals):  # bounded even if rounding stalls the bracket
        if b - a <= tol or len(seen) >= max_evals:
            break
        if c >= d or c <= a or d >= b:  # rounding collapsed the two probes
            c, d = a + max(1, (b - a) // 3), b - max(1, (b - a) // 3)
            if not a < c < d < b:
                break
        if val(c) >= val(d):  # the max is in [a, d]
            b, d = d, c
            c = round(b - INV_PHI * (b - a))
        else:  # the max is in [c, b]
            a, c = c, d
            d = round(a + INV_PHI * (b - a))
    best = max(seen.items(), key=lambda kv: (kv[1], -kv[0]))[0]
    return best, history


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
