"""The one place that decides what a dataset reference means, and loads it.

`source_kind(name)` sorts a `SourceSpec.dataset` into: `builtin` (builtin:emoji), `disk` (a
`save_to_disk` folder), `webdataset` (.tar shards: a folder of them, a glob or one file), `imagefolder`
(any other folder; metadata.csv/jsonl give its captions), `file` (csv/tsv/json/jsonl/parquet whose
image column holds paths, resolved relative to the file) or `hub` (a Hub dataset name).
`load_source` reads one split map-style; `load_stream` reads it as an `IterableDataset` (WebDataset
shards, a parquet / jsonl file, or whatever `datasets.load_dataset(..., streaming=True)` reads).
Images are left undecoded: training and evaluation decode them lazily and skip the unreadable ones.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from pathlib import Path
from typing import Any, Literal

import datasets

from ..artifacts import default_cache_dir
from ..config import ConfigError, SourceSpec

Kind = Literal["builtin", "disk", "webdataset", "imagefolder", "file", "hub"]
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
BUILTIN = ("builtin:emoji", "builtin:emoji-lineart", "builtin:emoji-gray")  # the emoji set in its styles
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "jp2", "image")


def source_kind(name: str) -> Kind:
    """What `name` refers to (see the module docstring); an existing path of no known form is an error."""
    if name.startswith("builtin:"):
        if name not in BUILTIN:
            raise ConfigError(f"unknown built-in dataset '{name}'; the built-in ones are {', '.join(BUILTIN)}")
        return "builtin"
    path = Path(name)
    if name.endswith(".tar") or "*" in name or (path.is_dir() and any(path.glob("*.tar"))):
        return "webdataset"
    if path.is_dir():
        return "disk" if any((path / m).exists() for m in DISK_MARKERS) else "imagefolder"
    if path.suffix.lower() in FILE_BUILDERS:
        if not path.is_file():
            raise ConfigError(f"data file {path} does not exist")
        return "file"
    if path.exists():
        raise ConfigError(f"{name}: not a dataset folder or a .csv/.tsv/.jsonl/.json/.parquet file")
    return "hub"


def is_plain_image_folder(name: str) -> bool:
    """A folder of image files without captions (no metadata file, not a saved dataset)."""
    path = Path(name)
    return source_kind(name) == "imagefolder" and not any((path / m).exists() for m in METADATA_FILES)


def _pick_split(dsd: datasets.DatasetDict, split: str, name: str) -> datasets.Dataset:
    if split in dsd:
        return dsd[split]
    if len(dsd) == 1:  # a single-split folder or file: use what is there
        return next(iter(dsd.values()))
    raise ConfigError(f"{name} has no split '{split}'; it has: {', '.join(dsd)}")


def _resolve_paths(ds: datasets.Dataset, column: str, base: Path) -> datasets.Dataset:
    """Relative image paths in a csv/json/parquet file are relative to that file, not to the cwd."""
    if column not in ds.column_names or ds.features[column].dtype not in ("string", "large_string"):
        return ds

    def resolve(batch: dict[str, list]) -> dict[str, list]:
        batch[column] = [p if p is None or os.path.isabs(p) else str(base / p) for p in batch[column]]
        return batch

    return ds.map(resolve, batched=True, desc=None)


def load_source(source: SourceSpec, cache_dir: str | None = None, emoji_image_size: int = 64) -> datasets.Dataset:
    """One split of a data source, map-style. `cache_dir` / `emoji_image_size`: the built-in set's."""
    try:
        return _load_utf8(source, cache_dir, emoji_image_size)
    except ValueError as err:
        # datasets' own words for an empty file are misleading ("Instruction 'train' corresponds to no data")
        if "corresponds to no data" in str(err):
            raise ConfigError(f"{source.dataset}: the dataset has no rows") from err
        raise


