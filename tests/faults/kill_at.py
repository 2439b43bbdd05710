"""`python -m mmcl.cli` that kills itself with SIGKILL at one moment of its run, for
tests/faults/test_kill_anywhere.py: the $MMCL_KILL_AT-th event of kind $MMCL_KILL_PHASE of this process,

  step        after a micro-batch's optimizer step, before the scheduler step and the step count
  checkpoint  after the training state's files were written, before mmcl marks it complete and renames it
  eval        after an evaluation computed its metrics, before they are logged or a best model is saved
  write       inside a checkpoint file's write: the weights or optimizer file is cut to half its bytes
  rename      just before one of mmcl's renames (a checkpoint into place; a best or final model set aside
              or moved in: between those two)
  log         inside a log append: half of the line is written
  model       inside a best or final model folder's write, after its weights, before its tokenizer
"""

import json
import os
import signal

import mmcl.artifacts
import mmcl.evaluation.evaluators as evaluators
from mmcl.cli import run
from mmcl.towers.model import DualEncoder
from mmcl.training import loop as train_module
from mmcl.training import state as state_module
from mmcl.training.tracking import JsonlTracker

PHASE, AT = os.environ["MMCL_KILL_PHASE"], int(os.environ["MMCL_KILL_AT"])
seen = 0


def due(phase):
    global seen
    if phase == PHASE:
        seen += 1
        return seen == AT
    return False


def kill():
    os.kill(os.getpid(), signal.SIGKILL)


def after(phase, function):
    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        if due(phase):
            kill()
        return result
    return wrapped


def cut_in_half(save):
    def wrapped(tensors, f, *args, **kwargs):
        result = save(tensors, f, *args, **kwargs)
        if due("write"):
            os.truncate(f, os.path.getsize(f) // 2)
            kill()
        return result
    return wrapped


class KillingOs:
    """mmcl.artifacts' `os`, killed before the chosen rename."""

    def __getattr__(self, name):
        return getattr(os, name)

    def replace(self, src, dst):
        if due("rename"):
            kill()
        return os.replace(src, dst)


def torn_log(log):
    def wrapped(self, values, step=None, **kwargs):
        if due("log"):
            line = json.dumps({"step": step, **values}) + "\n"
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line[: len(line) // 2])
            kill()
        return log(self, values, step, **kwargs)
    return wrapped


train_module.training_step = after("step", train_module.training_step)
evaluators.run_eval = after("eval", evaluators.run_eval)
state_module.TrainingState.save = after("checkpoint", state_module.TrainingState.save)
state_module.save_file = cut_in_half(state_module.save_file)
mmcl.artifacts.os = KillingOs()
JsonlTracker.log = torn_log(JsonlTracker.log)
DualEncoder.save_pretrained = after("model", DualEncoder.save_pretrained)
run()
