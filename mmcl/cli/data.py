"""`mmcl data check`, `mmcl data convert` and `mmcl data mine-negatives`."""

from __future__ import annotations

import argparse
from typing import Any

from .common import trust_backbone_argument


def _source(args: argparse.Namespace) -> Any:
    from ..config import SourceSpec

    given = {k: getattr(args, k) for k in ("image_column", "caption_column", "dataset_config", "split")}
    return SourceSpec(dataset=args.spec, **{k: v for k, v in given.items() if v is not None})


def check(args: argparse.Namespace, extra: list[str]) -> int:
    from ..data.check import check_data

    report = check_data(_source(args), args.tokenizer, args.max_length, args.num_workers, args.max_examples,
                        args.cache_dir)
    print(report.summary())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(report.to_json())
        print(f"report: {args.json}")
    return 0 if report.can_train else 1


def convert(args: argparse.Namespace, extra: list[str]) -> int:
    from ..data.convert import convert_to_hf, convert_to_webdataset

    if args.to == "hf":
        result = convert_to_hf(_source(args), args.out, args.num_workers, args.cache_dir)
    else:
        result = convert_to_webdataset(_source(args), args.out, args.shard_size, args.image_id_column,
                                       args.num_workers, args.cache_dir)
    print(result.summary())
    return 0


def mine_negatives(args: argparse.Namespace, extra: list[str]) -> int:
    from ..apps.predict import load_for_inference
    from ..data.mining import mine_negatives as mine

    bundle, accelerator = load_for_inference(args.model)
    result = mine(_source(args), bundle, accelerator, args.out, args.k, args.column, args.batch_size,
                  args.block_size, args.num_workers, args.cache_dir)
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


def register(sub: Any) -> None:
    """`mmcl data check`, `convert` and `mine-negatives` (heavy imports happen in the commands)."""
    data = sub.add_parser("data", help="check, convert or mine hard negatives for an image–caption dataset")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    parser = commands.add_parser(
        "check", help="report bad images and captions, truncation, duplicates, sizes and modes",
        description="Decodes every image as training does. Exit status 1 when the data cannot train.")
    _source_arguments(parser)
    parser.add_argument("--tokenizer", default=None, help="count caption length in this tokenizer's tokens "
                                                          "(a name or folder); default: whitespace words")
    parser.add_argument("--max-length", type=int, default=77, help="the text tower's limit, in tokens")
    parser.add_argument("--max-examples", type=int, default=10, help="problems listed per kind (all are counted)")
    parser.add_argument("--json", default=None, help="also write the report as JSON here")
    parser.set_defaults(func=check, parser=parser)
    parser = commands.add_parser(
        "convert", help="write a source as an HF dataset folder or as WebDataset tar shards",
        description="Rows whose image cannot be decoded or that have no caption are skipped and listed.")
    _source_arguments(parser)
    parser.add_argument("out", help="output folder (must not exist or be empty)")
    parser.add_argument("--to", choices=["hf", "webdataset"], required=True)
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard (webdataset)")
    parser.add_argument("--image-id-column", default=None,
                        help="column that names the image (several rows, one image); default: a hash of the bytes")
    parser.set_defaults(func=convert, parser=parser)
    parser = commands.add_parser(
        "mine-negatives", help="add a column of hard-negative captions: those of the k most similar other images",
        description="A model embeds every image; each row gets the first captions of its k nearest other images "
                    "(cosine), never the same image nor one of its own captions. Rows whose image cannot be "
                    "decoded are skipped and counted. Writes an HF dataset folder with the images embedded.")
    _source_arguments(parser)
    parser.add_argument("--model", required=True, help="the model that embeds the images: an mmcl folder, or a "
                                                       "CLIP / SigLIP / VisionTextDualEncoder folder or Hub id")
    trust_backbone_argument(parser)
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--k", type=int, default=4, help="negatives per row (fewer when too few images differ)")
    parser.add_argument("--column", default="hard_negatives", help="name of the new list-of-captions column")
    parser.add_argument("--batch-size", type=int, default=256, help="images embedded per batch")
    parser.add_argument("--block-size", type=int, default=4096,
                        help="query rows compared with all rows at once (memory: block size x rows)")
    parser.set_defaults(func=mine_negatives, parser=parser)
