"""`mmcl train [CONFIG.yaml] [--section.key=value ...]`: train, then export (and push) the result."""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
import types
import typing
from typing import Any, Literal


def config_help() -> str:
    """Every config key with its type, default and help text, for `mmcl train --help`."""
    from ..config import Config

    lines = ["config keys, by section (in the YAML file, or on the command line as --section.key=value; "
             "docs/configuration.md has them all):"]
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        lines += ["", f"{section.name}: {summary}" if summary else f"{section.name}:"]
        for key, kind, help_text in describe(cls, f"{section.name}."):
            lines.append(f"  --{key}  ({kind})")
            lines += textwrap.wrap(help_text, 92, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def config_markdown() -> str:
    """docs/configuration.md: every config key by section, with its type, default and meaning
    (written by scripts/config_docs.py; tests/test_docs.py checks it is current)."""
    from ..config import Config, EvalSpec, LoraSpec

    lines = ["# Configuration", "", "Every key of a config file (`configs/*.yaml`), generated from the typed dataclasses "
             "in `mmcl/config.py` by `python scripts/config_docs.py`. On the command line any key is "
             "`--section.key=value`; `mmcl train --help` prints the same list.", ""]
    sections = [(f.name, f.type) for f in dataclasses.fields(Config)]
    hints = typing.get_type_hints(Config)
    named = [("model.lora.<tower>", LoraSpec), ("eval.sets.<name>", EvalSpec)]
    for title, cls in [(name, hints[name]) for name, _ in sections] + named:
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        lines += [f"## `{title}`", ""]
        if doc and not doc.startswith(cls.__name__ + "("):
            lines += [" ".join(doc.split()), ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key, kind, help_text in describe(cls, "" if "<" in title else f"{title}."):
            kind, _, default = kind.partition(" = ")
            cell = lambda text: text.replace("|", "\\|")  # noqa: E731
            lines.append(f"| `{key}` | {cell(kind)} | `{cell(default)}` | {cell(help_text)} |")
        lines.append("")
    return "\n".join(lines)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, type and default, help) of every field, sections recursively: for --help."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows += describe(hint, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        rows.append((f"{prefix}{f.name}", f"{type_name(hint)} = {default!r}", f.metadata.get("help", "")))
    return rows


def type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is Literal:
        return "|".join(map(str, typing.get_args(hint)))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from ..config_loader import load_config

    config = load_config(args.config, overrides)
    from accelerate import PartialState

    from ..training.loop import train

    metrics = train(config)
    if PartialState().is_main_process:
        from ..publish import publish_run

        publish_run(config.train.output_dir, config.hub, metrics)
        import json

        summary = {k: round(v, 4) for k, v in metrics.items() if "R@" in k or "top" in k or k.endswith("wall_s")}
        print(json.dumps(summary))  # one JSON line: a script reads it with json.loads
    return 0


def init(args: argparse.Namespace, extra: list[str]) -> int:
    from pathlib import Path

    from ..data.starter import starter_config

    text = starter_config(args.data, args.image_column, args.caption_column, args.split, args.cache_dir)
    if args.out == "-":
        print(text, end="")
        return 0
    out = Path(args.out or f"{Path(args.data.rstrip('/')).stem or 'own_data'}.yaml")
    try:
        with open(out, "x", encoding="utf-8") as f:  # never over a file that is there
            f.write(text)
    except FileExistsError:
        raise FileExistsError(f"{out} is there already (init never overwrites a file): choose another --out") from None
    print(f"wrote {out}: read it, then  mmcl train {out}")
    return 0


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "train", help="train a dual encoder", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="mmcl train [-h] [CONFIG.yaml] [--section.key=value ...]",
        description="mmcl train [CONFIG.yaml] [--section.key=value ...]; with no config, configs/quickstart.yaml "
                    "(built-in emoji data). Exports the final model to <output_dir>/export when hub.export.",
        epilog=config_help())
    parser.add_argument("config", nargs="?", default=None, help="YAML config (default: the quickstart)")
    parser.set_defaults(func=run, parser=parser, takes_overrides=True)
    starter = sub.add_parser("init", help="write a commented starter config for your own data",
                             description="Read DATA's columns and row count and write a config that trains on it.")
    starter.add_argument("data", help="a csv/tsv/jsonl/parquet file, an imagefolder, a save_to_disk folder or a Hub "
                                      "dataset")
    starter.add_argument("--out", default=None, help="the config file to write (default: <data name>.yaml; - prints "
                                                     "it); an existing file is never overwritten")
    starter.add_argument("--image-column", default=None, help="(default: the first of image, img, path, file, ...)")
    starter.add_argument("--caption-column", default=None, help="(default: the first of caption, text, title, ...)")
    starter.add_argument("--split", default="train")
    starter.add_argument("--cache-dir", default=None)
    starter.set_defaults(func=init, parser=starter)
