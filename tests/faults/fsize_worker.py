"""`python -m mmcl.cli` whose files cannot grow past $MMCL_FSIZE bytes from its $MMCL_FSIZE_AT-th
checkpoint on, for tests/faults/test_disk_full.py: RLIMIT_FSIZE with SIGXFSZ ignored, so a write
past it fails (EFBIG) inside whichever writer makes it: safetensors, torch.save or Python's."""

import os
import resource
import signal

from accelerate import Accelerator

from mmcl.cli import run

LIMIT, AT = int(os.environ["MMCL_FSIZE"]), int(os.environ["MMCL_FSIZE_AT"])
save_state, calls = Accelerator.save_state, []


def limited(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == AT:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.RLIM_INFINITY))
    return save_state(self, *args, **kwargs)


Accelerator.save_state = limited
run()
