"""Plot files drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw


def save_confusion_png(matrix: torch.Tensor, class_names: list[str], path: str | Path, max_side: int = 1024) -> None:
    """Row-normalised confusion matrix (true class down, predicted across) as a heat map.

    Dark = many; the diagonal is the correct predictions. Class names are drawn when they fit.
    """
    n = matrix.shape[0]
    rates = matrix.float() / matrix.sum(dim=1, keepdim=True).clamp(min=1)
    cell = max(1, min(24, max_side // max(n, 1)))
    margin = 120 if cell >= 10 else 0
    image = Image.new("RGB", (margin + n * cell, margin + n * cell), "white")
    draw = ImageDraw.Draw(image)
    for i in range(n):
        for j in range(n):
            shade = int(255 * (1 - rates[i, j].item()))
            if shade < 255:
                draw.rectangle([margin + j * cell, margin + i * cell, margin + (j + 1) * cell - 1,
                                margin + (i + 1) * cell - 1], fill=(shade, shade, 255))
    if margin:
        for i, name in enumerate(class_names):
            draw.text((2, margin + i * cell), name[:18], fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
