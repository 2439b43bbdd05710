"""Offline, quiet, and one shared emoji cache per test session."""

import os
import sys
import tempfile
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


def python() -> str:
    return sys.executable
