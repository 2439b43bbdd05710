"""`auto`: each device gets the measured best settings, a value the user gives wins, a run prints and
saves what it chose, and a resume keeps the choices the run started with."""

import json

import pytest
import yaml

from mmcl.config import ModelConfig, TrainConfig
from mmcl.training.auto import Device, detect_device, resolve_auto
from tests.test_train import resume_through_the_cli

CASES = {  # device, sharded -> mixed_precision, attn_implementation, optim
    "cpu with bf16": (Device("cpu", True, "cpu"), False, ("bf16", "eager", "adamw_torch_fused")),
    "cpu without bf16": (Device("cpu", False, "cpu"), False, ("no", "sdpa", "adamw_torch_fused")),
    "an H100": (Device("cuda", True, "NVIDIA H100 80GB HBM3"), False, ("bf16", "sdpa", "adamw_torch_fused")),
    "a V100": (Device("cuda", False, "Tesla V100"), False, ("no", "sdpa", "adamw_torch_fused")),
    "FSDP on GPUs": (Device("cuda", True, "NVIDIA A100"), True, ("bf16", "sdpa", "adamw_torch")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_device_gets_its_measured_best(case):
    device, sharded, expected = CASES[case]
    model, train_cfg = ModelConfig(), TrainConfig()
    said = resolve_auto(model, train_cfg, device, sharded)
    assert (train_cfg.mixed_precision, model.attn_implementation, train_cfg.optim) == expected
    assert len(said) == 3 and all("=" in line for line in said)


def test_a_value_the_user_gave_wins():
    model, train_cfg = ModelConfig(attn_implementation="sdpa"), TrainConfig(mixed_precision="no", optim="adamw_torch")
    assert resolve_auto(model, train_cfg, Device("cpu", True, "cpu")) == []
    assert (train_cfg.mixed_precision, model.attn_implementation, train_cfg.optim) == ("no", "sdpa", "adamw_torch")


def test_a_run_prints_and_saves_its_choices_and_a_resume_keeps_them(tmp_path, emoji_cache, small_emoji):
    """Through the CLI, in fresh processes: Accelerate keeps one mixed precision per process."""
    args = [f"--data.train={small_emoji}", "--data.validation=null", "--data.validation_share=0", "--train.checkpoint_every=1",
            "--train.mixed_precision=auto", "--train.lr_scheduler=constant"]
    said = resume_through_the_cli(tmp_path, emoji_cache, *args, "--train.max_steps=2")
    expected = "bf16" if detect_device().bf16 else "no"
    assert f"auto: train.mixed_precision={expected}" in said and "auto: train.optim=adamw_torch_fused" in said
    saved = yaml.safe_load((tmp_path / "final" / "mmcl_training_config.yaml").read_text())
    assert saved["train"]["mixed_precision"] == expected and saved["train"]["optim"] == "adamw_torch_fused"
    path = tmp_path / "checkpoints" / "step-00000002" / "mmcl_train_state.json"
    state = json.loads(path.read_text())
    assert state["config"]["train.mixed_precision"] == expected
    # a resume of a run started with fp32 stays fp32 under auto, whatever this device would pick
    state["config"]["train.mixed_precision"] = "no"
    path.write_text(json.dumps(state))
    said = resume_through_the_cli(tmp_path, emoji_cache, *args, "--train.max_steps=3")
    assert "auto: train.mixed_precision=no (as the run was started)" in said and "resumed from" in said
