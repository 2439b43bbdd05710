"""Offline, quiet, and one shared emoji cache per test session."""

import os
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

_HF_HOME = tempfile.mkdtemp(prefix="mmcl-hf-")
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=_HF_HOME,
                  HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false",
                  TRANSFORMERS_VERBOSITY="error")

REPO = Path(__file__).resolve().parent.parent
DEBUG_CONFIG = REPO / "configs" / "debug_tiny.yaml"


@pytest.fixture(scope="session")
def emoji_cache() -> str:
    """A cache folder for the built-in emoji set, built once per test session."""
    return tempfile.mkdtemp(prefix="mmcl-emoji-")


@pytest.fixture(scope="session")
def small_emoji(emoji_cache, tmp_path_factory) -> str:
    """96 training emoji at 16 px as a `save_to_disk` folder: several epochs in a few steps."""
    from mmcl.data.emoji import build_emoji_dataset

    ds = build_emoji_dataset(emoji_cache, image_size=16)["train"].select(range(96))
    path = tmp_path_factory.mktemp("small") / "emoji96"
    ds.save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="session")
def small_tokenizer(small_emoji, tmp_path_factory) -> Path:
    """One tokenizer of `small_emoji`'s captions, trained once for the runs that share it."""
    from datasets import load_from_disk

    from mmcl.towers.build import train_tokenizer
    from mmcl.data.pairs import iter_captions

    path = tmp_path_factory.mktemp("tokenizer") / "bpe500"
    train_tokenizer(iter_captions(load_from_disk(small_emoji), "caption"), 500).save_pretrained(path)
    return path


def save_tiny_model(folder: Path, words: str, vocab_size: int = 300) -> Path:
    """A random tiny mmcl model folder (BERT + ViT towers of tests/test_model.py, 16 px images),
    with a tokenizer trained on `words` and an image processor beside it."""
    import torch

    from mmcl.towers.build import build_image_processor, train_tokenizer
    from mmcl.config import ModelConfig
    from mmcl.towers.model import DualEncoder, DualEncoderConfig
    from tests.test_model import TEXT, VISION

    tokenizer = train_tokenizer([words] * 5, vocab_size)  # byte-level: at least 261 tokens
    torch.manual_seed(0)
    DualEncoder(DualEncoderConfig(dict(TEXT, vocab_size=len(tokenizer)), VISION, projection_dim=8)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    build_image_processor(ModelConfig(image_size=16)).save_pretrained(folder)
    return folder


def python() -> str:
    return sys.executable


@contextmanager
def one_thread():
    """In-process work with one intra-op thread, as a subprocess launched with OMP_NUM_THREADS=1:
    the same kernels, so the same float sums (a launch's result can be compared exactly)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def free_port() -> int:
    """A port no earlier (or stray) launch is using: a fixed one could meet a leftover process."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- skips -------------------------------------------------------------------------------------------
# The only tests that may skip, and why. With MMCL_STRICT_SKIPS=1 (.ci/run sets it) any other skip fails
# the run: a test that silently does not run is not a passing test.
ALLOWED_SKIPS = {
    "tests/test_backbones.py::test_a_timm_model_is_a_tower_through_transformers_timm_wrapper":
        "timm needs torchvision, and no torchvision build for the CPU torch installs on these machines",
    "tests/scripts/test_benchmarks.py::test_peer_plugin_builds_mmcl_through_the_current_api":
        "the shared benchmark harness (../shared/bench) is not beside every clone",
}
_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def unexpected_skips() -> list[str]:
    return [nodeid for nodeid in _skipped if nodeid not in ALLOWED_SKIPS]


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("MMCL_STRICT_SKIPS") and unexpected_skips():
        terminalreporter.write_line("skipped outside tests/conftest.py ALLOWED_SKIPS (a failure under "
                                    "MMCL_STRICT_SKIPS): " + ", ".join(unexpected_skips()), red=True)


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("MMCL_STRICT_SKIPS") and unexpected_skips() and exitstatus == 0:
        session.exitstatus = 1
