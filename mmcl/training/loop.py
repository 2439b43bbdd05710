"""The training loop: one loop, through Accelerate, for one CPU or many GPUs.

prepare -> accumulate -> forward -> loss -> backward -> clip_grad_norm_ -> step ->
clamp temperature -> schedule -> log / evaluate / checkpoint. The rules of training dynamics
(weight decay groups, temperature clamp, freezing) are here, in `mmcl.towers.model` and in `mmcl.towers.build`,
nowhere else. Publishing the result (export, model card, Hub) is `mmcl.publish`'s job, after this.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, send_to_device, set_seed

from . import checkpoint as ckpt
from ..artifacts import BEST_DIR, FINAL_DIR, LOG_NAME, LOGS_DIR, METRICS_NAME, RunLock, scrub_secrets, write_json
from ..towers.build import build_model, fit_text_config
from ..config import Config, ConfigError, EvalSpec, StopError
from ..data.pairs import SkipCounter
from ..evaluation.evaluators import run_eval, scalars
from ..evaluation.retention import Retention, RetentionError
from ..towers.inference import EncoderBundle
from .launch import (build_accelerator, check_lost_process, claim_output_dir, full_value, is_sharded,
                     peak_memory_mb, release_reducer, whole)
from ..towers.lora import merged_weights, parameter_counts
from ..losses import build_objective, image_ssl_dim, init_logit_bias
from ..towers.model import DualEncoder
from .optimization import build_optimizer, build_scheduler
from .tracking import build_trackers, flatten, progress_bar
from .train_data import (build_processors, build_stream, build_train_loader, load_eval_datasets,
                         load_train_dataset)


class NonFiniteError(StopError):
    """`train.max_bad_steps` optimizer steps in a row had a non-finite loss or gradient norm."""


def training_step(accelerator: Accelerator, model: torch.nn.Module, loss_fn: torch.nn.Module,
                  optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                  max_grad_norm: float | None) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
    """One micro-batch; returns its loss, whether this was an optimizer step (the last
    micro-batch of an accumulation), and the gradient norm (None where the backend gives none).

    A non-finite gradient norm (a NaN or Inf loss gives one) skips the update: the norm is of the
    gradients averaged over every process, so every process skips the same step. Under fp16 the
    gradient scaler's own step runs instead: it skips the update and lowers the scale."""
    grad_norm, synced = None, False
    with accelerator.accumulate(model):
        loss = loss_fn(model, batch)  # the objective runs the prepared model: DDP's hooks live in its forward
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            synced = True
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
        if not synced or finite(grad_norm) or accelerator.scaler is not None:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), synced, grad_norm


def finite(value: torch.Tensor | float | None) -> bool:
    """None (DeepSpeed steps and clips in its engine) counts as finite."""
    return value is None or math.isfinite(float(value))


