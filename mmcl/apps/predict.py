"""Using a trained model: zero-shot `predict`, `embed` a dataset or folder, `search` a folder by text.

Each function takes an already-loaded `EncoderBundle` (`load_for_inference(name)` loads an mmcl
folder, or a CLIP / SigLIP / VisionTextDualEncoder folder or Hub id, onto the available device).
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image, ImageDraw

from ..config import ConfigError, SourceSpec
from ..data.embed import embed_images, embed_texts
from ..data.images import load_image
from ..data.pairs import caption_list
from ..data.sources import is_plain_image_folder, load_pairs
from ..evaluation.zero_shot import load_templates, zero_shot_classifier
from ..towers.inference import EncoderBundle, load_encoder

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CACHE_DIR = ".mmcl_cache"


def load_for_inference(model: str) -> tuple[EncoderBundle, Accelerator]:
    """The model's bundle on the available device, and the Accelerator that shards the work."""
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    return load_encoder(model).to(accelerator.device), accelerator


def list_images(inputs: list[str]) -> list[Path]:
    """Image files given directly, or found (recursively, sorted) in the given folders."""
    found: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and CACHE_DIR not in p.parts)
        elif path.is_file():
            found.append(path)
        else:
            raise ConfigError(f"{path}: no such image file or folder")
    if not found:
        raise ConfigError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(inputs)}")
    return found


def image_embeddings(bundle: EncoderBundle, accelerator: Accelerator, images: list[Path] | datasets.Dataset,
                     batch_size: int = 64, column: str = "image", progress: bool = False) -> tuple[Any, Any]:
    """(N, D) embeddings of image files (or of a dataset's image column) and the readable mask."""
    ds = images if isinstance(images, datasets.Dataset) else datasets.Dataset.from_dict({column: [str(p) for p in images]})
    return embed_images(bundle, ds, column, accelerator, batch_size, progress=progress)


def text_embeddings(bundle: EncoderBundle, accelerator: Accelerator, texts: list[str], batch_size: int = 256,
                    progress: bool = False) -> torch.Tensor:
    return embed_texts(bundle, texts, accelerator, batch_size, progress=progress)


def embed(bundle: EncoderBundle, accelerator: Accelerator, source: SourceSpec, output: str, what: str = "both",
          batch_size: int = 64) -> dict[str, Any]:
    """Write image and/or text embeddings of a dataset (any `mmcl train` source) or an image folder.

    `.npz` (numpy: image_embeds, text_embeds, image_valid, ids) or `.parquet` (one row per dataset
    row: id, caption, image_embeds, text_embeds). An id is the row's image path where the data names one,
else its row number. Text embeddings use each row's first caption.
    """
    if Path(output).suffix not in (".npz", ".parquet"):
        raise ConfigError(f"{output}: write embeddings to a .npz or a .parquet file")
    if is_plain_image_folder(source.dataset):
        if what in ("text", "both"):
            raise ConfigError(f"{source.dataset} is a plain image folder: it has no captions to embed; "
                              "use --what image")
        paths = list_images([source.dataset])
        ids, captions, images = [str(p) for p in paths], [], paths
    else:
        ds = load_pairs(source)
        ids, images = row_ids(ds, source.image_column), ds
        captions = [(caption_list(c) or [""])[0] for c in ds[source.caption_column]]
    out: dict[str, Any] = {"ids": np.array(ids)}
    if what in ("image", "both"):
        embeds, valid = image_embeddings(bundle, accelerator, images, batch_size, source.image_column, progress=True)
        out["image_embeds"], out["image_valid"] = embeds.numpy(), valid.numpy()
    if what in ("text", "both"):
        out["text_embeds"] = text_embeddings(bundle, accelerator, captions, batch_size, progress=True).numpy()
        out["captions"] = np.array(captions)
    if accelerator.is_main_process:
        _write_embeddings(out, Path(output))
    return {k: v.shape for k, v in out.items()}


