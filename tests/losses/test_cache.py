"""GradCache (`loss.cache_chunk`): one cached step equals one step on the whole batch with its
graph kept, with dropout on (its random draws are replayed), in 1 and in 2 processes, with SLIP's
views carried through the cache too; without dropout it also equals one plain forward of the whole
batch; and without the replay (a planted mutation) it does not."""

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, free_port

WORKER = REPO / "tests" / "losses" / "cache_worker.py"


def run_worker(tmp_path, nproc, batch, chunk, dropout, loss, *options):
    out = tmp_path / f"step-{nproc}-{chunk}-{dropout}-{loss}-{'-'.join(options)}.pt"
    args = [str(WORKER), str(out), str(batch), str(chunk), str(dropout), loss, *options]
    cmd = ([sys.executable, *args] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), *args])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def assert_same(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    worst = max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in a)
    assert worst[0] < tol, worst


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("loss", ["clip", "siglip", "clip+slip"])
def test_cached_step_equals_the_full_batch_step_with_dropout(tmp_path, nproc, loss):
    name, *options = loss.split("+")
    result = run_worker(tmp_path, nproc, 12, 4, 0.2, name, *options)
    assert result["loss"] == pytest.approx(result["ref_loss"], abs=1e-5)
    parts = {k: v for k, v in result["terms"].items() if k.startswith("loss_")}  # view_std: a diagnostic
    assert sum(parts.values()) == pytest.approx(result["loss"], abs=1e-5)
    assert set(result["terms"]) == {"loss_pair", *(["loss_image_ssl", "view_std"] if options else [])}
    assert_same(result["cached"], result["reference"])


def test_without_dropout_a_cached_step_equals_one_forward_of_the_whole_batch(tmp_path):
    result = run_worker(tmp_path, 1, 12, 4, 0.0, "clip", "slip", "whole")
    assert result["loss"] == pytest.approx(result["ref_loss"], abs=1e-5)
    assert_same(result["cached"], result["reference"])


def test_without_the_random_state_replay_the_step_differs(tmp_path):
    """The control: the equality above holds because dropout is replayed, not by accident."""
    result = run_worker(tmp_path, 1, 12, 4, 0.2, "clip", "noreplay")
    diff = max((result["cached"][k] - result["reference"][k]).abs().max().item() for k in result["reference"])
    assert diff > 1e-3


def test_dropout_changes_the_step(tmp_path):
    """The check above can fail: with other dropout draws the step differs by far more than 1e-5."""
    with_dropout = run_worker(tmp_path, 1, batch=12, chunk=4, dropout=0.2, loss="clip")
    without = run_worker(tmp_path, 1, batch=12, chunk=4, dropout=0.0, loss="clip")
    diff = max((with_dropout["cached"][k] - without["cached"][k]).abs().max().item() for k in without["cached"])
    assert diff > 1e-3
