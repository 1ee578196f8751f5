"""CRISPR (Yang et al., ACL 2024): find the units that drive biased answers and prune them.

attribution.py holds the scores, prune.py the pruning and the search for n, calibrate.py the
CC / DC baselines, scoring.py the option scoring on BBQ, pipeline.py the steps and the
``lmsmith debias attribute | prune | eval | run`` commands, cli.py what they print::

    from lmsmith import config, debias

    cfg = config.load(debias.DebiasConfig, "configs/debias/crispr.yaml", {"data": "Age.jsonl"})
    results = debias.run_pipeline(cfg)

Names are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmsmith._lazy import lazy_exports

_EXPORTS = {
    "DebiasConfig": "lmsmith.debias.config",
    "run_pipeline": "lmsmith.debias.pipeline",
    "load_model": "lmsmith.debias.pipeline",
    "attribute": "lmsmith.debias.attribution",
    "Pruner": "lmsmith.debias.prune",
    "save_pruned": "lmsmith.debias.prune",
}
__all__ = [
    "attribute",
    "DebiasConfig",
    "load_model",
    "run_pipeline",
    "Pruner",
    "save_pruned",
]

if TYPE_CHECKING:
    from lmsmith.debias.attribution import attribute
    from lmsmith.debias.config import DebiasConfig
    from lmsmith.debias.pipeline import load_model, run_pipeline
    from lmsmith.debias.prune import Pruner, save_pruned


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
