"""lmsmith: make language models smaller, fairer and better grounded.

The core (models, generation, evaluation, data, metrics) is importable from here; the three
systems are subpackages with their own entry points::

    from lmsmith import load_lm, generate, evaluate_rows, EvalConfig
    from lmsmith import distill, debias, dialog

    model, tok = load_lm("smollm2-135m-instruct")
    print(generate(model, tok, ["Name a colour."], max_new_tokens=8, greedy=True))
    summary = distill.run(cfg)  # cfg: a distill.DistillConfig

Names are imported on first use, so ``import lmsmith`` stays light (no torch until needed).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from lmsmith._lazy import lazy_exports

# torch's CPU thread pool (GNU OpenMP) spin-waits between parallel regions unless told
# otherwise; beside another busy process on the same cores that spinning made a decode 7.5x
# slower than passive waiting (docs/results.md, "Precision and threads"). The policy is read
# when torch loads, so it is set here, before any lmsmith module imports torch; a user's own
# OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

_EXPORTS = {
    "load_lm": "lmsmith.models",
    "load_tokenizer": "lmsmith.models",
    "generate": "lmsmith.generation",
    "evaluate_rows": "lmsmith.evaluate",
    "EvalConfig": "lmsmith.evaluate",
    "format_table": "lmsmith.evaluate",
    "load_instruct": "lmsmith.data.instruct",
    "UserError": "lmsmith.errors",
    "DataError": "lmsmith.errors",
}
_SUBPACKAGES = ("distill", "debias", "dialog", "data", "metrics")
__all__ = [
    "data",
    "debias",
    "dialog",
    "distill",
    "metrics",
    "load_instruct",
    "DataError",
    "UserError",
    "EvalConfig",
    "evaluate_rows",
    "format_table",
    "generate",
    "load_lm",
    "load_tokenizer",
]

if TYPE_CHECKING:
    from lmsmith import data, debias, dialog, distill, metrics
    from lmsmith.data.instruct import load_instruct
    from lmsmith.errors import DataError, UserError
    from lmsmith.evaluate import EvalConfig, evaluate_rows, format_table
    from lmsmith.generation import generate
    from lmsmith.models import load_lm, load_tokenizer


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _SUBPACKAGES)
