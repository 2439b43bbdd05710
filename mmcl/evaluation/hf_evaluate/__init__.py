"""mmcl's metric math published as Hugging Face `evaluate` modules, for users who compute metrics
with `evaluate` (mmcl's own evaluation calls `mmcl.evaluation.metrics` directly).

`load_metric("retrieval")` / `load_metric("zero_shot_accuracy")` load them by file path, which
works offline (`evaluate.load("accuracy")` needs the Hub). `import evaluate` costs ~5 s: only
`load_metric` imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

METRICS_DIR = Path(__file__).parent
METRIC_NAMES = ("retrieval", "zero_shot_accuracy")


def load_metric(name: str, **kwargs: Any) -> Any:
    """Load one of mmcl's ``evaluate`` modules by its file path (works offline, no Hub).

    Args:
        name: ``"retrieval"`` or ``"zero_shot_accuracy"``.
        **kwargs: forwarded to ``evaluate.load`` (e.g. ``num_process``, ``process_id``,
            ``experiment_id``, ``keep_in_memory``).
    """
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(METRIC_NAMES)}")
    import evaluate  # lazy: slow import

    return evaluate.load(str(METRICS_DIR / name / f"{name}.py"), **kwargs)


def metric_info(description: str, inputs_description: str, columns: dict[str, str]) -> Any:
    """The `evaluate.MetricInfo` of an mmcl metric: `columns` maps each streamed input to
    "float32 list" or "int64"."""
    import datasets
    import evaluate

    kinds = {"float32 list": datasets.List(datasets.Value("float32")), "int64": datasets.Value("int64")}
    return evaluate.MetricInfo(description=description, citation="", inputs_description=inputs_description,
                               features=datasets.Features({k: kinds[v] for k, v in columns.items()}))
