"""The training loop: one loop, through Accelerate, for one CPU or many GPUs.

prepare -> accumulate -> forward -> loss -> backward -> clip_grad_norm_ -> step -> clamp temperature
-> schedule -> log / evaluate / checkpoint. `setup` (setup.py) builds what it runs; the rules of
training dynamics (weight decay groups, temperature clamp, freezing) are here, in
`mmcl.towers.model` and in `mmcl.towers.build`, nowhere else. Publishing the result (export, model
card, Hub) is `mmcl.publish`'s job, after this.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from ..artifacts import BEST_DIR, FINAL_DIR, METRICS_NAME, RunLock, write_json
from ..config import Config, EvalConfig, EvalSpec, StopError, TrainConfig
from ..evaluation.retention import RetentionError
from ..towers.lora import merged_weights, parameter_counts
from ..towers.model import DualEncoder
from . import checkpoint as ckpt
from .launch import check_lost_process, full_value, is_sharded, peak_memory_mb, release_reducer, whole
from .signals import StopRequests
from .throughput import Throughput
from .tracking import RunTotals, Window, flatten, progress_bar

if TYPE_CHECKING:  # the run's data and evaluation modules import `datasets`: loaded when a run starts
    from .setup import Run


DATA_WAIT_WARNING = 0.10  # a log window that waits longer than this share of its time for data is data-bound


class NonFiniteError(StopError):
    """`train.max_bad_steps` optimizer steps in a row had a non-finite loss or gradient norm."""


class Step(NamedTuple):
    """One micro-batch's outcome: its loss and named terms (detached), whether it ended an optimizer
    step (the last micro-batch of an accumulation), and the gradient norm (None where the backend
    gives none, or before the optimizer step)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    synced: bool
    grad_norm: torch.Tensor | None


def training_step(accelerator: Accelerator, model: torch.nn.Module, loss_fn: torch.nn.Module,
                  optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                  max_grad_norm: float | None) -> Step:
    """One micro-batch through `loss_fn` (the objective: `(model, batch) -> (loss, terms)`).

    A non-finite gradient norm (a NaN or Inf loss gives one) skips the update: the norm is of the
    gradients averaged over every process, so every process skips the same step. Under fp16 the
    gradient scaler's own step runs instead: it skips the update and lowers the scale."""
    grad_norm, synced = None, False
    with accelerator.accumulate(model):
        loss, terms = loss_fn(model, batch)  # the objective runs the prepared model: DDP's hooks live in its forward
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            synced = True
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
        if not synced or finite(grad_norm) or accelerator.scaler is not None:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return Step(loss.detach(), terms, synced, grad_norm)


def finite(value: torch.Tensor | float | None) -> bool:
    """None (DeepSpeed steps and clips in its engine) counts as finite."""
    return value is None or math.isfinite(float(value))


