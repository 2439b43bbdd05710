"""`python -m mmcl.cli` with one injected fault, for tests/scale/test_lost_process.py: the process
of rank $MMCL_KILL_RANK kills itself with SIGKILL when it has taken $MMCL_KILL_STEP optimizer
steps, after writing the time to $MMCL_KILL_STAMP."""

import os
import signal
import time
from pathlib import Path

from mmcl.training import loop as train_module
from mmcl.cli import run

step_once = train_module.Trainer.training_step


def training_step(self, batch):
    if self.accelerator.process_index == int(os.environ["MMCL_KILL_RANK"]) and self.step == int(os.environ["MMCL_KILL_STEP"]):
        Path(os.environ["MMCL_KILL_STAMP"]).write_text(str(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    return step_once(self, batch)


train_module.Trainer.training_step = training_step
run()
