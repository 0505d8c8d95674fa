"""Run scripts/train.py and have it SIGKILL itself once it finishes a given step.

    python tests/sigkill_at_step.py STEP [train overrides ...]

A SIGKILL sent from outside races a run this small (40 steps take well under a second, so
polling for a checkpoint and then killing can land after the run ended). Killed from inside,
the run dies at the same step every time: no clean-up, no final checkpoint, exactly as a
power cut or the OOM killer would leave it.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

from lmkit.task import LanguageModelTask

kill_step = int(sys.argv.pop(1))
finish_batch = LanguageModelTask.on_train_batch_end


def on_train_batch_end(self, outputs, batch, batch_idx):
    finish_batch(self, outputs, batch, batch_idx)
    if self.trainer.global_step >= kill_step:
        os.kill(os.getpid(), signal.SIGKILL)


LanguageModelTask.on_train_batch_end = on_train_batch_end
script = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
sys.argv[0] = str(script)
runpy.run_path(str(script), run_name="__main__")
