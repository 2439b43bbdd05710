"""Preemption loses nothing: a real SIGTERM (what a scheduler sends) or SIGUSR1 (SLURM's --signal) at a
random step of a 1-process and a 2-process run ends it after that step with one checkpoint, one line
and the signal's exit status; resuming reaches the weights of the uninterrupted run. (Before this,
SIGTERM killed the run at once and lost every step since the last checkpoint.)"""

import os
import random
import re
import signal
import time

import pytest
from safetensors.torch import load_file

from tests.conftest import free_port
from tests.scale.test_scale_out import finish, launch, start, torchrun, train_args

RUN_BOUND_S = 300
STEPS = 24


def args(out, emoji_cache, small_emoji, tokenizer, batch, *extra):
    base = [a for a in train_args(out, emoji_cache, small_emoji, tokenizer, batch)
            if not a.startswith(("--train.max_steps=", "--train.checkpoint_every="))]
    return [*base, f"--train.max_steps={STEPS}", "--train.checkpoint_every=10", *extra]


def interrupt_at(cmd, out, step, signum):
    """Start `cmd`, send `signum` to its whole process group once the log shows `step`; (code, output)."""
    proc = start(cmd)
    log = out / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + RUN_BOUND_S
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and f'"step": {step},' in log.read_text():
            os.killpg(proc.pid, signum)
            break
        time.sleep(0.05)
    return finish(proc, RUN_BOUND_S)


def without_torchruns_own(said: str) -> str:
    """The output less torchrun's agent's traceback on a signal (its `SignalException`, not mmcl's)."""
    return re.sub(r"Traceback \(most recent call last\):\n(?:[ \t].*\n)*?\S*SignalException: Process \d+ got "
                  r"signal: \d+\n?", "", said)


# a signal to the whole process group, as a scheduler sends it (torchrun passes its own on: a repeat)
@pytest.mark.parametrize("nproc,signum", [(1, signal.SIGUSR1), (2, signal.SIGTERM)], ids=["1-process", "2-process"])
def test_a_signal_stops_after_a_checkpoint_and_the_resume_loses_nothing(tmp_path, emoji_cache, small_emoji,
                                                                         small_tokenizer, nproc, signum):
    import sys

    batch = 32 // nproc
    def cmd(out, *extra):
        inner = args(out, emoji_cache, small_emoji, small_tokenizer, batch, *extra)
        return torchrun(inner, free_port(), nproc) if nproc > 1 else [sys.executable, "-m", *inner]

    launch(cmd(tmp_path / "whole"))
    at = random.Random(nproc).randint(3, STEPS - 6)  # never on a step-10 checkpoint's own boundary alone
    out = tmp_path / "stopped"
    code, said = interrupt_at(cmd(out), out, at, signum)
    assert code == 128 + signum if nproc == 1 else code != 0, said[-3000:]  # torchrun: its own non-zero status
    stopped = re.search(rf"stopped by {signal.Signals(signum).name} at step (\d+); the checkpoint is (\S+); "
                        r"resume with --train.resume=latest", said)
    assert stopped and "Traceback" not in without_torchruns_own(said), said[-3000:]
    step = int(stopped.group(1))
    assert at <= step < STEPS and (out / "checkpoints" / f"step-{step:08d}").is_dir()  # the very step it stopped at
    launch(cmd(out, "--train.resume=latest"))
    a, b = load_file(tmp_path / "whole" / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"stopped at step {step} (signal at {at}); max |difference| resumed-uninterrupted {worst:.1e}")
    assert worst < 1e-5


def test_time_based_checkpoints(tmp_path, emoji_cache, small_emoji, small_tokenizer):
    import sys

    inner = args(tmp_path / "run", emoji_cache, small_emoji, small_tokenizer, 32, "--train.checkpoint_every=0",
                 "--train.checkpoint_every_minutes=0.0001")  # 6 ms: every step
    launch([sys.executable, "-m", *inner])
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert steps == list(range(1, STEPS + 1))[-len(steps):] and len(steps) >= 2  # keep_last of one per step


def test_a_signal_ignored_at_start_stays_ignored_and_the_others_set_the_flag():
    """`nohup` and a shell's background jobs start a process ignoring SIGHUP / SIGINT: that choice holds."""
    from types import SimpleNamespace

    from mmcl.training.signals import StopRequests

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequests(SimpleNamespace(num_processes=1)) as requests:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)  # ignored: no flag, no KeyboardInterrupt
            assert requests.due() == (0, False)
            signal.raise_signal(signal.SIGUSR1)
            assert requests.due() == (signal.SIGUSR1, False)
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # put back on leaving
    finally:
        signal.signal(signal.SIGINT, before)
