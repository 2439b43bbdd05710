"""`mmcl data check`: what is wrong with an image–caption source, before GPU hours go into it.

Every image is decoded exactly as training decodes it (`mmcl.data.load_image`) and every caption
is read as training reads it (`mmcl.data.caption_list`), so a row this check calls bad is a row
training would skip, and the other way round. An image over `PIL.Image.MAX_IMAGE_PIXELS` is a
decompression bomb: bad here and skipped in training (Pillow itself only warns up to twice the
limit; `load_image` turns that warning into an error).
"""

from __future__ import annotations

import io
import json
import math
import re
import statistics
import warnings
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from PIL import Image

from .config import ConfigError, DataConfig


@dataclass
class ImageInfo:
    """What decoding one image cell found; `kind` is empty when training can use the image."""

    row: int
    source: str  # the file path, or "<bytes>" for an embedded image
    kind: str = ""  # missing, unreadable, zero-byte, not an image, truncated, decompression bomb, corrupt
    reason: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""  # as stored (CMYK, I;16, P...), before the conversion to RGB
    format: str = ""  # JPEG, PNG, WEBP...
    image_id: int | None = None  # stable_id of the encoded bytes: equal bytes, equal id
    data: bytes | None = None  # the encoded bytes, when asked for (conversion)


def _read_problem(err: Exception) -> str:
    """Why the bytes of an image cell could not be read."""
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
        return "unreadable"  # a directory, no permission
    return "missing"  # no such file, or an empty cell


def _decode_problem(err: Exception, data: bytes | None) -> str:
    """Why read bytes could not be decoded."""
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return "decompression bomb"  # (the warning, should anyone turn it into an error)
    if data is not None and len(data) == 0:
        return "zero-byte"
    if isinstance(err, Image.UnidentifiedImageError):
        return "not an image"
    return "truncated" if "truncated" in str(err).lower() else "corrupt"


def _reason(err: Exception) -> str:
    # the repr of an in-memory file differs on every call and says nothing
    return re.sub(r" <_io\.BytesIO object at \w+>", "", f"{type(err).__name__}: {err}")[:200]


def inspect_image(cell: Any, row: int, keep_bytes: bool = False) -> ImageInfo:
    """Decode one image cell as training does and say what was found."""
    from .data import _describe, load_image, read_image_bytes, stable_id

    info = ImageInfo(row, "<none>" if cell is None else _describe(cell))
    try:
        data = read_image_bytes(cell)
    except Exception as err:
        info.kind, info.reason = _read_problem(err), _reason(err)
        return info
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # load_image decides on size
        try:
            header = cell if data is None else Image.open(io.BytesIO(data))  # header only: cheap
            info.width, info.height, info.mode, info.format = *header.size, header.mode, header.format or ""
            load_image(cell if data is None else data)  # the verdict: exactly what training does
        except Exception as err:
            info.kind, info.reason = _decode_problem(err, data), _reason(err)
    if data:
        info.image_id = stable_id(data)
        info.data = data if keep_bytes and not info.kind else None
    return info


class _ImageRows:
    """Map-style dataset of ImageInfo; `__getitems__` lets a DataLoader read rows in batches."""

    def __init__(self, ds: Any, column: str, keep_bytes: bool) -> None:
        self.ds, self.column, self.keep_bytes = ds.select_columns([column]), column, keep_bytes

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, rows: list[int]) -> list[ImageInfo]:
        cells = self.ds[rows][self.column]
        return [inspect_image(cell, row, self.keep_bytes) for cell, row in zip(cells, rows)]

    def __getitem__(self, row: int) -> ImageInfo:
        return self.__getitems__([row])[0]


def iter_image_infos(ds: Any, column: str, num_workers: int = 0, keep_bytes: bool = False,
                     batch_size: int = 64) -> Iterator[ImageInfo]:
    """ImageInfo for every row, in row order; decoded in `num_workers` DataLoader workers if > 0."""
    rows = _ImageRows(ds, column, keep_bytes)
    if num_workers <= 0:
        for start in range(0, len(rows), batch_size):
            yield from rows.__getitems__(list(range(start, min(start + batch_size, len(rows)))))
        return
    import torch

    loader = torch.utils.data.DataLoader(rows, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    for batch in loader:
        yield from batch


def caption_problem(cell: Any) -> str:
    """Why a caption cell gives training no caption ("" when it gives one)."""
    from .data import caption_list

    if caption_list(cell):
        return ""
    if cell is None:
        return "missing (an empty cell, or NaN/NA/null in a CSV)"
    if isinstance(cell, float) and math.isnan(cell):
        return "NaN"
    if isinstance(cell, str):
        return "empty string" if not cell else "whitespace only"
    if isinstance(cell, (list, tuple)):
        return "empty list" if not cell else "list without a non-empty string"
    return f"not text ({type(cell).__name__})"


def iter_cells(ds: Any, columns: list[str], batch_size: int = 4096) -> Iterator[dict[str, Any]]:
    """The rows of some columns, read in batches (a Dataset's row access is slow one at a time)."""
    for batch in ds.select_columns(columns).iter(batch_size=batch_size):
        yield from (dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns)))