class Trainer:
    """Holds what the loop needs; `train()` below is the entry point."""

    def __init__(self, config: Config, lock: RunLock) -> None:
        self.config, tcfg = config, config.train
        self.output_dir = Path(tcfg.output_dir)
        self.accelerator = acc = build_accelerator(tcfg, build_trackers(tcfg.report_to, self.output_dir))
        claim_output_dir(lock, acc)
        check_sharding(config, acc)
        set_seed(tcfg.seed)
        self.train_ds = load_train_dataset(config, acc)
        self.evals = load_eval_datasets(config, acc)
        self.best: float | None = None
        self.retention = Retention(config.eval.retention, config.eval.stop_if_retention_below, self.evals)
        resume_dir = ckpt.resolve_resume(tcfg.resume, self.output_dir)
        self.tokenizer, self.image_processor = build_processors(
            config, self.train_ds, self.output_dir, resume_dir is not None, acc)
        fit_text_config(config.model, self.tokenizer)
        set_seed(tcfg.seed)  # the same initial weights whatever happened before
        model = build_model(config.model, init_logit_bias(config.loss), image_ssl_dim(config.loss))
        optimizer = build_optimizer(model, tcfg)
        self.scheduler = build_scheduler(optimizer, tcfg)
        self.stream = self.loader = None
        if config.data.streaming:  # each process reads its own part: not through accelerate
            self.stream = build_stream(config, self.train_ds, self.tokenizer, self.image_processor, acc)
            self.model, self.optimizer = acc.prepare(model, optimizer)
        else:
            loader = build_train_loader(config, self.train_ds, self.tokenizer, self.image_processor, acc)
            self.model, self.optimizer, self.loader = acc.prepare(model, optimizer, loader)
            self.steps_per_epoch = math.ceil(len(self.loader) / tcfg.gradient_accumulation_steps)
            if self.steps_per_epoch == 0:
                raise ConfigError(f"{config.data.train}: {len(self.train_ds)} rows is less than one global batch "
                                  f"({tcfg.per_device_batch_size} x {acc.num_processes} processes); lower "
                                  "train.per_device_batch_size")
        acc.register_for_checkpointing(self.scheduler)
        self.frozen = None if is_sharded(acc) else ckpt.frozen_fingerprint(model)
        if self.frozen:  # checkpoints hold what trains; a resume rebuilds the rest
            acc.register_save_state_pre_hook(ckpt.drop_frozen)
        self.loss_fn = build_objective(config.loss, self.model, acc)
        if self.loss_fn.has_state():  # a queue and its momentum copy: checkpointed with the rest
            acc.register_for_checkpointing(self.loss_fn)
        self.skipped = SkipCounter()
        self.step = self.bad_steps = self.bad_in_a_row = self.overflow_steps = 0
        self.rows: list[int] = []  # the rows of the optimizer step being taken (named if it goes bad)
        if resume_dir is not None:
            saved = ckpt.read_state(resume_dir)  # checked before anything is loaded or set aside
            check_geometry(saved.get("geometry"), self.geometry(), resume_dir)
            ckpt.check_config(saved.get("config"), self.flat_config(), resume_dir)
            if self.frozen:
                ckpt.check_frozen(resume_dir, self.unwrapped, saved.get("frozen_sha256"), self.frozen)
            state = ckpt.load(acc, resume_dir, self.skipped, self.stream, whole_model=self.frozen is None)
            self.step, self.best = int(state["step"]), state.get("best")
            self.retention.base = state.get("retention_base")
            self.bad_steps, self.overflow_steps = int(state.get("bad_steps", 0)), int(state.get("overflow_steps", 0))
        elif acc.is_main_process:  # a fresh run starts a fresh log (a resumed one appends)
            (self.output_dir / LOGS_DIR / LOG_NAME).unlink(missing_ok=True)

    def geometry(self) -> dict[str, Any]:
        """What decides which examples a step reads: a resume must keep it."""
        t, acc = self.config.train, self.accelerator
        return {"num_processes": acc.num_processes, "per_device_batch_size": t.per_device_batch_size,
                "gradient_accumulation_steps": t.gradient_accumulation_steps, "streaming": self.config.data.streaming}

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps besides Accelerate's state."""
        return {"best": self.best, "geometry": self.geometry(), "bad_steps": self.bad_steps,
                "overflow_steps": self.overflow_steps, "retention_base": self.retention.base,
                "config": self.flat_config(), "frozen_sha256": self.frozen}

    def checkpoint(self) -> Path:
        """The training state at this step (`mmcl.training.checkpoint.save`; frozen weights left out)."""
        return ckpt.save(self.accelerator, self.output_dir, self.step, self.config.train.keep_last, self.skipped,
                         self.stream, self.state(), self.state_bytes)

    def state_bytes(self) -> int:
        """About what a checkpoint takes: the trained weights and their two AdamW moments (and the
        frozen weights, when checkpoints keep them)."""
        params = list(self.unwrapped.parameters())
        return sum(p.numel() * p.element_size() * (3 if p.requires_grad else int(not self.frozen)) for p in params)

    def flat_config(self) -> dict[str, Any]:
        return flatten(scrub_secrets(self.config.to_dict()))

    @property
    def unwrapped(self) -> DualEncoder:
        return self.accelerator.unwrap_model(self.model)

    def bundle(self) -> EncoderBundle:
        """The prepared model (DDP's wrapper included) with its inputs' makers, for evaluation."""
        model = self.config.model
        return EncoderBundle(self.model, self.tokenizer, self.image_processor, model.text_padding,
                             model.max_text_length)

    def training_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
        self.skipped.add(batch.pop("skipped"))
        self.rows.extend(batch.pop("rows"))
        return training_step(self.accelerator, self.model, self.loss_fn, self.optimizer, batch,
                             self.config.train.max_grad_norm)

    def batches(self) -> Any:
        """Batches from the current step on, epoch after epoch (resume skips what was consumed)."""
        if self.stream is not None:
            for batch in self.stream:
                yield send_to_device(batch, self.accelerator.device)
            return
        accum = self.config.train.gradient_accumulation_steps
        read = self.step + self.bad_steps + self.overflow_steps  # a skipped update read its batch too
        epoch, done = divmod(read, self.steps_per_epoch)
        while True:
            self.loader.set_epoch(epoch)
            self.loader.dataset.set_epoch(epoch)
            if done:
                yield from self.resumed_epoch(done * accum)
            else:
                yield from self.loader
            epoch, done = epoch + 1, 0

    def resumed_epoch(self, consumed: int) -> Any:
        """The rest of an epoch a checkpoint was taken in. Starting a DataLoader's iterator draws its
        base seed from torch's global RNG, which the uninterrupted run drew at the epoch's start, long
        before: that draw is undone, so dropout masks go on from the RNG state the checkpoint restored."""
        batches = iter(self.accelerator.skip_first_batches(self.loader, consumed))
        with torch.random.fork_rng(devices=[]):
            first = next(batches, None)
        if first is not None:
            yield first
            yield from batches

    def evaluate(self, final: bool = False, only: set[str] | None = None) -> dict[str, float]:
        """The evaluations due at this step (all of them when `final`; the sets `only` names when
        given), logged as `<name>/<metric>`, with `retention/<name>/<metric>` for `eval.retention`."""
        metrics: dict[str, float] = {}
        for name, (spec, ds) in self.evals.items():
            due = name in only if only is not None else final or (spec.every and self.step % spec.every == 0)
            if not due:
                continue
            results = run_eval(self.bundle(), ds, spec, self.accelerator, self.config.eval)
            metrics.update(scalars(name, results))
            self.draw_confusion(spec, results)
        if metrics:
            retained = self.retention.ratios(metrics)
            self.accelerator.log({**metrics, **retained}, step=self.step)
            self.accelerator.print(" ".join(f"{k}={v:.4g}" for k, v in {**metrics, **retained}.items()
                                            if "R@" in k or "top" in k or "recall" in k or k in retained))
            self.keep_best(metrics)
            if not final:
                self.stop_if_forgetting(retained)
        return metrics

    def measure_retention_base(self) -> None:
        """Before the first step of a fine-tuning run: what the model knows that it must keep."""
        sets = self.retention.due()
        if sets is None:
            return
        metrics = self.evaluate(only=sets)
        self.retention.set_base(metrics)
        self.accelerator.log(self.retention.ratios(metrics), step=self.step)  # 1.0 (where the value is not 0)
        self.accelerator.print("retention: step-0 values " + ", ".join(f"{k}={v:.4g}" for k, v in
                                                                        self.retention.base.items()))

    def stop_if_forgetting(self, ratios: dict[str, float]) -> None:
        said = self.retention.fallen(ratios)
        if not said:
            return
        folder = self.checkpoint()
        raise RetentionError(f"step {self.step}: {said}, below eval.stop_if_retention_below={self.retention.limit}; "
                             f"the model of this step is checkpointed in {folder}. Lower train.learning_rate, lock "
                             "more layers, or mix the models with mmcl wise-ft")

    def draw_confusion(self, spec: EvalSpec, results: dict[str, Any]) -> None:
        if spec.confusion_matrix and "confusion" in results and self.accelerator.is_main_process:
            from ..evaluation.plots import save_confusion_png

            save_confusion_png(results["confusion"], list(results["per_class_accuracy"]), spec.confusion_matrix)

    def keep_best(self, metrics: dict[str, float]) -> None:
        """Save the model to <output_dir>/best when `eval.best_metric` improves."""
        key, mode = self.config.eval.best_metric, self.config.eval.best_mode
        if not key or key not in metrics:
            return
        value = metrics[key]
        if self.best is not None and (value <= self.best if mode == "max" else value >= self.best):
            return
        self.best = value
        self.save_model(self.output_dir / BEST_DIR, info={"step": self.step, "metric": key, "value": value})

    def save_model(self, folder: Path, info: dict[str, Any] | None = None) -> None:
        """The model folder (final, best), written by the main process. Every process calls this:
        under FSDP / ZeRO-3 `get_state_dict` gathers the shards into a full state dict on the main one.
        LoRA adapters are merged into the saved weights: the folder is a plain model."""
        acc = self.accelerator
        state = acc.get_state_dict(self.model) if is_sharded(acc) else None
        if acc.is_main_process:
            state = state if state is not None else merged_weights(self.unwrapped)
            ckpt.save_final(self.unwrapped, self.tokenizer, self.image_processor, self.config, folder, info, state)
        acc.wait_for_everyone()

    def run(self) -> dict[str, float]:
        tcfg, acc = self.config.train, self.accelerator
        acc.init_trackers("mmcl", config=self.flat_config())
        self.params = trainable, total = parameter_counts(self.unwrapped)  # (which parameters train never changes)
        acc.print(f"parameters: {trainable:,} of {total:,} train ({trainable / max(total, 1):.2%})")
        self.measure_retention_base()
        bar = progress_bar(tcfg, acc, initial=self.step)
        window_loss, window_start, window_steps = torch.zeros((), device=acc.device), time.perf_counter(), 0
        step_loss = torch.zeros((), device=acc.device)
        start = time.perf_counter()
        batches = self.batches()
        while self.step < tcfg.max_steps:
            loss, synced, grad_norm = self.training_step(next(batches))
            step_loss += loss.float() / tcfg.gradient_accumulation_steps  # no .item(): no device sync
            if not synced:
                continue
            step_total, step_loss = step_loss, torch.zeros((), device=acc.device)
            rows, self.rows = self.rows, []
            if not finite(grad_norm):
                if self.scaler_overflow(step_total):
                    self.overflow_steps += 1
                else:
                    self.skip_update(step_total, grad_norm, rows)
                continue
            window_loss += step_total
            self.bad_in_a_row = 0
            with whole([self.unwrapped.logit_scale], modify=True):
                self.unwrapped.clamp_logit_scale()
            self.scheduler.step()
            self.step += 1
            window_steps += 1
            bar.update(1)
            if self.step % tcfg.log_every == 0 or self.step == tcfg.max_steps:
                elapsed = time.perf_counter() - window_start
                logs = self.health(window_loss / window_steps, grad_norm, window_steps, elapsed)
                bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in logs.items()})
                acc.log(logs, step=self.step)
                window_loss, window_steps = torch.zeros((), device=acc.device), 0
                window_start = time.perf_counter()
            if self.step < tcfg.max_steps:
                self.evaluate()
            if tcfg.checkpoint_every and self.step % tcfg.checkpoint_every == 0:
                self.checkpoint()
            if self.step % tcfg.log_every == 0:  # evaluation and checkpoint time is not training time
                window_start = time.perf_counter()
        bar.close()
        return self.finish(time.perf_counter() - start)

    def scaler_overflow(self, loss: torch.Tensor) -> bool:
        """fp16: a finite loss with an infinite gradient is the gradient scaler's overflow. The scaler
        skipped the update and lowered its scale, as it should early in training: not a bad step."""
        acc = self.accelerator
        return acc.scaler is not None and math.isfinite(acc.reduce(loss.detach().clone(), reduction="mean").item())

    def skip_update(self, loss: torch.Tensor, grad_norm: Any, rows: list[int]) -> None:
        """The optimizer step just taken had a non-finite gradient norm and was skipped (see
        `training_step`): no scheduler step either. Say which rows it read; after
        `train.max_bad_steps` in a row, checkpoint the last good state and stop."""
        acc, tcfg = self.accelerator, self.config.train
        self.bad_steps, self.bad_in_a_row = self.bad_steps + 1, self.bad_in_a_row + 1
        rows = sorted(row for part in gather_object([rows]) for row in part)
        loss = acc.reduce(loss.detach().clone(), reduction="mean").item()
        shown = ", ".join(map(str, rows[:32])) + (f", ... ({len(rows)} rows)" if len(rows) > 32 else "")
        acc.print(f"step {self.step + 1}: non-finite loss {loss:.4g} / gradient norm {float(grad_norm):.4g}; update "
                  f"skipped (bad batch {self.bad_in_a_row} in a row, {self.bad_steps} in all); rows {shown}")
        acc.log({"train/bad_steps": float(self.bad_steps)}, step=self.step)
        if self.bad_in_a_row < tcfg.max_bad_steps:
            return
        folder = self.checkpoint()
        raise NonFiniteError(f"{self.bad_in_a_row} optimizer steps in a row had a non-finite loss or gradient norm "
                             f"(train.max_bad_steps={tcfg.max_bad_steps}); saved the last good state (step {self.step}) "
                             f"to {folder}. Look at the rows above; --train.resume=latest continues after these "
                             "batches with the same settings (a lower train.learning_rate is a new run, in another "
                             "train.output_dir)")

    def health(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, steps: int, elapsed: float) -> dict[str, float]:
        """Cheap signals logged every `log_every` steps, averaged over processes where it matters."""
        acc, tcfg = self.accelerator, self.config.train
        loss = acc.reduce(loss.detach().clone(), reduction="mean").item()
        samples = steps * tcfg.per_device_batch_size * tcfg.gradient_accumulation_steps * acc.num_processes
        return {"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0],
                "train/temperature": math.exp(-full_value(self.unwrapped.logit_scale)),
                "train/grad_norm": float("nan") if grad_norm is None else float(grad_norm),
                "train/samples_per_s": samples / max(elapsed, 1e-9)}

    def finish(self, wall_s: float) -> dict[str, float]:
        acc = self.accelerator
        if self.stream is not None:
            self.stream.close()
        metrics = self.evaluate(final=True)
        skipped = ckpt.gather_skipped(self.skipped)
        trainable, total = self.params
        metrics.update({"train/steps": float(self.step), "train/wall_s": wall_s, "train/bad_steps": float(self.bad_steps),
                        "train/skipped_images": float(len(skipped.rows)), "train/trainable_params": float(trainable),
                        "train/params": float(total), "train/peak_memory_mb": peak_memory_mb(acc.device)})
        if skipped.rows:
            acc.print(skipped.summary())
        final = self.output_dir / FINAL_DIR
        self.save_model(final)
        if acc.is_main_process:
            write_json(self.output_dir / METRICS_NAME, metrics)
            acc.print(f"saved the model to {final} and metrics to {self.output_dir / METRICS_NAME}")
        acc.wait_for_everyone()  # every rank's last collective is done before the group goes
        release_reducer(self.model)
        acc.end_training()
        return metrics


