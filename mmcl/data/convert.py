"""`mmcl data convert`: an image–caption source -> an HF dataset folder or WebDataset tar shards.

A row is kept or skipped exactly as training would keep or skip it (the image decoded by
`mmcl.data.images.load_image`, the caption read by `mmcl.data.pairs.caption_list`), so the converted set trains on
the same pairs with nothing left to skip. Images are stored as their original encoded bytes.

WebDataset layout, one sample per source row: `<key>.<ext>` (the image bytes; ext from the decoded
format: jpg, png, webp...) and `<key>.json` = {"caption": [captions], "image_id": ..., "row": ...},
key = the source row as 9 digits. Read back with
`datasets.load_dataset("webdataset", data_files=f"{out}/shard-*.tar", split="train", streaming=True)`:
columns `<ext>` (a PIL image), `json` (a dict), `__key__` and `__url__` (strings). datasets infers
the columns from the first 5 samples: when several image extensions occur, pass
`features=webdataset_features(result.image_extensions)`, or the images under the other extensions
come back as None.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..config import ConfigError, SourceSpec
from .images import read_image_bytes
from .pairs import caption_list
from .rows import ImageInfo, caption_problem, iter_cells, iter_image_infos
from .sources import load_pairs

# Pillow format -> file extension; MPO (a camera JPEG with a preview) is a JPEG to every reader.
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


@dataclass
class ConvertResult:
    """What a conversion wrote and what it skipped (rows training would skip too)."""

    source: str
    out_dir: str
    to: str  # "hf" or "webdataset"
    rows: int = 0
    written: int = 0
    skipped: int = 0
    skipped_kinds: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[dict[str, Any]] = field(default_factory=list)  # row, source, kind, reason
    shards: list[str] = field(default_factory=list)  # webdataset: file names, in order
    image_extensions: dict[str, int] = field(default_factory=dict)  # webdataset: samples per extension

    def skip(self, info: ImageInfo, kind: str, reason: str, limit: int = 10) -> None:
        self.skipped += 1
        self.skipped_kinds[kind] = self.skipped_kinds.get(kind, 0) + 1
        if len(self.skipped_examples) < limit:
            self.skipped_examples.append({"row": info.row, "source": info.source, "kind": kind, "reason": reason})

    def summary(self) -> str:
        lines = [f"converted {self.source} -> {self.out_dir} ({self.to}): {self.written:,} of {self.rows:,} rows "
                 f"written, {self.skipped:,} skipped"
                 + (f" ({', '.join(f'{k} {v:,}' for k, v in self.skipped_kinds.items())})" if self.skipped else "")]
        lines += [f"  row {e['row']}: {e['source']} [{e['kind']}] {e['reason']}" for e in self.skipped_examples]
        if self.to == "webdataset":
            lines.append(f"shards: {len(self.shards)} ({self.shards[0]} .. {self.shards[-1]}); image files: "
                         + ", ".join(f"{k} {v:,}" for k, v in self.image_extensions.items()))
            if len(self.image_extensions) > 1:
                lines.append("several image extensions: read with features=mmcl.data.convert.webdataset_features("
                             f"{sorted(self.image_extensions)})")
        return "\n".join(lines)


def open_source(source: SourceSpec, out_dir: str | Path, extra: list[str], cache_dir: str | None) -> Any:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: the output folder exists and is not empty")
    ds = load_pairs(source, cache_dir)
    for column in extra:
        if column not in ds.column_names:
            raise ConfigError(f"{source.dataset}: no column '{column}'; columns are: {', '.join(ds.column_names)}")
    return ds


def usable_rows(ds: Any, source: SourceSpec, result: ConvertResult, columns: list[str], num_workers: int,
                 keep_bytes: bool) -> Iterator[tuple[ImageInfo, dict[str, Any]]]:
    """(image info, the row's `columns`) of each row training would use; the others go to `result`."""
    result.rows = len(ds)
    infos = iter_image_infos(ds, source.image_column, num_workers, keep_bytes, desc="convert")
    for info, cells in zip(infos, iter_cells(ds, columns)):
        if info.kind:
            result.skip(info, info.kind, info.reason)
        elif problem := caption_problem(cells[source.caption_column]):
            result.skip(info, "no caption", problem)
        else:
            yield info, cells


def _file_name(cell: Any) -> str | None:
    path = cell.get("path") if isinstance(cell, dict) else cell if isinstance(cell, (str, os.PathLike)) else None
    return os.path.basename(path) if path else None


def _embed(batch: dict[str, list], column: str) -> dict[str, list]:
    batch[column] = [{"bytes": read_image_bytes(c), "path": _file_name(c)} for c in batch[column]]
    return batch


def convert_to_hf(source: SourceSpec, out_dir: str | Path, num_workers: int = 0,
                  cache_dir: str | None = None) -> ConvertResult:
    """Write the usable rows of `source` as a `save_to_disk` folder whose image column is an `Image()`
    feature holding the encoded bytes (no paths left to break); every other column is kept as is.
    Load it with `datasets.load_from_disk(out_dir)` or train on it with `--data.train=OUT_DIR`."""
    ds = open_source(source, out_dir, [], cache_dir)
    result = ConvertResult(source.dataset, str(out_dir), "hf")
    good = [info.row for info, _ in usable_rows(ds, source, result, [source.caption_column], num_workers, False)]
    if not good:
        raise ConfigError(f"{source.dataset}: no row has both a readable image and a caption; nothing to convert")
    result.written = save_embedded(ds.select(good), source.image_column, out_dir)
    return result


def save_embedded(ds: Any, image_column: str, out_dir: str | Path) -> int:
    """`ds.save_to_disk(out_dir)` with its image column made an `Image()` feature holding each image's
    encoded bytes (read from its path if need be): the folder needs no other file. -> rows written."""
    import datasets

    features = ds.features.copy()
    features[image_column] = datasets.Image()
    Path(out_dir).parent.mkdir(parents=True, exist_ok=True)
    # map's output goes to a temporary file, not beside the source (a save_to_disk source would
    # get a cache file written into it)
    with tempfile.TemporaryDirectory(dir=Path(out_dir).parent) as tmp:
        out = ds.map(_embed, batched=True, batch_size=64, features=features, fn_kwargs={"column": image_column},
                     cache_file_name=str(Path(tmp) / "embed.arrow"))
        out.save_to_disk(str(out_dir))
        written = len(out)
        del out
    return written


class ShardWriter:
    """WebDataset tar shards of `shard_size` samples: `shard-000000.tar`, ... Each is written under
    a `.tmp` name and renamed when complete, so no reader (and no crash) leaves half a shard under
    a final name. Entries carry mtime 0: the same input gives byte-identical shards."""

    def __init__(self, out_dir: str | Path, shard_size: int) -> None:
        if shard_size < 1:
            raise ConfigError(f"shard_size must be at least 1, not {shard_size}")
        self.out_dir, self.shard_size = Path(out_dir), shard_size
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shards: list[str] = []
        self.samples, self._in_shard, self._tar = 0, 0, None

    def add(self, key: str, files: dict[str, bytes]) -> None:
        """One sample: `files` maps extension -> bytes; `key` must not contain a dot."""
        if self._tar is None:
            self._tar = tarfile.open(self._path(".tmp"), "w")
        for ext, data in files.items():
            entry = tarfile.TarInfo(f"{key}.{ext}")
            entry.size, entry.mode, entry.mtime = len(data), 0o644, 0
            self._tar.addfile(entry, io.BytesIO(data))
        self.samples, self._in_shard = self.samples + 1, self._in_shard + 1
        if self._in_shard == self.shard_size:
            self._finish()

    def _path(self, suffix: str = "") -> Path:
        return self.out_dir / f"shard-{len(self.shards):06d}.tar{suffix}"

    def _finish(self) -> None:
        self._tar.close()
        os.replace(self._path(".tmp"), self._path())
        self.shards.append(self._path().name)
        self._tar, self._in_shard = None, 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        if self._tar is None:
            return
        if kind is None:
            self._finish()
        else:  # a failed conversion leaves only complete shards
            self._tar.close()
            self._path(".tmp").unlink(missing_ok=True)


def _extension(fmt: str) -> str:
    if fmt in EXTENSIONS:
        return EXTENSIONS[fmt]
    from PIL import Image

    found = [ext for ext, f in Image.registered_extensions().items() if f == fmt]
    return found[0].lstrip(".") if found else fmt.lower()


def convert_to_webdataset(source: SourceSpec, out_dir: str | Path, shard_size: int = 1000,
                          image_id_column: str | None = None, num_workers: int = 0,
                          cache_dir: str | None = None) -> ConvertResult:
    """Write the usable rows of `source` as WebDataset tar shards (layout in the module docstring).

    image_id_column: a column naming the image when several rows share one (multi-caption data
        with one row per caption); without it, image_id is `stable_id` of the image bytes, the id
        training uses to keep the same image out of its own negatives.
    """
    extra = [image_id_column] if image_id_column else []
    ds = open_source(source, out_dir, extra, cache_dir)
    result, extensions = ConvertResult(source.dataset, str(out_dir), "webdataset"), Counter()
    with ShardWriter(out_dir, shard_size) as writer:
        for info, cells in usable_rows(ds, source, result, [source.caption_column] + extra, num_workers, True):
            if info.data is None:
                raise ConfigError(f"{source.dataset}: row {info.row} holds a decoded image, not encoded bytes")
            ext = _extension(info.format)
            meta = {"caption": caption_list(cells[source.caption_column]),
                    "image_id": cells[image_id_column] if image_id_column else info.image_id, "row": info.row}
            writer.add(f"{info.row:09d}", {ext: info.data, "json": json.dumps(meta, ensure_ascii=False).encode()})
            extensions[ext] += 1
    if not writer.samples:
        raise ConfigError(f"{source.dataset}: no row has both a readable image and a caption; nothing to convert")
    result.written, result.shards, result.image_extensions = writer.samples, writer.shards, dict(extensions)
    return result


def webdataset_features(image_extensions: Iterable[str], image_id: str = "int64") -> Any:
    """`datasets.Features` for reading shards written by `convert_to_webdataset` whatever their
    image extensions: one `Image()` column per extension (None where a sample has another).

    image_id: the dtype of the json's image_id ("int64" for the default byte hash, "string" for an
    image_id_column of names).
    """
    import datasets

    features = {ext: datasets.Image() for ext in sorted(image_extensions)}
    features["json"] = {"caption": datasets.List(datasets.Value("string")), "image_id": datasets.Value(image_id),
                        "row": datasets.Value("int64")}
    return datasets.Features({**features, "__key__": datasets.Value("string"), "__url__": datasets.Value("string")})
