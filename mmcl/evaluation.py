"""Zero-shot classification and image<->text retrieval of any supported model on any dataset.

Every rank embeds its shard; `gather_for_metrics` reassembles the rows in order without the
padding duplicates, so the metrics are the same with any number of processes. The metric math
is in `mmcl.metrics`, reached through the `evaluate` modules shipped in the package.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any, Sequence

import datasets
import torch
from accelerate import Accelerator

from .config import ConfigError, DataConfig, EvalConfig, EvalSpec
from .data import caption_list, load_image, load_source, processor_min_size, require_columns
from .metrics import class_embeddings, load_metric, per_class_accuracy
from .templates import class_prompts, load_class_names, load_templates


class _Images(torch.utils.data.Dataset):
    """Preprocessed images; an unreadable one comes back as zeros with valid=False."""

    def __init__(self, ds: datasets.Dataset, column: str, image_processor: Any) -> None:
        self.ds, self.column, self.image_processor = ds, column, image_processor

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            image = load_image(self.ds[i][self.column], processor_min_size(self.image_processor))
            return {"pixel_values": self.image_processor(image, return_tensors="pt")["pixel_values"][0], "valid": True}
        except Exception:  # counted by the caller through `valid`
            return {"pixel_values": None, "valid": False}


def _collate_images(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    shape = next((it["pixel_values"].shape for it in items if it["valid"]), (3, 1, 1))
    pixels = [it["pixel_values"] if it["valid"] else torch.zeros(shape) for it in items]
    return {"pixel_values": torch.stack(pixels), "valid": torch.tensor([it["valid"] for it in items])}


@torch.no_grad()
def embed_images(model: Any, ds: datasets.Dataset, column: str, image_processor: Any, accelerator: Accelerator,
                 batch_size: int, num_workers: int = 0, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (N, D) image embeddings (rows of unreadable images are zeros) and the (N,) valid mask."""
    loader = torch.utils.data.DataLoader(_Images(ds, column, image_processor), batch_size=batch_size,
                                         collate_fn=_collate_images, num_workers=num_workers)
    embeds, valid = [], []
    for batch in _bar(_shard(loader, accelerator), progress, accelerator, "images"):
        if not batch["valid"].any():  # a batch of only unreadable images (its size may be 1x1)
            out = torch.zeros(len(batch["valid"]), _embed_dim(model), device=batch["valid"].device)
        else:
            with accelerator.autocast():
                out = model.get_image_features(batch["pixel_values"]).float() * batch["valid"].unsqueeze(1)
        e, v = accelerator.gather_for_metrics((out, batch["valid"]))
        embeds.append(e.cpu())
        valid.append(v.cpu())
    return torch.cat(embeds), torch.cat(valid)


def _shard(loader: torch.utils.data.DataLoader, accelerator: Accelerator) -> Any:
    """This process's share of `loader`, on its device. Not `accelerator.prepare_data_loader`:
    that keeps a reference to every loader it prepares, and evaluations run many times."""
    from accelerate.data_loader import prepare_data_loader

    return prepare_data_loader(loader, accelerator.device, accelerator.num_processes, accelerator.process_index,
                               put_on_device=True)


def _bar(loader: Any, progress: bool, accelerator: Accelerator, unit: str) -> Any:
    if not progress:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=f"embedding {unit}", unit="batch", disable=not accelerator.is_local_main_process)


def _embed_dim(model: Any) -> int:
    projection = getattr(model, "visual_projection", None) or getattr(getattr(model, "model", None), "visual_projection", None)
    if projection is None:
        raise ValueError("a batch held only unreadable images and the embedding width is unknown")
    return projection.out_features


