"""Evaluation, the stage before training (the loop evaluates as it trains): `metrics` (pure metric
math), `zero_shot` (class names, prompts, the classifier builder), `evaluators` (retrieval and
zero-shot evaluations of a model on a dataset, and the evaluation sets of a run), `retention`,
`plots`, `formats` (results as CLIP_benchmark writes them) and `hf_evaluate` (the metric math as
published `evaluate` modules).

`evaluate_model` is importable from here; it is loaded on first use, so that `mmcl.evaluation.metrics`
stays a light import.
"""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate_model", "format_results"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import evaluators

        return getattr(evaluators, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
