"""MFU and data wait: the FLOPs counted on the meta-device copy are those of the real model's forward
and backward, frozen weights included; the peak table reads GPU names right; a run whose data is
slow says so once, and every log line and metrics.json carry the figures."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmcl.towers.model import DualEncoder, DualEncoderConfig
from mmcl.training.throughput import GPU_PEAK_TFLOPS, Throughput, flops_per_sample, peak_tflops
from mmcl.training.loop import train
from tests.test_model import TEXT, VISION
from tests.test_train import debug_config


def tiny(lock_text=False):
    torch.manual_seed(0)
    model = DualEncoder(DualEncoderConfig(dict(TEXT, vocab_size=120), VISION, text_pooling="mean",
                                          vision_pooling="cls", projection_dim=8))
    model.text_model.requires_grad_(not lock_text)
    return model


def counted_for_real(model, batch):
    """Eager attention: torch's FLOP counter has no formula for the backward of CPU flash attention."""
    for tower in (model.text_model, model.vision_model):
        tower.set_attn_implementation("eager")
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
        (out.image_embeds.sum() + out.text_embeds.sum()).backward()
    return counter.get_total_flops() / len(batch["pixel_values"])


@pytest.mark.parametrize("lock_text", [False, True])
def test_the_meta_count_is_the_real_models_count(lock_text):
    batch = {"input_ids": torch.randint(5, 120, (6, 9)), "attention_mask": torch.ones(6, 9, dtype=torch.long),
             "pixel_values": torch.randn(6, 3, 16, 16)}
    model = tiny(lock_text)
    counted = flops_per_sample(model, batch)
    assert counted == counted_for_real(model, batch) > 0
    if lock_text:  # no weight gradients for the locked tower: less backward
        assert counted < flops_per_sample(tiny(), batch)


def test_the_peak_table_and_mfu():
    assert list(GPU_PEAK_TFLOPS).index("H100 PCIe") < list(GPU_PEAK_TFLOPS).index("H100")  # longer names first
    assert peak_tflops(torch.device("cpu"), "bf16")[0] > 0
    meter = Throughput(torch.device("cpu"), "no")
    meter.flops, meter.peak = 2e9, 4.0  # 2 GFLOP a sample on a 4 TFLOP/s device
    assert meter.tflops(1000) == pytest.approx(2.0) and meter.mfu(1000) == pytest.approx(0.5)
    assert meter.logs(1000) == {"train/tflops": pytest.approx(2.0), "train/mfu": pytest.approx(0.5)}


def test_a_run_waiting_for_data_says_so_once_and_logs_its_figures(tmp_path, emoji_cache, small_emoji, monkeypatch,
                                                                   capsys):
    import time

    from mmcl.data.pairs import PairDataset

    slow = PairDataset.__getitem__
    monkeypatch.setattr(PairDataset, "__getitem__", lambda self, i: (time.sleep(0.02), slow(self, i))[1])
    metrics = train(debug_config(tmp_path, emoji_cache, f"--data.train={small_emoji}", "--data.validation=null", "--data.validation_share=0",
                                 "--train.max_steps=6", "--train.log_every=2", "--train.checkpoint_every=0"))
    said = capsys.readouterr().out
    assert said.count("of the step time waited for data (data.num_workers=0)") == 1
    assert "GFLOP per sample" in said and "CPU matmul probe" in said
    logs = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    for entry in logs:
        assert entry["train/data_wait"] > 0.2 and 0 < entry["train/mfu"] < 1 and entry["train/tflops"] > 0
    assert metrics["train/data_wait"] > 0.2 and 0 < metrics["train/mfu"] < 1 and metrics["train/flops_per_sample"] > 0
