"""Where the health signals go: progress (a bar on a terminal, plain lines in a log), and an
Accelerate tracker (tensorboard when installed, else a JSON-lines file that needs nothing)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from tqdm.auto import tqdm
from tqdm.std import tqdm as text_tqdm

from ..artifacts import LOG_NAME, LOGS_DIR
from ..config import TrainConfig


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
        with open(self.path.with_name("config.json"), "w", encoding="utf-8") as f:
            json.dump(values, f, indent=2, default=str)

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")


def build_trackers(report_to: str, output_dir: Path) -> list[Any]:
    if report_to == "none":
        return []
    if report_to == "tensorboard" or (report_to == "auto" and importlib.util.find_spec("tensorboard")):
        return ["tensorboard"]
    return [JsonlTracker(output_dir)]


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"train.max_steps": 10, ...} with only str/int/float/bool/None values."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
    return flat


LINE_EVERY_S = 30.0  # a log file gets a progress line this often (and one at the end)


class LineProgress(text_tqdm):  # not tqdm.auto's: in a notebook that is the widget class
    """tqdm for output that is not a terminal (a log file, a pipe, CI): whole lines, every
    `mininterval` seconds, on `set_postfix` and at the end, instead of carriage-return frames."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.printed = -1
        super().__init__(*args, leave=False, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is None and self.n and self.n != self.printed:
            self.fp.write(f"{self}\n")
            self.fp.flush()
            self.printed = self.n
        return msg != ""  # msg="" is tqdm clearing the line as it closes: nothing to clear, no "\r" after

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        self.printed = -1  # new figures at the same count: print them
        super().set_postfix(*args, **kwargs)

    def close(self) -> None:
        if not self.disable and (self.printed != -1 or self.format_dict["elapsed"] >= self.delay):
            self.display()  # work shorter than `delay` leaves no line
        super().close()


def progress(iterable: Any = None, *, desc: str, unit: str, total: int | None = None, initial: int = 0,
             disable: bool = False, delay: float = 0.0) -> tqdm:
    """Progress with its rate, shown once the work has lasted `delay` seconds: a bar on a terminal;
    otherwise one compact line every 30 s, on each `set_postfix` and at the end."""
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, disable=disable, delay=delay,
                    dynamic_ncols=True)
    return LineProgress(iterable, desc=desc, unit=unit, total=total, initial=initial, disable=disable, delay=delay,
                        mininterval=LINE_EVERY_S, file=sys.stderr,
                        bar_format="{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")


def progress_bar(cfg: TrainConfig, accelerator: Accelerator, initial: int) -> tqdm:
    """The training loop's: a line per log window (its `set_postfix`) when the output is a log."""
    return progress(desc="train", unit="steps", total=cfg.max_steps, initial=initial,
                    disable=not (cfg.progress_bar and accelerator.is_local_main_process))
