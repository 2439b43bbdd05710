"""Evaluation results in the formats the field's tools read.

CLIP_benchmark (LAION-AI/CLIP_benchmark) writes one JSON file per model, dataset and task:
``{"dataset", "model", "pretrained", "task", "metrics", "language"}``, and its ``build`` command
joins such files into one CSV (each row: the metrics, the other keys, ``model + " " + pretrained``).
Its names differ from mmcl's, and one of them is a direction trap:

    mmcl                      CLIP_benchmark
    zero_shot                 zeroshot_classification
      top1 / top5               acc1 / acc5 (acc5 null with fewer than 5 classes)
      mean_per_class_recall     mean_per_class_recall
    retrieval                 zeroshot_retrieval
      image_to_text_R@k         text_retrieval_recall@k   (an image queries, texts are retrieved)
      text_to_image_R@k         image_retrieval_recall@k  (a text queries, images are retrieved)

Both count a query as a hit when any of its matches is in the top k (CLIP's protocol).
"""

from __future__ import annotations

from typing import Any

TASKS = {"zero_shot": "zeroshot_classification", "retrieval": "zeroshot_retrieval"}
RETRIEVAL = {"image_to_text_R@": "text_retrieval_recall@", "text_to_image_R@": "image_retrieval_recall@"}


def clip_benchmark_metrics(task: str, results: dict[str, Any]) -> dict[str, float | None]:
    """mmcl's metrics of one evaluation under CLIP_benchmark's names."""
    if task == "zero_shot":
        return {"acc1": results["top1"], "acc5": results.get("top5"),
                "mean_per_class_recall": results["mean_per_class_recall"]}
    if task == "retrieval":
        return {theirs + key[len(ours):]: value for key, value in results.items()
                for ours, theirs in RETRIEVAL.items() if key.startswith(ours)}
    raise ValueError(f"no CLIP_benchmark task for mmcl's {task!r}")


def clip_benchmark_record(model: str, dataset: str, task: str, results: dict[str, Any],
                          language: str = "en") -> dict[str, Any]:
    """One CLIP_benchmark result file's content. `model` and `pretrained` are both the model folder or
    Hub id (CLIP_benchmark names an open_clip architecture and its weights; an mmcl model is one folder)."""
    return {"dataset": dataset, "model": model, "pretrained": model, "task": TASKS[task],
            "metrics": clip_benchmark_metrics(task, results), "language": language}
