"""Reading and decoding one image cell, exactly the same way for training, evaluation, data
check and conversion: a cell is a path, a {"bytes", "path"} dict, encoded bytes or a PIL image."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from typing import Any

from PIL import Image

MAX_IMAGE_BYTES = 64 * 2**20  # data.max_image_bytes' default
FILE_KINDS = {stat.S_IFIFO: "a named pipe", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
              stat.S_IFDIR: "a directory", stat.S_IFSOCK: "a socket"}


class NotARegularFile(OSError):
    """A path to a named pipe, a device, a directory or a socket: never opened for reading."""


class FileTooLarge(ValueError):
    """A file over `data.max_image_bytes`: not read."""


def read_image_bytes(value: Any, max_bytes: int = MAX_IMAGE_BYTES) -> bytes | None:
    """The encoded bytes of an image cell (path or {"bytes", "path"} dict); None for a PIL image."""
    if isinstance(value, dict):
        return value.get("bytes") or read_file(value["path"], max_bytes)
    if isinstance(value, (str, os.PathLike)):
        return read_file(value, max_bytes)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, Image.Image):
        return None
    raise ValueError(f"not an image: {type(value).__name__}")


def read_file(path: str | os.PathLike, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes`. Anything else raises at once, unread: a
    named pipe (opened without waiting for a writer), a device such as /dev/zero, a directory, a
    larger file (`data.max_image_bytes`)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = FILE_KINDS.get(stat.S_IFMT(info.st_mode), "not a file")
            raise NotARegularFile(f"{path} is {kind}, not a regular file: only regular files are read")
        if info.st_size > max_bytes:
            raise FileTooLarge(f"{path} has {info.st_size} bytes, over data.max_image_bytes ({max_bytes}): not read")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise FileTooLarge(f"{path} grew over data.max_image_bytes ({max_bytes}) while read")
        return data
    finally:
        os.close(fd)


def load_image(value: Any, min_size: int | None = None, max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    """An image cell (path, {"bytes", "path"} dict, encoded bytes or PIL image) -> an RGB image.

    Transparent images are composited on white (emoji, logos); grayscale, palette, CMYK and
    16-bit images are converted. Raises on a missing, unreadable or corrupt file, and on one
    over Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, not twice it). With `min_size`, a JPEG much larger than needed is
    decoded at a reduced scale (1/2, 1/4, 1/8: Pillow's draft mode), never below `min_size` px
    on its shorter side: the processor resizes it anyway, and decoding is the costly part.
    """
    data = read_image_bytes(value, max_bytes)
    image = value if data is None else Image.open(io.BytesIO(data))  # reads the header only
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.size[0] * image.size[1] > limit:
        # Pillow only warns between 1x and 2x its limit; mmcl skips all of those: one such image
        # decoded to RGB costs gigabytes in a worker. (Checked by hand: warning filters are global
        # and not thread-safe, and streaming decodes in threads.)
        raise Image.DecompressionBombError(f"Image size ({image.size[0] * image.size[1]} pixels) exceeds the "
                                           f"limit of {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS)")
    if min_size and image.format == "JPEG":
        width, height = image.size
        scale = min(width, height) / min_size
        image.draft("RGB", (max(1, round(width / scale)), max(1, round(height / scale))))
    image.load()  # decode now: truncated files fail here, not later
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        image = image.point(lambda v: v / 256).convert("L")  # 16-bit -> 8-bit
    return image.convert("RGB")


def processor_min_size(image_processor: Any) -> int | None:
    """The smallest side an image processor resizes to (None when unknown)."""
    size = getattr(image_processor, "size", None) or {}
    sides = [v for k, v in dict(size).items() if k in ("height", "width", "shortest_edge") and isinstance(v, int)]
    return min(sides) if sides else None


def stable_id(data: bytes) -> int:
    """A 63-bit id of some bytes, the same in every process and run (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def describe(value: Any) -> str:
    """How an image cell is named in a report: its path, or "<bytes>"."""
    if isinstance(value, dict):
        return str(value.get("path") or "<bytes>")
    return str(value)
