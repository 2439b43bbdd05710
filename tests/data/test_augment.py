import random

import numpy as np
from PIL import Image

from mmcl.data.augment import Augment


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
    from mmcl.config import load_config
    from mmcl.train import train
    from tests.conftest import DEBUG_CONFIG

    config = load_config(DEBUG_CONFIG, [f"--train.output_dir={tmp_path}", f"--data.cache_dir={emoji_cache}",
                                        f"--data.train={small_emoji}", "--data.validation=null", "--data.augment=true",
                                        "--train.max_steps=2", "--train.checkpoint_every=0", "--hub.export=false"])
    assert train(config)["train/steps"] == 2.0