class _Groups:
    """Rows that share a key (image bytes, caption text); memory only for the repeated keys."""

    def __init__(self) -> None:
        self.first: dict[int, int] = {}
        self.repeated: dict[int, list[int]] = {}

    def add(self, key: int, row: int) -> None:
        if key not in self.first:
            self.first[key] = row
        elif row != self.first[key]:
            self.repeated.setdefault(key, [self.first[key]]).append(row)

    def report(self, limit: int) -> tuple[int, int, list[list[int]]]:
        """(groups, rows in them, the first `limit` groups' rows)."""
        groups = list(self.repeated.values())
        return len(groups), sum(map(len, groups)), [g[:10] for g in groups[:limit]]


def _stats(values: array) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else {}


@dataclass
class DataReport:
    """The findings of `check_data`; `summary()` for people, `to_json()` for programs."""

    spec: str
    split: str
    image_column: str
    caption_column: str
    rows: int = 0
    columns: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the source cannot be used at all
    trainable_rows: int = 0  # a readable image and at least one caption
    bad_images: int = 0
    bad_image_kinds: dict[str, int] = field(default_factory=dict)
    bad_image_examples: list[dict[str, Any]] = field(default_factory=list)  # row, source, kind, reason
    pixel_limit: int = 0  # PIL.Image.MAX_IMAGE_PIXELS: larger images are decompression bombs, skipped
    bad_captions: int = 0
    bad_caption_kinds: dict[str, int] = field(default_factory=dict)
    bad_caption_examples: list[dict[str, Any]] = field(default_factory=list)  # row, value, kind
    captions: int = 0  # usable captions (a row may hold several)
    length_unit: str = "words"  # "tokens" with a tokenizer, else whitespace words
    tokenizer: str | None = None
    max_length: int = 77
    truncated: int = 0  # captions longer than max_length, in length_unit
    truncation_rate: float = 0.0
    longest: dict[str, Any] = field(default_factory=dict)  # row, length, caption
    duplicate_image_groups: int = 0
    duplicate_image_rows: int = 0
    duplicate_image_examples: list[dict[str, Any]] = field(default_factory=list)  # rows, source
    duplicate_caption_groups: int = 0
    duplicate_caption_rows: int = 0
    duplicate_caption_examples: list[dict[str, Any]] = field(default_factory=list)  # rows, caption
    width: dict[str, float] = field(default_factory=dict)  # min, median, max of readable images
    height: dict[str, float] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)
    formats: dict[str, int] = field(default_factory=dict)
    can_train: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)

    def summary(self) -> str:
        from .datacli import format_summary

        return format_summary(self)


def _load_tokenizer(tokenizer: Any) -> tuple[Any, str | None]:
    """(tokenizer, its name) from a tokenizer, a name or path, or None."""
    if tokenizer is None:
        return None, None
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(tokenizer), tokenizer
        except OSError as err:  # not found, or offline
            raise ConfigError(f"cannot load tokenizer '{tokenizer}': {err}") from err
    return tokenizer, getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _lengths(texts: list[str], tokenizer: Any) -> list[int]:
    if tokenizer is None:
        return [len(t.split()) for t in texts]
    # with the special tokens, as the training collator counts them against max_length
    return [len(ids) for ids in tokenizer(texts, truncation=False, verbose=False)["input_ids"]]


def _check_images(ds: Any, cfg: DataConfig, report: DataReport, num_workers: int, limit: int) -> set[int]:
    bad, kinds, modes, formats = set(), Counter(), Counter(), Counter()
    widths, heights, groups = array("q"), array("q"), _Groups()
    for info in iter_image_infos(ds, cfg.image_column, num_workers):
        if info.kind:
            bad.add(info.row)
            kinds[info.kind] += 1
            if len(report.bad_image_examples) < limit:
                report.bad_image_examples.append({"row": info.row, "source": info.source, "kind": info.kind,
                                                  "reason": info.reason})
            continue
        widths.append(info.width)
        heights.append(info.height)
        modes[info.mode] += 1
        formats[info.format or "in memory"] += 1
        if info.image_id is not None:
            groups.add(info.image_id, info.row)
    report.bad_images, report.bad_image_kinds = len(bad), dict(kinds.most_common())
    report.width, report.height = _stats(widths), _stats(heights)
    report.modes, report.formats = dict(modes.most_common()), dict(formats.most_common())
    n, rows, examples = groups.report(limit)
    report.duplicate_image_groups, report.duplicate_image_rows = n, rows
    from .data import _describe

    cells = ds.select_columns([cfg.image_column])
    report.duplicate_image_examples = [{"rows": g, "source": _describe(cells[g[0]][cfg.image_column])}
                                       for g in examples]
    return bad