def check_geometry(saved: dict[str, Any] | None, now: dict[str, Any], folder: Path) -> None:
    if saved is not None and saved != now:
        changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        raise ConfigError(f"train.resume: {folder} was saved with {', '.join(f'{k}={a}' for k, (a, _) in changed.items())}; "
                          f"now {', '.join(f'{k}={b}' for k, (_, b) in changed.items())}. Resuming would read other "
                          "examples than the interrupted run: keep them equal, or start a new run")


def check_sharding(config: Config, acc: Accelerator) -> None:
    """The options that are not sharding-safe yet, refused before anything is prepared."""
    if not is_sharded(acc):
        return
    if config.model.lora:
        raise ConfigError("model.lora is not supported with sharded parameters (FSDP / DeepSpeed) yet: its adapters "
                          "are merged from whole weights; use a DDP launch config")
    loss = config.loss
    if loss.cache_chunk:
        raise ConfigError("loss.cache_chunk (GradCache) is not supported with sharded parameters (FSDP / DeepSpeed) "
                          "yet: use a DDP launch config, or set loss.cache_chunk=0")
    if loss.queue_size and loss.momentum:
        raise ConfigError("loss.momentum > 0 keeps a full EMA copy of the model, which is not sharded: with FSDP / "
                          "DeepSpeed set loss.momentum=0 (a queue of the model's own embeddings) or use DDP")


def train(config: Config) -> dict[str, float]:
    """Train the model `config` describes; returns the final metrics (also in metrics.json).
    `mmcl.publish.publish_run` then exports (and pushes) the final model, as `mmcl train` does.

    Another live run writing to the same `train.output_dir` is refused (`RunLock`). When another
    process of the job is lost (killed, out of memory, its node gone), this one raises a
    `mmcl.training.launch.LostProcessError` naming it, within seconds, instead of waiting on it."""
    lock = RunLock(config.train.output_dir)
    try:
        trainer = Trainer(config, lock)
        try:
            return trainer.run()
        except StopError:
            raise
        except RuntimeError as error:
            check_lost_process(trainer.accelerator, trainer.step, error)
            raise
    finally:
        lock.release()
