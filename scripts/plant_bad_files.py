"""Make a folder of emoji images with one of every kind of bad input planted in it, to see what
`mmcl data check` reports and that `mmcl train` finishes on it.

Run:  python scripts/plant_bad_files.py OUT_DIR [--size 48] [--limit 600]
Writes OUT_DIR/images/*.png|jpg|tif, OUT_DIR/pairs.csv (image,caption; UTF-8) and
OUT_DIR/pairs_latin1.csv (the same rows, re-encoded as Latin-1: a non-UTF-8 caption file).
Planted: a truncated JPEG, a zero-byte file, a text file named .jpg, an image over Pillow's
decompression-bomb limit (a 13,000 x 13,000 PNG of 1 colour: tiny on disk, 169 Mpx > 2 x 89 Mpx),
a CMYK JPEG and a 16-bit PNG (both good: converted), a missing file, an empty caption, a NaN caption.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

from mmcl.data.sources import default_cache_dir
from mmcl.data.emoji import build_emoji_dataset


def plant(images: Path, base: Image.Image) -> list[tuple[str, str]]:
    """(relative path, caption) rows of the planted files."""
    buffer = io.BytesIO()
    base.save(buffer, format="JPEG")
    (images / "bad_truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (images / "bad_zero_bytes.jpg").write_bytes(b"")
    (images / "bad_text_named.jpg").write_text("this is not an image\n")
    Image.new("1", (13_000, 13_000)).save(images / "bad_bomb.png", optimize=True)
    base.convert("CMYK").save(images / "good_cmyk.jpg")
    Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257)).save(images / "good_16bit.png")
    return [("images/bad_truncated.jpg", "truncated jpeg"), ("images/bad_zero_bytes.jpg", "zero byte file"),
            ("images/bad_text_named.jpg", "text file named jpg"), ("images/bad_bomb.png", "decompression bomb"),
            ("images/good_cmyk.jpg", "cmyk picture"), ("images/good_16bit.png", "sixteen bit picture"),
            ("images/does_not_exist.png", "missing file"), ("images/good_cmyk.jpg", ""),  # empty caption
            ("images/good_16bit.png", "NaN")]  # pandas reads a bare NaN cell as a missing value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--limit", type=int, default=600)
    args = parser.parse_args()
    out = Path(args.out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    ds = build_emoji_dataset(default_cache_dir() / "datasets", image_size=args.size)["train"]
    ds = ds.select(range(min(args.limit, len(ds))))
    rows = []
    for i, row in enumerate(ds):
        row["image"].save(images / f"emoji_{i:05d}.png")
        rows.append((f"images/emoji_{i:05d}.png", row["name"]))
    rows += plant(images, ds[0]["image"])
    with open(out / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    text = (out / "pairs.csv").read_text(encoding="utf-8") + "images/emoji_00000.png,café crème\n"
    (out / "pairs_latin1.csv").write_bytes(text.encode("latin-1", errors="replace"))
    print(f"wrote {len(rows)} rows ({len(rows) - len(ds)} planted) to {out / 'pairs.csv'} and a Latin-1 copy")


if __name__ == "__main__":
    main()
