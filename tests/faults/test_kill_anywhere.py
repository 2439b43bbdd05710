"""Killed at any moment: a training run, a subprocess, is killed with SIGKILL 10 times at moments
drawn at random (seeded) from three kinds: inside a step, inside a checkpoint save, inside an
evaluation (tests/faults/kill_at.py). Each time `--train.resume=latest` must start from the newest
complete checkpoint, never a partial one; the run that finishes must hold the parameters of an
uninterrupted run."""

import os
import random
import subprocess
import sys

from safetensors.torch import load_file

from mmcl.training.checkpoint import checkpoints
from mmcl.training.loop import train
from tests.conftest import DEBUG_CONFIG, REPO, one_thread
from tests.test_train import debug_config

KILLS = 10
LAUNCH_BOUND_S = 180  # one launch: start-up, a few steps and checkpoints, an evaluation
# A launch gets at most 8 steps further (killed at its 3rd evaluation, every 3 steps, after the
# checkpoint of step 8): 48 steps leave room for all 10 kills.


def launch(out, args, phase=None, at=0):
    cmd = [sys.executable, "-m", "tests.faults.kill_at", "train", str(DEBUG_CONFIG), *args, f"--train.output_dir={out}",
           "--train.resume=latest", "--train.progress_bar=false", "--hub.export=false"]
    env = dict(os.environ, MMCL_KILL_PHASE=str(phase), MMCL_KILL_AT=str(at), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_BOUND_S)


def test_killed_ten_times_at_random_moments_the_run_resumes_to_the_uninterrupted_weights(
        tmp_path, emoji_cache, small_emoji, small_tokenizer):
    args = [f"--data.cache_dir={emoji_cache}", f"--data.train={small_emoji}", f"--data.validation={small_emoji}",
            "--data.max_validation_samples=32", f"--model.tokenizer={small_tokenizer}", "--train.max_steps=48",
            "--train.checkpoint_every=2", "--train.eval_every=3", "--train.keep_last=0", "--train.log_every=1"]
    with one_thread():  # uninterrupted, in this process, with the threads of the killed launches
        train(debug_config(tmp_path / "whole", emoji_cache, *args))

    out = tmp_path / "killed"
    rng = random.Random(12)
    moments = [(phase, rng.randint(1, 3)) for phase in rng.sample(["step"] * 4 + ["checkpoint"] * 3 + ["eval"] * 3, 10)]
    expected = None  # the checkpoint the next launch must resume from
    report = []
    for phase, at in [*moments, (None, 0)]:
        done = launch(out, args, phase, at)
        said = done.stdout + done.stderr
        if expected is None:
            assert "resumed from" not in said, said[-3000:]
        else:
            assert f"resumed from {expected} at step {int(expected.name.split('-')[1])}" in said, said[-3000:]
        partial = sorted(p.name for p in (out / "checkpoints").glob(".tmp-*")) if (out / "checkpoints").is_dir() else []
        report.append(f"killed {phase} #{at}: rc {done.returncode}, resumed from "
                      f"{expected.name if expected else 'nothing'}, partial left {partial or 'none'}")
        if phase is None:
            assert done.returncode == 0, said[-3000:]
            break
        assert done.returncode == -9, (report, said[-3000:])  # killed where asked, not finished before
        expected = (checkpoints(out) or [None])[-1]
    print("\n".join(report))

    assert any("partial left ['.tmp-" in line for line in report)  # a half-written checkpoint was there, not used
    a, b = load_file(tmp_path / "whole" / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    print("max |difference| killed-uninterrupted", worst)
    assert worst < 1e-6
