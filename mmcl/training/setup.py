"""Everything a training run is built from, in the order it is used: `setup(config) -> Run`.

1. accelerator and output folder  2. data and evaluation sets  3. tokenizer and image processor
4. model  5. optimizer and schedule  6. prepare (batches, model, optimizer)  7. objective  8. resume

Each builder takes the config section it reads. `Run` holds exactly what the loop (`loop.py`) then
touches; this module never imports the loop.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..artifacts import (BEST_DIR, CHECKPOINTS_DIR, EXPORT_DIR, FINAL_DIR, LOG_NAME, LOGS_DIR, METRICS_NAME,
                         PROCESSOR_DIR, RunLock, check_output_folder, folder_sha256, mark_folder, restore_aside)
from ..secrets import scrub_secrets
from ..config import Config, ConfigError, DataConfig, EvalSpec, LossConfig, ModelConfig, TrainConfig
from ..data.loader import (TrainBatches, build_stream, build_train_loader, count_up_to, fit_batch, hold_out,
                           load_train_dataset, shares_images, train_captions)
from ..data.pairs import PairCollator, PairRecipe, SkipCounter
from ..evaluation.evaluators import eval_specs, load_eval_datasets
from ..evaluation.retention import Retention
from ..evaluation.zero_shot import caption_style
from ..losses import (Objective, build_objective, image_ssl_dim, init_logit_bias, needs_copy, predictor_hidden,
                      swav_prototypes)
from ..towers.build import build_image_processor, build_model, build_tokenizer, fit_text_config
from ..towers.inference import EncoderBundle, load_encoder, load_processors
from . import checkpoint as ckpt
from .auto import detect_device, resolve_auto, sharded_launch
from .launch import build_accelerator, claim_output_dir, is_sharded
from .optimization import build_optimizer, build_scheduler
from .state import TrainingState
from .tracking import build_trackers, flatten


@dataclass
class Run:
    """What the training loop touches. `model` and `optimizer` are the prepared ones (DDP / FSDP
    wrappers); `bundle` runs evaluations through that model; `config` is the resolved config, with
    anything secret-looking dropped, as it is saved beside every model and checkpoint; `resumed` is
    the checkpoint's state (step, best, counters) when the run resumes, else None."""

    accelerator: Accelerator
    output_dir: Path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    objective: Objective
    training: TrainingState  # what a checkpoint saves and restores
    batches: TrainBatches
    bundle: EncoderBundle
    evals: dict[str, tuple[EvalSpec, Any]]
    retention: Retention
    config: dict[str, Any]
    geometry: dict[str, Any]
    frozen: str | None  # SHA-256 of the frozen weights (checkpoints leave them out); None when all train
    processors: str  # SHA-256 of the tokenizer and image processor files: a resume must have the same
    skipped: SkipCounter
    zero_shot: dict[str, Any]  # the training captions' style and matching templates, saved with the model
    resumed: dict[str, Any] | None = None


