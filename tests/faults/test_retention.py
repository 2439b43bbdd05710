"""The retention monitor: `eval.retention` metrics are measured before the first step, logged as a
fraction of that value at every evaluation, and `eval.stop_if_retention_below` stops the run with a
checkpoint when one falls below it. The drop is planted: the evaluation's result is scripted."""

import json

import pytest

import mmcl.evaluation.evaluators as evaluators
from mmcl.training.checkpoint import checkpoints
from mmcl.config import ConfigError
from mmcl.training.loop import RetentionError, train
from tests.test_train import debug_config

KEEP = "{keep: {task: zero_shot, dataset: 'builtin:emoji', label_column: name, max_samples: 20, every: 2}}"


def planted(monkeypatch, values):
    """`keep`'s top-1 is each of `values` in turn, from the step-0 measurement on."""
    calls = []

    def fake_run_eval(bundle, ds, spec, accelerator, cfg):
        calls.append(1)
        return {"top1": values[len(calls) - 1], "classes": 20}

    monkeypatch.setattr(evaluators, "run_eval", fake_run_eval)


def test_a_planted_drop_is_logged_and_stops_the_run_with_a_checkpoint(tmp_path, emoji_cache, small_emoji,
                                                                      monkeypatch):
    planted(monkeypatch, [0.8, 0.7, 0.4, 0.4])
    config = debug_config(tmp_path, emoji_cache, f"--data.train={small_emoji}", "--data.validation=null", "--data.validation_share=0",
                          f"--eval.sets={KEEP}", "--eval.retention=[keep/top1]", "--eval.stop_if_retention_below=0.6",
                          "--train.max_steps=6", "--train.checkpoint_every=0")
    with pytest.raises(RetentionError, match=r"step 4: keep/top1 is 0\.500 x its step-0 value 0\.8, below "
                                             r"eval\.stop_if_retention_below=0\.6; the model of this step is "
                                             r"checkpointed in .*step-00000004"):
        train(config)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000004"]
    logs = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    retained = [(e["step"], e["retention/keep/top1"]) for e in logs if "retention/keep/top1" in e]
    assert retained == [(0, 1.0), (2, pytest.approx(0.875)), (4, pytest.approx(0.5))]


def test_a_retention_metric_must_name_a_set_and_a_metric(tmp_path, emoji_cache, small_emoji, monkeypatch):
    common = [f"--data.train={small_emoji}", "--data.validation=null", "--data.validation_share=0", f"--eval.sets={KEEP}", "--train.max_steps=1"]
    with pytest.raises(ConfigError, match=r"eval.retention: kept/top1 names no evaluation set; the sets are: keep"):
        train(debug_config(tmp_path / "a", emoji_cache, *common, "--eval.retention=[kept/top1]"))
    planted(monkeypatch, [0.8])
    with pytest.raises(ConfigError, match=r"eval.retention: keep/top9 not among the metrics of those sets: "
                                          r"keep/classes, keep/top1"):
        train(debug_config(tmp_path / "b", emoji_cache, *common, "--eval.retention=[keep/top9]"))