def _load_utf8(source: SourceSpec, cache_dir: str | None, emoji_image_size: int) -> datasets.Dataset:
    """`_load`, with a clear error naming the file when a text file is not UTF-8.

    datasets raises DatasetGenerationError (csv, tsv, an imagefolder's metadata.jsonl) or a bare
    UnicodeDecodeError (an imagefolder's metadata.csv). pyarrow's JSON reader keeps the invalid bytes
    and fails only when a row is read, in the middle of training: so JSON tables are validated here.
    """
    name = source.dataset
    try:
        ds = _load(source, cache_dir, emoji_image_size)
        if Path(name).suffix.lower() in (".json", ".jsonl"):
            ds.data.table.validate(full=True)  # a linear scan; raises ArrowInvalid on bad UTF-8
        return ds
    except (ValueError, datasets.exceptions.DatasetGenerationError) as err:
        cause: BaseException | None = err
        while cause is not None and not (isinstance(cause, UnicodeDecodeError) or "Invalid UTF8" in str(cause)):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        path = Path(name)
        files = sorted(str(p) for p in path.rglob("metadata.*")) if path.is_dir() else [name]
        raise ConfigError(f"{', '.join(files) or name}: not UTF-8 text ({cause}); mmcl reads text files as "
                          f"UTF-8: re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)") from err


def _load(source: SourceSpec, cache_dir: str | None, emoji_image_size: int) -> datasets.Dataset:
    name, split = source.dataset, source.split
    match source_kind(name):
        case "builtin":
            from .emoji import build_emoji_dataset

            folder = Path(cache_dir) if cache_dir else default_cache_dir() / "datasets"
            style = name.partition("-")[2] or "color"
            return _pick_split(build_emoji_dataset(folder, image_size=emoji_image_size, style=style), split, name)
        case "disk":
            try:
                loaded = datasets.load_from_disk(name)
            except IndexError as err:  # what datasets raises for a saved table with no rows
                raise ConfigError(f"{name}: the dataset has no rows") from err
            return _pick_split(loaded, split, name) if isinstance(loaded, datasets.DatasetDict) else loaded
        case "imagefolder":
            return _pick_split(datasets.load_dataset("imagefolder", data_dir=name), split, name)
        case "file":
            path = Path(name)
            if path.stat().st_size == 0:
                raise ConfigError(f"{path} is empty (0 bytes): give a file with a header and one row per image")
            kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            try:
                ds = datasets.load_dataset(FILE_BUILDERS[path.suffix.lower()], data_files=name, split="train", **kwargs)
            except (ValueError, datasets.exceptions.DatasetGenerationError) as err:
                where = first_bad_line(path)
                if where is None:
                    raise
                fix = "fix or remove that line" if where.startswith("line") else "write the file again"
                raise ConfigError(f"{path}, {where}: {fix}") from err
            return _resolve_paths(ds, source.image_column, path.resolve().parent)
        case "webdataset":
            raise ConfigError(f"{name}: WebDataset shards are read as a stream; set data.streaming: true")
        case _:
            try:
                return datasets.load_dataset(name, source.dataset_config, split=split)
            except (ConnectionError, FileNotFoundError) as err:  # offline, no network, no such dataset
                raise ConfigError(f"{name}: not a local file or folder, and the Hub dataset cannot be loaded "
                                  f"({' '.join(str(err).split())[:160]}); check the name, the network, and "
                                  "HF_DATASETS_OFFLINE / HF_HUB_OFFLINE") from err


