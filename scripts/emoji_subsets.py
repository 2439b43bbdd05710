"""Split the built-in emoji set into a fine-tuning domain and the rest, as `save_to_disk` folders
for the fine-tuning example (configs/finetune_flags*.yaml):

    python scripts/emoji_subsets.py [--out runs/emoji_subsets] [--image-size 48]

writes OUT/flags_train, OUT/flags_validation (the country and region flags: "flag: Japan", ...)
and OUT/rest_train, OUT/rest_validation (every other emoji), each split of the built-in set cut
in two by whether its name starts with "flag: ". The emoji behind each row are the built-in set's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmcl.data.emoji import build_emoji_dataset

PREFIX = "flag: "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/emoji_subsets")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "mmcl"))
    args = parser.parse_args()
    emoji = build_emoji_dataset(args.cache_dir, image_size=args.image_size)
    for split, ds in emoji.items():
        flags = ds.filter(lambda name: name.startswith(PREFIX), input_columns="name")
        rest = ds.filter(lambda name: not name.startswith(PREFIX), input_columns="name")
        for part, subset in (("flags", flags), ("rest", rest)):
            folder = Path(args.out) / f"{part}_{split}"
            subset.save_to_disk(str(folder))
            print(f"{folder}: {len(subset)} emoji")


if __name__ == "__main__":
    main()