def setup(config: Config, lock: RunLock) -> Run:
    """Build the run `config` describes, resumed from `train.resume` when it names a checkpoint."""
    t = config.train
    output_dir = Path(t.output_dir)
    # 1. accelerator and output folder (the lock is taken for every process); `auto` settings resolved
    resume_dir = ckpt.resolve_resume(t.resume, output_dir)
    chosen = resolve_run_auto(config, resume_dir)
    acc = build_accelerator(t, build_trackers(t.report_to, output_dir))
    for line in chosen:
        acc.print(f"auto: {line}")
    claim_output_dir(lock, acc, lambda: prepare_output_dir(output_dir, resume_dir, t.overwrite_output_dir))
    check_sharding(config.model, config.loss, acc)
    set_seed(t.seed, deterministic=t.deterministic)
    # 2. data and evaluation sets (a bad column fails now, not after an hour of training)
    train_ds = load_train_dataset(config.data, config.loss.hard_negative_column, acc)
    train_ds, evals = held_out_evals(train_ds, config.data, t, acc)
    evals.update(load_eval_datasets(eval_specs(config.data, config.eval, t.eval_every), config.data, acc))
    fit_batch_size(train_ds, config.data, t, acc)
    retention = Retention(config.eval.retention, config.eval.stop_if_retention_below, evals)
    # 3. tokenizer and image processor (a tokenizer trained on the captions is saved, and reused on resume)
    tokenizer, image_processor = build_processors(config.model, train_captions(train_ds, config.data),
                                                  output_dir / PROCESSOR_DIR, resume_dir is not None, acc,
                                                  config.data.cache_dir)
    fit_text_config(config.model, tokenizer)
    # 4. model (seeded again: the same initial weights whatever happened before)
    set_seed(t.seed)
    model = build_model(config.model, init_logit_bias(config.loss), image_ssl_dim(config.loss),
                        predictor_hidden(config.loss), swav_prototypes(config.loss))
    # 5. optimizer and schedule
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t)
    # FSDP2 cannot deep-copy a sharded model: the EMA copies (momentum queue, BYOL) are sharded from this one
    blueprint = copy.deepcopy(model) if getattr(acc, "is_fsdp2", False) and needs_copy(config.loss) else None
    # 6. prepare: the batches, and what Accelerate wraps
    recipe = PairRecipe.from_config(config.data, config.loss, image_processor)
    collator = PairCollator(tokenizer, config.model.max_text_length, config.model.text_padding)
    if config.data.streaming:  # each process reads its own part of the stream: not through Accelerate
        batches = TrainBatches(acc, stream=build_stream(train_ds, config.data, recipe, collator,
                                                        t.per_device_batch_size, t.seed, acc))
        prepared_model, optimizer = acc.prepare(model, optimizer)
    else:
        labels = build_cluster_labels(train_ds, config, acc) if config.data.batch_sampler == "cluster" else None
        loader = build_train_loader(train_ds, config.data, recipe, collator, t.per_device_batch_size, t.seed, labels)
        prepared_model, optimizer, loader = acc.prepare(model, optimizer, loader)
        batches = TrainBatches(acc, loader=loader, accumulation=t.gradient_accumulation_steps)
        check_one_batch(batches, len(train_ds), config.data.train, t, acc)
    frozen = None if is_sharded(acc) else ckpt.frozen_fingerprint(model)
    # 7. objective (runs the prepared model; its queue copies it)
    objective = build_objective(config.loss, prepared_model, acc, t.max_steps, blueprint)
    del blueprint  # its tensors now live, sharded, in the copies
    # what checkpoints keep: with frozen weights, what trains (a resume rebuilds the rest from the config)
    training = TrainingState(prepared_model, optimizer, scheduler, objective if objective.has_state() else None,
                             saved_tensors(model) if frozen else None)
    zero_shot = caption_style(train_captions(train_ds, config.data))
    bundle = EncoderBundle(prepared_model, tokenizer, image_processor, config.model.text_padding,
                           config.model.max_text_length, templates=zero_shot["templates"])
    run = Run(acc, output_dir, prepared_model, optimizer, scheduler, objective, training, batches, bundle, evals,
              retention, scrub_secrets(config.to_dict()), geometry(t, config.data.streaming, acc), frozen,
              folder_sha256(output_dir / PROCESSOR_DIR), SkipCounter(), zero_shot)
    # 8. resume, or a fresh log
    if resume_dir is not None:
        run.resumed = resume(run, resume_dir, acc.unwrap_model(prepared_model))
    elif acc.is_main_process:  # a resumed run appends to its log
        (output_dir / LOGS_DIR / LOG_NAME).unlink(missing_ok=True)
    return run


RUN_OUTPUTS = (CHECKPOINTS_DIR, PROCESSOR_DIR, LOGS_DIR, FINAL_DIR, BEST_DIR, EXPORT_DIR, METRICS_NAME,
               "training_curves.png")  # what a run writes into its folder: all that overwrite_output_dir removes