class Trainer:
    """The step policy of a run built by `setup`: how many steps, when to evaluate, keep the best
    model and checkpoint, what a non-finite step does, what is logged, and how the run finishes."""

    def __init__(self, run: Run, train: TrainConfig, eval: EvalConfig) -> None:
        self.run, self.cfg, self.eval_cfg = run, train, eval
        self.accelerator, self.output_dir = run.accelerator, run.output_dir
        self.model, self.optimizer, self.scheduler, self.loss_fn = run.model, run.optimizer, run.scheduler, run.objective
        state = run.resumed or {}
        self.step, self.best = int(state.get("step", 0)), state.get("best")
        self.bad_steps, self.overflow_steps = int(state.get("bad_steps", 0)), int(state.get("overflow_steps", 0))
        if run.resumed is not None:
            run.retention.base = state.get("retention_base")
        self.bad_in_a_row = 0
        self.logged: dict[str, float] = {}  # the last health line
        self.throughput = Throughput(self.accelerator.device, train.mixed_precision)
        self.totals = RunTotals()
        self.windows, self.warned_data = 0, False
        self.rows: list[int] = []  # the rows of the optimizer step being taken (named if it goes bad)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps besides Accelerate's state."""
        run = self.run
        return {"best": self.best, "geometry": run.geometry, "bad_steps": self.bad_steps,
                "overflow_steps": self.overflow_steps, "retention_base": run.retention.base,
                "config": flatten(run.config), "frozen_sha256": run.frozen, "processors_sha256": run.processors}

    def checkpoint(self) -> Path:
        """The training state at this step (`mmcl.training.checkpoint.save`; frozen weights left out)."""
        return ckpt.save(self.accelerator, self.run.training, self.output_dir, self.step, self.cfg.keep_last,
                         self.run.skipped, self.run.batches.stream, self.state(), self.state_bytes)

    def state_bytes(self) -> int:
        """About what a checkpoint takes: the trained weights and their two AdamW moments (and the
        frozen weights, when checkpoints keep them)."""
        params = list(self.unwrapped.parameters())
        return sum(p.numel() * p.element_size() * (3 if p.requires_grad else int(not self.run.frozen)) for p in params)

    @property
    def unwrapped(self) -> DualEncoder:
        return self.accelerator.unwrap_model(self.model)

    def training_step(self, batch: dict[str, Any]) -> Step:
        self.run.skipped.add(batch.pop("skipped"))
        self.rows.extend(batch.pop("rows"))
        return training_step(self.accelerator, self.model, self.loss_fn, self.optimizer, batch, self.cfg.max_grad_norm)

    def evaluate(self, final: bool = False, only: set[str] | None = None) -> dict[str, float]:
        """The evaluations due at this step (all of them when `final`; the sets `only` names when
        given), logged as `<name>/<metric>`, with `retention/<name>/<metric>` for `eval.retention`."""
        from ..evaluation.evaluators import run_eval, scalars

        metrics: dict[str, float] = {}
        for name, (spec, ds) in self.run.evals.items():
            due = name in only if only is not None else final or (spec.every and self.step % spec.every == 0)
            if not due:
                continue
            results = run_eval(self.run.bundle, ds, spec, self.accelerator, self.eval_cfg)
            metrics.update(scalars(name, results))
            self.draw_confusion(spec, results)
        if metrics:
            retained = self.run.retention.ratios(metrics)
            self.accelerator.log({**metrics, **retained}, step=self.step)
            self.accelerator.print(" ".join(f"{k}={v:.4g}" for k, v in {**metrics, **retained}.items()
                                            if "R@" in k or "top" in k or "recall" in k or k in retained))
            self.keep_best(metrics)
            if not final:
                self.stop_if_forgetting(retained)
        return metrics

    def measure_retention_base(self) -> None:
        """Before the first step of a fine-tuning run: what the model knows that it must keep."""
        retention = self.run.retention
        sets = retention.due()
        if sets is None:
            return
        metrics = self.evaluate(only=sets)
        retention.set_base(metrics)
        self.accelerator.log(retention.ratios(metrics), step=self.step)  # 1.0 (where the value is not 0)
        self.accelerator.print("retention: step-0 values " + ", ".join(f"{k}={v:.4g}" for k, v in
                                                                        retention.base.items()))

    def stop_if_forgetting(self, ratios: dict[str, float]) -> None:
        said = self.run.retention.fallen(ratios)
        if not said:
            return
        folder = self.checkpoint()
        raise RetentionError(f"step {self.step}: {said}, below eval.stop_if_retention_below={self.run.retention.limit}; "
                             f"the model of this step is checkpointed in {folder}. Lower train.learning_rate, lock "
                             "more layers, or mix the models with mmcl wise-ft")

    def draw_confusion(self, spec: EvalSpec, results: dict[str, Any]) -> None:
        if spec.confusion_matrix and "confusion" in results and self.accelerator.is_main_process:
            from ..evaluation.plots import save_confusion_png

            save_confusion_png(results["confusion"], list(results["per_class_accuracy"]), spec.confusion_matrix)

    def keep_best(self, metrics: dict[str, float]) -> None:
        """Save the model to <output_dir>/best when `eval.best_metric` improves."""
        key, mode = self.eval_cfg.best_metric, self.eval_cfg.best_mode
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
            bundle = self.run.bundle
            ckpt.save_final(self.unwrapped, bundle.tokenizer, bundle.image_processor, self.run.config, folder, info, state,
                            self.run.zero_shot)
        acc.wait_for_everyone()

    def train(self) -> dict[str, float]:
        tcfg, acc = self.cfg, self.accelerator
        acc.init_trackers("mmcl", config=flatten(self.run.config))
        self.params = trainable, total = parameter_counts(self.unwrapped)  # (which parameters train never changes)
        acc.print(f"parameters: {trainable:,} of {total:,} train ({trainable / max(total, 1):.2%})")
        self.measure_retention_base()
        bar = progress_bar(tcfg, acc, initial=self.step)
        start, window, step_values = time.perf_counter(), Window(), {}
        batches = self.run.batches.after(self.step + self.bad_steps + self.overflow_steps)  # a skipped update read its batch too
        with StopRequests(acc, tcfg.checkpoint_every_minutes) as stops:
            self.steps(batches, window, step_values, stops, bar)
        bar.close()
        return self.finish(time.perf_counter() - start)

    def steps(self, batches: Iterator[dict[str, Any]], window: Window, step_values: dict[str, Any],
              stops: StopRequests, bar: Any) -> None:
        """Optimizer steps until train.max_steps, or until a stop signal (after a checkpoint)."""
        tcfg, acc = self.cfg, self.accelerator
        while self.step < tcfg.max_steps:
            step = self.training_step(self.next_batch(batches, window))
            for name, value in {"loss": step.loss, **step.terms}.items():  # no .item(): no device sync
                step_values[name] = step_values.get(name, 0.0) + value.float() / tcfg.gradient_accumulation_steps
            if not step.synced:
                continue
            values, step_values = step_values, {}
            rows, self.rows = self.rows, []
            if not finite(step.grad_norm):
                if self.scaler_overflow(values["loss"]):
                    self.overflow_steps += 1
                else:
                    self.skip_update(values["loss"], step.grad_norm, rows)
                continue
            window.add(values)
            self.bad_in_a_row = 0
            with whole([self.unwrapped.logit_scale], modify=True):
                self.unwrapped.clamp_logit_scale()
            self.scheduler.step()
            self.step += 1
            bar.update(1)
            if self.step % tcfg.log_every == 0 or self.step == tcfg.max_steps:
                self.logged = self.health(window, step.grad_norm)
                bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in self.logged.items() if k != "train/tflops"})
                acc.log(self.logged, step=self.step)
                self.warn_if_data_bound(self.logged["train/data_wait"])
                window = Window()
            paused = time.perf_counter()
            if self.step < tcfg.max_steps:
                self.evaluate()
            signum, timed = stops.due()  # every process: the same answer
            if signum or timed or (tcfg.checkpoint_every and self.step % tcfg.checkpoint_every == 0):
                folder = self.checkpoint()
                stops.checkpointed()
                if signum:
                    raise stops.stop(self.step, folder)
            window.exclude(time.perf_counter() - paused)  # evaluation and checkpoint time is not training time

    def next_batch(self, batches: Iterator[dict[str, Any]], window: Window) -> dict[str, Any]:
        """The next batch, the time spent waiting for it counted in the window; on the first, the
        model's FLOPs per sample are counted (that time is not the window's)."""
        waited = time.perf_counter()
        batch = next(batches)
        window.wait(time.perf_counter() - waited)
        if not self.throughput.measured:
            counting = time.perf_counter()
            self.accelerator.print(self.throughput.measure(self.unwrapped, batch))
            window.exclude(time.perf_counter() - counting)
        return batch

    def warn_if_data_bound(self, share: float) -> None:
        """Once per run, after the first window (start-up is not the steady state)."""
        self.windows += 1
        if self.windows > 1 and share > DATA_WAIT_WARNING and not self.warned_data:
            self.warned_data = True
            self.accelerator.print(
                f"warning: {share:.0%} of the step time waited for data (data.num_workers="
                f"{self.run.batches.num_workers}): raise data.num_workers, or make decoding cheaper (images stored "
                "near the model's input size; JPEG decodes at reduced size when the processor shrinks it)")

    def scaler_overflow(self, loss: torch.Tensor) -> bool:
        """fp16: a finite loss with an infinite gradient is the gradient scaler's overflow. The scaler
        skipped the update and lowered its scale, as it should early in training: not a bad step."""
        acc = self.accelerator
        return acc.scaler is not None and math.isfinite(acc.reduce(loss.detach().clone(), reduction="mean").item())

    def skip_update(self, loss: torch.Tensor, grad_norm: Any, rows: list[int]) -> None:
        """The optimizer step just taken had a non-finite gradient norm and was skipped (see
        `training_step`): no scheduler step either. Say which rows it read; after
        `train.max_bad_steps` in a row, checkpoint the last good state and stop."""
        acc, tcfg = self.accelerator, self.cfg
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

    def health(self, window: Window, grad_norm: torch.Tensor | None) -> dict[str, float]:
        """Cheap signals logged every `log_every` steps: the loss and each of its terms (averaged over
        the window's steps and over processes), learning rate, temperature, gradient norm, samples/s."""
        acc, tcfg = self.accelerator, self.cfg
        means = window.means()
        seconds = max(window.seconds(), 1e-9)
        waited = torch.tensor(window.waited / seconds, device=acc.device)
        *averaged, wait = acc.reduce(torch.stack([*means.values(), waited]), reduction="mean").tolist()  # one collective
        samples = window.steps * tcfg.per_device_batch_size * tcfg.gradient_accumulation_steps
        self.totals.add(samples, seconds, window.waited)
        per_device = samples / seconds
        return {**{f"train/{name}": value for name, value in zip(means, averaged)},
                "train/lr": self.scheduler.get_last_lr()[0],
                "train/temperature": math.exp(-full_value(self.unwrapped.logit_scale)),
                "train/grad_norm": float("nan") if grad_norm is None else float(grad_norm),
                "train/samples_per_s": per_device * acc.num_processes, "train/data_wait": wait,
                **self.throughput.logs(per_device)}

    def finish(self, wall_s: float) -> dict[str, float]:
        acc = self.accelerator
        self.run.batches.close()
        metrics = self.evaluate(final=True)
        skipped = ckpt.gather_skipped(self.run.skipped)
        trainable, total = self.params
        metrics.update({k: v for k, v in self.logged.items() if k.startswith(("train/loss", "train/view_std"))})  # the last window's
        metrics.update(self.totals.summary(self.throughput))  # the whole run's MFU and data wait
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


def train(config: Config) -> dict[str, float]:
    """Train the model `config` describes; returns the final metrics (also in metrics.json).
    `mmcl.publish.publish_run` then exports (and pushes) the final model, as `mmcl train` does.

    Another live run writing to the same `train.output_dir` is refused (`RunLock`). When another
    process of the job is lost (killed, out of memory, its node gone), this one raises a
    `mmcl.training.launch.LostProcessError` naming it, within seconds, instead of waiting on it."""
    from .setup import setup

    lock = RunLock(config.train.output_dir)
    try:
        trainer = Trainer(setup(config, lock), config.train, config.eval)
        try:
            return trainer.train()
        except StopError:
            raise
        except RuntimeError as error:
            check_lost_process(trainer.accelerator, trainer.step, error)
            raise
    finally:
        lock.release()
