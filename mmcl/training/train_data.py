"""What a training run reads: the training data (map-style through a DataLoader, or a stream),
the tokenizer and image processor it is built or resumed with, and the evaluation sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ..artifacts import PROCESSOR_DIR
from ..towers.build import build_image_processor, build_tokenizer
from ..config import Config, EvalSpec
from ..data.augment import Augment, build_augment
from ..data.clusters import ClusterBatchSampler, cluster_labels
from ..data.pairs import PairCollator, PairDataset, iter_captions
from ..data.sources import load_pairs, load_stream, require_columns
from ..data.streaming import StreamingPairs, stream_captions
from ..evaluation.evaluators import load_eval_dataset
from ..towers.inference import load_encoder, load_processors


def build_processors(config: Config, train_ds: Any, output_dir: Path, resuming: bool,
                     accelerator: Accelerator) -> tuple[Any, Any]:
    """Tokenizer and image processor, saved to `<output_dir>/processor` by the main process.

    Tokenizer training is not deterministic (ties between merges), so it runs once, on the main
    process; the other processes, and a resumed run, load what it saved.
    """
    saved = output_dir / PROCESSOR_DIR
    with accelerator.main_process_first():
        if (resuming or not accelerator.is_main_process) and (saved / "tokenizer_config.json").is_file():
            return load_processors(saved, config.model.trust_remote_code)
        captions = (stream_captions(train_ds, config.data) if config.data.streaming
                    else iter_captions(train_ds, config.data.caption_column))
        tokenizer = build_tokenizer(config.model, captions)
        image_processor = build_image_processor(config.model)
        if accelerator.is_main_process:
            tokenizer.save_pretrained(saved)
            image_processor.save_pretrained(saved)
    return tokenizer, image_processor


def build_views(config: Config) -> Augment | None:
    """SLIP's term: two views of each image with a stronger crop and jitter than `data.augment`."""
    if not config.loss.image_ssl_weight:
        return None
    return Augment(scale=(0.3, 1.0), flip=bool(config.data.augment_options.get("flip")), jitter=0.4)


def build_train_loader(config: Config, train_ds: Any, tokenizer: Any, image_processor: Any,
                       accelerator: Accelerator) -> torch.utils.data.DataLoader:
    data, tcfg = config.data, config.train
    dataset = PairDataset(train_ds, data.image_column, data.caption_column, image_processor,
                          seed=tcfg.seed, augment=build_augment(data.augment, data.augment_options),
                          negative_column=config.loss.hard_negative_column, views=build_views(config),
                          max_image_bytes=data.max_image_bytes)
    collator = PairCollator(tokenizer, config.model.max_text_length, config.model.text_padding)
    if data.batch_sampler == "cluster":  # each batch from a few clusters: hard in-batch negatives
        bundle = load_encoder(data.cluster_model).to(accelerator.device)
        labels = cluster_labels(train_ds, data.image_column, bundle, accelerator, data.num_clusters, tcfg.seed,
                                num_workers=data.num_workers)
        sampler = ClusterBatchSampler(labels, tcfg.per_device_batch_size, data.clusters_per_batch, tcfg.seed)
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator,
                                           num_workers=data.num_workers)
    return torch.utils.data.DataLoader(
        dataset, batch_size=tcfg.per_device_batch_size, shuffle=True, drop_last=True, collate_fn=collator,
        num_workers=data.num_workers, persistent_workers=False)


def load_train_dataset(config: Config, accelerator: Accelerator) -> Any:
    data, negatives = config.data, config.loss.hard_negative_column
    if data.streaming:
        return load_stream(data.train_source())
    with accelerator.main_process_first():  # a built-in dataset is built once, then read
        ds = load_pairs(data.train_source(), data.cache_dir, data.emoji_image_size)
    if negatives:
        require_columns(ds, data.train_source(), {negatives: "(loss.hard_negative_column; `mmcl data "
                                                             "mine-negatives` writes one)"})
    return ds


def build_stream(config: Config, train_ds: Any, tokenizer: Any, image_processor: Any,
                 accelerator: Accelerator) -> StreamingPairs:
    data = config.data
    collator = PairCollator(tokenizer, config.model.max_text_length, config.model.text_padding)
    return StreamingPairs(train_ds, data, image_processor, collator,
                          config.train.per_device_batch_size, config.train.seed, accelerator.process_index,
                          accelerator.num_processes, data.shuffle_buffer,
                          build_augment(data.augment, data.augment_options),
                          config.loss.hard_negative_column, build_views(config))


def eval_specs(config: Config) -> dict[str, EvalSpec]:
    """`data.validation` as the retrieval eval named "val", plus the named `eval.sets`."""
    data, specs = config.data, {}
    if data.validation:
        source = data.validation_source()
        specs["val"] = EvalSpec(**vars(source), task="retrieval", every=config.train.eval_every,
                                max_samples=data.max_validation_samples)
    specs.update(config.eval.sets)
    return specs


def load_eval_datasets(config: Config, accelerator: Accelerator) -> dict[str, tuple[EvalSpec, Any]]:
    """Every evaluation's data, loaded at start so that a bad column fails before training."""
    data, specs = config.data, eval_specs(config)
    if any(spec.confusion_matrix for spec in specs.values()):
        from ..evaluation.plots import pyplot

        pyplot()  # matplotlib is there, before training starts
    with accelerator.main_process_first():
        return {name: (spec, load_eval_dataset(spec, data.cache_dir, data.emoji_image_size))
                for name, spec in specs.items()}
