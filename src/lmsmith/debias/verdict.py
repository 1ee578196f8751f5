"""The verdict on a CRISPR run: ``improved``, ``no-feasible-pruning`` or ``degenerate``.

A pruned model is *degenerate* when, on the test rows, it gives >= ``max_one_kind``% of its
answers to one option kind (stereotyped person, other person, "unknown") or one position, or
its disambiguated accuracy, its "unknown" rate on disambiguated rows or its held-out NLL moves
past the search's bounds relative to the original model. A degenerate model is never written
unless the user insists (``--allow-degenerate``), and the command exits non-zero.
*improved*: n > 0, not degenerate, and the bias objective is better on test than the
original's. Otherwise *no-feasible-pruning*: the original model stays as it is.
"""

from __future__ import annotations

from lmsmith.debias.prune import constraint_check, objective_value

VERDICTS = ("improved", "no-feasible-pruning", "degenerate")


def judge(
    n: int,
    before: dict,
    after: dict,
    bounds,
    objective: str = "ambig",
    search_note: str = "",
) -> dict:
    """{"verdict", "reasons": [...], "objective_before", "objective_after"}.

    ``before``/``after``: test metrics (bbq metrics plus ``nll``, the retention NLL) of the
    original and the pruned model; ``bounds``: a PruneConfig.
    """
    ob, oa = objective_value(before, objective), objective_value(after, objective)
    name = "ambiguous accuracy" if objective == "ambig" else "-(|s_AMB| + |s_DIS|)"
    out = {"objective": name, "objective_before": ob, "objective_after": oa}
    if n == 0:
        reasons = [search_note or "no pruning of n > 0 units met the bounds on dev"]
        for key in ("answers", "answers_by_position"):
            for kind, share in before.get(key, {}).items():
                if share >= bounds.max_one_kind:
                    reasons.append(f"the original model already gives {share:.0f}% of its "
                                   f"answers to {kind}")  # fmt: skip
        reasons.append("the original model is kept; no model/ written")
        return {"verdict": "no-feasible-pruning", "reasons": reasons, **out}
    broken = constraint_check(after, before, bounds)
    if broken:
        return {"verdict": "degenerate", "reasons": broken, **out}
    if not oa > ob:
        return {
            "verdict": "no-feasible-pruning",
            "reasons": [
                f"n={n} met the bounds on dev, but on test {name} went {ob:.2f} → {oa:.2f} "
                "(no gain)",
                "the original model is kept; no model/ written",
            ],
            **out,
        }
    return {
        "verdict": "improved",
        "reasons": [f"{name} {ob:.2f} → {oa:.2f} on test with every bound met ({n} units)"],
        **out,
    }
