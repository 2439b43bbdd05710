"""A full disk while a checkpoint or the final model is written: a clear error naming the path, the
bytes needed and free, and the folder left intact; the earlier checkpoint still resumes exactly."""

import builtins
import errno
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from mmcl.artifacts import SaveError, folder_bytes
from mmcl.training.checkpoint import checkpoints
from mmcl.towers.model import DualEncoder
from mmcl.training.loop import train
from tests.conftest import DEBUG_CONFIG, REPO
from tests.test_train import debug_config


def fill_disk_at(monkeypatch, marker):
    """Every file opened for writing at a path containing `marker` fails as on a full disk (the
    optimizer state, the JSON files and transformers' config are written through `open`)."""
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax") and marker in str(file):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)


def runs(small_emoji, small_tokenizer, *extra):
    return (f"--data.train={small_emoji}", "--data.validation=null", "--data.validation_share=0", "--train.checkpoint_every=2",
            "--train.keep_last=0", f"--model.tokenizer={small_tokenizer}", "--train.lr_scheduler=constant", *extra)


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one_which_resumes_exactly(
        tmp_path, emoji_cache, small_emoji, small_tokenizer, monkeypatch):
    common = runs(small_emoji, small_tokenizer, "--train.max_steps=6")
    train(debug_config(tmp_path / "whole", emoji_cache, *common))

    out = tmp_path / "full"
    fill_disk_at(monkeypatch, ".tmp-step-00000004")
    with pytest.raises(SaveError) as error:
        train(debug_config(out, emoji_cache, *common))
    step2 = out / "checkpoints" / "step-00000002"
    message = str(error.value)
    print(message)
    assert message.startswith(f"could not write {out}/checkpoints/step-00000004: No space left on device ({out}/")
    assert f"it needs about {folder_bytes(step2):,} bytes and " in message and f"; {step2} is intact." in message
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]  # no half-written folder left

    monkeypatch.undo()
    train(debug_config(out, emoji_cache, *common, "--train.resume=latest"))
    assert [p.name for p in checkpoints(out)] == ["step-00000002", "step-00000004", "step-00000006"]
    a, b = load_file(tmp_path / "whole" / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-6


def test_a_full_disk_during_the_final_save_keeps_the_earlier_model(tmp_path, emoji_cache, small_emoji,
                                                                    small_tokenizer, monkeypatch):
    train(debug_config(tmp_path, emoji_cache, *runs(small_emoji, small_tokenizer, "--train.max_steps=2")))
    before = (tmp_path / "final" / "model.safetensors").read_bytes()

    fill_disk_at(monkeypatch, ".tmp-final")
    with pytest.raises(SaveError, match=rf"could not write {tmp_path}/final: No space left on device .* "
                                        rf"it needs about [\d,]+ bytes .*; {tmp_path}/final is intact\."):
        train(debug_config(tmp_path, emoji_cache, *runs(small_emoji, small_tokenizer, "--train.max_steps=4",
                                                       "--train.resume=latest")))
    monkeypatch.undo()
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    DualEncoder.from_pretrained(tmp_path / "final")  # still loads


def test_the_real_writers_failing_are_named_in_one_line_and_leave_the_last_checkpoint(
        tmp_path, emoji_cache, small_emoji, small_tokenizer):
    """Not a patched `open`: from the second checkpoint on no file may grow past 64 kB (RLIMIT_FSIZE),
    so safetensors' writer fails first, as it would on a full disk."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tests.faults.fsize_worker", "train", str(DEBUG_CONFIG), f"--train.output_dir={out}",
           f"--data.cache_dir={emoji_cache}", *runs(small_emoji, small_tokenizer, "--train.max_steps=6"),
           "--train.progress_bar=false", "--hub.export=false"]
    env = dict(os.environ, MMCL_FSIZE=str(64 * 1024), MMCL_FSIZE_AT="2")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    said = done.stdout + done.stderr
    print(said[-1500:])
    step2 = out / "checkpoints" / "step-00000002"
    assert done.returncode == 1 and "Traceback" not in said, said[-3000:]
    assert f"mmcl train: error: could not write {out}/checkpoints/step-00000004: " in said
    assert "File too large" in said and f"it needs about {folder_bytes(step2):,} bytes" in said
    assert f"{step2} is intact." in said
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
