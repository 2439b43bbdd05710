"""`python -m mmcl.cli ...` (what `torchrun -m mmcl.cli` and `accelerate launch -m mmcl.cli` run)."""

from . import run

run()
