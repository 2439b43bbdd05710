"""`mmcl train [CONFIG.yaml] [--section.key=value ...]`: train, then export (and push) the result."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any


def config_help() -> str:
    """Every config key with its type, default and help text, for `mmcl train --help`."""
    from ..config import Config, describe

    lines = ["config keys (in the YAML file, or overridden as --section.key=value):"]
    for key, kind, help_text in describe(Config):
        lines.append(f"  {key}  ({kind})")
        lines += textwrap.wrap(help_text, 92, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from ..config import load_config

    config = load_config(args.config, overrides)
    from accelerate import PartialState

    from ..train import train

    metrics = train(config)
    if PartialState().is_main_process:
        from ..publish import publish_run

        publish_run(config.train.output_dir, config.hub, metrics)
        print({k: round(v, 4) for k, v in metrics.items() if "R@" in k or "top" in k or k.endswith("wall_s")})
    return 0


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "train", help="train a dual encoder", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="mmcl train [CONFIG.yaml] [--section.key=value ...]; with no config, configs/quickstart.yaml "
                    "(built-in emoji data). Exports the final model to <output_dir>/export when hub.export.",
        epilog=config_help())
    parser.add_argument("config", nargs="?", default=None, help="YAML config (default: the quickstart)")
    parser.set_defaults(func=run, parser=parser, takes_overrides=True)
