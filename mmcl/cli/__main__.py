"""`python -m mmcl.cli ...` (what `torchrun -m mmcl.cli` and `accelerate launch -m mmcl.cli` run)."""

import sys

from . import main

sys.exit(main())
