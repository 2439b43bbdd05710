"""A resume with settings that would change what the run computes is refused before anything is
loaded, listing every such key; logging, evaluation, checkpoint settings and the length may change."""

import pytest

from mmcl.training.checkpoint import checkpoints
from mmcl.config import ConfigError
from mmcl.training.loop import train
from tests.test_train import debug_config


def test_a_resume_with_other_settings_is_refused_and_a_harmless_change_is_not(tmp_path, emoji_cache, small_emoji):
    data = (f"--data.train={small_emoji}", "--data.validation=null", "--data.validation_share=0", "--train.checkpoint_every=3",
            "--train.lr_scheduler=constant")
    train(debug_config(tmp_path, emoji_cache, *data, "--train.max_steps=6"))
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert before == ["step-00000003", "step-00000006"]

    step3 = tmp_path / "checkpoints" / "step-00000003"  # a resume from it would set step 6 aside
    harmless = ("--train.max_steps=5", "--train.log_every=1", "--eval.batch_size=8", f"--train.resume={step3}")
    expected = "model.projection_dim: 16 -> 8; train.learning_rate: 0.001 -> 0.002. Resume with the saved values"
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        train(debug_config(tmp_path, emoji_cache, *data, *harmless, "--model.projection_dim=8",
                           "--train.learning_rate=0.002"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before  # nothing loaded, nothing set aside

    metrics = train(debug_config(tmp_path, emoji_cache, *data, *harmless))
    assert metrics["train/steps"] == 5
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000003"]  # step 6 of the old run was set aside

    # a cosine schedule is drawn over train.max_steps: a longer run would take other steps
    cosine = [a for a in data if "lr_scheduler" not in a]
    train(debug_config(tmp_path / "cosine", emoji_cache, *cosine, "--train.max_steps=3"))
    with pytest.raises(ConfigError, match=r"train\.max_steps: 3 -> 6\. Resume with the saved values"):
        train(debug_config(tmp_path / "cosine", emoji_cache, *cosine, "--train.max_steps=6", "--train.resume=latest"))
