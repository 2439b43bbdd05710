"""`mmcl predict`, `mmcl embed`, `mmcl search` and `mmcl demo`: using a trained model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..artifacts import check_model_reference
from ..config import ConfigError
from .common import trust_backbone_argument


def _labels(args: argparse.Namespace) -> list[str]:
    from ..evaluation.zero_shot import load_class_names

    if not (args.labels or args.labels_file):
        args.parser.error("give --labels 'cat,dog,...' or --labels-file FILE")
    if args.labels_file and not Path(args.labels_file).is_file():
        raise FileNotFoundError(f"--labels-file {args.labels_file}: no such file")
    labels = load_class_names(args.labels_file or args.labels)
    if not labels:
        args.parser.error("the label list is empty")
    return labels


def positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def predict(args: argparse.Namespace, extra: list[str]) -> int:
    check_model_reference(args.model)  # mistakes in the arguments fail before the slow imports
    from ..apps.predict import list_images, load_for_inference, predict, write_predictions

    labels = _labels(args)
    paths = list_images(args.images)  # a missing file fails before the model loads
    bundle, accelerator = load_for_inference(args.model)
    rows = predict(bundle, accelerator, paths, labels, args.templates, args.top_k)
    for row in rows:
        shown = row.get("error") or "  ".join(f"{t['label']} {t['prob']:.3f}" for t in row["top"])
        print(f"{row['image']}\t{shown}")
    if args.output:
        write_predictions(rows, Path(args.output))
        print(f"predictions: {args.output}")
    unreadable = sum("error" in row for row in rows)
    if unreadable == len(rows):
        raise ConfigError(f"none of the {len(rows)} image(s) could be read (corrupt, or not an image): nothing predicted")
    return 0


def embed(args: argparse.Namespace, extra: list[str]) -> int:
    check_model_reference(args.model)
    if Path(args.output).suffix not in (".npz", ".parquet"):
        args.parser.error(f"--output {args.output}: write embeddings to a .npz or a .parquet file")
    from ..apps.predict import embed, load_for_inference
    from ..config import SourceSpec

    source = SourceSpec(args.source, args.split, None, args.image_column, args.caption_column)
    bundle, accelerator = load_for_inference(args.model)
    shapes = embed(bundle, accelerator, source, args.output, args.what, args.batch_size)
    print(f"wrote {args.output}: " + ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items()))
    return 0


def search(args: argparse.Namespace, extra: list[str]) -> int:
    check_model_reference(args.model)
    from ..apps.predict import contact_sheet, list_images, load_for_inference, search

    list_images([args.folder])  # no folder, or no images in it: fail before the model loads
    bundle, accelerator = load_for_inference(args.model)
    results, cached = search(bundle, accelerator, args.folder, args.queries, args.top_k)
    print(f"image embeddings {'read from the cache' if cached else 'computed and cached'} in {args.folder}/.mmcl_cache")
    for result in results:
        print(f"== {result['query']}")
        for match in result["matches"]:
            print(f"  {match['score']:.3f}  {match['image']}")
    if args.sheet:
        contact_sheet(results, args.sheet)
        print(f"contact sheet: {args.sheet}")
    return 0


def demo(args: argparse.Namespace, extra: list[str]) -> int:
    from ..apps.demo import serve

    check_model_reference(args.model)  # before the slow imports
    serve(args.model, args.images, args.host, args.port)
    return 0


MODEL_HELP = "an mmcl folder, or a CLIP / SigLIP / VisionTextDualEncoder folder or Hub id"


def register(sub: Any) -> None:
    p = sub.add_parser("predict", help="zero-shot classify image files or folders against labels")
    p.add_argument("model", help=MODEL_HELP)
    trust_backbone_argument(p)
    p.add_argument("images", nargs="+", help="image files and/or folders")
    p.add_argument("--labels", help="comma-separated labels")
    p.add_argument("--labels-file", help="one label per line (or a JSON list)")
    p.add_argument("--templates", default="auto", help="auto (the model's recommendation, from the style of its "
                                                       "training captions; else simple) | simple | ensemble | name | a file")
    p.add_argument("--top-k", type=positive, default=5, help="labels shown per image")
    p.add_argument("--output", help="write predictions to .csv or .json")
    p.set_defaults(func=predict, parser=p)
    e = sub.add_parser("embed", help="write image and/or text embeddings of a dataset or folder")
    e.add_argument("model", help=MODEL_HELP)
    trust_backbone_argument(e)
    e.add_argument("source", help="an image folder or any data source mmcl train accepts")
    e.add_argument("--output", required=True, help=".npz or .parquet")
    e.add_argument("--what", choices=("image", "text", "both"), default="both")
    e.add_argument("--image-column", default="image")
    e.add_argument("--caption-column", default="caption")
    e.add_argument("--split", default="train")
    e.add_argument("--batch-size", type=int, default=64)
    e.set_defaults(func=embed, parser=e)
    s = sub.add_parser("search", help="text -> images over a folder (embeddings cached)")
    s.add_argument("model", help=MODEL_HELP)
    trust_backbone_argument(s)
    s.add_argument("folder", help="a folder of images")
    s.add_argument("queries", nargs="+", help="one or more text queries")
    s.add_argument("--top-k", type=positive, default=5, help="matches shown per query")
    s.add_argument("--sheet", help="write a contact-sheet PNG of the matches")
    s.set_defaults(func=search, parser=s)
    d = sub.add_parser("demo", help="a local web page: zero-shot with typed labels, and text search over a folder",
                       description="mmcl demo MODEL [--images FOLDER] [--port 7860]: serves a page on "
                                   "http://127.0.0.1:PORT (gradio; pip install \"mmcl[demo]\"). Offline, no telemetry.")
    d.add_argument("model", help=MODEL_HELP)
    trust_backbone_argument(d)
    d.add_argument("--images", help="a folder of images: text search over it, and images to pick")
    d.add_argument("--port", type=int, default=7860)
    d.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines too")
    d.set_defaults(func=demo, parser=d)
