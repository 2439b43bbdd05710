"""Decoding a JPEG at a reduced scale (Pillow's draft mode) when the processor shrinks it anyway:
the training tensor stays within a stated tolerance of the full decode, and a crop of the
augmentation is taken from enough pixels."""

import io

import numpy as np
import pytest
from PIL import Image
from transformers import ViTImageProcessorPil

from mmcl.data.augment import Augment
from mmcl.data.images import load_image
from mmcl.data.pairs import PairRecipe, make_pair

PROCESSOR = ViTImageProcessorPil(size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
# pixel values are normalised to [-1, 1]: 2/255 = 0.0078 is one intensity level
MEAN_TOLERANCE, MAX_TOLERANCE = 0.01, 0.1


def photo(width=1024, height=768):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width] / height
    base = np.stack([xx * 200, yy * 180, (xx + yy) * 90], -1) + ((np.floor(xx * 12) + np.floor(yy * 12)) % 2)[..., None] * 40
    buffer = io.BytesIO()
    Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_a_draft_decode_gives_the_full_decodes_pixels_within_tolerance():
    data = photo()
    full = PROCESSOR(load_image(data), return_tensors="pt")["pixel_values"]
    small = load_image(data, min_size=224)
    assert small.size == (512, 384)  # decoded at half the side: a quarter of the work
    diff = (PROCESSOR(small, return_tensors="pt")["pixel_values"] - full).abs()
    assert diff.mean() < MEAN_TOLERANCE and diff.max() < MAX_TOLERANCE


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_a_crop_is_resized_down_never_up(scale):
    """The recipe decodes large enough that the smallest crop still has at least the processor's side."""
    recipe = PairRecipe(PROCESSOR, Augment(scale=(scale, 1.0), jitter=0.0))
    assert recipe.min_size == (224 if scale == 1.0 else 409)  # 224 / sqrt(0.3)
    drafted = make_pair(photo(), "a caption", recipe, "0/0/1")["pixel_values"]
    object.__setattr__(recipe, "min_size", None)
    exact = make_pair(photo(), "a caption", recipe, "0/0/1")["pixel_values"]
    diff = (drafted - exact).abs()
    assert diff.mean() < MEAN_TOLERANCE and diff.max() < MAX_TOLERANCE