def prepare_output_dir(folder: Path, resume_dir: Path | None, overwrite: bool) -> None:
    """The run folder may hold only what mmcl wrote; a new run does not mix into an earlier run's
    checkpoints (`train.resume` continues it, `train.overwrite_output_dir` starts over, removing what
    that run wrote and nothing else). Then the folder is marked as mmcl's, and a best or final model a
    killed run left set aside is put back."""
    check_output_folder(folder, overwrite, "--train.overwrite_output_dir=true")
    earlier = ckpt.checkpoints(folder) if resume_dir is None and not overwrite else []
    if earlier:
        raise ConfigError(f"{folder} holds the checkpoints of an earlier run (up to {earlier[-1].name}): "
                          "continue it with --train.resume=latest, or start over with "
                          "--train.overwrite_output_dir=true (removes what that run wrote)")
    if overwrite and resume_dir is None:
        for name in RUN_OUTPUTS:
            path = folder / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    mark_folder(folder, "run")
    for name in (BEST_DIR, FINAL_DIR):
        restore_aside(folder / name)


def held_out_evals(ds: Any, data: DataConfig, t: TrainConfig,
                   acc: Accelerator) -> tuple[Any, dict[str, tuple[EvalSpec, Any]]]:
    """With no `data.validation`, 'val' is a seeded share of the training images (said in the log);
    returns the rows that train and {"val": (spec, held-out rows)}, or no 'val'."""
    if data.validation or data.validation_share <= 0:
        return ds, {}
    if data.streaming:
        acc.print("data: no 'val' evaluation: a stream has no length to hold a share out of; name held-out data "
                  "with data.validation")
        return ds, {}
    rows = len(ds)
    train_ds, held = hold_out(ds, data, t.seed)
    acc.print(f"data: no data.validation named: {len(held)} of {rows} rows of {data.train} (data.validation_share="
              f"{data.validation_share:g} of its images, seed {t.seed}) are held out as 'val'; {len(train_ds)} train")
    spec = EvalSpec(dataset=data.train, split=data.train_split, dataset_config=data.dataset_config,
                    image_column=data.image_column, caption_column=data.caption_column, task="retrieval",
                    image_id_column=data.image_column if shares_images(ds, data.image_column) else None,
                    every=t.eval_every, max_samples=data.max_validation_samples)
    if spec.max_samples:
        held = held.select(range(min(spec.max_samples, len(held))))
    return train_ds, {"val": (spec, held)}


def fit_batch_size(ds: Any, data: DataConfig, t: TrainConfig, acc: Accelerator) -> None:
    """A dataset smaller than one global batch trains with a batch that fits (said in the log), streamed
    or not; the fitted size is what the run's saved config holds."""
    wanted = t.per_device_batch_size * acc.num_processes
    rows = count_up_to(ds, wanted) if data.streaming else len(ds)
    t.per_device_batch_size, said = fit_batch(rows, t.per_device_batch_size, acc.num_processes, data.train)
    if said:
        acc.print(f"data: {said}")


def resolve_run_auto(config: Config, resume_dir: Path | None) -> list[str]:
    """`auto` settings: a resumed run keeps the choices it was started with; a new run takes this
    device's (`mmcl.training.auto`). Returns what was chosen, to be printed."""
    saved = flatten((ckpt.read_state(resume_dir).get("config") or {}) if resume_dir else {})
    said = []
    for section, key in (("train", "mixed_precision"), ("model", "attn_implementation"), ("train", "optim")):
        cfg = getattr(config, section)
        if getattr(cfg, key) == "auto" and saved.get(f"{section}.{key}", "auto") != "auto":
            setattr(cfg, key, saved[f"{section}.{key}"])
            said.append(f"{section}.{key}={saved[f'{section}.{key}']} (as the run was started)")
    return said + resolve_auto(config.model, config.train, detect_device(), sharded_launch())


def build_processors(cfg: ModelConfig, captions: Iterator[str], folder: Path, resuming: bool,
                     accelerator: Accelerator, cache_dir: str | None = None) -> tuple[Any, Any]:
    """Tokenizer and image processor, saved to `folder` (the run's `processor/`) by the main process;
    the other processes, and a resumed run, load what it saved (a tokenizer trained on the captions
    is the same anywhere, but training it once is enough)."""
    with accelerator.main_process_first():
        if (resuming or not accelerator.is_main_process) and (folder / "tokenizer_config.json").is_file():
            return load_processors(folder, cfg.trust_remote_code)
        tokenizer, image_processor = build_tokenizer(cfg, captions, cache_dir), build_image_processor(cfg)
        if accelerator.is_main_process:
            tokenizer.save_pretrained(folder)
            image_processor.save_pretrained(folder)
    return tokenizer, image_processor


