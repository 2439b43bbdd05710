"""Zero-shot classification accuracy as a Hugging Face `evaluate` metric (wraps mmcl.evaluation.metrics).

Load it offline by path: ``mmcl.evaluation.hf_evaluate.load_metric("zero_shot_accuracy")``.
"""

import evaluate
import torch

from mmcl.evaluation.hf_evaluate import metric_info
from mmcl.evaluation.metrics import zero_shot_metrics

_DESCRIPTION = """
Zero-shot classification accuracy from per-image class logits (e.g. image_embeds @ class_embeds.T):
top-k accuracy for each k <= number of classes, and the mean over present classes of the top-1
per-class recall. Ties go to the lower class index.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one row of C class logits per image, list of N float lists (or an (N, C) array/tensor).
    references: the true class index of each image, N ints in [0, C).
    ks: top-k accuracies to report (default (1, 5)); a k larger than C is skipped.
Returns:
    dict with `top{k}` for each k <= C and `mean_per_class_recall`, all floats in [0, 1].
Example:
    >>> metric = load_metric("zero_shot_accuracy")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.2, 0.8]], references=[0, 0], ks=(1,))
    {'top1': 0.5, 'mean_per_class_recall': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ZeroShotAccuracy(evaluate.Metric):
    """Top-k accuracy and mean per-class recall of zero-shot classification logits."""

    def _info(self) -> evaluate.MetricInfo:
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, {"predictions": "float32 list", "references": "int64"})

    def _compute(self, predictions, references, ks=(1, 5)) -> dict:
        logits = torch.tensor(predictions, dtype=torch.float32).reshape(len(predictions), -1)  # (N, C)
        return zero_shot_metrics(logits, torch.tensor(references, dtype=torch.long), ks=tuple(ks))
