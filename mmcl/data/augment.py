"""Optional training-time image augmentation, in plain Pillow (no torchvision needed).

Off by default (`data.augment: false`). Randomness comes from the `random.Random` the dataset
seeds per (seed, epoch, row), so augmented runs stay reproducible and resumable.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageEnhance


@dataclass
class Augment:
    """Random resized crop (area fraction in `scale`, aspect ratio in `ratio`), horizontal flip,
    and mild brightness/contrast jitter. Flipping is off by default: it changes the meaning of
    captions such as "left arrow"."""

    scale: tuple[float, float] = (0.6, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False
    jitter: float = 0.2

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        image = self._crop(image, rng)
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.jitter > 0:
            image = ImageEnhance.Brightness(image).enhance(1 + rng.uniform(-self.jitter, self.jitter))
            image = ImageEnhance.Contrast(image).enhance(1 + rng.uniform(-self.jitter, self.jitter))
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