def row_ids(ds: Any, column: str) -> list[str]:
    """Each row's id: its image's path (a path column, or an Image feature's stored path), else its row
    number. Read from the Arrow column, so no image is decoded or copied."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cells = ds.with_format("arrow")[column]
    if pa.types.is_struct(cells.type):
        cells = pc.struct_field(cells, "path") if cells.type.get_field_index("path") >= 0 else None
    if cells is None or not (pa.types.is_string(cells.type) or pa.types.is_large_string(cells.type)):
        return [str(i) for i in range(len(ds))]
    return [path or str(i) for i, path in enumerate(cells.to_pylist())]


def _write_embeddings(out: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({k: pa.array(v.tolist()) for k, v in out.items()}), path)  # 2-D -> list column
    else:
        np.savez(path, **out)


def predict(bundle: EncoderBundle, accelerator: Accelerator, paths: list[Path], labels: list[str],
            templates: str = "auto", top_k: int = 5) -> list[dict]:
    """Zero-shot classify image files (see `list_images`): per image, the top-k labels with probabilities.
    `templates: auto` is what the model recommends (the style of its training captions), else simple."""
    template_list = load_templates(templates, bundle.templates)
    classes = zero_shot_classifier(lambda texts: text_embeddings(bundle, accelerator, texts), labels,
                                   template_list)  # (C, D)
    embeds, valid = image_embeddings(bundle, accelerator, paths)
    scale = float(bundle.encoder.logit_scale.detach().exp())  # the model's own temperature
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


def write_predictions(rows: list[dict], path: Path) -> None:
    """Predictions as JSON (`.json`) or as CSV rows of image, rank, label, prob."""
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2))
        return
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "rank", "label", "prob"])
        for row in rows:
            for rank, top in enumerate(row.get("top", []), start=1):
                writer.writerow([row["image"], rank, top["label"], top["prob"]])


def _cache_path(folder: Path, model: str, paths: list[Path]) -> Path:
    """Cache key: the model folder or id and every file's path, size and mtime."""
    h = hashlib.sha1(str(Path(model).resolve() if Path(model).exists() else model).encode())
    for p in paths:
        stat = p.stat()
        h.update(f"{p}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return folder / CACHE_DIR / f"{h.hexdigest()[:16]}.safetensors"


def folder_embeddings(bundle: EncoderBundle, accelerator: Accelerator, folder: Path) -> tuple[list[Path], Any, bool]:
    """Embeddings of every image in `folder`, cached on disk beside them; returns (paths, embeds, cached)."""
    from safetensors.torch import load_file, save_file

    paths = list_images([str(folder)])
    cache = _cache_path(folder, bundle.name, paths)
    if cache.is_file():
        return paths, load_file(str(cache))["embeds"], True
    embeds, valid = image_embeddings(bundle, accelerator, paths)
    embeds[~valid] = 0.0  # unreadable images never match
    cache.parent.mkdir(exist_ok=True)
    save_file({"embeds": embeds.contiguous()}, str(cache))
    return paths, embeds, False


def search(bundle: EncoderBundle, accelerator: Accelerator, folder: str, queries: list[str],
           top_k: int = 5) -> tuple[list[dict], bool]:
    """Text -> images over a folder: per query the top-k files and their cosine similarity."""
    paths, embeds, cached = folder_embeddings(bundle, accelerator, Path(folder))
    scores = text_embeddings(bundle, accelerator, queries) @ embeds.T  # (Q, N)
    results = []
    for query, row in zip(queries, scores):
        top = row.topk(min(top_k, len(paths)))
        results.append({"query": query, "matches": [{"image": str(paths[i]), "score": round(float(v), 4)}
                                                   for v, i in zip(top.values, top.indices)]})
    return results, cached


def _thumbnail(path: str, size: int) -> Image.Image | None:
    try:
        image = load_image(path)
    except Exception:  # drawn as an empty cell
        return None
    image.thumbnail((size, size))
    return image


def contact_sheet(results: list[dict], path: str | Path, thumb: int = 96) -> None:
    """One row per query: the query text, then its matches as thumbnails with their scores."""
    columns = max(len(r["matches"]) for r in results)
    images = {m["image"]: _thumbnail(m["image"], thumb) for r in results for m in r["matches"]}
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
