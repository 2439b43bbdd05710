"""The `mmcl` command: one module per command group, and the only place argparse lives.

Heavy libraries are imported inside the commands, so `mmcl --help` answers at once. Every error a
user can cause (a wrong flag, file, key, column or model folder) ends the command with one line,
`mmcl <command>: error: ...`, and exit status 2; a traceback means a bug in mmcl.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import NoReturn

from ..config import ConfigError, StopError
from . import apps, data, evaluate, publish, train

COMMAND_GROUPS = (train, evaluate, data, apps, publish)
# What a user's mistake raises: mmcl's ConfigError (a ValueError), and the OS's word for a path.
USER_ERRORS = (ConfigError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): `mmcl predict: error: ... (see --help)`."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


OVERRIDE = re.compile(r"--\w+(\.\w+)+=")  # --section.key=value


def build_parser() -> Parser:
    from .. import __version__

    parser = Parser(prog="mmcl", description="Train, evaluate and publish CLIP-style image–text models.")
    parser.add_argument("--version", action="version", version=f"mmcl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not sys.stderr.isatty():  # a log gets mmcl's progress lines, not the libraries' carriage-return frames
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    overrides = [a for a in argv if OVERRIDE.match(a)]  # argparse would take one with a space for the config
    args, extra = build_parser().parse_known_args([a for a in argv if not OVERRIDE.match(a)])
    extra += overrides
    if extra and not getattr(args, "takes_overrides", False):
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "trust_backbone", False):
            from ..towers.backbones import trust_backbone

            trust_backbone()
        return args.func(args, extra)
    except USER_ERRORS as err:
        message = " ".join(str(err).split()) or type(err).__name__  # one line
        print(f"{args.parser.prog}: error: {message}", file=sys.stderr)
        return 2
    except StopError as err:  # a lost process, non-finite steps, a full disk, forgetting, a stop signal
        print(f"{args.parser.prog}: error: {err}", file=sys.stderr, flush=True)
        return getattr(err, "exit_status", 1)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which checkpoints and stops on its own)
        print(f"{args.parser.prog}: interrupted", file=sys.stderr, flush=True)
        return 130


def run() -> NoReturn:
    """The `mmcl` executable and `python -m mmcl.cli`: `main`, then exit.

    A process of a multi-process job leaves with `os._exit` once its outputs are written and the
    process group is destroyed: torch's gloo objects still held at interpreter shutdown (FSDP2's
    device mesh keeps its groups) were destroyed with their threads running, and a finished job
    ended in `terminate called without an active exception` (SIGABRT; seen in a CI run) after its
    model and metrics were saved."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
