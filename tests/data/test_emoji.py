"""Tests for mmcl.data.emoji: the OpenMoji image-caption set rendered offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import pytest
from PIL import Image

from mmcl.data import emoji as emoji_data
from mmcl.data.emoji import build_emoji_dataset

SIZE = 16  # small images keep the one full build per module at about 2 s


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("emoji-cache")


@pytest.fixture(scope="module")
def emoji_set(cache_dir: Path) -> datasets.DatasetDict:
    return build_emoji_dataset(cache_dir, image_size=SIZE)


def _tiny_set() -> datasets.DatasetDict:
    """A stand-in for a build, for tests of the cache logic that need no rendering."""
    row = {"image": [Image.new("RGB", (SIZE, SIZE), "red")], "caption": [["red"]],
           "name": ["red"], "emoji": ["R"]}
    split = datasets.Dataset.from_dict(row, features=emoji_data._FEATURES)
    return datasets.DatasetDict({"train": split, "validation": split})


def test_both_splits_are_non_empty_and_disjoint(emoji_set: datasets.DatasetDict) -> None:
    train, validation = emoji_set["train"], emoji_set["validation"]
    assert len(train) > 3000 and len(validation) > 100
    assert set(train["emoji"]).isdisjoint(validation["emoji"])
    assert set(train["name"]).isdisjoint(validation["name"])
    # Roughly the requested share, and no emoji twice.
    assert 0.05 < len(validation) / (len(train) + len(validation)) < 0.15
    assert len(set(train["emoji"])) == len(train)


def test_split_and_order_are_deterministic(
    emoji_set: datasets.DatasetDict, tmp_path: Path
) -> None:
    again = build_emoji_dataset(tmp_path, image_size=SIZE)
    for split in ("train", "validation"):
        assert again[split]["name"] == emoji_set[split]["name"]
        assert again[split]["emoji"] == emoji_set[split]["emoji"]


# sha1 of each emoji below 0.5: fixed values, where Python's salted hash() would vary by run.
GOLDEN_HALF_SPLIT = {
    "\U0001f34e": True, "\U0001f1ef\U0001f1f5": False, "\U0001f600": False, "\U0001f41d": False,
    "#\ufe0f\u20e3": True, "\U0001f44d": True, "\u2764\ufe0f": False, "\U0001f680": True,
}


def test_split_hash_is_stable_across_processes() -> None:
    assert {e: emoji_data._in_validation(e, 0.5) for e in GOLDEN_HALF_SPLIT} == GOLDEN_HALF_SPLIT


def test_images_are_rgb_of_the_requested_size_and_not_blank(
    emoji_set: datasets.DatasetDict,
) -> None:
    for split in emoji_set.values():
        for image in split["image"]:
            assert image.mode == "RGB" and image.size == (SIZE, SIZE)
            assert image.convert("L").getextrema()[0] < 200  # some ink, not just white
    split = next(s for s in emoji_set.values() if "red apple" in s["name"])
    apple = split[split["name"].index("red apple")]["image"]
    assert apple.getpixel((0, 0)) == (255, 255, 255)  # white background


def test_captions_start_with_the_name(emoji_set: datasets.DatasetDict) -> None:
    for split in emoji_set.values():
        for caption, name in zip(split["caption"], split["name"]):
            assert caption and caption[0] == name and all(caption)
            assert len({c.casefold() for c in caption}) == len(caption)
    names = set(emoji_set["train"]["name"]) | set(emoji_set["validation"]["name"])
    assert {"red apple", "flag: Japan", "grinning face"} <= names
    assert not any(":" in n.removeprefix("flag:") or "_" in n for n in names)


def test_second_call_loads_from_cache(
    emoji_set: datasets.DatasetDict, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("rendered again instead of loading the cache")

    monkeypatch.setattr(emoji_data, "_render", fail)
    cached = build_emoji_dataset(cache_dir, image_size=SIZE)
    assert cached["validation"]["emoji"] == emoji_set["validation"]["emoji"]
    assert cached["train"][0]["caption"] == emoji_set["train"][0]["caption"]


def test_losing_a_concurrent_build_loads_the_winner(
    emoji_set: datasets.DatasetDict, cache_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (winner,) = [p for p in cache_dir.iterdir() if f"-{SIZE}px-" in p.name]

    def build_while_another_process_finishes(image_size: int, fraction: float, style: str) -> object:
        shutil.copytree(winner, tmp_path / winner.name)  # the other process wins the rename
        return _tiny_set()

    monkeypatch.setattr(emoji_data, "_build", build_while_another_process_finishes)
    loaded = build_emoji_dataset(tmp_path, image_size=SIZE)
    assert loaded["train"]["emoji"] == emoji_set["train"]["emoji"]
    assert [p.name for p in tmp_path.iterdir()] == [winner.name]  # no staging left behind


def test_interrupted_build_leaves_no_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted_save(self: datasets.DatasetDict, path: str, **kwargs: object) -> None:
        Path(path).mkdir(exist_ok=True)
        (Path(path) / "half-written").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(emoji_data, "_build", lambda *args: _tiny_set())
    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        build_emoji_dataset(tmp_path, image_size=SIZE)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs", [{"image_size": 0}, {"validation_fraction": 1.5}])
def test_bad_arguments_are_rejected(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        build_emoji_dataset(tmp_path, **kwargs)


def test_attribution_is_re_exported() -> None:
    assert "OpenMoji" in emoji_data.ATTRIBUTION and "CC BY-SA 4.0" in emoji_data.ATTRIBUTION


def test_skin_tone_variants_stay_on_one_side(emoji_set: datasets.DatasetDict) -> None:
    def base(text: str) -> str:
        return "".join(ch for ch in text if not 0x1F3FB <= ord(ch) <= 0x1F3FF)

    train = {base(e) for e in emoji_set["train"]["emoji"]}
    validation = {base(e) for e in emoji_set["validation"]["emoji"]}
    assert train.isdisjoint(validation)
    assert any(base(e) != e for e in emoji_set["validation"]["emoji"])  # the case does occur


@pytest.mark.parametrize("style", ["lineart", "gray"])
def test_styles_are_the_same_rows_in_another_look_and_the_same_bytes_twice(
    emoji_set: datasets.DatasetDict, tmp_path: Path, style: str
) -> None:
    """builtin:emoji-lineart / -gray: the colour set's rows, names and splits; gray pixels (R = G =
    B); line art is black strokes on white; and a second build writes identical PNG bytes."""
    import numpy as np

    styled = build_emoji_dataset(tmp_path / "a", image_size=SIZE, style=style)
    again = build_emoji_dataset(tmp_path / "b", image_size=SIZE, style=style)
    for split in ("train", "validation"):
        assert styled[split]["name"] == emoji_set[split]["name"]
        raw = styled[split].cast_column("image", datasets.Image(decode=False))["image"]
        assert raw == again[split].cast_column("image", datasets.Image(decode=False))["image"]
        colour = emoji_set[split].cast_column("image", datasets.Image(decode=False))["image"]
        assert sum(a["bytes"] != b["bytes"] for a, b in zip(raw, colour)) > 0.9 * len(raw)
    pixels = np.stack([np.asarray(styled["validation"][i]["image"]) for i in range(40)]).astype(int)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    if style == "lineart":  # mostly white paper, some black ink
        assert (pixels > 250).mean() > 0.5 and (pixels < 128).mean() > 0.03  # 16 px: 0.62 and 0.06


def test_style_names_resolve_and_a_wrong_one_is_named(tmp_path: Path) -> None:
    from mmcl.config import ConfigError, SourceSpec
    from mmcl.data.sources import load_source

    spec = SourceSpec(dataset="builtin:emoji-lineart", split="validation")
    assert len(load_source(spec, str(tmp_path), SIZE)) > 100
    with pytest.raises(ConfigError, match="the built-in ones are builtin:emoji, builtin:emoji-lineart"):
        load_source(SourceSpec(dataset="builtin:emoji-sepia"), str(tmp_path), SIZE)
    with pytest.raises(ValueError, match="style in"):
        build_emoji_dataset(tmp_path, image_size=SIZE, style="sepia")
