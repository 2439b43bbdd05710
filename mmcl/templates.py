"""Prompt templates for zero-shot classification: class names become sentences, and a class's
text embedding is the re-normalised mean over its prompts (CLIP's prompt ensembling)."""

from __future__ import annotations

import json
from pathlib import Path

SIMPLE = ["a photo of a {}."]

# A general-purpose ensemble in the spirit of CLIP's ImageNet prompts: several renderings,
# sizes and qualities, so that no single phrasing decides the result.
ENSEMBLE = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a good photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a drawing of a {}.",
    "a painting of a {}.",
    "a sketch of a {}.",
    "a cartoon {}.",
    "an icon of a {}.",
    "an emoji of a {}.",
    "a rendering of a {}.",
    "{}",
]

BUILTIN = {"simple": SIMPLE, "ensemble": ENSEMBLE, "name": ["{}"]}


def load_templates(spec: str) -> list[str]:
    """`simple`, `ensemble`, `name` (the bare class name), or a file: a JSON list, or one
    template per line; every template holds one `{}` for the class name."""
    if spec in BUILTIN:
        return list(BUILTIN[spec])
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"templates '{spec}': not one of {', '.join(BUILTIN)} and no such file")
    text = path.read_text(encoding="utf-8")
    templates = json.loads(text) if path.suffix == ".json" else [t for t in text.splitlines() if t.strip()]
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"{path}: each template needs exactly one '{{}}' for the class name; bad: {bad[:3]}")
    return templates


def class_prompts(class_names: list[str], templates: list[str],
                  per_class: dict[str, list[str]] | None = None) -> list[list[str]]:
    """Prompts for each class: its own list from `per_class` if given, else the templates."""
    per_class = per_class or {}
    return [per_class.get(name) or [t.format(name) for t in templates] for name in class_names]


def load_class_names(spec: str | list[str]) -> list[str]:
    """A list, a comma-separated string, or a file with one class name per line (or a JSON list)."""
    if isinstance(spec, list):
        return spec
    path = Path(spec)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if path.suffix == ".json" else [line.strip() for line in text.splitlines() if line.strip()]
    return [name.strip() for name in spec.split(",") if name.strip()]
