"""End-to-end training on the built-in emoji data: outputs, exact resume, safe checkpoints."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from mmcl.artifacts import STATE_NAME
from mmcl.training.checkpoint import checkpoints, resolve_resume
from mmcl.config_loader import load_config
from mmcl.training.loop import train
from tests.conftest import DEBUG_CONFIG, REPO, one_thread


def debug_config(tmp_path, emoji_cache, *overrides):
    return load_config(DEBUG_CONFIG, [f"--train.output_dir={tmp_path}", f"--data.cache_dir={emoji_cache}",
                                      "--train.progress_bar=false", *overrides])


def test_debug_run_writes_model_metrics_and_logs(tmp_path, emoji_cache):
    zs = "{zs: {task: zero_shot, dataset: 'builtin:emoji', label_column: name, max_samples: 40, every: 3}}"
    metrics = train(debug_config(tmp_path, emoji_cache, f"--eval.sets={zs}", "--eval.best_metric=zs/top1"))
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert (tmp_path / "final" / "tokenizer.json").is_file()
    assert (tmp_path / "final" / "preprocessor_config.json").is_file()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for key in ("val/image_to_text_R@1", "val/text_to_image_R@5", "train/steps", "zs/top1", "zs/mean_per_class_recall",
                "train/loss", "train/loss_pair"):
        assert key in saved
    best = json.loads((tmp_path / "best" / "mmcl_info.json").read_text())
    assert best["metric"] == "zs/top1" and best["step"] in (3, 6)
    assert (tmp_path / "best" / "model.safetensors").is_file()
    logs = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logs if "zs/top1" in entry] == [3, 6]  # every 3 steps, and the end
    trained = [entry for entry in logs if "train/loss" in entry]
    assert [entry["step"] for entry in trained] == [2, 4, 6]
    assert saved["train/loss"] == trained[-1]["train/loss"] == trained[-1]["train/loss_pair"]  # the last window
    for key in ("train/lr", "train/temperature", "train/grad_norm", "train/samples_per_s"):
        assert key in trained[0]
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000003", "step-00000006"]


# Each case: the option's overrides, and the batch geometry it runs with. 96 rows / batch 16 = 6
# micro-batches an epoch: with 2-step accumulation 3 optimizer steps an epoch, so the step-3
# resume starts a new epoch's shuffled order; without accumulation the step-3 checkpoint is
# mid-epoch, where a resume once drew the RNG off (dropout) and must re-draw each view (augment).
NO_ACCUMULATION = ("--train.gradient_accumulation_steps=1",)
RESUME_CASES = {
    "clip": ((), ()),
    "queue": (("--loss.queue_size=40", "--loss.momentum=0.9"), ()),
    # BYOL's EMA target and step count; SwAV's queue (two micro-batches), step count and prototypes frozen
    # through the checkpoint at step 3
    "byol-swav": (("--loss.byol_weight=1.0", "--loss.swav_weight=1.0", "--loss.swav_queue_size=32",
                   "--loss.swav_freeze_steps=4", "--loss.image_ssl_dim=16"), ()),
    "cluster-sampler": (("cluster",), ()),
    "dropout": (("--model.text_config.hidden_dropout_prob=0.1", "--model.vision_config.hidden_dropout_prob=0.1"),
                NO_ACCUMULATION),
    # every augmentation option on: each view is drawn from (seed, epoch, row)
    "augment": (("--data.augment=strong", "--data.augment_options={flip: true, scale: [0.5, 1.0], jitter: 0.3, "
                 "saturation: 0.3, blur: 0.3}"), NO_ACCUMULATION),
}


def weights(folder):
    return load_file(folder / "final" / "model.safetensors")


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


def resume_through_the_cli(out, emoji_cache, *overrides):
    """A fresh process, as a user resumes: `python -m mmcl.cli train ... --train.resume=latest` (a
    first run where there is no checkpoint yet); returns what it printed."""
    cmd = [sys.executable, "-m", "mmcl.cli", "train", str(DEBUG_CONFIG), f"--train.output_dir={out}",
           f"--data.cache_dir={emoji_cache}", "--train.progress_bar=false", "--hub.export=false", *overrides,
           "--train.resume=latest"]
    done = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_equals_uninterrupted(tmp_path, emoji_cache, small_emoji, small_tokenizer, case):
    """6 steps in this process; a fresh process resuming from the step-3 checkpoint through the CLI,
    3 more: the same weights as 6 uninterrupted steps. The option must have been in effect: the
    same run without it ends elsewhere."""
    option, geometry = RESUME_CASES[case]
    if option == ("cluster",):  # batches from k-means clusters of a (tiny, random) model's image embeddings
        from tests.conftest import save_tiny_model

        model = save_tiny_model(tmp_path / "cluster_model", "a b c")
        option = ("--data.batch_sampler=cluster", f"--data.cluster_model={model}", "--data.num_clusters=6")
    common = [f"--data.train={small_emoji}", "--data.validation=null", "--data.validation_share=0", "--train.max_steps=6",
              "--train.checkpoint_every=3", "--train.gradient_accumulation_steps=2",
              "--train.per_device_batch_size=16", "--train.keep_last=0", f"--model.tokenizer={small_tokenizer}",
              *geometry]
    full = tmp_path / "full"
    with one_thread():  # the same kernels as the one-thread resuming process
        train(debug_config(full, emoji_cache, *common, *option))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    shutil.copytree(full / "processor", resumed / "processor")
    said = resume_through_the_cli(resumed, emoji_cache, *common, *option)
    assert f"resumed from {resumed / 'checkpoints' / 'step-00000003'} at step 3" in said
    a = weights(full)
    assert max_difference(a, weights(resumed)) < 1e-6
    if option:
        with one_thread():
            train(debug_config(tmp_path / "off", emoji_cache, *common))
        off = weights(tmp_path / "off")  # (without the option's heads, if it adds any)
        assert max_difference({k: a[k] for k in off}, off) > 1e-4, f"{case} changed nothing"
    # a resume that would read other examples than the interrupted run is refused
    shutil.rmtree(resumed / "checkpoints" / "step-00000006")
    with pytest.raises(ValueError, match="per_device_batch_size=16.*now per_device_batch_size=8"):
        train(debug_config(resumed, emoji_cache, *common, *option, "--train.resume=latest",
                           "--train.per_device_batch_size=8"))
    # and the run did move: step 3 differs from the end
    mid = load_file(full / "checkpoints" / "step-00000003" / "model.safetensors")
    assert max_difference(mid, a) > 1e-4


def test_half_written_checkpoint_is_never_picked(tmp_path):
    good = tmp_path / "checkpoints" / "step-00000010"
    good.mkdir(parents=True)
    (good / STATE_NAME).write_text(json.dumps({"step": 10}))
    (tmp_path / "checkpoints" / ".tmp-step-00000020").mkdir()  # crash while writing
    (tmp_path / "checkpoints" / "step-00000030").mkdir()  # no state file: incomplete
    assert resolve_resume("latest", tmp_path) == good
    assert resolve_resume("latest", tmp_path / "nothing-yet") is None
    with pytest.raises(ValueError, match="not a complete mmcl checkpoint"):
        resolve_resume(str(tmp_path / "checkpoints" / "step-00000030"), tmp_path)


def test_temperature_is_clamped(tmp_path, emoji_cache, small_emoji):
    import math

    from mmcl.towers.model import DualEncoder

    train(debug_config(tmp_path, emoji_cache, f"--data.train={small_emoji}", "--data.validation=null", "--data.validation_share=0",
                       "--model.init_temperature=0.001", "--train.max_steps=2", "--train.checkpoint_every=0"))
    model = DualEncoder.from_pretrained(tmp_path / "final")
    # started at ln(1000) = 6.9; one clamp to ln(100), then at most two tiny Adam moves
    assert math.log(100.0) - 0.01 < model.logit_scale.item() <= math.log(100.0) + 1e-6


# Speed and memory options: the same math, so 4 steps give the same weights as without them, to
# the stated tolerance (seen: full and selective checkpointing 0, eager attention 1.2e-7 to 1.8e-7, fused
# AdamW 1.5e-8 to 6e-8).
SPEED_OPTIONS = {
    "activation-checkpointing": (("--model.text_activation_checkpointing=true",
                                  "--model.vision_activation_checkpointing=true"), 1e-6),
    "selective-checkpointing": (("--model.text_activation_checkpointing=true",
                                 "--model.vision_activation_checkpointing=true",
                                 "--model.activation_checkpointing_policy=selective"), 1e-6),
    "eager-attention": (("--model.attn_implementation=eager",), 1e-6),
    "fused-adamw": (("--train.optim=adamw_torch_fused",), 1e-6),
}


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, emoji_cache, small_emoji, small_tokenizer):
    """4 steps with none of the options (one text block trainable in a locked text tower)."""
    root, tokenizer = tmp_path_factory.mktemp("speed_options"), small_tokenizer
    common = (f"--data.train={small_emoji}", "--data.validation=null", "--data.validation_share=0", "--train.max_steps=4",
              "--train.checkpoint_every=0", f"--model.tokenizer={tokenizer}", "--model.lock_text=true",
              "--model.unlock_text_layers=1", "--model.attn_implementation=sdpa", "--train.optim=adamw_torch")
    train(debug_config(root / "plain", emoji_cache, *common))
    return root, common


def spy(monkeypatch, owner, name, calls):
    """Count the calls of `owner.name` (still calling it)."""
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)


@pytest.mark.parametrize("option", SPEED_OPTIONS)
def test_speed_options_take_the_same_steps(plain_run, emoji_cache, option, monkeypatch):
    import importlib

    from transformers import modeling_utils
    from transformers.models.bert import modeling_bert
    from transformers.models.vit import modeling_vit

    root, common = plain_run
    overrides, tolerance = SPEED_OPTIONS[option]
    calls = {}
    for owner, name in ((modeling_bert, "eager_attention_forward"), (modeling_vit, "eager_attention_forward"),
                        (importlib.import_module("torch.optim.adam"), "_fused_adam"), (modeling_utils, "checkpoint")):
        spy(monkeypatch, owner, name, calls)
    train(debug_config(root / option, emoji_cache, *common, *overrides))
    # the option was in effect: its kernel ran (the plain run uses sdpa, foreach AdamW, no checkpointing)
    expected = {"eager-attention": "eager_attention_forward", "fused-adamw": "_fused_adam"}.get(option, "checkpoint")
    assert calls.get(expected, 0) > 0 and set(calls) == {expected}, calls
    a = load_file(root / "plain" / "final" / "model.safetensors")
    b = load_file(root / option / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    diff = max((a[n] - b[n]).abs().max().item() for n in a)
    print(f"{option}: max |difference| {diff:.1e}")
    assert diff < tolerance
