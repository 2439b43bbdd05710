"""Property-based fuzzing of what a user hands mmcl (hypothesis): random YAML as a config, random CSV /
JSONL rows, random bytes as images, fed to `mmcl train` and `mmcl data check`. Whatever comes in,
each `mmcl train` ends with exit 0, or one line `mmcl train: error: ...` and exit 2; `mmcl data
check` ends with its report's verdict (exit 0 can train, 1 cannot) or that one line; a bad image is a
counted skip; nothing prints a traceback and nothing hangs (each call runs under an alarm)."""

from __future__ import annotations

import contextlib
import io
import json
import signal

import pytest
import yaml

from mmcl.cli import main
from tests.conftest import DEBUG_CONFIG

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CALL_BOUND_S = 120  # one in-process call; a hang raises here instead of stalling the suite
FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

KEYS = ["model", "data", "train", "loss", "eval", "hub", "max_steps", "train.max_steps", "text_config", "model_type",
        "per_device_batch_size", "learning_rate", "augment", "sets", "task", "caption_column", "", "é", "1"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=20))
yaml_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
                           max_leaves=8)
cells = st.one_of(st.text(max_size=30), st.sampled_from(["img0.png", "missing.png", "", "NaN", "img1.bin", "/dev/zero",
                                                          "..", "img0.png,extra"]))


class Alarm(Exception):
    pass


@contextlib.contextmanager
def bounded(seconds: int):
    def ring(signum, frame):
        raise Alarm(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run(argv: list[str], stdout: io.StringIO | None = None) -> tuple[int, str]:
    err = io.StringIO()
    with bounded(CALL_BOUND_S), contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout or io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def one_clean_line(command: str, code: int, said: str) -> None:
    lines = [line for line in said.splitlines() if line.strip() and not line.startswith(("train:", "auto:"))]
    errors = [line for line in lines if line.startswith(f"mmcl {command}: error: ")]
    assert code in (0, 2) and "Traceback" not in said, (code, said[-2000:])
    assert code == 0 or len(errors) == 1, said[-2000:]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("fuzz")
    for i in range(2):
        Image.new("RGB", (16, 16), (i * 100, 50, 200)).save(root / f"img{i}.png")
    (root / "pairs_ok.csv").write_text("image,caption\nimg0.png,a blue square\nimg0.png,blue\nimg0.png,a square\n")
    return root


@FUZZ
@given(value=yaml_values)
def test_random_yaml_as_a_config(folder, emoji_cache, value):
    path = folder / "fuzz.yaml"
    path.write_text(yaml.safe_dump(value, allow_unicode=True) if not isinstance(value, str) else value)
    code, said = run(["train", str(path), "--train.max_steps=1", f"--train.output_dir={folder / 'run'}",
                      "--train.overwrite_output_dir=true", f"--data.train={folder / 'pairs_ok.csv'}",
                      "--data.validation=null", "--data.validation_share=0", f"--data.cache_dir={emoji_cache}", "--hub.export=false",
                      "--train.progress_bar=false", "--train.mixed_precision=no", "--train.per_device_batch_size=2"])
    one_clean_line("train", code, said)


@FUZZ
@given(rows=st.lists(st.tuples(cells, cells), max_size=6), jsonl=st.booleans(),
       blob=st.binary(max_size=300))
def test_random_rows_and_image_bytes(folder, emoji_cache, rows, jsonl, blob):
    (folder / "img1.bin").write_bytes(blob)  # random bytes where an image should be
    if jsonl:
        path = folder / "pairs.jsonl"
        path.write_text("".join(json.dumps({"image": a, "caption": b}) + "\n" for a, b in rows))
    else:
        path = folder / "pairs.csv"
        path.write_text("image,caption\n" + "".join(f"{a},{b}\n" for a, b in rows))
    report = io.StringIO()
    code, said = run(["data", "check", str(path)], report)
    verdict = [line for line in report.getvalue().splitlines() if line.startswith("verdict: ")]
    if code in (0, 1):  # the report, its verdict last: whether this data can train
        assert "Traceback" not in said and verdict == [("verdict: CANNOT TRAIN" if code else verdict[0])], \
            (code, report.getvalue()[-2000:], said[-2000:])
    else:
        one_clean_line("data check", code, said)
    code, said = run(["train", str(DEBUG_CONFIG), f"--data.train={path}", "--data.validation=null", "--data.validation_share=0",
                      "--train.max_steps=1", "--train.per_device_batch_size=2", f"--train.output_dir={folder / 'run'}",
                      "--train.overwrite_output_dir=true", f"--data.cache_dir={emoji_cache}", "--hub.export=false",
                      "--train.progress_bar=false", "--eval.sets={}"])
    one_clean_line("train", code, said)


def test_the_fuzzers_inputs_are_not_all_rejected_early(folder, emoji_cache):
    """The fuzzing can fail: a well-formed config and well-formed rows do train (exit 0); the run's
    last line is its metrics as JSON."""
    out = io.StringIO()
    code, said = run(["train", str(DEBUG_CONFIG), f"--data.train={folder / 'pairs_ok.csv'}", "--data.validation=null", "--data.validation_share=0",
                      "--train.max_steps=1", "--train.per_device_batch_size=2", f"--train.output_dir={folder / 'run'}",
                      "--train.overwrite_output_dir=true", f"--data.cache_dir={emoji_cache}", "--hub.export=false",
                      "--train.progress_bar=false", "--eval.sets={}"], out)
    assert code == 0, said[-2000:]
    assert "train/wall_s" in json.loads(out.getvalue().splitlines()[-1])

