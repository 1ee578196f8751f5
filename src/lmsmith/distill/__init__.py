"""Knowledge distillation: SWITCH and the methods it is compared with.

``run(cfg)`` does setup → train → evaluate → save and returns the summary; ``DistillTrainer``
is the same loop step by step. ``config.py`` holds the typed config, ``losses.py`` the
divergences, ``rollout.py`` the intervention rules and the draft-and-verify rollout,
``trainer.py`` the loop, ``cli.py`` the ``lmsmith distill`` command, ``demo.py`` ``make demo``::

    from lmsmith import config, distill

    cfg = config.load(distill.DistillConfig, "configs/distill/switch.yaml", {"max_steps": 20})
    summary = distill.run(cfg)

Names are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmsmith._lazy import lazy_exports

_EXPORTS = {
    "DistillConfig": "lmsmith.distill.config",
    "DistillTrainer": "lmsmith.distill.trainer",
    "run": "lmsmith.distill.trainer",
    "divergence": "lmsmith.distill.losses",
    "SwitchRule": "lmsmith.distill.rollout",
    "SKDRule": "lmsmith.distill.rollout",
    "AdaSwitchRule": "lmsmith.distill.rollout",
    "switch_rollout": "lmsmith.distill.rollout",
}
__all__ = [
    "DistillConfig",
    "divergence",
    "AdaSwitchRule",
    "SKDRule",
    "SwitchRule",
    "switch_rollout",
    "DistillTrainer",
    "run",
]

if TYPE_CHECKING:
    from lmsmith.distill.config import DistillConfig
    from lmsmith.distill.losses import divergence
    from lmsmith.distill.rollout import AdaSwitchRule, SKDRule, SwitchRule, switch_rollout
    from lmsmith.distill.trainer import DistillTrainer, run


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
