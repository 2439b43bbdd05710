"""Two processes (gloo on CPU) with per-device batch b take exactly the step that one process
takes with batch 2b: same loss, same parameters after the optimizer step."""

import json
import os
import subprocess
import sys

import pytest

from safetensors.torch import load_file

from mmcl.cli import main
from tests.conftest import DEBUG_CONFIG, REPO, free_port, one_thread


def run(nproc, batch, out, emoji_cache, small_emoji, tokenizer, loss_args=()):
    """One process: here (one thread, as the launched ones); two: a torchrun launch."""
    args = ["train", str(DEBUG_CONFIG), f"--model.tokenizer={tokenizer}", f"--train.output_dir={out}",
            f"--data.cache_dir={emoji_cache}", f"--data.train={small_emoji}", "--data.validation=null", "--data.validation_share=0",
            f"--train.per_device_batch_size={batch}", "--train.max_steps=2", "--train.log_every=1",
            "--train.checkpoint_every=0", "--train.progress_bar=false", "--train.warmup_steps=0", *loss_args]
    if nproc == 1:
        with one_thread():
            assert main(args) == 0
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), "-m", "mmcl.cli", *args]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        errors = [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line or "rank1" in line]
        assert done.returncode == 0, "\n".join(errors[-20:])
    logs = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return logs, load_file(out / "final" / "model.safetensors")


LOSSES = {"clip": (), "siglip": ("--loss.name=siglip", "--model.init_temperature=0.1"),
          # GradCache in chunks of 5 (1 process: 7 chunks; 2 processes: 4 each) with a momentum queue and
          # SLIP's views carried through the cache
          "clip-cache-queue-slip": ("--loss.cache_chunk=5", "--loss.queue_size=40", "--loss.momentum=0.9",
                                    "--loss.image_ssl_weight=0.5"),
          # each row's 2 hard-negative captions, a queue of the model's own embeddings, SLIP's term
          "siglip-negatives-queue-slip": ("--loss.name=siglip", "--model.init_temperature=0.1", "--loss.queue_size=24",
                                          "--loss.momentum=0", "--loss.hard_negative_column=hard_negatives",
                                          "--loss.image_ssl_weight=0.5"),
          # BYOL and SwAV with SigLIP through the cache: BYOL's predictor's batch norm over the global batch
          # and its EMA target; Sinkhorn's sums over both processes, SwAV's queue (one global batch, in use at
          # step 2), its prototypes frozen in step 1. Adam's epsilon is raised because at 1e-6 AdamW turns one
          # weight's ~1e-9 gradient rounding into a 1.06e-5 difference (next largest 3.2e-6; at 1e-4 the
          # largest is 2.5e-7, measured); SwAV's epsilon is the paper's 0.05: Sinkhorn's exp(score / eps)
          # amplifies rounding, at the default 0.02 FSDP's losses differed by 5.3e-5 by step 4
          "siglip-cache-byol-swav-queue": ("--loss.name=siglip", "--model.init_temperature=0.1",
                                           "--loss.cache_chunk=5", "--loss.byol_weight=1.0",
                                           "--loss.swav_weight=1.0", "--loss.swav_queue_size=32",
                                           "--loss.swav_freeze_steps=1", "--loss.swav_epsilon=0.05",
                                           "--loss.image_ssl_dim=16", "--train.adam_epsilon=1e-4")}


@pytest.fixture(scope="module")
def with_negatives(small_emoji, tmp_path_factory):
    """The small emoji set with a `hard_negatives` column: two other rows' captions each."""
    from datasets import load_from_disk

    ds = load_from_disk(small_emoji)
    captions = ds["caption"]
    ds = ds.map(lambda row, i: {"hard_negatives": [captions[(i + 1) % len(ds)], captions[(i + 7) % len(ds)]]},
                with_indices=True)
    path = tmp_path_factory.mktemp("negatives") / "emoji96"
    ds.save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_two_processes_match_one_process_on_the_global_batch(tmp_path, emoji_cache, small_emoji, with_negatives, loss):
    if "negatives" in loss:
        small_emoji = with_negatives
    # one tokenizer for both runs, trained once
    from datasets import load_from_disk

    from mmcl.data.pairs import iter_captions
    from mmcl.towers.build import train_tokenizer

    tokenizer = tmp_path / "tokenizer"
    train_tokenizer(iter_captions(load_from_disk(small_emoji), "caption"), 500).save_pretrained(tokenizer)
    single_logs, single = run(1, 32, tmp_path / "one", emoji_cache, small_emoji, tokenizer, LOSSES[loss])
    multi_logs, multi = run(2, 16, tmp_path / "two", emoji_cache, small_emoji, tokenizer, LOSSES[loss])
    terms = ["train/loss", "train/loss_pair", *(["train/loss_image_ssl"] if "slip" in loss else []),
             *(["train/loss_byol"] if "byol" in loss else []),
             *(["train/loss_swav_views", "train/loss_swav_pairs"] if "swav" in loss else [])]
    assert len(single_logs) == len(multi_logs) == 2
    for a, b in zip(single_logs, multi_logs):
        assert [k for k in a if k.startswith("train/loss")] == terms  # each term logged apart
        for key in terms:
            assert abs(a[key] - b[key]) < 1e-5, (key, single_logs, multi_logs)
        assert abs(a["train/loss"] - sum(a[k] for k in terms[1:])) < 1e-5
    for name in single:
        assert (single[name] - multi[name]).abs().max().item() < 1e-5, name
    assert "logit_scale" in single
    assert ("logit_bias" in single) == loss.startswith("siglip")