def first_bad_line(path: Path) -> str | None:
    """Where a table file that datasets could not read goes wrong: "line N: why" (a csv / tsv row
    with more fields than the header, a quote never closed, a JSON line that does not
    parse or is not an object), "not a parquet file (why)", or None when no line is at fault."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pq.ParquetFile(path)
        except Exception as err:  # pyarrow's words for a damaged or foreign file
            return f"not a readable parquet file ({err})"
        return None
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        if suffix in (".json", ".jsonl"):
            return _bad_json_line(f) if suffix == ".jsonl" or not _is_one_document(path) else None
        reader = csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",", strict=True)
        header, start = next(reader, []), 2
        try:
            for row in reader:
                if len(row) > len(header):  # fewer is read, the missing cells empty
                    return f"line {start}: {len(row)} fields where the header has {len(header)}"
                start = reader.line_num + 1
        except csv.Error as err:
            return f"line {start}: {err} (a quote opened there is never closed?)"
    return None


def _bad_json_line(lines: Any) -> str | None:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as err:
            return f"line {number}: not valid JSON ({err.msg} at column {err.pos + 1})"
        if not isinstance(value, dict):
            return f"line {number}: a JSON {type(value).__name__}, where each line must be an object of columns"
    return None


def _is_one_document(path: Path) -> bool:
    """A .json file holding one JSON document (a list of rows, or columns), not JSON lines."""
    try:
        json.loads(path.read_text(encoding="utf-8", errors="replace"))
        return True
    except json.JSONDecodeError:
        return False


def require_columns(ds: datasets.Dataset, source: SourceSpec, needed: dict[str, str]) -> datasets.Dataset:
    """Fail at start, naming the source, the missing column, why it is needed (`needed`: column ->
    reason) and the columns that exist; fail on no rows; leave the images undecoded."""
    name = source.dataset
    for column, why in needed.items():
        if column not in ds.column_names:
            raise ConfigError(f"{name}: no column '{column}' {why}; columns are: {', '.join(ds.column_names)}")
    if len(ds) == 0:
        raise ConfigError(f"{name}: the dataset has no rows")
    if isinstance(ds.features[source.image_column], datasets.Image):
        # decode ourselves, lazily, so that one corrupt file is skipped instead of crashing
        ds = ds.cast_column(source.image_column, datasets.Image(decode=False))
    return ds


def pair_columns(source: SourceSpec) -> dict[str, str]:
    """The columns image–caption pairs need, and the config keys that name them."""
    return {source.image_column: "(data.image_column)", source.caption_column: "(data.caption_column)"}


def load_pairs(source: SourceSpec, cache_dir: str | None = None, emoji_image_size: int = 64) -> datasets.Dataset:
    """Image–caption data, map-style, with both columns checked (training, data check and convert)."""
    return require_columns(load_source(source, cache_dir, emoji_image_size), source, pair_columns(source))


def load_stream(source: SourceSpec) -> datasets.IterableDataset:
    """WebDataset shards (a folder of .tar files, a glob, or one .tar), a Hub dataset, or a local
    parquet / jsonl file (its image column holding embedded images or absolute paths), streamed."""
    name = source.dataset
    match source_kind(name):
        case "webdataset":
            ds = _webdataset(name)
        case "file" if Path(name).suffix.lower() in (".parquet", ".jsonl", ".json"):  # streamed like a Hub set
            builder = "parquet" if name.endswith(".parquet") else "json"
            ds = datasets.load_dataset(builder, data_files={"train": name}, split="train", streaming=True)
        case "builtin" | "file":  # a csv's relative image paths are resolved by the map-style reader only
            raise ConfigError(f"data.train: {name} is read map-style; set data.streaming: false (or stream "
                              "WebDataset shards written by mmcl data convert)")
        case _:  # a Hub dataset, or a local folder / file that datasets streams by itself
            ds = datasets.load_dataset(name, source.dataset_config, split=source.split, streaming=True)
    for column, feature in (ds.features or {}).items():
        if isinstance(feature, datasets.Image):  # decode ourselves: a corrupt image is skipped
            ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds


def _webdataset(name: str) -> datasets.IterableDataset:
    pattern = str(Path(name) / "*.tar") if Path(name).is_dir() else name
    files = sorted(glob.glob(pattern))
    if not files:
        raise ConfigError(f"data.train: no .tar shards match {pattern}")
    ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train", streaming=True)
    # datasets infers the columns from the first few samples: a shard mixing png and jpg would
    # yield None (or fail) for the extension it did not see, so declare every image extension
    missing: dict[str, Any] = {k: datasets.Image() for k in IMAGE_KEYS if k not in (ds.features or {})}
    if missing:
        ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train", streaming=True,
                                   features=datasets.Features({**ds.features, **missing}))
    return ds