def build_cluster_labels(ds: Any, config: Config, accelerator: Accelerator) -> torch.Tensor:
    """`data.batch_sampler: cluster`: each row's k-means cluster of `data.cluster_model`'s image embeddings."""
    from ..data.clusters import cluster_labels

    data = config.data
    bundle = load_encoder(data.cluster_model).to(accelerator.device)
    return cluster_labels(ds, data.image_column, bundle, accelerator, data.num_clusters, config.train.seed,
                          num_workers=data.num_workers)


def check_one_batch(batches: TrainBatches, rows: int, name: str, t: TrainConfig, acc: Accelerator) -> None:
    if batches.steps_per_epoch == 0:
        raise ConfigError(f"{name}: {rows} rows is less than one global batch ({t.per_device_batch_size} x "
                          f"{acc.num_processes} processes); lower train.per_device_batch_size")


def check_sharding(model: ModelConfig, loss: LossConfig, acc: Accelerator) -> None:
    """The options that are not sharding-safe yet, refused before anything is prepared."""
    if not is_sharded(acc):
        return
    if model.lora:
        raise ConfigError("model.lora is not supported with sharded parameters (FSDP / DeepSpeed) yet: its adapters "
                          "are merged from whole weights; use a DDP launch config")
    if getattr(acc, "is_fsdp2", False):
        return  # GradCache, the momentum queue, BYOL and SwAV run sharded (tests/scale/test_scale_out.py)
    for key, on in (("loss.cache_chunk", loss.cache_chunk), ("loss.momentum", loss.queue_size and loss.momentum),
                    ("loss.byol_weight", loss.byol_weight), ("loss.swav_weight", loss.swav_weight)):
        if on:
            raise ConfigError(f"{key} is not supported with DeepSpeed or FSDP version 1 (it runs parameters outside "
                              "the sharded forward, or copies them): use an FSDP2 or DDP launch config")


def saved_tensors(model: torch.nn.Module) -> Callable[[str], bool]:
    """Which of the model's tensors a checkpoint writes: the parameters that train, and the buffers."""
    names = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return names.__contains__


def geometry(t: TrainConfig, streaming: bool, acc: Accelerator) -> dict[str, Any]:
    """What decides which examples a step reads: a resume must keep it."""
    return {"num_processes": acc.num_processes, "per_device_batch_size": t.per_device_batch_size,
            "gradient_accumulation_steps": t.gradient_accumulation_steps, "streaming": streaming}


def resume(run: Run, folder: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load the checkpoint in `folder` into the run, after checking that it belongs to this run
    (the same geometry, settings and frozen weights); returns its saved state."""
    saved = ckpt.read_state(folder)  # checked before anything is loaded or set aside
    check_geometry(saved.get("geometry"), run.geometry, folder)
    ckpt.check_config(saved.get("config"), flatten(run.config), folder)
    if run.frozen:
        ckpt.check_frozen(folder, model, saved.get("frozen_sha256"), run.frozen)
    if saved.get("processors_sha256") not in (None, run.processors):
        raise ConfigError(f"train.resume: the tokenizer or image processor in {run.output_dir / PROCESSOR_DIR} is "
                          f"not the one {folder} was trained with (another run wrote its own there?): put that run's "
                          "processor folder back, or start a new run in another train.output_dir")
    return ckpt.load(run.accelerator, run.training, folder, run.skipped, run.batches.stream)


def check_geometry(saved: dict[str, Any] | None, now: dict[str, Any], folder: Path) -> None:
    if saved is not None and saved != now:
        changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        raise ConfigError(f"train.resume: {folder} was saved with {', '.join(f'{k}={a}' for k, (a, _) in changed.items())}; "
                          f"now {', '.join(f'{k}={b}' for k, (_, b) in changed.items())}. Resuming would read other "
                          "examples than the interrupted run: keep them equal, or start a new run")
