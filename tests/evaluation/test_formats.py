"""`mmcl eval --output` writes CLIP_benchmark's result file: its keys, task and metric names, and the
retrieval directions mapped the right way round (checked against CLIP_benchmark's definition written
out naively: scores = texts @ images.T, "image retrieval" ranks images for each text)."""

import json
import subprocess
import sys

import pytest
import torch

from mmcl.evaluation.formats import clip_benchmark_metrics, clip_benchmark_record
from mmcl.evaluation.metrics import retrieval_metrics
from tests.conftest import REPO, save_tiny_model

CLIP_BENCHMARK_KEYS = {"dataset", "model", "pretrained", "task", "metrics", "language"}


def naive_clip_benchmark_recall(images, texts, text_to_image, k):
    """CLIP_benchmark's zeroshot_retrieval recall, as its paper-style definition: a query is a hit when
    any of its positives is among its top k."""
    scores = texts @ images.T  # (texts, images)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(texts)), text_to_image] = True
    def hits(s, p):
        top = s.topk(k, dim=1).indices
        return p.gather(1, top).any(dim=1).float().mean().item()
    return {f"image_retrieval_recall@{k}": hits(scores, positive), f"text_retrieval_recall@{k}": hits(scores.T, positive.T)}


def test_retrieval_directions_match_clip_benchmarks_definition():
    torch.manual_seed(3)
    images = torch.nn.functional.normalize(torch.randn(12, 8), dim=-1)
    text_to_image = torch.arange(24) % 12  # two captions per image
    texts = torch.nn.functional.normalize(images[text_to_image] + 0.9 * torch.randn(24, 8), dim=-1)
    ours = clip_benchmark_metrics("retrieval", retrieval_metrics(images, texts, text_to_image, ks=(1, 2, 5)))
    for k in (1, 2, 5):
        reference = naive_clip_benchmark_recall(images, texts, text_to_image, k)
        for name, value in reference.items():
            assert abs(ours[name] - value) < 1e-6, (name, ours[name], value)
    # the two directions differ here, so a swapped mapping could not pass
    assert ours["image_retrieval_recall@1"] != ours["text_retrieval_recall@1"]


def test_zero_shot_names_and_a_missing_top5():
    assert clip_benchmark_metrics("zero_shot", {"top1": 0.5, "mean_per_class_recall": 0.4}) == {
        "acc1": 0.5, "acc5": None, "mean_per_class_recall": 0.4}
    record = clip_benchmark_record("m", "d", "zero_shot", {"top1": 0.5, "top5": 0.9, "mean_per_class_recall": 0.4})
    assert set(record) == CLIP_BENCHMARK_KEYS and record["task"] == "zeroshot_classification"


def build_row(path):
    """What `clip_benchmark build` makes of one result file (its main_build: metrics, then the other keys)."""
    data = json.loads(path.read_text())
    row = {**data["metrics"], **{k: v for k, v in data.items() if k != "metrics"}}
    row["model_fullname"] = row["model"] + " " + row["pretrained"]
    return row


