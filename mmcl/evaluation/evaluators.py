"""Zero-shot classification and image<->text retrieval of any supported model on any dataset.

Every evaluation takes an `EncoderBundle` and embeds through it with `mmcl.data.embed` (during
training: the prepared model, on every rank, so the metrics are the same with any number of
processes). The metric math is `mmcl.evaluation.metrics`, called directly.
"""

from __future__ import annotations

from typing import Any

import datasets
import torch
from accelerate import Accelerator

from ..config import DataConfig, EvalConfig, EvalSpec
from ..data.embed import embed_images, embed_texts
from ..data.pairs import caption_list
from ..data.sources import load_source, require_columns
from ..towers.inference import EncoderBundle, load_encoder
from .metrics import per_class_accuracy, retrieval_metrics, zero_shot_metrics
from .zero_shot import class_labels, load_per_class_prompts, load_templates, zero_shot_classifier


def group_captions(ds: datasets.Dataset, spec: EvalSpec) -> tuple[datasets.Dataset, list[list[str]]]:
    """One row per image, with all of its captions.

    Without `image_id_column` each row is an image (its caption cell may be a list). With it,
    rows sharing an id are one image: its pixels are read from the first such row and its
    captions are those of all of them.
    """
    captions = [caption_list(cell) for cell in ds[spec.caption_column]]
    if not spec.image_id_column:
        return ds, captions
    first: dict[Any, int] = {}
    grouped: dict[Any, list[str]] = {}
    for row, image_id in enumerate(ds[spec.image_id_column]):
        first.setdefault(image_id, row)
        grouped.setdefault(image_id, []).extend(captions[row])
    return ds.select(list(first.values())), list(grouped.values())


def retrieval_evaluation(bundle: EncoderBundle, ds: datasets.Dataset, spec: EvalSpec, accelerator: Accelerator,
                         cfg: EvalConfig) -> dict[str, float]:
    """Image->text and text->image retrieval over every caption of every readable image.

    A row with several captions (a list cell) is one image with several correct texts: an image
    query is a hit at k if any of its captions is in its top k. Rows with an unreadable image or
    no caption are left out, and counted in `skipped_images`.
    """
    images, captions = group_captions(ds, spec)
    image_embeds, valid = embed_images(bundle, images, spec.image_column, accelerator, cfg.batch_size, progress=True)
    keep = valid & torch.tensor([bool(c) for c in captions])
    texts, text_to_image = [], []
    for image_index, row in enumerate(keep.nonzero().flatten().tolist()):
        texts += captions[row]
        text_to_image += [image_index] * len(captions[row])
    if not texts:
        raise ValueError(f"{spec.dataset}: no row has both a readable image and a caption")
    text_embeds = embed_texts(bundle, texts, accelerator, cfg.batch_size, progress=True)
    metrics = retrieval_metrics(image_embeds[keep], text_embeds, torch.tensor(text_to_image),
                                ks=tuple(cfg.retrieval_ks), chunk_size=cfg.chunk_size)
    metrics.update(images=float(keep.sum()), texts=float(len(texts)), skipped_images=float((~keep).sum()))
    return metrics


