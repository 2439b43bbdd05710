"""Figures, drawn with matplotlib (the optional `plot` extra: `pip install "mmcl[plot]"`): the
confusion matrix of a zero-shot evaluation, and a run's training curves (`mmcl plot RUN_DIR`).
Image grids (the search contact sheet) stay with Pillow, in `mmcl.apps.predict`."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..artifacts import LOG_NAME, LOGS_DIR
from ..config import ConfigError

TRAIN_CURVES = ("train/loss", "train/lr", "train/temperature", "train/grad_norm", "train/samples_per_s",
                "train/bad_steps")
LOG_SCALE = ("train/grad_norm",)
Series = dict[str, list[tuple[int, float]]]


def pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ConfigError('drawing a figure needs matplotlib: pip install "mmcl[plot]"') from err
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_confusion_png(matrix: torch.Tensor, class_names: list[str], path: str | Path) -> None:
    """Row-normalised confusion matrix (true class down, predicted across) with a colour bar; the
    class names label both axes up to 60 classes."""
    plt = pyplot()
    n = matrix.shape[0]
    rates = (matrix.float() / matrix.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    side = min(4 + 0.22 * n, 24)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 60:
        names = [name[:24] for name in class_names]
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = float(matrix.diagonal().sum() / matrix.sum().clamp(min=1))
    ax.set_title(f"{n} classes, top-1 {accuracy:.3f}")
    save(fig, path, plt)


def read_log(run_dir: str | Path) -> Series:
    """Every scalar a run logged, as sorted (step, value) series, from `logs/metrics.jsonl`. A
    resumed run logs the steps after its checkpoint again: the last value of a step wins."""
    path = Path(run_dir) / LOGS_DIR / LOG_NAME
    if not path.is_file():
        found = sorted(p.name for p in (Path(run_dir) / LOGS_DIR).glob("*")) if (Path(run_dir) / LOGS_DIR).is_dir() else []
        hint = " (it logged to tensorboard: plot it there, or train with --train.report_to=jsonl)" if any(
            "tfevents" in name for name in found) else ""
        raise FileNotFoundError(f"{path}: no training log{hint}")
    values: dict[str, dict[int, float]] = defaultdict(dict)
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if line.endswith("\n"):  # only the last line may be cut short (a killed run)
                    raise ConfigError(f"{path}, line {number}: not valid JSON") from None
                continue
            for key, value in entry.items():
                if key != "step" and isinstance(value, (int, float)) and entry.get("step") is not None:
                    values[key][int(entry["step"])] = float(value)
    return {key: sorted(steps.items()) for key, steps in values.items()}


COUNTS = ("images", "texts", "classes", "skipped_images", "wall_s", "steps")  # sizes, not curves


def panels(series: Series) -> dict[str, list[str]]:
    """Panel title -> the series drawn in it: each training signal alone; an evaluation's recalls
    per direction together (val/image_to_text R@1, R@5, R@10), its ranks together, and its other
    scores together (zs/top1, top5, mean per-class recall). Sizes (images, classes) are left out."""
    groups: dict[str, list[str]] = {name: [name] for name in TRAIN_CURVES if name in series}
    for name in sorted(series, key=natural):
        if name in groups or name.split("/")[-1] in COUNTS:
            continue
        if "_R@" in name:
            key = name.rsplit("_R@", 1)[0]
        elif name.endswith("_rank"):
            key = f"{name.split('/')[0]} ranks"
        else:
            key = name.split("/")[0]
        groups.setdefault(key, []).append(name)
    return groups


def natural(name: str) -> list[Any]:
    """R@1 < R@5 < R@10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def save_training_curves(series: Series, path: str | Path, title: str) -> None:
    """One PNG: a panel per training signal and per evaluation, against the optimizer step."""
    plt = pyplot()
    groups = panels(series)
    if not groups:
        raise ConfigError(f"{title}: the log has no scalars to draw")
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax, (panel, names) in zip(axes.flat, groups.items()):
        for name in names:
            steps, values = zip(*series[name])
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3,
                    label=name.split("/", 1)[-1])
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if panel in LOG_SCALE and all(v > 0 for _, v in series[names[0]]):
            ax.set_yscale("log")
        if len(names) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle(title)
    save(fig, path, plt)


def save_tradeoff_curve(rows: list[dict[str, Any]], x: str, y: str, path: str | Path, title: str) -> None:
    """A WiSE-FT sweep: metric `x` across, metric `y` up, one point per mix, labelled with its alpha."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot([r[x] for r in rows], [r[y] for r in rows], marker="o")
    for row in rows:
        ax.annotate(f"alpha {row['alpha']:g}", (row[x], row[y]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel(f"{x} (what the model keeps)")
    ax.set_ylabel(f"{y} (the fine-tuning task)")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    save(fig, path, plt)


def save(fig: Any, path: str | Path, plt: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
