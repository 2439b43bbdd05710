"""`mmcl data check` and `mmcl data convert`: every kind of bad input reported with its row, the
same verdict as training, and conversions that read back with the same pairs and bytes."""

import io
import json
import tarfile

import datasets
import numpy as np
import pytest
from PIL import Image

from mmcl.cli import main
from mmcl.config import ConfigError, ModelConfig, SourceSpec
from mmcl.data.pairs import PairDataset, PairRecipe
from mmcl.data.sources import load_pairs, load_source
from mmcl.data.check import check_data
from mmcl.data.convert import ShardWriter, convert_to_hf, convert_to_webdataset, webdataset_features
from mmcl.towers.build import build_image_processor, train_tokenizer

PROCESSOR = build_image_processor(ModelConfig(image_size=8))
BOMB_LIMIT = 1000  # PIL.Image.MAX_IMAGE_PIXELS in these tests, so that a "bomb" is a few bytes


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def noise(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def write_bad_folder(folder):
    """(file, caption) rows, and the kind of problem expected at each row ("" for a good row)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        noise(10 + i, 12, i).save(folder / f"good{i}.png")
    jpeg = encode(noise(30, 30, 9), "JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image")
    Image.new("RGB", (50, 50)).save(folder / "bomb.png")  # 2,500 px > 2 x BOMB_LIMIT: refused
    Image.new("CMYK", (8, 6), (0, 80, 160, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((6, 8), 40000, dtype=np.uint16)).save(folder / "sixteen.png")
    rows = [("good0.png", "a red square", ""), ("good1.png", "a blue circle", ""),
            ("truncated.jpg", "a cut file", "truncated"), ("zero.jpg", "nothing", "zero-byte"),
            ("text.jpg", "words", "not an image"), ("missing.png", "gone", "missing"),
            ("bomb.png", "too big", "decompression bomb"), ("cmyk.jpg", "print colours", ""),
            ("sixteen.png", "a deep grey", ""), ("good2.png", "", "caption"),  # empty field: NaN
            ("good3.png", "NaN", "caption"), ("good3.png", "a green leaf", "")]
    (folder / "pairs.csv").write_text("image,caption\n" + "\n".join(f"{f},{c}" for f, c, _ in rows) + "\n")
    return rows


@pytest.fixture
def bad_csv(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BOMB_LIMIT)
    rows = write_bad_folder(tmp_path / "data")
    return str(tmp_path / "data" / "pairs.csv"), rows


def test_every_bad_input_is_reported_with_its_row_and_training_agrees(bad_csv):
    spec, rows = bad_csv
    report = check_data(SourceSpec(spec))
    assert report.rows == len(rows) and report.can_train
    bad_images = {e["row"]: e for e in report.bad_image_examples}
    assert {r: e["kind"] for r, e in bad_images.items()} == {
        i: kind for i, (_, _, kind) in enumerate(rows) if kind not in ("", "caption")}
    for row, example in bad_images.items():
        assert example["source"].endswith(rows[row][0])  # the path is named
    assert "DecompressionBombError" in bad_images[6]["reason"]
    assert report.bad_image_kinds == {"truncated": 1, "zero-byte": 1, "not an image": 1, "missing": 1,
                                      "decompression bomb": 1}
    assert {e["row"] for e in report.bad_caption_examples} == {9, 10}  # empty field and "NaN": both None
    assert report.bad_caption_kinds == {"missing (an empty cell, or NaN/NA/null in a CSV)": 2}
    # CMYK and 16-bit images are good: counted in the modes, converted, not rejected
    assert report.modes == {"RGB": 5, "CMYK": 1, "I;16": 1} and report.formats == {"PNG": 6, "JPEG": 1}
    assert report.width == {"min": 8, "median": 12, "max": 12} and report.height["max"] == 13
    assert report.trainable_rows == 5
    # exactly the rows the check calls bad are the rows training skips
    pairs = PairDataset(load_pairs(SourceSpec(spec)), "image", "caption", PairRecipe(PROCESSOR))
    trainable = set()
    for row in range(len(rows)):
        try:
            pairs._load(row)
            trainable.add(row)
        except Exception:
            pass
    assert trainable == {i for i, (_, _, kind) in enumerate(rows) if not kind}
    summary = report.summary()
    assert "row 2: " in summary and "truncated.jpg [truncated]" in summary and "verdict: can train" in summary
    assert json.loads(report.to_json())["bad_images"] == 5


def test_images_over_the_pixel_limit_are_bad_in_check_and_training(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BOMB_LIMIT)
    sizes = {"under.png": (30, 30), "band.png": (40, 40), "over.png": (45, 45)}  # 900, 1600, 2025 px
    for name, size in sizes.items():
        Image.new("RGB", size).save(tmp_path / name)
    with pytest.warns(Image.DecompressionBombWarning):  # Pillow: between 1x and 2x the limit, a warning
        Image.open(tmp_path / "band.png")
    with pytest.raises(Image.DecompressionBombError):  # above 2x, an error
        Image.open(tmp_path / "over.png")
    (tmp_path / "pairs.csv").write_text("image,caption\n" + "\n".join(f"{n},{n}" for n in sizes))
    spec = str(tmp_path / "pairs.csv")
    report = check_data(SourceSpec(spec))
    # mmcl skips both: the warning band too (one such image decoded to RGB can take gigabytes)
    assert [e["row"] for e in report.bad_image_examples] == [1, 2]
    assert {e["kind"] for e in report.bad_image_examples} == {"decompression bomb"}
    pairs = PairDataset(load_pairs(SourceSpec(spec)), "image",
                        "caption", PairRecipe(PROCESSOR))
    assert pairs[1]["row"] == 0 and [s.row for s in pairs[1]["skipped"]] == [1, 2]


def test_every_kind_of_bad_caption(tmp_path):
    noise(8, 8, 0).save(tmp_path / "a.png")
    cells = ["fine", "", "   ", [], None, 5, ["", " "], ["ok", ""], 2.5]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps({"image": "a.png", "caption": c}) for c in cells))
    report = check_data(SourceSpec(str(tmp_path / "pairs.jsonl")))
    kinds = {e["row"]: e["kind"] for e in report.bad_caption_examples}
    assert kinds == {1: "empty string", 2: "whitespace only", 3: "empty list", 4: "missing (an empty cell, or "
                     "NaN/NA/null in a CSV)", 5: "not text (int)", 6: "list without a non-empty string",
                     8: "not text (float)"}
    assert report.trainable_rows == 2 and report.captions == 2


def test_truncation_with_a_tokenizer_trained_here_and_without_one(tmp_path):
    captions = ["a cat", "a cat on a mat in the sun", "dog", "a very very long caption about a dog and a cat"]
    for i in range(len(captions)):
        noise(8, 8, i).save(tmp_path / f"{i}.png")
    (tmp_path / "pairs.csv").write_text("image,caption\n" + "\n".join(f"{i}.png,{c}" for i, c in enumerate(captions)))
    tokenizer = train_tokenizer(captions, 60)
    lengths = [len(tokenizer(c)["input_ids"]) for c in captions]  # with [CLS] and [SEP]
    spec = str(tmp_path / "pairs.csv")
    report = check_data(SourceSpec(spec), tokenizer=tokenizer, max_length=8)
    assert report.length_unit == "tokens" and report.captions == 4
    assert report.truncated == sum(n > 8 for n in lengths) == 2
    assert report.truncation_rate == 0.5
    assert report.longest == {"row": 3, "length": max(lengths), "caption": captions[3]}
    tokenizer.save_pretrained(tmp_path / "tok")  # a tokenizer named by its folder, as on the command line
    assert check_data(SourceSpec(spec), tokenizer=str(tmp_path / "tok"), max_length=8).truncated == 2
    words = check_data(SourceSpec(spec), max_length=8)
    assert words.length_unit == "words" and words.truncated == 1 and words.longest["length"] == 11
    assert "whitespace words (no tokenizer given" in words.summary()


def test_duplicate_images_and_captions(tmp_path):
    data = encode(noise(8, 8, 0), "PNG")
    for name in ("a.png", "copy_of_a.png"):
        (tmp_path / name).write_bytes(data)
    noise(8, 8, 1).save(tmp_path / "b.png")
    rows = [("a.png", "a cat"), ("b.png", "a cat"), ("copy_of_a.png", "a dog"), ("a.png", "a bird"), ("b.png", "a fox")]
    (tmp_path / "pairs.csv").write_text("image,caption\n" + "\n".join(f"{f},{c}" for f, c in rows))
    report = check_data(SourceSpec(str(tmp_path / "pairs.csv")))
    assert report.duplicate_image_groups == 2 and report.duplicate_image_rows == 5
    assert [e["rows"] for e in report.duplicate_image_examples] == [[0, 2, 3], [1, 4]]
    assert report.duplicate_caption_groups == 1 and report.duplicate_caption_rows == 2
    assert report.duplicate_caption_examples == [{"rows": [0, 1], "caption": "a cat"}]


def test_non_utf8_caption_files_are_a_clear_error(tmp_path):
    noise(8, 8, 0).save(tmp_path / "a.png")
    (tmp_path / "latin1.csv").write_bytes("image,caption\na.png,café crème\n".encode("latin-1"))
    (tmp_path / "latin1.jsonl").write_bytes('{"image": "a.png", "caption": "café"}\n'.encode("latin-1"))
    folder = tmp_path / "folder"
    folder.mkdir()
    noise(8, 8, 0).save(folder / "a.png")
    (folder / "metadata.csv").write_bytes("file_name,caption\na.png,naïve\n".encode("latin-1"))
    for spec, named in ((tmp_path / "latin1.csv", "latin1.csv"), (tmp_path / "latin1.jsonl", "latin1.jsonl"),
                        (folder, "metadata.csv")):
        with pytest.raises(ConfigError, match=rf"{named}: not UTF-8 text .*re-save the file as UTF-8"):
            load_source(SourceSpec(str(spec)))
        report = check_data(SourceSpec(str(spec)))  # a report, not a traceback
        assert not report.can_train and named in report.errors[0] and "not UTF-8" in report.errors[0]


def test_missing_column_and_all_bad_rows_cannot_train(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "pairs.csv").write_text("file,text\nzero.png,a caption\nmissing.png,another\nfolder.png,a third\n")
    spec = str(tmp_path / "pairs.csv")
    missing = check_data(SourceSpec(spec))
    assert not missing.can_train and missing.columns == ["file", "text"]
    assert missing.errors == [f"{spec}: no column 'image' (data.image_column); columns are: file, text",
                              f"{spec}: no column 'caption' (data.caption_column); columns are: file, text"]
    report = check_data(SourceSpec(spec, image_column="file", caption_column="text"))
    assert not report.can_train and report.trainable_rows == 0
    assert report.bad_image_kinds == {"zero-byte": 1, "missing": 1, "not a regular file": 1}  # the folder
    assert "no row has both a readable image and a caption" in report.errors[0]
    assert report.summary().endswith("verdict: CANNOT TRAIN")
    nothing = check_data(SourceSpec(str(tmp_path / "nope.csv")))
    assert not nothing.can_train and "does not exist" in nothing.errors[0]


def test_command_line_exit_status_and_json(tmp_path, bad_csv, capsys):
    spec, rows = bad_csv
    assert main(["data", "check", spec, "--json", str(tmp_path / "report.json"), "--max-length", "2"]) == 0
    out = capsys.readouterr().out
    assert "bad images: 5" in out and "longer than 2: " in out
    assert json.loads((tmp_path / "report.json").read_text())["bad_image_kinds"]["zero-byte"] == 1
    (tmp_path / "bad.csv").write_text("image,caption\nnope.png,x\n")
    assert main(["data", "check", str(tmp_path / "bad.csv"), "--caption-column", "caption"]) == 1
    assert main(["data", "convert", spec, str(tmp_path / "shards"), "--to", "webdataset", "--shard-size", "2"]) == 0
    assert "5 of 12 rows written" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [f"shard-00000{i}.tar" for i in range(3)]


def test_parallel_decoding_gives_the_same_report(bad_csv):
    spec, _ = bad_csv  # the workers are forked after the monkeypatched bomb limit
    assert check_data(SourceSpec(spec), num_workers=2) == check_data(SourceSpec(spec))


def good_rows(rows, folder):
    return [(i, (folder / f).read_bytes(), c) for i, (f, c, kind) in enumerate(rows) if not kind]


def test_convert_to_hf_round_trip(tmp_path, bad_csv):
    spec, rows = bad_csv
    result = convert_to_hf(SourceSpec(spec), tmp_path / "hf")
    assert result.written == 5 and result.skipped == 7 and result.skipped_kinds["no caption"] == 2
    assert "row 3: " in result.summary()
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    assert isinstance(ds.features["image"], datasets.Image)
    raw = ds.cast_column("image", datasets.Image(decode=False))
    expected = good_rows(rows, tmp_path / "data")
    assert [(r["image"]["bytes"], r["caption"]) for r in raw] == [(data, c) for _, data, c in expected]
    again = check_data(SourceSpec(str(tmp_path / "hf")))  # nothing left for training to skip
    assert again.can_train and again.trainable_rows == 5 and again.modes["CMYK"] == 1
    with pytest.raises(ConfigError, match="not empty"):
        convert_to_hf(SourceSpec(spec), tmp_path / "hf")


def test_convert_to_webdataset_round_trip_through_datasets_streaming(tmp_path, bad_csv):
    spec, rows = bad_csv
    out = tmp_path / "wds"
    result = convert_to_webdataset(SourceSpec(spec), out, shard_size=2)
    assert result.shards == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(p.name for p in out.iterdir()) == result.shards  # no .tmp left behind
    assert result.image_extensions == {"png": 4, "jpg": 1}
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert tar.getnames() == ["000000000.png", "000000000.json", "000000001.png", "000000001.json"]
    stream = datasets.load_dataset("webdataset", data_files=str(out / "shard-*.tar"), split="train", streaming=True,
                                   features=webdataset_features(result.image_extensions))
    assert stream.num_shards == 3
    samples = list(stream)
    assert isinstance(samples[0]["png"], Image.Image) and samples[0]["jpg"] is None
    assert [s["json"]["row"] for s in samples] == [0, 1, 7, 8, 11]
    assert samples[2]["jpg"].mode == "CMYK"  # datasets decodes as stored: mmcl.data.images.load_image converts
    raw = stream.cast_column("png", datasets.Image(decode=False)).cast_column("jpg", datasets.Image(decode=False))
    got = [((s["png"] or s["jpg"])["bytes"], s["json"]["caption"]) for s in raw]
    assert got == [(data, [c]) for _, data, c in good_rows(rows, tmp_path / "data")]


def test_webdataset_image_ids_and_single_format_read_without_features(tmp_path):
    for name, seed in (("x.png", 0), ("y.png", 1)):
        noise(8, 8, seed).save(tmp_path / name)
    rows = [("x.png", "a cat", "img-x"), ("x.png", "a kitten", "img-x"), ("y.png", "a dog", "img-y")]
    (tmp_path / "coco.csv").write_text("image,caption,id\n" + "\n".join(",".join(r) for r in rows))
    spec = str(tmp_path / "coco.csv")
    convert_to_webdataset(SourceSpec(spec), tmp_path / "by_bytes")
    convert_to_webdataset(SourceSpec(spec), tmp_path / "by_column", image_id_column="id")
    by_bytes, by_column = (list(datasets.load_dataset("webdataset", data_files=str(tmp_path / d / "shard-*.tar"),
                                                       split="train", streaming=True))
                           for d in ("by_bytes", "by_column"))
    assert set(by_bytes[0]) == {"png", "json", "__key__", "__url__"}  # one format: no features needed
    assert by_bytes[0]["json"]["image_id"] == by_bytes[1]["json"]["image_id"] != by_bytes[2]["json"]["image_id"]
    assert [s["json"]["image_id"] for s in by_column] == ["img-x", "img-x", "img-y"]
    with pytest.raises(ConfigError, match="no column 'nope'; columns are: image, caption, id"):
        convert_to_webdataset(SourceSpec(spec), tmp_path / "x", image_id_column="nope")


def test_a_failed_conversion_leaves_only_complete_shards(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, shard_size=2) as writer:
            for i in range(3):
                writer.add(f"{i:03d}", {"txt": b"x"})
            raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar"]


def test_convert_imagefolder_and_embedded_bytes_sources(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(3):
        noise(8, 8 + i, i).save(folder / f"{i}.png")
    (folder / "zero.png").write_bytes(b"")
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f, "caption": [f"pic {f}", "x"]})
                                                     for f in ("0.png", "1.png", "2.png", "zero.png")))
    first = convert_to_hf(SourceSpec(str(folder)), tmp_path / "hf1")  # paths -> bytes
    assert (first.written, first.skipped_kinds) == (3, {"zero-byte": 1})
    assert convert_to_hf(SourceSpec(str(tmp_path / "hf1")), tmp_path / "hf2").written == 3  # bytes -> bytes
    raw = datasets.load_from_disk(str(tmp_path / "hf2")).cast_column("image", datasets.Image(decode=False))
    assert [(r["image"], r["caption"]) for r in raw] == [
        ({"bytes": (folder / f"{i}.png").read_bytes(), "path": f"{i}.png"}, [f"pic {i}.png", "x"]) for i in range(3)]