def zero_shot_evaluation(bundle: EncoderBundle, ds: datasets.Dataset, spec: EvalSpec, accelerator: Accelerator,
                         cfg: EvalConfig) -> dict[str, Any]:
    """Top-1/top-5, mean per-class recall and per-class accuracy of zero-shot classification.

    Each class's text embedding is the re-normalised mean over its prompts (templates filled
    with the class name, or its own prompts from `per_class_prompts`).
    """
    names, labels = class_labels(ds, spec)
    classes = zero_shot_classifier(lambda texts: embed_texts(bundle, texts, accelerator, cfg.batch_size), names,
                                   load_templates(spec.templates, bundle.templates), load_per_class_prompts(spec.per_class_prompts))
    image_embeds, valid = embed_images(bundle, ds, spec.image_column, accelerator, cfg.batch_size, progress=True)
    logits = image_embeds[valid] @ classes.T  # (N, C)
    labels = labels[valid]
    metrics: dict[str, Any] = zero_shot_metrics(logits, labels)
    metrics.update(images=float(valid.sum()), classes=float(len(names)), skipped_images=float((~valid).sum()))
    metrics["per_class_accuracy"] = {names[c]: acc for c, acc in per_class_accuracy(logits, labels).items()}
    metrics["confusion"] = confusion_matrix(logits.argmax(dim=1), labels, len(names))
    return metrics


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(C, C) counts: row = true class, column = predicted class."""
    flat = labels * n_classes + predicted
    return torch.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def load_eval_dataset(spec: EvalSpec, cache_dir: str | None = None, emoji_image_size: int = 64) -> datasets.Dataset:
    """The evaluation split, with the columns its task needs checked up front."""
    ds = load_source(spec, cache_dir, emoji_image_size)
    columns = [spec.image_column, spec.caption_column if spec.task == "retrieval" else spec.label_column]
    columns += [spec.image_id_column] if spec.image_id_column and spec.task == "retrieval" else []
    ds = require_columns(ds, spec, {column: f"(split {spec.split}) for the {spec.task} task" for column in columns})
    return ds.select(range(min(spec.max_samples, len(ds)))) if spec.max_samples else ds


def eval_specs(data: DataConfig, cfg: EvalConfig, validation_every: int = 0) -> dict[str, EvalSpec]:
    """`data.validation` as the retrieval evaluation named "val" (every `validation_every` steps), plus
    the named `eval.sets`."""
    specs = {}
    if data.validation:
        specs["val"] = EvalSpec(**vars(data.validation_source()), task="retrieval", every=validation_every,
                                max_samples=data.max_validation_samples)
    specs.update(cfg.sets)
    return specs


def load_eval_datasets(specs: dict[str, EvalSpec], data: DataConfig,
                       accelerator: Accelerator) -> dict[str, tuple[EvalSpec, datasets.Dataset]]:
    """Every evaluation's data, loaded at start so that a bad column fails before training."""
    if any(spec.confusion_matrix for spec in specs.values()):
        from .plots import pyplot

        pyplot()  # matplotlib is there, before training starts
    with accelerator.main_process_first():
        return {name: (spec, load_eval_dataset(spec, data.cache_dir, data.emoji_image_size))
                for name, spec in specs.items()}


def run_eval(bundle: EncoderBundle, ds: datasets.Dataset, spec: EvalSpec, accelerator: Accelerator,
             cfg: EvalConfig) -> dict[str, Any]:
    """One named evaluation; the encoder is put in eval mode for it and restored after."""
    model = bundle.encoder
    was_training = model.training
    model.eval()
    task = retrieval_evaluation if spec.task == "retrieval" else zero_shot_evaluation
    try:
        return task(bundle, ds, spec, accelerator, cfg)
    finally:
        model.train(was_training)


def scalars(name: str, results: dict[str, Any]) -> dict[str, float]:
    """The loggable numbers of one evaluation, prefixed with its name."""
    return {f"{name}/{k}": float(v) for k, v in results.items() if isinstance(v, (int, float))}


def evaluate_model(model: str | EncoderBundle, spec: EvalSpec, cfg: EvalConfig | None = None,
                   cache_dir: str | None = None, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Python API: evaluate a model folder / Hub id (or a loaded `EncoderBundle`) on `spec`.

    >>> evaluate_model("runs/quickstart/final", EvalSpec(task="zero_shot", dataset="builtin:emoji",
    ...                label_column="name", templates="ensemble"))["top1"]
    """
    bundle = load_encoder(model) if isinstance(model, str) else model
    accelerator = accelerator or Accelerator(cpu=not torch.accelerator.is_available())
    size = dict(getattr(bundle.image_processor, "size", None) or {})
    emoji_size = int(size.get("height") or 64)  # the built-in set is drawn at the model's input height
    with accelerator.main_process_first():
        ds = load_eval_dataset(spec, cache_dir, emoji_size)
    return run_eval(bundle.to(accelerator.device), ds, spec, accelerator, cfg or EvalConfig())


def format_results(name: str, results: dict[str, Any], worst: int = 5) -> str:
    """A readable table of one evaluation's numbers (and its hardest classes, for zero-shot)."""
    rows = [(k, v) for k, v in results.items() if isinstance(v, (int, float))]
    width = max(len(k) for k, _ in rows)
    lines = [f"== {name}"] + [f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}"
                              for k, v in rows]
    per_class = results.get("per_class_accuracy")
    if per_class:
        hardest = sorted(per_class.items(), key=lambda kv: kv[1])[:worst]
        lines.append("  hardest classes: " + ", ".join(f"{c} ({a:.2f})" for c, a in hardest))
    return "\n".join(lines)
