"""Your own data with one command: a seeded held-out share when no validation set is named, the
quickstart's emoji evaluations not inherited, a batch that fits a small dataset (map-style and
streamed alike, never a row twice in one batch), and `mmcl init`'s starter config."""

import contextlib
import csv
import io
import json

import datasets
import pytest
import yaml

from mmcl.cli import main
from mmcl.config import ConfigError, DataConfig
from mmcl.config_loader import load_config
from mmcl.data.loader import fit_batch, hold_out
from mmcl.training.checkpoint import check_config
from mmcl.training.tracking import flatten
from tests.data.test_streaming import stream, write_shards


def rows_of(n_images: int, captions_per_image: int = 1) -> datasets.Dataset:
    paths = [f"img/{i}.png" for i in range(n_images) for _ in range(captions_per_image)]
    return datasets.Dataset.from_dict({"image": paths, "caption": [f"c{j}" for j in range(len(paths))]})


def test_the_held_out_share_is_seeded_and_keeps_an_images_rows_together():
    ds, data = rows_of(100, captions_per_image=3), DataConfig(train="pairs.csv", validation_share=0.05)
    train, held = hold_out(ds, data, seed=42)
    again_train, again_held = hold_out(ds, data, seed=42)
    assert held["caption"] == again_held["caption"] and train["caption"] == again_train["caption"]
    assert len(set(held["image"])) == 5 and len(held) == 15  # ceil(0.05 x 100 images), each with its 3 rows
    assert not set(held["image"]) & set(train["image"]) and len(train) + len(held) == len(ds)
    assert set(hold_out(ds, data, seed=1)[1]["image"]) != set(held["image"])
    assert hold_out(ds, DataConfig(train="x", validation="val.csv"), 42)[1] is None  # a named set: no share
    assert hold_out(ds, DataConfig(train="x", validation_share=0.0), 42)[1] is None
    with pytest.raises(ConfigError, match="too few to hold out"):
        hold_out(rows_of(1), data, 42)


def test_a_batch_fits_a_small_dataset_and_says_so():
    assert fit_batch(500, 128, 1, "a.csv") == (128, None)
    size, said = fit_batch(62, 128, 2, "a.csv")
    assert size == 31 and "a.csv has 62 rows" in said and "per_device_batch_size=31" in said
    with pytest.raises(ConfigError, match="at least 2 pairs"):
        fit_batch(3, 128, 2, "a.csv")


def test_a_stream_never_repeats_a_row_within_a_batch(tmp_path):
    """18 examples a pass, batches of 8: each pass gives 2 batches and drops the 2 left over, as a
    DataLoader's last partial batch; before, a batch spanned two passes and could hold an image twice."""
    pairs = stream(write_shards(tmp_path / "shards", n_shards=3, per_shard=6), rank=0, world=1, batch=8)
    batches = iter(pairs)
    for _ in range(6):
        ids = next(batches)["image_ids"].tolist()
        assert len(set(ids)) == len(ids) == 8
    assert pairs.state_dict()["epoch"] == 2
    too_big = iter(stream(write_shards(tmp_path / "few", n_shards=1, per_shard=5), rank=0, world=1, batch=8))
    with pytest.raises(ConfigError, match="fewer readable examples than one batch"):
        next(too_big)


def test_own_data_on_the_default_config_leaves_the_quickstarts_evaluations(capsys):
    config = load_config(None, ["--data.train=my/pairs.csv"])
    said = capsys.readouterr().out
    assert config.data.validation is None and config.eval.sets == {} and config.train.output_dir == "runs/pairs"
    assert "data.validation (built-in emoji) is not used" in said and "eval.sets" in said
    kept = load_config(None, ["--data.train=my/pairs.csv", "--data.validation=my/val.csv",
                              "--train.output_dir=runs/x"])
    assert kept.data.validation == "my/val.csv" and kept.train.output_dir == "runs/x"
    quickstart = load_config(None, [])
    assert quickstart.data.validation == "builtin:emoji" and set(quickstart.eval.sets) == {"zs_emoji", "lineart"}
    from tests.conftest import REPO

    named = load_config(REPO / "configs" / "quickstart.yaml", ["--data.train=my/pairs.csv"])  # a config you name
    assert named.data.validation == "builtin:emoji" and named.eval.sets  # is taken as written


def test_a_resume_refuses_another_held_out_share():
    before = flatten(load_config(None, ["--data.train=a.csv", "--data.validation_share=0.05"]).to_dict())
    now = dict(before, **{"data.validation_share": 0.1})
    with pytest.raises(ConfigError, match="data.validation_share"):
        check_config(before, now, "ckpt")
    with pytest.raises(ConfigError, match="data.validation_share"):  # naming a set: the held-out rows train
        check_config(before, dict(before, **{"data.validation": "v.csv"}), "ckpt")
    legacy = {k: v for k, v in before.items() if k != "data.validation_share"}  # from before the share: none
    with pytest.raises(ConfigError, match="data.validation_share: 0.0 -> 0.05"):
        check_config(legacy, before, "ckpt")
    check_config(legacy, dict(before, **{"data.validation_share": 0.0}), "ckpt")
    named = dict(before, **{"data.validation": "v.csv"})
    check_config(named, dict(named, **{"data.validation_share": 0.3}), "ckpt")  # unused with a named set


def write_csv(folder, n=40):
    from PIL import Image

    (folder / "img").mkdir(parents=True)
    with open(folder / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "text"])
        for i in range(n):
            Image.new("RGB", (16, 16), (6 * i, 255 - 6 * i, (40 * i) % 256)).save(folder / "img" / f"{i}.png")
            w.writerow([f"img/{i}.png", f"colour number {i}"])
    return folder / "pairs.csv"


def call(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_init_writes_a_starter_config_that_trains(tmp_path, monkeypatch, emoji_cache):
    monkeypatch.chdir(tmp_path)
    data = write_csv(tmp_path)
    code, out, _ = call(["init", str(data)])
    assert code == 0 and "wrote pairs.yaml" in out
    text = (tmp_path / "pairs.yaml").read_text()
    starter = yaml.safe_load(text)
    assert starter["data"]["image_column"] == "file_name" and starter["data"]["caption_column"] == "text"
    assert starter["data"]["validation"] is None and starter["train"]["per_device_batch_size"] == 38
    assert text.count("\n#") >= 2  # commented
    code, _, err = call(["init", str(data)])
    assert code == 2 and "never overwrites" in err and (tmp_path / "pairs.yaml").read_text() == text
    code, out, err = call(["train", "pairs.yaml", "--train.max_steps=2", "--train.report_to=jsonl",
                           "--hub.export=false", "--train.progress_bar=false", "--model.tokenizer_vocab_size=300",
                           "--train.mixed_precision=no",  # in-process: the Accelerate state of earlier tests
                           f"--data.cache_dir={emoji_cache}", "--train.per_device_batch_size=64"])
    assert code == 0, err[-2000:]
    assert "2 of 40 rows" in out and "held out as 'val'" in out
    assert "38 rows, less than one global batch of 64 x 1: training with train.per_device_batch_size=38" in out
    metrics = json.loads((tmp_path / "runs" / "pairs" / "metrics.json").read_text())
    assert metrics["val/images"] == 2.0
    saved = yaml.safe_load((tmp_path / "runs" / "pairs" / "final" / "mmcl_training_config.yaml").read_text())
    assert saved["train"]["per_device_batch_size"] == 38  # what a resume fits again
