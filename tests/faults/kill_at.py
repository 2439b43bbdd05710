"""`python -m mmcl.cli` that kills itself with SIGKILL at one moment of its run, for
tests/faults/test_kill_anywhere.py: the $MMCL_KILL_AT-th event of kind $MMCL_KILL_PHASE of this process,

  step        after a micro-batch's optimizer step, before the scheduler step and the step count
  checkpoint  after Accelerate wrote a checkpoint's files, before mmcl marks it complete and renames it
  eval        after an evaluation computed its metrics, before they are logged or a best model is saved
"""

import os
import signal

from accelerate import Accelerator

from mmcl.training import loop as train_module
from mmcl.cli import run

PHASE, AT = os.environ["MMCL_KILL_PHASE"], int(os.environ["MMCL_KILL_AT"])
seen = 0


def tick(phase):
    global seen
    if phase == PHASE:
        seen += 1
        if seen == AT:
            os.kill(os.getpid(), signal.SIGKILL)


def after(phase, function):
    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        tick(phase)
        return result
    return wrapped


train_module.training_step = after("step", train_module.training_step)
train_module.run_eval = after("eval", train_module.run_eval)
Accelerator.save_state = after("checkpoint", Accelerator.save_state)
run()
