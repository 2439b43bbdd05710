"""Data sources, lazy decoding, and bad input that must be skipped and counted, not crash."""

import json

import datasets
import numpy as np
import pytest
from PIL import Image

from mmcl.config import ConfigError, SourceSpec

from mmcl.config_loader import load_config
from mmcl.data.images import load_image
from mmcl.data.pairs import PairCollator, PairDataset, PairRecipe
from mmcl.data.sources import load_pairs, load_source, pair_columns, require_columns
from mmcl.towers.build import build_image_processor, train_tokenizer
from mmcl.config import ModelConfig

PROCESSOR = build_image_processor(ModelConfig(image_size=8))


def make_images(folder, n=6):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        names.append(f"img{i}.png")
    return names


def test_csv_paths_resolve_relative_to_the_file(tmp_path, monkeypatch):
    names = make_images(tmp_path / "data" / "images")
    lines = ["file,text"] + [f"images/{n},caption {i}" for i, n in enumerate(names)]
    (tmp_path / "data" / "pairs.csv").write_text("\n".join(lines))
    monkeypatch.chdir(tmp_path)  # not the csv's folder
    ds = load_pairs(SourceSpec("data/pairs.csv", image_column="file", caption_column="text"))
    item = PairDataset(ds, "file", "text", PairRecipe(PROCESSOR))[2]
    assert item["caption"] == "caption 2" and item["skipped"] == []
    assert item["pixel_values"].shape == (3, 8, 8)


def test_jsonl_list_captions_sampled_deterministically(tmp_path):
    names = make_images(tmp_path)
    rows = [{"image": n, "captions": [f"a {i}", f"b {i}", f"c {i}"]} for i, n in enumerate(names)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_pairs(SourceSpec(str(tmp_path / "pairs.jsonl"), caption_column="captions"))
    data = PairDataset(ds, "image", "captions", PairRecipe(PROCESSOR), seed=1)
    draws = {data[0]["caption"] for data.epoch in range(12) for _ in [0]}
    assert draws == {"a 0", "b 0", "c 0"}  # every caption gets drawn over epochs
    data.set_epoch(3)
    assert data[0]["caption"] == data[0]["caption"]  # same epoch, same draw


def test_imagefolder_parquet_and_save_to_disk(tmp_path):
    names = make_images(tmp_path / "folder")
    (tmp_path / "folder" / "metadata.csv").write_text(
        "file_name,caption\n" + "\n".join(f"{n},picture {i}" for i, n in enumerate(names)))
    ds = load_pairs(SourceSpec(str(tmp_path / "folder")))
    assert len(ds) == 6 and PairDataset(ds, "image", "caption", PairRecipe(PROCESSOR))[0]["skipped"] == []
    ds.save_to_disk(str(tmp_path / "disk"))
    assert len(load_source(SourceSpec(str(tmp_path / "disk")))) == 6
    pd_rows = [{"image": str(tmp_path / "folder" / n), "caption": "x"} for n in names]
    datasets.Dataset.from_list(pd_rows).to_parquet(str(tmp_path / "pairs.parquet"))
    assert len(load_source(SourceSpec(str(tmp_path / "pairs.parquet")))) == 6


def test_missing_column_and_empty_source_are_clear_errors(tmp_path):
    source = SourceSpec("pairs.csv", caption_column="text")
    ds = datasets.Dataset.from_dict({"image": ["a.png"], "caption": ["x"]})
    with pytest.raises(ConfigError, match=r"no column 'text' \(data.caption_column\); columns are: image, caption"):
        require_columns(ds, source, pair_columns(source))
    with pytest.raises(ConfigError, match="pairs.csv: the dataset has no rows"):
        require_columns(ds.select([]), SourceSpec("pairs.csv"), {})
    with pytest.raises(ConfigError, match="does not exist"):
        load_source(SourceSpec(str(tmp_path / "nope.csv")))


def test_bad_images_are_skipped_and_reported(tmp_path):
    names = make_images(tmp_path, n=4)
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    data = (tmp_path / "img0.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    paths = ["zero.jpg", "text.jpg", "missing.png", "truncated.png"] + names
    ds = datasets.Dataset.from_dict({"image": [str(tmp_path / p) for p in paths], "caption": ["x"] * len(paths)})
    data = PairDataset(ds, "image", "caption", PairRecipe(PROCESSOR))
    item = data[0]  # rows 0-3 are bad: it falls through to row 4
    assert item["row"] == 4
    assert [s.row for s in item["skipped"]] == [0, 1, 2, 3]
    assert "missing.png" in item["skipped"][2].source
    batch = PairCollator(train_tokenizer(["x y"], 50), 8)([data[i] for i in range(len(data))])
    assert batch["pixel_values"].shape[0] == len(paths)  # shapes stay equal on every rank


def test_image_modes_become_rgb_and_transparency_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    for image in (Image.new("L", (4, 4), 7), Image.new("CMYK", (4, 4)), Image.new("I;16", (4, 4), 65535),
                  Image.new("P", (4, 4))):
        assert load_image(image).mode == "RGB", image.mode
    assert load_image(Image.new("I;16", (4, 4), 65535)).getpixel((0, 0))[0] == 255


def test_training_run_counts_a_bad_image(tmp_path, emoji_cache):
    from mmcl.training.loop import train

    names = make_images(tmp_path / "imgs", n=40)
    (tmp_path / "imgs" / "broken.png").write_text("garbage")
    rows = [f"imgs/{n},picture {i % 5}" for i, n in enumerate(names)] + ["imgs/broken.png,broken"]
    (tmp_path / "pairs.csv").write_text("image,caption\n" + "\n".join(rows))
    config = load_config(None, [f"--train.output_dir={tmp_path / 'run'}", f"--data.train={tmp_path / 'pairs.csv'}",
                                "--data.validation=null", "--data.validation_share=0", "--train.max_steps=6", "--train.per_device_batch_size=8",
                                "--train.checkpoint_every=0", "--train.progress_bar=false",
                                "--model.text_config.num_hidden_layers=1", "--model.vision_config.num_hidden_layers=1",
                                "--train.mixed_precision=no"])  # one precision per process (Accelerate)
    metrics = train(config)
    assert metrics["train/skipped_images"] == 1.0
