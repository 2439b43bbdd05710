"""Figures: `mmcl plot RUN_DIR` draws a real run's curves; the log reader keeps the last value of a
step logged twice (a resumed run) and names a broken line; the confusion matrix is drawn with axes."""

import json

import pytest
import torch
from PIL import Image

from mmcl.cli import main
from mmcl.config import ConfigError
from mmcl.evaluation.plots import panels, read_log, save_confusion_png
from mmcl.training.loop import train
from tests.test_train import debug_config


def drawn(path):
    """The PNG's size and how many distinct colours it has (a blank or broken figure has ~1)."""
    with Image.open(path) as image:
        return image.size, len(image.convert("RGB").getcolors(maxcolors=2**24))


def test_plot_draws_the_curves_and_metrics_of_a_run(tmp_path, emoji_cache, small_emoji, capsys, monkeypatch):
    zs = "{zs: {task: zero_shot, dataset: 'builtin:emoji', label_column: name, max_samples: 40, every: 2, " \
         f"confusion_matrix: '{tmp_path}/confusion.png'}}}}"
    train(debug_config(tmp_path / "run", emoji_cache, f"--data.train={small_emoji}", f"--eval.sets={zs}",
                       "--train.log_every=1", "--train.eval_every=2"))
    import mmcl.evaluation.plots as plots

    figures, save = [], plots.save
    monkeypatch.setattr(plots, "save", lambda fig, path, plt: (figures.append(fig), save(fig, path, plt)))
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert f"{tmp_path / 'run' / 'training_curves.png'}" in capsys.readouterr().out
    (width, height), colours = drawn(tmp_path / "run" / "training_curves.png")
    assert width >= 1000 and height >= 600 and colours > 50
    groups = panels(read_log(tmp_path / "run"))
    assert groups["train/loss"] == ["train/loss"] and "train/temperature" in groups
    assert groups["val/image_to_text"] == [f"val/image_to_text_R@{k}" for k in (1, 5, 10)]
    assert set(groups["val ranks"]) == {f"val/{d}_{s}_rank" for d in ("image_to_text", "text_to_image")
                                        for s in ("mean", "median")}
    assert set(groups["zs"]) == {"zs/top1", "zs/top5", "zs/mean_per_class_recall"}  # no sizes (zs/classes)
    # every plotted line is the log's values of its metric, step for step
    logged = {}
    for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        for key, value in entry.items():
            if key != "step":
                logged.setdefault(key, []).append((entry["step"], value))
    (figure,) = figures
    lines = {(ax.get_title(), ln.get_label()): ln for ax in figure.axes for ln in ax.get_lines()}
    assert len(lines) == sum(len(names) for names in groups.values()) > 10
    for panel, names in groups.items():
        for name in names:
            ln = lines[(panel, name.split("/", 1)[-1])]
            steps, values = zip(*logged[name])
            assert list(ln.get_xdata()) == list(steps) and list(ln.get_ydata()) == pytest.approx(values), name
    assert len(logged["train/loss"]) == 6 and len(logged["zs/top1"]) == 3  # steps 1..6; 2, 4, 6
    (width, height), colours = drawn(tmp_path / "confusion.png")
    assert width >= 500 and colours > 50


def test_the_log_reader_keeps_a_resumed_runs_values_and_names_a_broken_line(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    lines = [{"step": s, "train/loss": 10.0 - s} for s in (1, 2, 3, 4)]  # killed after step 4,
    lines += [{"step": s, "train/loss": 20.0 - s} for s in (3, 4, 5)]  # resumed from the step-2 checkpoint
    (logs / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 6, "tr')
    assert read_log(tmp_path)["train/loss"] == [(1, 9.0), (2, 8.0), (3, 17.0), (4, 16.0), (5, 15.0)]
    (logs / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n{not json\n" + json.dumps(lines[1]) + "\n")
    with pytest.raises(ConfigError, match=r"metrics.jsonl, line 2: not valid JSON"):
        read_log(tmp_path)
    with pytest.raises(FileNotFoundError, match="no training log"):
        read_log(tmp_path / "nothing")


def test_a_confusion_matrix_of_many_classes_has_no_labels_but_still_draws(tmp_path):
    matrix = torch.eye(80, dtype=torch.long) * 3
    matrix[0, 1] = 2
    save_confusion_png(matrix, [f"class {i}" for i in range(80)], tmp_path / "big.png")
    (width, height), colours = drawn(tmp_path / "big.png")
    assert width > height > 500 and colours > 20
