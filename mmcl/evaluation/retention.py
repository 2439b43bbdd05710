"""The retention monitor of a fine-tuning run (`eval.retention`, `eval.stop_if_retention_below`):
metrics of what the model must keep, measured before the first step, then followed as a fraction
of that value."""

from __future__ import annotations

from typing import Iterable

from ..config import ConfigError, StopError


class RetentionError(StopError):
    """A metric of `eval.retention` fell below `eval.stop_if_retention_below` x its step-0 value."""


class Retention:
    """`watched` metrics (`<set>/<metric>`, larger is better) of the evaluation sets `sets`; `base`:
    their step-0 values once measured (kept in checkpoints)."""

    def __init__(self, watched: list[str], limit: float | None, sets: Iterable[str],
                 base: dict[str, float] | None = None) -> None:
        sets = list(sets)
        unknown = [name for name in watched if name.split("/")[0] not in sets]
        if unknown:
            raise ConfigError(f"eval.retention: {', '.join(unknown)} names no evaluation set; the sets are: "
                              f"{', '.join(sets) or 'none'} (write <set>/<metric>, e.g. keep/top1)")
        self.watched, self.limit, self.base = watched, limit, base

    def due(self) -> set[str] | None:
        """The sets to evaluate before the first step, or None when there is nothing to measure."""
        return {name.split("/")[0] for name in self.watched} if self.watched and self.base is None else None

    def set_base(self, metrics: dict[str, float]) -> None:
        missing = [name for name in self.watched if name not in metrics]
        if missing:
            raise ConfigError(f"eval.retention: {', '.join(missing)} not among the metrics of those sets: "
                              f"{', '.join(sorted(metrics))}")
        self.base = {name: metrics[name] for name in self.watched}

    def ratios(self, metrics: dict[str, float]) -> dict[str, float]:
        """`retention/<metric>` = value / its step-0 value, for the watched metrics measured now."""
        base = self.base or {}
        return {f"retention/{name}": metrics[name] / base[name] if base[name] else float("nan")
                for name in base if name in metrics}

    def fallen(self, ratios: dict[str, float]) -> str:
        """What fell below the limit, in words ("" when nothing did)."""
        return "; ".join(f"{key.removeprefix('retention/')} is {value:.3f} x its step-0 value "
                         f"{self.base[key.removeprefix('retention/')]:.4g}" for key, value in ratios.items()
                         if self.limit is not None and value < self.limit)
