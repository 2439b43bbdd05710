import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mmcl.config import ConfigError

from mmcl.config_loader import load_config
from mmcl.data.augment import PRESETS, Augment, build_augment, edge_drawing


def test_augment_is_seeded_and_changes_the_image():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8))
    aug = Augment(scale=(0.3, 0.6), flip=True)
    a, b = aug(image, random.Random(7)), aug(image, random.Random(7))
    assert np.array_equal(np.asarray(a), np.asarray(b))  # same seed, same view: resume stays exact
    c = aug(image, random.Random(8))
    assert a.size != image.size or not np.array_equal(np.asarray(a), np.asarray(image))
    assert not np.array_equal(np.asarray(a), np.asarray(c)) or a.size != c.size
    assert a.width * a.height < image.width * image.height  # a crop of at most 60% of the area


def test_training_with_augmentation_runs(tmp_path, emoji_cache, small_emoji):
    from mmcl.config_loader import load_config
    from mmcl.training.loop import train
    from tests.conftest import DEBUG_CONFIG

    config = load_config(DEBUG_CONFIG, [f"--train.output_dir={tmp_path}", f"--data.cache_dir={emoji_cache}",
                                        f"--data.train={small_emoji}", "--data.validation=null", "--data.validation_share=0", "--data.augment=strong",
                                        "--train.max_steps=2", "--train.checkpoint_every=0", "--hub.export=false"])
    assert train(config)["train/steps"] == 2.0


def _drawing() -> Image.Image:
    """A red disc with a black outline on white, like an emoji."""
    image = Image.new("RGB", (48, 48), "white")
    ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=(220, 30, 30), outline=(0, 0, 0), width=3)
    return image


@pytest.mark.parametrize("preset", ["light", "strong"])
def test_presets_are_seeded(preset):
    aug = build_augment(preset, {})
    views = [[np.asarray(aug(_drawing(), random.Random(seed))) for seed in range(12)] for _ in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(*views))  # same seeds, same bytes
    distinct = len({v.tobytes() for v in views[0]})
    # light crops every view its own way; strong draws the image as it is, in gray or as edges
    assert distinct == 12 if preset == "light" else distinct == 3


def test_strong_preset_draws_edges_and_grayscale():
    aug = build_augment("strong", {"scale": [1.0, 1.0], "jitter": 0.0})
    views = [np.asarray(aug(_drawing(), random.Random(seed))).astype(int) for seed in range(200)]
    gray = [v for v in views if (v[..., 0] == v[..., 1]).all() and (v[..., 1] == v[..., 2]).all()]
    # edges (p 0.15) or grayscale (p 0.15) leave R = G = B: about 1 - 0.85 * 0.85 = 28% of views
    assert 0.18 < len(gray) / len(views) < 0.38
    assert PRESETS["none"] is None and build_augment("none", {}) is None
    blurred = build_augment("strong", {"blur": 1.0, "edges": 0.0, "grayscale": 0.0, "jitter": 0.0, "scale": [1, 1]})
    sharp = np.asarray(_drawing()).astype(int)
    soft = np.asarray(blurred(_drawing(), random.Random(0))).astype(int)
    assert np.abs(np.diff(soft, axis=1)).max() < np.abs(np.diff(sharp, axis=1)).max()  # blur softens edges


def test_edge_drawing_is_dark_lines_on_white():
    lines = np.asarray(edge_drawing(_drawing()).convert("L"))
    assert (lines > 200).mean() > 0.8 and (lines < 100).mean() > 0.02  # mostly paper, some ink
    assert (lines[0] > 200).all() and (lines[:, -1] > 200).all()  # no frame along the border
    assert lines[24, 24] > 200  # the flat red fill has no edge inside


def test_augment_options_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown option.*blurr; known: scale"):
        load_config(None, ["--data.augment=light", "--data.augment_options={blurr: 0.5}"])
    with pytest.raises(ConfigError, match="augment_options.grayscale is a probability"):
        load_config(None, ["--data.augment=strong", "--data.augment_options={grayscale: 2}"])
    with pytest.raises(ConfigError, match="augment_options.scale must be a \\[low, high\\] pair"):
        load_config(None, ["--data.augment=light", "--data.augment_options={scale: 0.5}"])
    with pytest.raises(ConfigError, match="'data.augment' is 'true'; choose one of none, light, strong"):
        load_config(None, ["--data.augment=true"])
