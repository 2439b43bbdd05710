"""Using a trained model: zero-shot `predict`, `embed` a dataset or folder, `search` a folder by text.

Every command takes an mmcl folder or a CLIP / SigLIP / VisionTextDualEncoder folder or Hub id.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(inputs: list[str]) -> list[Path]:
    """Image files given directly, or found (recursively, sorted) in the given folders."""
    found: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and ".mmcl_cache" not in p.parts)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such image file or folder")
    if not found:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(inputs)}")
    return found


def _runtime(model: str) -> tuple[Any, Any]:
    import torch
    from accelerate import Accelerator

    from .inference import load_encoder

    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    loaded = load_encoder(model)
    loaded.encoder.to(accelerator.device)
    return loaded, accelerator


def image_embeddings(loaded: Any, accelerator: Any, paths: list[Path] | Any, batch_size: int = 64,
                     column: str = "image", progress: bool = False) -> tuple[Any, Any]:
    """(N, D) embeddings of image files (or of a dataset's image column) and the readable mask."""
    import datasets

    from .evaluation import embed_images

    ds = paths if isinstance(paths, datasets.Dataset) else datasets.Dataset.from_dict({column: [str(p) for p in paths]})
    return embed_images(loaded.encoder, ds, column, loaded.image_processor, accelerator, batch_size, progress=progress)


def text_embeddings(loaded: Any, accelerator: Any, texts: list[str], batch_size: int = 256, progress: bool = False) -> Any:
    from .evaluation import embed_texts

    return embed_texts(loaded.encoder, texts, loaded.tokenizer, accelerator, batch_size, loaded.max_length,
                       loaded.text_padding, progress=progress)


def embed(model: str, source: str, output: str, what: str = "both", image_column: str = "image",
          caption_column: str = "caption", split: str = "train", batch_size: int = 64) -> dict[str, Any]:
    """Write image and/or text embeddings of a dataset (any `mmcl train` source) or an image folder.

    `.npz` (numpy: image_embeds, text_embeds, image_valid, ids) or `.parquet` (one row per dataset
    row: id, caption, image_embeds, text_embeds). Text embeddings use each row's first caption.
    """
    import numpy as np

    from .config import DataConfig
    from .data import caption_list, check_columns, load_source

    loaded, accelerator = _runtime(model)
    from .data import DISK_MARKERS

    markers = (*DISK_MARKERS, "metadata.csv", "metadata.jsonl")  # a dataset, not a bare folder of images
    folder_mode = Path(source).is_dir() and not any((Path(source) / m).exists() for m in markers)
    if folder_mode:
        paths = list_images([source])
        ids, captions, images = [str(p) for p in paths], None, paths
        if what in ("text", "both"):
            raise ValueError(f"{source} is a plain image folder: it has no captions to embed; use --what image")
    else:
        cfg = DataConfig(image_column=image_column, caption_column=caption_column)
        ds = check_columns(load_source(source, split, cfg), cfg, source)
        ids, images = [str(i) for i in range(len(ds))], ds
        captions = [(caption_list(c) or [""])[0] for c in ds[caption_column]]
    out: dict[str, Any] = {"ids": np.array(ids)}
    if what in ("image", "both"):
        embeds, valid = image_embeddings(loaded, accelerator, images, batch_size, image_column, progress=True)
        out["image_embeds"], out["image_valid"] = embeds.numpy(), valid.numpy()
    if what in ("text", "both"):
        out["text_embeds"] = text_embeddings(loaded, accelerator, captions, batch_size, progress=True).numpy()
        out["captions"] = np.array(captions)
    if accelerator.is_main_process:
        _write_embeddings(out, Path(output))
    return {k: v.shape for k, v in out.items()}


def _write_embeddings(out: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({k: pa.array(v.tolist()) for k, v in out.items()}), path)  # 2-D -> list column
    elif path.suffix == ".npz":
        import numpy as np

        np.savez(path, **out)
    else:
        raise ValueError(f"{path}: write embeddings to a .npz or a .parquet file")


def predict(model: str, images: list[str], labels: list[str], templates: str = "simple", top_k: int = 5) -> list[dict]:
    """Zero-shot classify image files: per image, the top-k labels with probabilities."""
    import torch

    from .metrics import class_embeddings
    from .templates import class_prompts, load_templates

    loaded, accelerator = _runtime(model)
    prompts = class_prompts(labels, load_templates(templates))
    text = text_embeddings(loaded, accelerator, [p for ps in prompts for p in ps])
    classes = class_embeddings(text.reshape(len(labels), len(prompts[0]), -1))  # (C, D)
    paths = list_images(images)
    embeds, valid = image_embeddings(loaded, accelerator, paths)
    owner = getattr(loaded.encoder, "model", loaded.encoder)  # HF models sit inside an adapter
    scale = float(getattr(owner, "logit_scale", torch.tensor(4.6052)).detach().exp())  # the model's own temperature
    probs = (scale * embeds @ classes.T).softmax(dim=-1)
    rows = []
    for path, p, ok in zip(paths, probs, valid.tolist()):
        if not ok:
            rows.append({"image": str(path), "error": "unreadable image"})
            continue
        top = p.topk(min(top_k, len(labels)))
        rows.append({"image": str(path), "top": [{"label": labels[i], "prob": round(float(v), 4)}
                                                 for v, i in zip(top.values, top.indices)]})
    return rows


def _cache_path(folder: Path, model: str, paths: list[Path]) -> Path:
    """Cache key: the model folder or id and every file's path, size and mtime."""
    h = hashlib.sha1(str(Path(model).resolve() if Path(model).exists() else model).encode())
    for p in paths:
        stat = p.stat()
        h.update(f"{p}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return folder / ".mmcl_cache" / f"{h.hexdigest()[:16]}.safetensors"


def folder_embeddings(loaded: Any, accelerator: Any, model: str, folder: Path) -> tuple[list[Path], Any, bool]:
    """Embeddings of every image in `folder`, cached on disk beside them; returns (paths, embeds, cached)."""
    from safetensors.torch import load_file, save_file

    paths = list_images([str(folder)])
    cache = _cache_path(folder, model, paths)
    if cache.is_file():
        stored = load_file(str(cache))
        return paths, stored["embeds"], True
    embeds, valid = image_embeddings(loaded, accelerator, paths)
    embeds[~valid] = 0.0  # unreadable images never match
    cache.parent.mkdir(exist_ok=True)
    save_file({"embeds": embeds.contiguous()}, str(cache))
    return paths, embeds, False


def search(model: str, folder: str, queries: list[str], top_k: int = 5) -> tuple[list[dict], bool]:
    """Text -> images over a folder: per query the top-k files and their cosine similarity."""
    loaded, accelerator = _runtime(model)
    paths, embeds, cached = folder_embeddings(loaded, accelerator, model, Path(folder))
    text = text_embeddings(loaded, accelerator, queries)
    scores = text @ embeds.T  # (Q, N)
    results = []
    for query, row in zip(queries, scores):
        top = row.topk(min(top_k, len(paths)))
        results.append({"query": query, "matches": [{"image": str(paths[i]), "score": round(float(v), 4)}
                                                   for v, i in zip(top.values, top.indices)]})
    return results, cached


def _thumbnail(path: str, size: int, load_image: Any) -> Any:
    try:
        image = load_image(path)
    except Exception:  # drawn as an empty cell
        return None
    image.thumbnail((size, size))
    return image


def contact_sheet(results: list[dict], path: str | Path, thumb: int = 96) -> None:
    """One row per query: the query text, then its matches as thumbnails with their scores."""
    from PIL import Image, ImageDraw

    from .data import load_image

    columns = max(len(r["matches"]) for r in results)
    images = {m["image"]: _thumbnail(m["image"], thumb, load_image) for r in results for m in r["matches"]}
    thumb = max([thumb // 2] + [im.height for im in images.values() if im is not None])  # no empty band
    label_width = 220
    sheet = Image.new("RGB", (label_width + columns * (thumb + 8), len(results) * (thumb + 24)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, result in enumerate(results):
        top = row * (thumb + 24)
        draw.text((6, top + thumb // 2), result["query"][:34], fill="black")
        for col, match in enumerate(result["matches"]):
            left = label_width + col * (thumb + 8)
            image = images[match["image"]]
            if image is None:  # an unreadable file gets an empty red cell
                draw.rectangle([left, top + 4, left + thumb, top + 4 + thumb], outline="red")
            else:
                sheet.paste(image, (left, top + 4))
            draw.text((left, top + thumb + 6), f"{match['score']:.3f}", fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def _labels(args: argparse.Namespace) -> list[str]:
    from .templates import load_class_names

    if not (args.labels or args.labels_file):
        raise SystemExit("mmcl predict: give --labels 'cat,dog,...' or --labels-file FILE")
    return load_class_names(args.labels_file or args.labels)


def _predict(args: argparse.Namespace, overrides: list[str]) -> int:
    rows = predict(args.model, args.images, _labels(args), args.templates, args.top_k)
    for row in rows:
        shown = row.get("error") or "  ".join(f"{t['label']} {t['prob']:.3f}" for t in row["top"])
        print(f"{row['image']}\t{shown}")
    if args.output:
        _write_predictions(rows, Path(args.output))
        print(f"predictions: {args.output}")
    return 0


def _write_predictions(rows: list[dict], path: Path) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2))
        return
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "rank", "label", "prob"])
        for row in rows:
            for rank, top in enumerate(row.get("top", []), start=1):
                writer.writerow([row["image"], rank, top["label"], top["prob"]])


def _embed(args: argparse.Namespace, overrides: list[str]) -> int:
    shapes = embed(args.model, args.source, args.output, args.what, args.image_column, args.caption_column,
                   args.split, args.batch_size)
    print(f"wrote {args.output}: " + ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items()))
    return 0


def _search(args: argparse.Namespace, overrides: list[str]) -> int:
    results, cached = search(args.model, args.folder, args.queries, args.top_k)
    print(f"image embeddings {'read from the cache' if cached else 'computed and cached'} in {args.folder}/.mmcl_cache")
    for result in results:
        print(f"== {result['query']}")
        for match in result["matches"]:
            print(f"  {match['score']:.3f}  {match['image']}")
    if args.sheet:
        contact_sheet(results, args.sheet)
        print(f"contact sheet: {args.sheet}")
    return 0


def add_predict_parsers(sub: argparse._SubParsersAction) -> None:
    """`mmcl predict`, `mmcl embed`, `mmcl search`."""
    p = sub.add_parser("predict", help="zero-shot classify image files or folders against labels")
    p.add_argument("model")
    p.add_argument("images", nargs="+", help="image files and/or folders")
    p.add_argument("--labels", help="comma-separated labels")
    p.add_argument("--labels-file", help="one label per line (or a JSON list)")
    p.add_argument("--templates", default="simple", help="simple | ensemble | name | a file")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--output", help="write predictions to .csv or .json")
    p.set_defaults(func=_predict)
    e = sub.add_parser("embed", help="write image and/or text embeddings of a dataset or folder")
    e.add_argument("model")
    e.add_argument("source", help="an image folder or any data source mmcl train accepts")
    e.add_argument("--output", required=True, help=".npz or .parquet")
    e.add_argument("--what", choices=("image", "text", "both"), default="both")
    e.add_argument("--image-column", default="image")
    e.add_argument("--caption-column", default="caption")
    e.add_argument("--split", default="train")
    e.add_argument("--batch-size", type=int, default=64)
    e.set_defaults(func=_embed)
    s = sub.add_parser("search", help="text -> images over a folder (embeddings cached)")
    s.add_argument("model")
    s.add_argument("folder")
    s.add_argument("queries", nargs="+")
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--sheet", help="write a contact-sheet PNG of the matches")
    s.set_defaults(func=_search)
