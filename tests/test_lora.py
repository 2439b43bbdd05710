"""LoRA through peft: a fresh adapter changes nothing, merging changes nothing, checkpoints hold
only what trains and resume exactly, the saved model is plain, 2 processes take 1 process's steps."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from accelerate.utils import set_seed
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmcl.towers.build import build_model, build_tokenizer, fit_text_config
from mmcl.config import ConfigError
from mmcl.config_loader import load_config
from mmcl.towers.lora import merged_weights
from mmcl.training.loop import train
from tests.conftest import DEBUG_CONFIG, free_port, save_tiny_model
from tests.scale.test_scale_out import accelerate, assert_same_steps, launch, train_args
from tests.test_train import debug_config

pytest.importorskip("peft")

LORA = "--model.lora={text: {r: 4, alpha: 8, dropout: 0.1}, vision: {r: 4, target_modules: all-linear}}"


def built(tokenizer, *overrides):
    config = load_config(str(DEBUG_CONFIG), [f"--model.tokenizer={tokenizer}", *overrides])
    fit_text_config(config.model, build_tokenizer(config.model))
    set_seed(config.train.seed)
    return build_model(config.model)


def inputs():
    gen = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(5, 100, (4, 9), generator=gen), "attention_mask": torch.ones(4, 9, dtype=torch.long),
            "pixel_values": torch.randn(4, 3, 16, 16, generator=gen)}


def embeddings(model, batch):
    out = model(**batch)
    return torch.cat([out.text_embeds, out.image_embeds])


def test_fresh_adapters_compute_the_base_model_exactly(small_tokenizer):
    base, lora = built(small_tokenizer), built(small_tokenizer, LORA)
    batch = inputs()
    for mode in ("train", "eval"):  # in train mode the adapters' dropout runs: still exactly the base model
        getattr(base, mode)(), getattr(lora, mode)()
        assert torch.equal(embeddings(base, batch), embeddings(lora, batch)), mode
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or not n.startswith(("text_model.", "vision_model.")) for n in trainable)
    assert "text_projection.weight" in trainable and "logit_scale" in trainable


def test_merged_weights_are_a_plain_model_with_the_same_embeddings(small_tokenizer):
    lora = built(small_tokenizer, LORA).eval()
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.05)  # trained adapters: a real update to merge
    merged = merged_weights(lora)
    plain = built(small_tokenizer).eval()
    plain.load_state_dict(merged, strict=True)  # the plain model's names, every one
    batch = inputs()
    with torch.no_grad():
        difference = (embeddings(lora, batch) - embeddings(plain, batch)).abs().max().item()
        base = (embeddings(built(small_tokenizer).eval(), batch) - embeddings(lora, batch)).abs().max().item()
    print(f"max |merged - unmerged| {difference:.2e}; the update moved embeddings by {base:.2e}")
    assert difference < 1e-5 and base > 1e-2


@pytest.mark.slow
def test_lora_run_resumes_exactly_from_checkpoints_of_what_trains(tmp_path, emoji_cache, small_emoji):
    pretrained = save_tiny_model(tmp_path / "pretrained", "a b c")
    common = [f"--data.train={small_emoji}", "--data.validation=null", "--data.validation_share=0", "--train.max_steps=6",
              "--train.checkpoint_every=3", "--train.keep_last=0", f"--model.init_from={pretrained}",
              "--model.lora={text: {r: 4}, vision: {r: 2, target_modules: [q_proj, v_proj]}}", "--hub.export=false"]
    full = tmp_path / "full"
    metrics = train(debug_config(full, emoji_cache, *common))
    step3 = full / "checkpoints" / "step-00000003"
    with safe_open(str(step3 / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert saved and all(".lora_" in k or not k.startswith(("text_model.", "vision_model.")) for k in saved), saved
    assert metrics["train/trainable_params"] < metrics["train/params"] / 2 and metrics["train/peak_memory_mb"] > 0

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(step3, resumed / "checkpoints" / step3.name)
    train(debug_config(resumed, emoji_cache, *common, "--train.resume=latest"))
    a, b = load_file(full / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and not any("lora" in k or "base_layer" in k for k in a)
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    print("max |difference| resumed-uninterrupted", worst)
    assert worst < 1e-6
    # the final folder is a plain model: it loads where peft cannot be imported
    probe = (f"import sys; sys.modules['peft'] = None; from mmcl.towers.model import DualEncoder; "
             f"m = DualEncoder.from_pretrained({str(full / 'final')!r}); print(sum(p.numel() for p in m.parameters()))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and int(out.stdout.split()[-1]) == sum(t.numel() for t in a.values()), out.stderr[-2000:]

    # the frozen weights are rebuilt from model.init_from: if that folder changed, the resume is refused
    weights = load_file(pretrained / "model.safetensors")
    weights["text_model.embeddings.word_embeddings.weight"] += 0.01
    save_file(weights, str(pretrained / "model.safetensors"))
    shutil.rmtree(resumed / "checkpoints" / "step-00000006")
    with pytest.raises(ConfigError, match="frozen weights differ"):
        train(debug_config(resumed, emoji_cache, *common, "--train.resume=latest"))


@pytest.mark.slow
def test_lora_two_processes_take_the_steps_of_one(tmp_path, emoji_cache, small_emoji, small_tokenizer):
    args = lambda out, batch, *extra: train_args(tmp_path / out, emoji_cache, small_emoji, small_tokenizer, batch,
                                                 "--model.lora={text: {r: 4}}", "--model.lock_vision=true",
                                                 "--model.unlock_vision_layers=1", *extra)
    launch([sys.executable, "-m", *args("one", 32)])
    launch(accelerate("multi_gpu_cpu.yaml", free_port(), args("ddp", 16)))
    print("max |difference| ddp-one", assert_same_steps(tmp_path / "ddp", tmp_path / "one", "ddp vs 1 process"))
    step3 = tmp_path / "ddp" / "checkpoints" / "step-00000003"  # (resume is exact: the test above)
    with safe_open(str(step3 / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("text_model.") and ".lora_" not in k for k in f.keys())
    assert json.loads((step3 / "mmcl_train_state.json").read_text())["frozen_sha256"]


def test_lora_config_merges_overrides_and_refuses_what_it_cannot_do(tmp_path, small_tokenizer):
    yaml = tmp_path / "lora.yaml"
    yaml.write_text(DEBUG_CONFIG.read_text().replace(
        "  projection_dim: 16\n", "  projection_dim: 16\n  lora: {text: {r: 4, target_modules: [query]}}\n"))
    config = load_config(str(yaml), ["--model.lora.text.r=2", "--model.lora.vision.alpha=4"])
    assert (config.model.lora["text"].r, config.model.lora["text"].target_modules) == (2, ["query"])
    assert (config.model.lora["vision"].r, config.model.lora["vision"].alpha) == (8, 4.0)
    for overrides, message in ((["--model.lora.audio.r=2"], "LoRA goes on a tower: text or vision"),
                               (["--model.lora.text.r=0"], "needs r >= 1"),
                               (["--loss.queue_size=8", "--loss.momentum=0.9"], "loss.momentum > 0 with model.lora")):
        with pytest.raises(ConfigError, match=message):
            load_config(str(yaml), overrides)
    with pytest.raises(ConfigError, match=r"target_modules=\['nope'\].*linear layers are named: .*query"):
        built(small_tokenizer, "--model.lora={text: {target_modules: [nope]}}")
