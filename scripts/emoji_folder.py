"""Write a split of the built-in emoji set as an image folder with metadata.csv (file_name,caption),
the layout `mmcl train`, `mmcl data check` and `mmcl search` read.

Run:  python scripts/emoji_folder.py OUT_DIR [--split validation] [--size 64] [--limit N]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from mmcl.data.sources import default_cache_dir
from mmcl.data.emoji import build_emoji_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    ds = build_emoji_dataset(default_cache_dir() / "datasets", image_size=args.size)[args.split]
    if args.limit:
        ds = ds.select(range(min(args.limit, len(ds))))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "caption"])
        for i, row in enumerate(ds):
            name = f"{i:05d}_{'-'.join(row['name'].lower().split())[:40].replace('/', '_').replace(':', '')}.png"
            row["image"].save(out / name)
            writer.writerow([name, row["name"]])
    print(f"wrote {len(ds)} images and metadata.csv to {out}")


if __name__ == "__main__":
    main()
