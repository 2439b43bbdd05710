"""Hostile data files, as a new user meets them. An image path to /dev/zero or a named pipe made
`mmcl data check` and `mmcl train` hang; a file over data.max_image_bytes was read whole; a broken
CSV / JSONL line stopped with a pandas traceback naming neither the file nor the line. Every
command runs in a subprocess with a time limit: a hang fails the test."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from mmcl.config import ConfigError, SourceSpec
from mmcl.data.sources import load_pairs
from tests.conftest import DEBUG_CONFIG, REPO

HANG_BOUND_S = 300  # a data check of 7 rows takes seconds, 4 training steps well under a minute


def mmcl(*args):
    done = subprocess.run([sys.executable, "-m", "mmcl.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=HANG_BOUND_S)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture
def hostile_csv(tmp_path):
    """4 good PNGs, /dev/zero, a named pipe and a 65 MB (sparse) file, as image paths of a CSV."""
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 100, 200)).save(tmp_path / f"ok{i}.png")
    os.mkfifo(tmp_path / "pipe.png")
    with open(tmp_path / "huge.png", "wb") as f:
        f.truncate(65 * 2**20)
    rows = ["ok0.png,a blue square", "/dev/zero,zeros", "pipe.png,a pipe", "ok1.png,another square",
            "huge.png,a huge file", "ok2.png,a third square", "ok3.png,a fourth square"]
    (tmp_path / "pairs.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    return tmp_path / "pairs.csv"


def test_data_check_names_pipes_devices_and_huge_files_without_reading_them(hostile_csv):
    code, out = mmcl("data", "check", str(hostile_csv))
    assert code == 0, out  # 4 rows of 7 can train
    assert "\r" not in out  # a log, not a terminal: no progress frames
    assert "bad images: 3 (not a regular file 2, too large 1)" in out
    assert "row 1: /dev/zero [not a regular file] NotARegularFile: /dev/zero is a character device" in out
    assert f"row 2: {hostile_csv.parent}/pipe.png [not a regular file] NotARegularFile: " in out
    assert "is a named pipe" in out
    assert "has 68157440 bytes, over data.max_image_bytes (67108864): not read" in out


def test_training_skips_and_counts_them(hostile_csv, tmp_path):
    code, out = mmcl("train", str(DEBUG_CONFIG), f"--data.train={hostile_csv}", "--data.validation=null", "--data.validation_share=0",
                     f"--train.output_dir={tmp_path / 'run'}", "--train.per_device_batch_size=4",
                     "--train.max_steps=4", "--train.checkpoint_every=0", "--train.progress_bar=false",
                     "--data.max_image_bytes=1000000", "--hub.export=false")
    assert code == 0, out[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["train/skipped_images"] == 3
    assert "skipped 3 row(s)" in out and "over data.max_image_bytes (1000000)" in out


BROKEN = {
    "pairs.jsonl": ('{"image": "a.png", "caption": "a"}\n' * 33 + '{"image": "b.png", "caption": "b"\n'
                    + '{"image": "c.png", "caption": "c"}\n',
                    "pairs.jsonl, line 34: not valid JSON (Expecting ',' delimiter at column 34): fix or remove that line"),
    "fields.csv": ("image,caption\n" + "a.png,a\n" * 19 + "b.png,b,c,d\n" + "c.png,c\n",
                   "fields.csv, line 21: 4 fields where the header has 2: fix or remove that line"),
    "quote.csv": ("image,caption\n" + "a.png,a\n" * 19 + 'b.png,"never closed\n' + "c.png,c\n" * 3,
                  "quote.csv, line 21: unexpected end of data (a quote opened there is never closed?)"),
    "pairs.parquet": ("PAR1 not really parquet", "pairs.parquet, not a readable parquet file ("),
}


@pytest.mark.parametrize("name", BROKEN)
def test_a_broken_table_line_is_named_with_its_file_and_line(tmp_path, name):
    text, expected = BROKEN[name]
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as error:
        load_pairs(SourceSpec(dataset=str(tmp_path / name)))
    assert f"{tmp_path}/{expected}" in str(error.value)


def test_the_cli_says_it_in_one_line(tmp_path):
    text, expected = BROKEN["pairs.jsonl"]
    (tmp_path / "pairs.jsonl").write_text(text)
    code, out = mmcl("data", "check", str(tmp_path / "pairs.jsonl"))
    assert code != 0 and f"{tmp_path}/{expected}" in out and "Traceback" not in out
