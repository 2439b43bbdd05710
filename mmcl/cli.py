"""The `mmcl` command. Heavy libraries are imported inside the subcommands, so `mmcl --help`
answers at once."""

from __future__ import annotations

import argparse
import sys


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from .config import load_config

    config = load_config(args.config, overrides)
    from .train import train

    metrics = train(config)
    shown = {k: round(v, 4) for k, v in metrics.items() if "R@" in k or k.endswith("wall_s")}
    print(shown)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmcl", description="Train and evaluate CLIP-style image–text models.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a dual encoder",
                           description="mmcl train [CONFIG.yaml] [--section.key=value ...]; "
                                       "with no config, configs/quickstart.yaml (built-in emoji data).")
    train.add_argument("config", nargs="?", default=None, help="YAML config (default: the quickstart)")
    train.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = build_parser().parse_known_args(argv)
    from .config import ConfigError

    try:
        return args.func(args, overrides)
    except ConfigError as err:
        print(f"mmcl: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
