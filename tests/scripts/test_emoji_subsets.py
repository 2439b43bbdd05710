"""scripts/emoji_subsets.py: the worked fine-tuning example's flag / rest split of the emoji set."""

import subprocess
import sys

from datasets import load_from_disk

from mmcl.data.emoji import build_emoji_dataset
from tests.conftest import REPO


def test_flags_and_the_rest_partition_each_split(tmp_path, emoji_cache):
    out = tmp_path / "subsets"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "emoji_subsets.py"), "--out", str(out),
                           "--image-size", "16", "--cache-dir", emoji_cache], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    emoji = build_emoji_dataset(emoji_cache, image_size=16)
    for split in ("train", "validation"):
        flags, rest = (load_from_disk(str(out / f"{part}_{split}"))["name"] for part in ("flags", "rest"))
        assert flags and all(name.startswith("flag: ") for name in flags)
        assert not any(name.startswith("flag: ") for name in rest)
        assert sorted([*flags, *rest]) == sorted(emoji[split]["name"])
