"""Training-time image augmentation, in plain Pillow (no torchvision needed).

`data.augment` names a preset (`PRESETS`: none, light, strong) and `data.augment_options` overrides
its fields. Randomness comes from the `random.Random` the dataset seeds per (seed, epoch, row), so
augmented runs stay reproducible and resume exactly.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageEnhance, ImageFilter, ImageOps


@dataclass
class Augment:
    """In order: random resized crop (area fraction in `scale`, aspect ratio in `ratio`), horizontal
    flip, an edge drawing (dark edges on white), grayscale, brightness / contrast / saturation
    jitter, and a Gaussian blur. `edges`, `grayscale` and `blur` are probabilities; `blur_sigma` is
    the blur's range as a fraction of the image side. Flipping is off by default: it changes the
    meaning of captions such as "left arrow"."""

    scale: tuple[float, float] = (0.6, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False
    jitter: float = 0.2  # brightness and contrast factors drawn from 1 +- jitter
    saturation: float = 0.0  # colour saturation factor drawn from 1 +- saturation
    edges: float = 0.0
    grayscale: float = 0.0
    blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.01, 0.04)

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        image = self._crop(image, rng)
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.edges and rng.random() < self.edges:
            image = edge_drawing(image)
        if self.grayscale and rng.random() < self.grayscale:
            image = ImageOps.grayscale(image).convert("RGB")
        for amount, enhance in ((self.jitter, ImageEnhance.Brightness), (self.jitter, ImageEnhance.Contrast),
                                (self.saturation, ImageEnhance.Color)):
            if amount > 0:
                image = enhance(image).enhance(1 + rng.uniform(-amount, amount))
        if self.blur and rng.random() < self.blur:
            sigma = rng.uniform(*self.blur_sigma) * min(image.size)
            image = image.filter(ImageFilter.GaussianBlur(sigma))
        return image

    def _crop(self, image: Image.Image, rng: random.Random) -> Image.Image:
        width, height = image.size
        for _ in range(10):
            area = width * height * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                left, top = rng.randint(0, width - w), rng.randint(0, height - h)
                return image.crop((left, top, left + w, top + h))
        return image  # no valid crop drawn: keep the whole image


def edge_drawing(image: Image.Image) -> Image.Image:
    """A line drawing of `image`: the luminance's edges, dark on white, contrast stretched. The filter
    marks the image's own border as an edge; that frame is blanked."""
    edges = ImageOps.grayscale(image.convert("RGB")).filter(ImageFilter.FIND_EDGES)
    edges = ImageOps.expand(edges.crop((1, 1, edges.width - 1, edges.height - 1)), border=1, fill=0)
    return ImageOps.autocontrast(ImageOps.invert(edges)).convert("RGB")


# Measured on the quickstart (600 steps, one run each; README, "Transfer beyond the training
# style"). light: the crop and mild jitter mmcl always had. strong: the two options that moved
# held-out line-art retrieval most when each was added to light alone (grayscale: line-art i->t
# median rank 184 -> 91; edge drawings: -> 101; saturation jitter -> 167, blur -> 179), without
# light's crop and jitter (with them the mix reached median rank 87, without them 33; none: 88),
# each at 0.15: the same line-art retrieval as at 0.3 (median rank 32) with more of the training
# look kept (colour i->t R@1 0.222 instead of 0.158; none: 0.317).
PRESETS: dict[str, Augment | None] = {
    "none": None,
    "light": Augment(),
    "strong": Augment(scale=(1.0, 1.0), jitter=0.0, edges=0.15, grayscale=0.15),
}
OPTIONS = tuple(f.name for f in dataclasses.fields(Augment))


def build_augment(preset: str, options: dict[str, Any]) -> Augment | None:
    """The preset named `preset` with `options` overriding its fields; None for no augmentation."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"data.augment_options: unknown option(s) {', '.join(unknown)}; "
                         f"known: {', '.join(OPTIONS)}")
    if preset not in PRESETS:
        raise ValueError(f"data.augment is {preset!r}; choose one of {', '.join(PRESETS)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    for key in ("scale", "ratio", "blur_sigma"):
        if key in values and not (isinstance(values[key], tuple) and len(values[key]) == 2):
            raise ValueError(f"data.augment_options.{key} must be a [low, high] pair, got {options[key]!r}")
    for key in ("edges", "grayscale", "blur"):
        if key in values and not 0.0 <= values[key] <= 1.0:
            raise ValueError(f"data.augment_options.{key} is a probability in [0, 1], got {values[key]!r}")
    base = PRESETS[preset]
    return None if base is None else dataclasses.replace(base, **values)
