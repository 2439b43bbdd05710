"""Two runs into one output folder: the second is refused while the first is alive, naming it; the
lock a killed run leaves is taken over with a warning; a finished run leaves no lock."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mmcl.artifacts import LOCK_NAME
from mmcl.training.loop import train
from tests.conftest import DEBUG_CONFIG, REPO
from tests.test_train import debug_config

START_BOUND_S = 120  # a run locks its folder right after start (imports and Accelerator)


def wait_for_lock(folder, pid, proc):
    deadline = time.monotonic() + START_BOUND_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        try:
            if json.loads((folder / LOCK_NAME).read_text())["pid"] == pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no lock by pid {pid} within {START_BOUND_S} s")


def test_a_second_run_is_refused_while_the_first_lives_and_takes_over_when_it_is_killed(
        tmp_path, emoji_cache, small_emoji, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "mmcl.cli", "train", str(DEBUG_CONFIG), f"--train.output_dir={out}",
         f"--data.cache_dir={emoji_cache}", f"--data.train={small_emoji}", "--data.validation=null", "--data.validation_share=0",
         "--train.max_steps=1000000", "--train.checkpoint_every=0", "--train.progress_bar=false"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_lock(out, first.pid, first)
        second = [f"--data.train={small_emoji}", "--data.validation=null", "--data.validation_share=0", "--train.max_steps=2",
                  "--train.checkpoint_every=0"]
        with pytest.raises(FileExistsError, match=rf"{out} is in use by another run \(pid {first.pid} on "):
            train(debug_config(out, emoji_cache, *second))
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid  # the refused run left it alone
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.communicate(timeout=60)

    train(debug_config(out, emoji_cache, *second))
    assert f"warning: took over the lock of a run that is gone (pid {first.pid} on " in capsys.readouterr().out
    assert (out / "final" / "model.safetensors").is_file()
    assert not (out / LOCK_NAME).exists()
