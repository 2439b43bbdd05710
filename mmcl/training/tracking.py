"""Where the health signals go: the training progress bar, a JSON-lines log that is always written
(`mmcl plot` and a resume read it), and any of Accelerate's trackers (`train.report_to`)."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, MLflowTracker
from tqdm.auto import tqdm

from ..artifacts import LOG_NAME, LOGS_DIR
from ..config import ConfigError, TrainConfig
from ..progress import progress


class JsonlTracker(GeneralTracker):
    """Appends `{"step": ..., **values}` lines to `<output_dir>/logs/metrics.jsonl`."""

    name = "jsonl"
    requires_logging_directory = False

    def __init__(self, output_dir: Path) -> None:
        super().__init__()
        self.path = Path(output_dir) / LOGS_DIR / LOG_NAME

    @property
    def tracker(self) -> Path:
        return self.path

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_torn_line(self.path)  # a run killed while appending; the resumed run appends after it
        with open(self.path.with_name("config.json"), "w", encoding="utf-8") as f:
            json.dump(values, f, indent=2, default=str)

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")


class Window:
    """One log window of the training loop: each optimizer step's loss and terms summed as device
    tensors (no host sync per step), and the steps and seconds of training in it."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.start, self.paused, self.waited = 0, time.perf_counter(), 0.0, 0.0

    def wait(self, seconds: float) -> None:
        """Time the loop spent waiting for the next batch (part of the training time)."""
        self.waited += seconds

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.steps += 1

    def means(self) -> dict[str, torch.Tensor]:
        return {name: total / max(self.steps, 1) for name, total in self.sums.items()}

    def exclude(self, seconds: float) -> None:
        """Time spent on work that is not training (an evaluation, a checkpoint)."""
        self.paused += seconds

    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.paused


class RunTotals:
    """The whole run's training samples (this process's), seconds and data wait, for metrics.json."""

    def __init__(self) -> None:
        self.samples, self.seconds, self.waited = 0, 0.0, 0.0

    def add(self, samples: int, seconds: float, waited: float) -> None:
        self.samples, self.seconds, self.waited = self.samples + samples, self.seconds + seconds, self.waited + waited

    def summary(self, throughput: Any) -> dict[str, float]:
        per_device = self.samples / max(self.seconds, 1e-9)
        values = {"train/tflops": throughput.tflops(per_device), "train/mfu": throughput.mfu(per_device),
                  "train/data_wait": self.waited / max(self.seconds, 1e-9), "train/flops_per_sample": throughput.flops}
        return {k: float(v) for k, v in values.items() if v is not None and v == v}  # unknown (None, NaN): left out


def drop_torn_line(path: Path) -> None:
    """Cut an unfinished last line (a process killed inside an append) off a JSON-lines file."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, 2)
        if f.read(1) == b"\n":
            return
        data = f.seek(0) or f.read()
        f.truncate(data.rfind(b"\n") + 1)


OWN_NAMES = ("auto", "jsonl", "none")
PACKAGES = {"comet_ml": "comet-ml", "mlflow": "mlflow (or mlflow-skinny)"}  # where pip's name is not the tracker's


def tracker_names(report_to: str | list[str]) -> list[str]:
    """`train.report_to` as a list of names, each one mmcl or Accelerate knows (else a ConfigError)."""
    from accelerate.utils import LoggerType

    names = [n.strip() for n in (report_to.split(",") if isinstance(report_to, str) else report_to) if n.strip()]
    known = list(OWN_NAMES) + LoggerType.list()
    for name in names:
        if name not in known:
            raise ConfigError(f"train.report_to: '{name}' is not a tracker; choose from {', '.join(known)}")
    return names


def build_trackers(report_to: str | list[str], output_dir: Path) -> list[Any]:
    """The JSON-lines log, and the trackers `report_to` names (Accelerate's, by name; wandb and mlflow
    as instances that keep their files in the run's logs/ and, for mlflow, its metric-name rules).
    A named tracker that is not installed is an error, not a silent drop."""
    from accelerate.tracking import get_available_trackers

    trackers: list[Any] = [JsonlTracker(output_dir)]
    available = {str(t) for t in get_available_trackers()}
    for name in dict.fromkeys(tracker_names(report_to)):
        if name == "auto":
            trackers += ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
        elif name == "all":
            trackers.append("all")
        elif name not in OWN_NAMES and name not in available:
            raise ConfigError(f"train.report_to: {name} is not installed here: pip install {PACKAGES.get(name, name)}")
        elif name == "wandb":
            from accelerate.tracking import WandBTracker

            trackers.append(WandBTracker("mmcl", dir=str(Path(output_dir) / LOGS_DIR), name=Path(output_dir).name))
        elif name == "mlflow":
            trackers.append(MlflowTracker("mmcl", run_name=Path(output_dir).name))
        elif name not in OWN_NAMES:
            trackers.append(name)
    return list(dict.fromkeys(trackers))


class MlflowTracker(MLflowTracker):
    """Accelerate's MLflow tracker, with metric names MLflow accepts: it refuses '@', so R@k is logged
    as R_at_k (every other name as in the JSON-lines log). Where runs go is MLflow's own setting
    (MLFLOW_TRACKING_URI)."""

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        super().log({k.replace("@", "_at_"): v for k, v in values.items()}, step=step, **kwargs)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"train.max_steps": 10, ...} with only str/int/float/bool/None values."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
    return flat


def progress_bar(cfg: TrainConfig, accelerator: Accelerator, initial: int) -> tqdm:
    """The training loop's: a line per log window (its `set_postfix`) when the output is a log."""
    return progress(desc="train", unit="steps", total=cfg.max_steps, initial=initial,
                    disable=not (cfg.progress_bar and accelerator.is_local_main_process))
