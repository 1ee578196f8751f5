"""One distillation run on tiny in-process models, for ``accelerate launch`` (tests/distill/
test_distributed.py starts it with two CPU processes; not a test module itself).

    python ddp_worker.py '{"method": "switch", "output_dir": ..., "data": ...}'

Each process writes its process id to ``<output_dir>.pid-<rank>`` and appends the global ids of
the rows it trains on to ``<output_dir>.rows-<rank>``.
With ``LMSMITH_TEST_HANG_AFTER=k`` the main process, once it has written the checkpoint of step k,
touches ``<output_dir>.hung`` and sleeps: the test kills the whole run there (kill -9).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from lmsmith import config as C
from lmsmith.distill import trainer as T
from lmsmith.distill.config import DistillConfig
from lmsmith.models import tiny_causal_lm, tiny_tokenizer


def models():
    """The same teacher and student in every process (and in the one-process reference)."""
    return tiny_causal_lm(layers=2, seed=0), tiny_causal_lm(layers=1, seed=1), tiny_tokenizer()


def main(values: dict) -> None:
    torch.set_num_threads(1)
    out = Path(values["output_dir"])
    rank = int(os.environ.get("RANK", 0))
    # torchrun starts each rank in a session of its own: the test kills these ids itself
    out.with_name(f"{out.name}.pid-{rank}").write_text(str(os.getpid()))
    rows_file = out.with_name(f"{out.name}.rows-{rank}")
    plain_rows = T.DistillTrainer.rows

    def rows(self, step, micro):
        ids = plain_rows(self, step, micro)
        with rows_file.open("a") as f:
            f.write(json.dumps({"step": step, "micro": micro, "rows": ids}) + "\n")
        return ids

    T.DistillTrainer.rows = rows
    hang = int(os.environ.get("LMSMITH_TEST_HANG_AFTER", 0))
    plain_save = T.DistillTrainer.save_checkpoint

    def save_checkpoint(self):
        path = plain_save(self)
        if hang and self.step == hang and self.is_main:
            out.with_name(f"{out.name}.hung").touch()
            time.sleep(600)
        return path

    T.DistillTrainer.save_checkpoint = save_checkpoint
    teacher, student, tok = models()
    T.run(C.load(DistillConfig, None, values), teacher, student, tok)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
