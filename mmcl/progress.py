"""Progress on the console: a bar on a terminal, whole lines in a log (a file, a pipe, CI), each with
its rate. Used by every stage that does long work (reading data, embedding, training)."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm
from tqdm.std import tqdm as text_tqdm

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
