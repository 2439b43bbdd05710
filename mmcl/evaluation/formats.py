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

DataComp (mlfoundations/datacomp) writes one `eval_results.jsonl` per model: a line per task,
``{"key", "dataset", "metrics"}``, the metrics under CLIP_benchmark's names plus ``main_metric`` (the
task's headline: acc1 for classification, mean_recall@1 = the mean of both directions' R@1 for
retrieval), and reports the mean of the main metrics. `mmcl eval --suite` writes that file, with the
mean as a last line keyed "average" (DataComp's reader skips keys outside its task list).
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


MAIN_METRICS = {"zero_shot": "acc1", "retrieval": "mean_recall@1"}


def datacomp_line(key: str, name: str, task: str, results: dict[str, Any],
                  main_metric: str | None = None) -> dict[str, Any]:
    """One line of DataComp's eval_results.jsonl for one task of a suite."""
    metrics: dict[str, Any] = dict(clip_benchmark_metrics(task, results))
    if task == "retrieval" and "text_retrieval_recall@1" in metrics:
        metrics["mean_recall@1"] = 0.5 * (metrics["text_retrieval_recall@1"] + metrics["image_retrieval_recall@1"])
    chosen = main_metric or MAIN_METRICS[task]
    if chosen not in metrics:
        raise ValueError(f"suite task {key}: main_metric {chosen!r} is not one of {', '.join(metrics)}")
    metrics["main_metric"] = metrics[chosen]
    return {"key": key, "dataset": name, "metrics": metrics}


def datacomp_average(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of the tasks' main metrics (those that have one), as DataComp reports it."""
    values = [line["metrics"]["main_metric"] for line in lines if line["metrics"].get("main_metric") is not None]
    return {"key": "average", "dataset": "Average", "metrics": {"main_metric": sum(values) / len(values),
                                                                   "tasks": len(values)}}