def test_mmcl_eval_writes_a_file_clip_benchmark_builds_from(tmp_path, emoji_cache):
    model = save_tiny_model(tmp_path / "model", "emoji face hand heart cat dog flag")
    records = {}
    for task, extra in (("zero_shot", ["--label-column", "name"]), ("retrieval", [])):
        for fmt in ("clip_benchmark", "mmcl"):
            out = tmp_path / f"{task}-{fmt}.json"
            done = subprocess.run(
                [sys.executable, "-m", "mmcl.cli", "eval", str(model), "--dataset", "builtin:emoji", "--task", task,
                 *extra, "--max-samples", "40", "--cache-dir", emoji_cache, "--output", str(out),
                 "--output-format", fmt], cwd=REPO, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
            records[task, fmt] = out
    classification = json.loads(records["zero_shot", "clip_benchmark"].read_text())
    assert set(classification) == CLIP_BENCHMARK_KEYS and classification["task"] == "zeroshot_classification"
    full = json.loads(records["zero_shot", "mmcl"].read_text())["results"]
    assert classification["metrics"] == {"acc1": full["top1"], "acc5": full["top5"],
                                         "mean_per_class_recall": full["mean_per_class_recall"]}
    retrieval = json.loads(records["retrieval", "clip_benchmark"].read_text())
    full = json.loads(records["retrieval", "mmcl"].read_text())["results"]
    assert retrieval["task"] == "zeroshot_retrieval"
    assert {f"text_retrieval_recall@{k}" for k in (1, 5, 10)} <= set(retrieval["metrics"])
    for k in (1, 5, 10):
        assert retrieval["metrics"][f"text_retrieval_recall@{k}"] == full[f"image_to_text_R@{k}"]
        assert retrieval["metrics"][f"image_retrieval_recall@{k}"] == full[f"text_to_image_R@{k}"]
    row = build_row(records["retrieval", "clip_benchmark"])
    assert row["dataset"] == "builtin:emoji" and row["model_fullname"] == f"{model} {model}"


def test_datacomp_lines_carry_each_tasks_main_metric_and_the_average():
    from mmcl.evaluation.formats import datacomp_average, datacomp_line

    zs = datacomp_line("zs", "Zero-shot", "zero_shot", {"top1": 0.25, "top5": 0.5, "mean_per_class_recall": 0.2})
    rt = datacomp_line("rt", "Retrieval", "retrieval", {"image_to_text_R@1": 0.4, "text_to_image_R@1": 0.2})
    assert zs == {"key": "zs", "dataset": "Zero-shot",
                  "metrics": {"acc1": 0.25, "acc5": 0.5, "mean_per_class_recall": 0.2, "main_metric": 0.25}}
    assert rt["metrics"]["mean_recall@1"] == rt["metrics"]["main_metric"] == (0.4 + 0.2) / 2
    assert datacomp_line("zs", "Z", "zero_shot", {"top1": 0.25, "mean_per_class_recall": 0.2},
                         "mean_per_class_recall")["metrics"]["main_metric"] == 0.2
    average = datacomp_average([zs, rt])
    assert average["key"] == "average" and average["metrics"]["main_metric"] == (0.25 + 0.3) / 2


@pytest.mark.slow
def test_eval_suite_writes_datacomp_and_clip_benchmark_files(tmp_path, emoji_cache):
    model = save_tiny_model(tmp_path / "model", "grinning face red heart rocket cat")
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks:\n"
                     "  zs: {name: Emoji zero-shot, task: zero_shot, dataset: 'builtin:emoji', label_column: name,"
                     " max_samples: 24}\n"
                     "  art: {task: retrieval, dataset: 'builtin:emoji-lineart', max_samples: 24}\n")
    out = tmp_path / "results"
    argv = [sys.executable, "-m", "mmcl.cli", "eval", str(model), "--suite", str(suite), "--output", str(out),
            "--cache-dir", emoji_cache]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "eval_results.jsonl").read_text().splitlines()]
    assert [line["key"] for line in lines] == ["zs", "art", "average"]
    assert lines[0]["dataset"] == "Emoji zero-shot" and lines[1]["dataset"] == "art"
    assert lines[0]["metrics"]["main_metric"] == lines[0]["metrics"]["acc1"]
    assert lines[1]["metrics"]["main_metric"] == lines[1]["metrics"]["mean_recall@1"]
    assert lines[2]["metrics"]["main_metric"] == (lines[0]["metrics"]["acc1"] + lines[1]["metrics"]["mean_recall@1"]) / 2
    for key, task in (("zs", "zeroshot_classification"), ("art", "zeroshot_retrieval")):
        record = json.loads((out / f"{key}.json").read_text())
        assert set(record) == CLIP_BENCHMARK_KEYS and record["task"] == task
    again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)  # files are never replaced
    assert again.returncode == 2 and "is there already" in again.stderr and len(again.stderr.splitlines()) == 1
    suite.write_text("tasks:\n  zs: {task: zero_shot, dataset: 'builtin:emoji', label_colum: name}\n")
    bad = subprocess.run(argv[:-2], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "tasks.zs.label_colum" in bad.stderr and "label_column" in bad.stderr
