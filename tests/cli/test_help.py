"""`--help` documents every config key and eval flag from the dataclasses' own help text."""

import dataclasses
import subprocess
import sys

import pytest

from mmcl.cli import main
from mmcl.config import Config, EvalSpec


def help_text(capsys, command: str) -> str:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_train_help_lists_every_config_key_with_its_help(capsys):
    text = help_text(capsys, "train")
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(getattr(Config(), section.name)):
            assert f"{section.name}.{f.name} (" in text, f.name
            assert " ".join(f.metadata["help"].split()) in text, f.name
    assert "train.mixed_precision (auto|no|bf16|fp16 = 'auto')" in text
    assert "averages gradients over micro-batches; adds NO negatives" in text
    assert text.startswith("usage: mmcl train [-h] [CONFIG.yaml] [--section.key=value ...]")
    headings = [text.index(f" {section.name}: ") for section in dataclasses.fields(Config)]
    assert headings == sorted(headings)  # grouped: each section's heading, in order
    ends = headings[1:] + [len(text)]
    for section, start, end in zip(dataclasses.fields(Config), headings, ends):  # its keys under its heading
        for f in dataclasses.fields(getattr(Config(), section.name)):
            assert start < text.index(f"--{section.name}.{f.name} (") < end, f.name


def test_eval_help_shows_each_spec_field_help(capsys):
    text = help_text(capsys, "eval")
    for f in dataclasses.fields(EvalSpec):
        if f.name != "every":
            assert f"--{f.name.replace('_', '-')}" in text and " ".join(f.metadata["help"].split()) in text, f.name


def test_version_is_the_projects():
    import tomllib

    from tests.conftest import REPO

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    done = subprocess.run([sys.executable, "-m", "mmcl.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"mmcl {version}", done
