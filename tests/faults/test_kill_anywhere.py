"""Killed at any moment: a training run, a subprocess, is killed with SIGKILL 13 times at moments
drawn at random (seeded) from seven kinds (tests/faults/kill_at.py): inside a step, a checkpoint
save, an evaluation, a file's write (half a weights or optimizer file), just before a rename (of a
checkpoint, or between setting a best model aside and moving the new one in), a log append (half a
line), a model folder's write. Each time `--train.resume=latest` must start from the newest complete
checkpoint, never a partial one; the run that finishes must hold the parameters of an uninterrupted
run, a log every reader parses, and its best model."""

import os
import random
import subprocess
import sys

from safetensors.torch import load_file

from mmcl.evaluation.plots import read_log
from mmcl.training.checkpoint import checkpoints
from mmcl.training.loop import train
from tests.conftest import DEBUG_CONFIG, REPO, one_thread
from tests.test_train import debug_config

KINDS = ["step"] * 2 + ["checkpoint"] * 2 + ["eval"] * 2 + ["write"] * 2 + ["rename"] * 2 + ["log"] * 2 + ["model"]
LAUNCH_BOUND_S = 180  # one launch: start-up, a few steps and checkpoints, an evaluation
# A launch gets at most 8 steps further (killed at its 3rd evaluation, every 3 steps, after the
# checkpoint of step 8): 120 steps leave room for all 13 kills.


def launch(out, args, phase=None, at=0):
    cmd = [sys.executable, "-m", "tests.faults.kill_at", "train", str(DEBUG_CONFIG), *args, f"--train.output_dir={out}",
           "--train.resume=latest", "--train.progress_bar=false", "--hub.export=false"]
    env = dict(os.environ, MMCL_KILL_PHASE=str(phase), MMCL_KILL_AT=str(at), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_BOUND_S)


def test_killed_thirteen_times_at_random_moments_the_run_resumes_to_the_uninterrupted_weights(
        tmp_path, emoji_cache, small_emoji, small_tokenizer):
    args = [f"--data.cache_dir={emoji_cache}", f"--data.train={small_emoji}", f"--data.validation={small_emoji}",
            "--data.max_validation_samples=32", f"--model.tokenizer={small_tokenizer}", "--train.max_steps=120",
            "--train.checkpoint_every=2", "--train.eval_every=3", "--train.keep_last=0", "--train.log_every=1",
            "--eval.best_metric=val/image_to_text_R@5"]
    with one_thread():  # uninterrupted, in this process, with the threads of the killed launches
        train(debug_config(tmp_path / "whole", emoji_cache, *args))

    out = tmp_path / "killed"
    rng = random.Random(12)
    moments = [(phase, rng.randint(1, 4)) for phase in rng.sample(KINDS, len(KINDS))]
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
    # the log survived its torn lines: every step logged, each reader parses it; the best model is there
    assert [step for step, _ in read_log(out)["train/loss"]] == list(range(1, 121))
    assert (out / "best" / "model.safetensors").is_file() and not list(out.glob(".old-*"))