@torch.no_grad()
def embed_texts(model: Any, texts: Sequence[str], tokenizer: Any, accelerator: Accelerator, batch_size: int,
                max_length: int = 77, padding: str = "longest", progress: bool = False) -> torch.Tensor:
    """-> (N, D) text embeddings, in the order of `texts`."""
    def collate(batch: list[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(list(batch), padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc.get("attention_mask")}

    loader = _shard(torch.utils.data.DataLoader(list(texts), batch_size=batch_size, collate_fn=collate), accelerator)
    embeds = []
    for batch in _bar(loader, progress, accelerator, "texts"):
        with accelerator.autocast():
            out = model.get_text_features(batch["input_ids"], batch["attention_mask"]).float()
        embeds.append(accelerator.gather_for_metrics(out).cpu())
    return torch.cat(embeds)


@functools.cache
def _metric(name: str) -> Any:
    return load_metric(name, keep_in_memory=True)  # in memory: ranks never share a cache file


def retrieval_evaluation(model: Any, ds: datasets.Dataset, spec: EvalSpec, tokenizer: Any, image_processor: Any,
                         accelerator: Accelerator, cfg: EvalConfig, max_length: int = 77,
                         padding: str = "longest") -> dict[str, float]:
    """Image->text and text->image retrieval over every caption of every readable image.

    A row with several captions (a list cell) is one image with several correct texts: an image
    query is a hit at k if any of its captions is in its top k. Rows with an unreadable image or
    no caption are left out, and counted in `skipped_images`.
    """
    images, captions = group_captions(ds, spec)
    image_embeds, valid = embed_images(model, images, spec.image_column, image_processor, accelerator, cfg.batch_size)
    keep = valid & torch.tensor([bool(c) for c in captions])
    texts, text_to_image = [], []
    for image_index, row in enumerate(keep.nonzero().flatten().tolist()):
        texts += captions[row]
        text_to_image += [image_index] * len(captions[row])
    if not texts:
        raise ValueError(f"{spec.dataset}: no row has both a readable image and a caption")
    text_embeds = embed_texts(model, texts, tokenizer, accelerator, cfg.batch_size, max_length, padding)
    metric = _metric("retrieval")
    metrics = metric.compute(text_embeds=text_embeds, text_to_image=text_to_image, image_embeds=image_embeds[keep],
                             ks=tuple(cfg.retrieval_ks), chunk_size=cfg.chunk_size)
    metrics.update(images=float(keep.sum()), texts=float(len(texts)), skipped_images=float((~keep).sum()))
    return metrics


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


def zero_shot_evaluation(model: Any, ds: datasets.Dataset, spec: EvalSpec, tokenizer: Any, image_processor: Any,
                         accelerator: Accelerator, cfg: EvalConfig, max_length: int = 77,
                         padding: str = "longest") -> dict[str, Any]:
    """Top-1/top-5, mean per-class recall and per-class accuracy of zero-shot classification.

    Each class's text embedding is the re-normalised mean over its prompts (templates filled
    with the class name, or its own prompts from `per_class_prompts`).
    """
    names, labels = class_labels(ds, spec)
    per_class = None
    if spec.per_class_prompts:
        import json

        with open(spec.per_class_prompts, encoding="utf-8") as f:
            per_class = json.load(f)
    prompts = class_prompts(names, load_templates(spec.templates), per_class)
    flat = [p for ps in prompts for p in ps]
    text = embed_texts(model, flat, tokenizer, accelerator, cfg.batch_size, max_length, padding)
    counts = torch.tensor([len(ps) for ps in prompts])
    classes = torch.stack([class_embeddings(t.unsqueeze(0))[0] for t in text.split(counts.tolist())])  # (C, D)
    image_embeds, valid = embed_images(model, ds, spec.image_column, image_processor, accelerator, cfg.batch_size)
    logits = image_embeds[valid] @ classes.T  # (N, C)
    labels = labels[valid]
    metrics = dict(_metric("zero_shot_accuracy").compute(predictions=logits, references=labels))
    metrics.update(images=float(valid.sum()), classes=float(len(names)), skipped_images=float((~valid).sum()))
    metrics["per_class_accuracy"] = {names[c]: acc for c, acc in per_class_accuracy(logits, labels).items()}
    metrics["confusion"] = confusion_matrix(logits.argmax(dim=1), labels, len(names))
    return metrics


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(C, C) counts: row = true class, column = predicted class."""
    flat = labels * n_classes + predicted
    return torch.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def load_eval_dataset(spec: EvalSpec, data: DataConfig) -> datasets.Dataset:
    """The evaluation split, with the columns its task needs checked up front."""
    source = replace(data, image_column=spec.image_column, caption_column=spec.caption_column,
                     dataset_config=spec.dataset_config)
    ds = load_source(spec.dataset, spec.split, source)
    columns = [spec.image_column, spec.caption_column if spec.task == "retrieval" else spec.label_column]
    columns += [spec.image_id_column] if spec.image_id_column and spec.task == "retrieval" else []
    ds = require_columns(ds, f"{spec.dataset} (split {spec.split})", spec.image_column,
                         {column: f"for the {spec.task} task" for column in columns})
    return ds.select(range(min(spec.max_samples, len(ds)))) if spec.max_samples else ds


def run_eval(model: Any, ds: datasets.Dataset, spec: EvalSpec, tokenizer: Any, image_processor: Any,
             accelerator: Accelerator, cfg: EvalConfig, max_length: int = 77, padding: str = "longest") -> dict[str, Any]:
    """One named evaluation; the model is put in eval mode for it and restored after."""
    was_training = getattr(model, "training", False)
    model.eval()
    task = retrieval_evaluation if spec.task == "retrieval" else zero_shot_evaluation
    try:
        return task(model, ds, spec, tokenizer, image_processor, accelerator, cfg, max_length, padding)
    finally:
        model.train(was_training)


def scalars(name: str, results: dict[str, Any]) -> dict[str, float]:
    """The loggable numbers of one evaluation, prefixed with its name."""
    return {f"{name}/{k}": float(v) for k, v in results.items() if isinstance(v, (int, float))}


def evaluate_model(model: str | Any, spec: EvalSpec, cfg: EvalConfig | None = None, data: DataConfig | None = None,
                   accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Python API: evaluate a model folder / Hub id (or a `Loaded` from `load_encoder`) on `spec`.

    >>> evaluate_model("runs/quickstart/final", EvalSpec(task="zero_shot", dataset="builtin:emoji",
    ...                label_column="name", templates="ensemble"))["top1"]
    """
    from .inference import load_encoder

    loaded = load_encoder(model) if isinstance(model, str) else model
    accelerator = accelerator or Accelerator(cpu=not torch.accelerator.is_available())
    data = data or DataConfig()
    size = getattr(loaded.image_processor, "size", None) or {}
    if spec.dataset.startswith("builtin:") and size.get("height"):
        data = replace(data, emoji_image_size=int(size["height"]))  # render at the model's input size
    with accelerator.main_process_first():
        ds = load_eval_dataset(spec, data)
    encoder = loaded.encoder.to(accelerator.device)
    return run_eval(encoder, ds, spec, loaded.tokenizer, loaded.image_processor, accelerator, cfg or EvalConfig(),
                    loaded.max_length, loaded.text_padding)


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
