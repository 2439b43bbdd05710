"""Training: `setup` builds a run from a `Config` in numbered steps (setup.py), and the loop trains
it (loop.py: `train(config)`), with crash-safe checkpoints (checkpoint.py), the process group and
output-folder lock (launch.py), trackers (tracking.py) and the optimizer (optimization.py).

`train` is importable from here; it is loaded on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
