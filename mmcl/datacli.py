"""The `mmcl data check` and `mmcl data convert` commands, and the readable data-check summary."""

from __future__ import annotations

import argparse

from .config import DataConfig
from .datacheck import DataReport, check_data


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counts.items())


def format_summary(r: DataReport) -> str:
    lines = [f"data check: {r.spec} (split {r.split}; image column '{r.image_column}', "
             f"caption column '{r.caption_column}')",
             f"rows: {r.rows:,}   columns: {', '.join(r.columns) or '-'}"]
    if r.captions + r.bad_captions:  # the rows were read (every row has captions or a bad one)
        lines.append(f"trainable rows: {r.trainable_rows:,} ({r.trainable_rows / r.rows:.1%}); "
                     f"training skips the other {r.rows - r.trainable_rows:,}")
    if r.bad_images:
        lines.append(f"bad images: {r.bad_images:,} ({_counts(r.bad_image_kinds)})")
        lines += [f"  row {e['row']}: {e['source']} [{e['kind']}] {e['reason']}" for e in r.bad_image_examples]
    if r.bad_captions:
        lines.append(f"bad captions: {r.bad_captions:,} ({_counts(r.bad_caption_kinds)})")
        lines += [f"  row {e['row']}: {e['value']} [{e['kind']}]" for e in r.bad_caption_examples]
    if r.captions:
        unit = f"tokens ({r.tokenizer})" if r.length_unit == "tokens" else \
            "whitespace words (no tokenizer given: a lower bound on tokens)"
        lines.append(f"captions: {r.captions:,}, lengths in {unit}; longer than {r.max_length}: "
                     f"{r.truncated:,} ({r.truncation_rate:.2%}) will be truncated")
        lines.append(f"  longest: {r.longest['length']} (row {r.longest['row']}): {r.longest['caption'][:100]!r}")
    for what, groups, rows, examples, key in (
            ("images (same bytes)", r.duplicate_image_groups, r.duplicate_image_rows, r.duplicate_image_examples,
             "source"),
            ("captions", r.duplicate_caption_groups, r.duplicate_caption_rows, r.duplicate_caption_examples,
             "caption")):
        if groups:
            lines.append(f"duplicate {what}: {groups:,} group(s) covering {rows:,} rows "
                         f"(not used as each other's negatives in training)")
            lines += [f"  rows {', '.join(map(str, e['rows']))}: {str(e[key])[:100]!r}" for e in examples]
    if r.width:
        lines.append("image size (min / median / max): width {min:g} / {median:g} / {max:g}, ".format(**r.width)
                     + "height {min:g} / {median:g} / {max:g}".format(**r.height))
        lines.append(f"modes: {_counts(r.modes)}   formats: {_counts(r.formats)}")
    lines += [f"error: {e}" for e in r.errors]
    lines.append("verdict: can train" if r.can_train else "verdict: CANNOT TRAIN")
    return "\n".join(lines)


# --- mmcl data check | convert -----------------------------------------------------------------------

def _data_config(args: argparse.Namespace) -> DataConfig:
    given = {k: getattr(args, k) for k in ("image_column", "caption_column", "dataset_config", "cache_dir")}
    return DataConfig(**{k: v for k, v in given.items() if v is not None})


def _no_extra(command: str, overrides: list[str]) -> None:
    if overrides:
        raise SystemExit(f"mmcl data {command}: unknown arguments {overrides}; see mmcl data {command} --help")


def _check(args: argparse.Namespace, overrides: list[str]) -> int:
    _no_extra("check", overrides)
    report = check_data(args.spec, _data_config(args), args.tokenizer, args.max_length, args.split,
                        args.num_workers, args.max_examples)
    print(report.summary())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(report.to_json())
        print(f"report: {args.json}")
    return 0 if report.can_train else 1


def _convert(args: argparse.Namespace, overrides: list[str]) -> int:
    _no_extra("convert", overrides)
    from .dataconvert import convert_to_hf, convert_to_webdataset

    cfg = _data_config(args)
    if args.to == "hf":
        result = convert_to_hf(args.spec, cfg, args.out, split=args.split, num_workers=args.num_workers)
    else:
        result = convert_to_webdataset(args.spec, cfg, args.out, args.shard_size, args.image_id_column,
                                       split=args.split, num_workers=args.num_workers)
    print(result.summary())
    return 0


def _source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="a csv/tsv/jsonl/parquet file, an imagefolder, a save_to_disk folder, "
                                     "a Hub dataset or builtin:emoji")
    parser.add_argument("--image-column", default=None, help="(default: image)")
    parser.add_argument("--caption-column", default=None, help="(default: caption)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--dataset-config", default=None, help="the Hub dataset's config name")
    parser.add_argument("--cache-dir", default=None, help="where built-in datasets are cached")
    parser.add_argument("--num-workers", type=int, default=0, help="processes that decode images")


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    """Register `mmcl data check` and `mmcl data convert` (heavy imports happen in the commands)."""
    data = sub.add_parser("data", help="check or convert an image–caption dataset")
    commands = data.add_subparsers(dest="data_command", required=True)
    check = commands.add_parser(
        "check", help="report bad images and captions, truncation, duplicates, sizes and modes",
        description="Decodes every image as training does. Exit status 1 when the data cannot train.")
    _source_arguments(check)
    check.add_argument("--tokenizer", default=None, help="count caption length in this tokenizer's tokens "
                                                         "(a name or folder); default: whitespace words")
    check.add_argument("--max-length", type=int, default=77, help="the text tower's limit, in tokens")
    check.add_argument("--max-examples", type=int, default=10, help="problems listed per kind (all are counted)")
    check.add_argument("--json", default=None, help="also write the report as JSON here")
    check.set_defaults(func=_check)
    convert = commands.add_parser(
        "convert", help="write a source as an HF dataset folder or as WebDataset tar shards",
        description="Rows whose image cannot be decoded or that have no caption are skipped and listed.")
    _source_arguments(convert)
    convert.add_argument("out", help="output folder (must not exist or be empty)")
    convert.add_argument("--to", choices=["hf", "webdataset"], required=True)
    convert.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard (webdataset)")
    convert.add_argument("--image-id-column", default=None,
                         help="column that names the image (several rows, one image); default: a hash of the bytes")
    convert.set_defaults(func=_convert)