def _check_captions(ds: Any, cfg: DataConfig, report: DataReport, tokenizer: Any, limit: int) -> set[int]:
    from .data import caption_list, stable_id

    bad, kinds, groups, texts = set(), Counter(), _Groups(), {}
    longest, truncated, total = (0, -1, ""), 0, 0
    pending: list[tuple[int, str]] = []  # tokenized in batches

    def measure() -> None:
        nonlocal longest, truncated, total
        for (row, text), n in zip(pending, _lengths([t for _, t in pending], tokenizer)):
            total, truncated = total + 1, truncated + (n > report.max_length)
            longest = max(longest, (n, -row, text))
        pending.clear()

    for row, cell in enumerate(c[cfg.caption_column] for c in iter_cells(ds, [cfg.caption_column])):
        problem = caption_problem(cell)
        if problem:
            bad.add(row)
            kinds[problem] += 1
            if len(report.bad_caption_examples) < limit:
                report.bad_caption_examples.append({"row": row, "value": repr(cell)[:100], "kind": problem})
            continue
        for text in dict.fromkeys(caption_list(cell)):  # a caption repeated inside one row counts once
            key = stable_id(text.encode("utf-8"))  # the text_id training masks duplicates by
            groups.add(key, row)
            if key in groups.repeated and len(texts) < limit:
                texts.setdefault(key, text)
            pending.append((row, text))
        if len(pending) >= 4096:
            measure()
    measure()
    report.bad_captions, report.bad_caption_kinds = len(bad), dict(kinds.most_common())
    report.captions, report.truncated = total, truncated
    report.truncation_rate = truncated / total if total else 0.0
    if total:
        report.longest = {"row": -longest[1], "length": longest[0], "caption": longest[2][:300]}
    n, rows, _ = groups.report(limit)
    report.duplicate_caption_groups, report.duplicate_caption_rows = n, rows
    report.duplicate_caption_examples = [{"rows": groups.repeated[k][:10], "caption": t[:200]}
                                         for k, t in texts.items()]
    return bad


def check_data(spec: str, cfg: DataConfig, tokenizer: Any = None, max_length: int = 77, split: str = "train",
               num_workers: int = 0, max_examples: int = 10) -> DataReport:
    """Read a source as `mmcl train` would (`cfg.image_column`, `cfg.caption_column`) and report
    what is wrong with it. Never raises for bad data: an unusable source gives `can_train=False`
    and the reason in `errors`.

    tokenizer: a tokenizer or its name/path; without one, caption length is counted in whitespace
        words (a lower bound on tokens, so on the truncation count).
    max_length: the text tower's limit in tokens (model.max_text_length), special tokens included.
    num_workers: DataLoader worker processes that decode images; 0 decodes in this process.
    max_examples: how many of each kind of problem are listed (all are counted).
    """
    from .data import check_columns, load_source

    tokenizer, name = _load_tokenizer(tokenizer)
    report = DataReport(spec, split, cfg.image_column, cfg.caption_column, max_length=max_length,
                        tokenizer=name, length_unit="words" if tokenizer is None else "tokens",
                        pixel_limit=Image.MAX_IMAGE_PIXELS)
    try:
        ds = load_source(spec, split, cfg)
    except (ConfigError, OSError) as err:  # no such file or Hub dataset, not UTF-8, no rows
        report.errors.append(str(err))
        return report
    report.rows, report.columns = len(ds), list(ds.column_names)
    for key in ("image_column", "caption_column"):
        if getattr(cfg, key) not in ds.column_names:
            report.errors.append(f"{spec}: no column '{getattr(cfg, key)}' (data.{key}); columns are: "
                                 f"{', '.join(ds.column_names)}")
    if report.errors:
        return report
    try:
        ds = check_columns(ds, cfg, spec)
    except ConfigError as err:  # no rows
        report.errors.append(str(err))
        return report
    bad = _check_images(ds, cfg, report, num_workers, max_examples)
    bad |= _check_captions(ds, cfg, report, tokenizer, max_examples)
    report.trainable_rows = report.rows - len(bad)
    if report.trainable_rows == 0:
        report.errors.append(f"{spec}: no row has both a readable image and a caption")
    report.can_train = not report.errors
    return report
