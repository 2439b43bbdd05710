"""The parts of mmcl/launch.py and the sharding rules that need no second process."""

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from mmcl.config import Config, ConfigError
from mmcl.training.launch import check_lost_process, full_value, is_peer_failure
from mmcl.towers.model import DualEncoder, DualEncoderConfig
from mmcl.training.setup import check_sharding
from tests.test_model import TEXT, VISION


def tiny():
    return DualEncoder(DualEncoderConfig(text_config=dict(TEXT), vision_config=dict(VISION), text_pooling="mean",
                                         vision_pooling="cls", projection_dim=16))


def fake_accelerator(kind=DistributedType.FSDP, processes=2, fsdp_version=2):
    return SimpleNamespace(distributed_type=kind, num_processes=processes, process_index=0,
                           is_fsdp2=kind == DistributedType.FSDP and fsdp_version == 2)


@pytest.mark.parametrize("option,value", [("cache_chunk", 4), ("queue_size", 8), ("byol_weight", 1.0),
                                          ("swav_weight", 1.0)])
def test_options_that_deepspeed_cannot_run_are_refused_there_and_run_under_fsdp2(option, value):
    config = Config()
    setattr(config.loss, option, value)
    for refused in (fake_accelerator(DistributedType.DEEPSPEED), fake_accelerator(fsdp_version=1)):
        with pytest.raises(ConfigError, match="not supported with DeepSpeed or FSDP version 1"):
            check_sharding(config.model, config.loss, refused)
    check_sharding(config.model, config.loss, fake_accelerator())  # FSDP2: sharded (tests/scale/test_scale_out.py)
    check_sharding(config.model, config.loss, fake_accelerator(DistributedType.MULTI_CPU))  # DDP: fine
    config.loss.momentum = 0.0
    if option == "queue_size":  # a queue of the model's own embeddings holds no model copy
        check_sharding(config.model, config.loss, fake_accelerator(DistributedType.DEEPSPEED))


def test_fsdp_wraps_each_towers_blocks():
    assert tiny()._no_split_modules == ["BertEmbeddings", "BertLayer", "ViTEmbeddings", "ViTLayer"]


def test_a_model_saved_with_a_0d_logit_scale_still_loads(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["logit_scale"] = torch.tensor(3.25)  # how mmcl saved it before it became (1,)
    save_file(weights, tmp_path / "model.safetensors")
    loaded = DualEncoder.from_pretrained(tmp_path)
    assert loaded.logit_scale.shape == (1,) and full_value(loaded.logit_scale) == 3.25


def test_a_full_state_dict_saves_the_same_model(tmp_path):
    """What the main process writes from `accelerator.get_state_dict` under FSDP equals a plain save."""
    model = tiny()
    model.save_pretrained(tmp_path / "plain")
    flat = torch.cat([p.detach().reshape(-1) for p in model.state_dict().values()])  # views into one buffer
    views, offset = {}, 0
    for name, p in model.state_dict().items():
        views[name] = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    model.save_pretrained(tmp_path / "gathered", state_dict=views)
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "gathered" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_only_a_failed_collective_starts_a_roll_call():
    assert is_peer_failure(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1"))
    assert not is_peer_failure(RuntimeError("shape mismatch"))
    check_lost_process(fake_accelerator(), 3, RuntimeError("shape mismatch"))  # returns: the caller re-raises
    check_lost_process(fake_accelerator(processes=1), 3, RuntimeError("Connection closed by peer"))


def test_a_deepspeed_launch_on_cpu_is_refused_not_silently_run_as_ddp(monkeypatch):
    from mmcl.training.launch import shard_on_cpu

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="DeepSpeed only on GPUs"):
        shard_on_cpu(fake_accelerator(DistributedType.MULTI_CPU))
    shard_on_cpu(fake_accelerator(DistributedType.NO))  # one process: nothing to shard, nothing to refuse
