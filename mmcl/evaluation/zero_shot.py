"""Zero-shot classification pieces: class names (from a list, a file or a label column), prompt
templates that turn them into sentences, and the one classifier builder: a class's text
embedding is the re-normalised mean over its prompts' embeddings (CLIP's prompt ensembling)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Callable, Iterable

import datasets
import torch

from ..config import ConfigError, EvalSpec
from .metrics import class_embeddings

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


PHOTO_OPENINGS = ("a photo of", "a picture of", "an image of", "a photograph of", "a close-up of")


def caption_style(captions: Iterable[str], limit: int = 2000) -> dict[str, Any]:
    """The style of the training captions and the templates that match it: `names` (short captions that
    do not open like a sentence, e.g. "red heart"; a model trained on them ranks a bare class name
    best) -> `name`; `sentences` -> `simple` ("a photo of a {}."). Saved with the model, it is what
    `templates: auto` means for `predict`, `demo`, `eval` and the card."""
    words, sentence_like, count = [], 0, 0
    for caption in itertools.islice(captions, limit):
        text = caption.strip().lower()
        words.append(len(text.split()))
        sentence_like += text.startswith(PHOTO_OPENINGS + ("a ", "an ", "the ")) or text.endswith(".")
        count += 1
    if not count:
        return {"caption_style": "unknown", "templates": "simple", "captions": 0}
    median = float(sorted(words)[len(words) // 2])
    names = median <= 4 and sentence_like / count < 0.5
    return {"caption_style": "names" if names else "sentences", "templates": "name" if names else "simple",
            "median_words": median, "sentence_like_share": round(sentence_like / count, 4), "captions": count}


def load_templates(spec: str, recommended: str | None = None) -> list[str]:
    """`simple`, `ensemble`, `name` (the bare class name), or a file: a JSON list, or one
    template per line; every template holds one `{}` for the class name. `auto`: the model's
    `recommended` templates (the style of its training captions), else `simple`."""
    if spec == "auto":
        spec = recommended or "simple"
    if spec in BUILTIN:
        return list(BUILTIN[spec])
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"templates '{spec}': not auto, one of {', '.join(BUILTIN)} or a file")
    text = path.read_text(encoding="utf-8")
    templates = json.loads(text) if path.suffix == ".json" else [t for t in text.splitlines() if t.strip()]
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if not templates or bad:
        raise ConfigError(f"{path}: each template needs exactly one '{{}}' for the class name; bad: {bad[:3]}")
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


def load_per_class_prompts(path: str | None) -> dict[str, list[str]] | None:
    """A JSON file {class name: [prompt, ...]}, or None."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            prompts = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"per_class_prompts {path}: {err}") from err
    if not isinstance(prompts, dict):
        raise ConfigError(f"per_class_prompts {path}: expected a JSON object {{class name: [prompt, ...]}}")
    return prompts


def zero_shot_classifier(embed_texts: Callable[[list[str]], torch.Tensor], class_names: list[str],
                         templates: list[str], per_class: dict[str, list[str]] | None = None) -> torch.Tensor:
    """(C, D) unit-norm class embeddings: each class's prompts embedded by `embed_texts`
    ((N,) texts -> (N, D)), averaged and re-normalised."""
    prompts = class_prompts(class_names, templates, per_class)
    text = embed_texts([p for ps in prompts for p in ps])  # (sum of prompts, D)
    return torch.stack([class_embeddings(t.unsqueeze(0))[0] for t in text.split([len(ps) for ps in prompts])])


def class_labels(ds: datasets.Dataset, spec: EvalSpec) -> tuple[list[str], torch.Tensor]:
    """Class names and each row's class index, from `spec.class_names` or the label column."""
    feature, values = ds.features[spec.label_column], ds[spec.label_column]
    names = load_class_names(spec.class_names) if spec.class_names else None
    if isinstance(feature, datasets.ClassLabel):
        names = names or feature.names
        if len(names) != feature.num_classes:
            raise ConfigError(f"{len(names)} class names for the {feature.num_classes} classes of '{spec.label_column}'")
        return names, torch.tensor(values)
    if all(isinstance(v, str) for v in values):
        names = names or sorted(set(values))
        index = {name: i for i, name in enumerate(names)}
        missing = sorted(set(values) - index.keys())
        if missing:
            raise ConfigError(f"labels not among the class names: {missing[:5]}")
        return names, torch.tensor([index[v] for v in values])
    if names is None:
        raise ConfigError(f"{spec.dataset}: label column '{spec.label_column}' is {feature}, not a ClassLabel; "
                          "give the class names (class_names: a list or a file, one per line)")
    labels = torch.tensor(values)
    if labels.min() < 0 or labels.max() >= len(names):
        raise ConfigError(f"labels of '{spec.label_column}' run {labels.min()}..{labels.max()}, "
                          f"but there are {len(names)} class names")
    return names, labels
