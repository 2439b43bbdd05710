"""Arguments several commands share."""

from __future__ import annotations

import argparse


def trust_backbone_argument(parser: argparse.ArgumentParser) -> None:
    """`--trust-backbone` for a command that loads a model folder (handled in `mmcl.cli.main`)."""
    parser.add_argument("--trust-backbone", action="store_true",
                        help="import the backbone code a model folder names (package.module:attribute in your "
                             "environment); without it only mmcl's built-in backbones load")
