"""`python -m mmcl.cli` whose files cannot grow past $MMCL_FSIZE bytes from its $MMCL_FSIZE_AT-th
checkpoint on, for tests/faults/test_disk_full.py: RLIMIT_FSIZE with SIGXFSZ ignored, so a write
past it fails (EFBIG) inside whichever writer makes it: safetensors' or Python's."""

import os
import resource
import signal

from mmcl.cli import run
from mmcl.training.state import TrainingState

LIMIT, AT = int(os.environ["MMCL_FSIZE"]), int(os.environ["MMCL_FSIZE_AT"])
save_state, calls = TrainingState.save, []


def limited(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == AT:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.RLIM_INFINITY))
    return save_state(self, *args, **kwargs)


TrainingState.save = limited
run()
