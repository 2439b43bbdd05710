"""Non-finite numbers: a batch with a NaN pixel gives a NaN loss and gradient; its update is
skipped (no optimizer or scheduler step), counted and logged with the step and the batch's rows;
`train.max_bad_steps` of them in a row stop the run with a checkpoint of the last good state."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mmcl.training.checkpoint import checkpoints
from mmcl.data.pairs import PairCollator
from mmcl.training.loop import NonFiniteError, train
from tests.test_train import debug_config


def poison(monkeypatch, bad_batches):
    """A NaN pixel in the collated batches numbered `bad_batches` (0-based, in the order they are made)."""
    collate, made = PairCollator.__call__, []

    def call(self, items):
        batch = collate(self, items)
        if len(made) in bad_batches:
            batch["pixel_values"][0, 0, 0, 0] = float("nan")
        made.append([it["row"] for it in items])
        return batch

    monkeypatch.setattr(PairCollator, "__call__", call)
    return made


def common(small_emoji, *extra):
    return (f"--data.train={small_emoji}", "--data.validation=null", "--data.validation_share=0", "--train.log_every=1",
            "--train.lr_scheduler=constant", "--train.warmup_steps=0", "--train.keep_last=0", *extra)


@pytest.mark.parametrize("queue", [(), ("--loss.queue_size=32", "--loss.momentum=0")], ids=["plain", "queue"])
def test_a_nan_batch_skips_its_update_and_is_reported(tmp_path, emoji_cache, small_emoji, monkeypatch, capsys, queue):
    """With a queue of earlier embeddings the NaN batch must not be queued either: every later loss
    would be NaN."""
    made = poison(monkeypatch, {2})
    metrics = train(debug_config(tmp_path, emoji_cache, *common(small_emoji, "--train.max_steps=4",
                                                               "--train.checkpoint_every=4", *queue)))
    assert metrics["train/steps"] == 4 and metrics["train/bad_steps"] == 1

    out = capsys.readouterr().out
    rows = ", ".join(map(str, sorted(made[2])))
    assert f"step 3: non-finite loss nan / gradient norm nan; update skipped (bad batch 1 in a row, 1 in all); rows {rows}" in out
    logs = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [e["train/bad_steps"] for e in logs if "train/bad_steps" in e] == [1]

    # four updates, not five: AdamW's step count and the schedule; and the weights stayed finite
    step4 = checkpoints(tmp_path)[-1]
    optimizer = load_file(step4 / "optimizer.safetensors")
    assert {int(v) for k, v in optimizer.items() if k.endswith("/step")} == {4}
    assert json.loads((step4 / "scheduler.json").read_text())["last_epoch"] == 4  # the scheduler
    assert all(torch.isfinite(w).all() for w in load_file(tmp_path / "final" / "model.safetensors").values())


def test_too_many_bad_steps_in_a_row_stop_with_the_last_good_state(tmp_path, emoji_cache, small_emoji,
                                                                   small_tokenizer, monkeypatch):
    poison(monkeypatch, set(range(2, 100)))
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row .* last good state \(step 2\) .*step-00000002"):
        train(debug_config(tmp_path / "bad", emoji_cache, *common(small_emoji, "--train.max_steps=6",
                                                                  "--train.checkpoint_every=0",
                                                                  "--train.max_bad_steps=3",
                                                                  f"--model.tokenizer={small_tokenizer}")))
    assert [p.name for p in checkpoints(tmp_path / "bad")] == ["step-00000002"]
    monkeypatch.undo()  # the same two steps without any bad batch: the checkpoint holds exactly them
    train(debug_config(tmp_path / "good", emoji_cache, *common(small_emoji, "--train.max_steps=2",
                                                               "--train.checkpoint_every=0",
                                                               f"--model.tokenizer={small_tokenizer}")))
    saved = load_file(checkpoints(tmp_path / "bad")[0] / "model.safetensors")
    good = load_file(tmp_path / "good" / "final" / "model.safetensors")
    assert saved.keys() == good.keys()
    assert all(torch.equal(saved[name], good[name]) for name in good)
