"""What decoding one row finds: the image as training decodes it (`mmcl.data.images.load_image`),
the caption as training reads it (`mmcl.data.pairs.caption_list`). `mmcl data check` reports these
findings and `mmcl data convert` keeps exactly the rows they call usable."""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

from PIL import Image

from .images import FileTooLarge, NotARegularFile, describe, load_image, read_image_bytes, stable_id
from .pairs import caption_list


@dataclass
class ImageInfo:
    """What decoding one image cell found; `kind` is empty when training can use the image."""

    row: int
    source: str  # the file path, or "<bytes>" for an embedded image
    kind: str = ""  # missing, unreadable, not a regular file, too large, zero-byte, not an image, truncated,
    #                 decompression bomb, corrupt
    reason: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""  # as stored (CMYK, I;16, P...), before the conversion to RGB
    format: str = ""  # JPEG, PNG, WEBP...
    image_id: int | None = None  # stable_id of the encoded bytes: equal bytes, equal id
    data: bytes | None = None  # the encoded bytes, when asked for (conversion)


def _read_problem(err: Exception) -> str:
    """Why the bytes of an image cell could not be read."""
    if isinstance(err, NotARegularFile):
        return "not a regular file"  # a named pipe, a device such as /dev/zero
    if isinstance(err, FileTooLarge):
        return "too large"
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
        return "unreadable"  # no permission
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
    info = ImageInfo(row, "<none>" if cell is None else describe(cell))
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
                     batch_size: int = 64, desc: str = "images") -> Iterator[ImageInfo]:
    """ImageInfo for every row, in row order; decoded in `num_workers` DataLoader workers if > 0,
    with progress (`desc`) and its rate."""
    from ..progress import progress

    rows = _ImageRows(ds, column, keep_bytes)
    if num_workers <= 0:
        batches: Any = (rows.__getitems__(list(range(start, min(start + batch_size, len(rows)))))
                        for start in range(0, len(rows), batch_size))
    else:
        import torch

        batches = torch.utils.data.DataLoader(rows, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    with progress(desc=desc, unit="images", total=len(rows), delay=3.0) as bar:
        for batch in batches:
            yield from batch
            bar.update(len(batch))


def caption_problem(cell: Any) -> str:
    """Why a caption cell gives training no caption ("" when it gives one)."""
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
