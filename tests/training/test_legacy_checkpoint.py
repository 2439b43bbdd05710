"""A checkpoint written by an earlier mmcl (tests/data/legacy_checkpoint: configs/debug_tiny.yaml with
`--data.validation=null --train.report_to=jsonl --hub.export=false --model.tokenizer_vocab_size=200`,
its step-3 checkpoint and processor folder, and the weights that run reached at step 6) still resumes,
and takes the earlier code's steps."""

import shutil

from safetensors.torch import load_file

from mmcl.config_loader import load_config
from mmcl.training.loop import train
from tests.conftest import DEBUG_CONFIG, REPO

LEGACY = REPO / "tests" / "data" / "legacy_checkpoint"


def test_a_checkpoint_of_an_earlier_version_resumes_to_its_weights(tmp_path, emoji_cache):
    run = tmp_path / "run"
    shutil.copytree(LEGACY / "checkpoints", run / "checkpoints")
    shutil.copytree(LEGACY / "processor", run / "processor")
    train(load_config(DEBUG_CONFIG, [f"--train.output_dir={run}", f"--data.cache_dir={emoji_cache}",
                                     "--train.progress_bar=false", "--data.validation=null", "--data.validation_share=0",
                                     "--train.report_to=jsonl", "--hub.export=false",
                                     "--model.tokenizer_vocab_size=200", "--train.resume=latest"]))
    expected = load_file(LEGACY / "step6_uninterrupted.safetensors")
    resumed = load_file(run / "final" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    worst = max((expected[k] - resumed[k]).abs().max().item() for k in expected)
    assert worst < 1e-5, worst
    start = load_file(run / "checkpoints" / "step-00000003" / "model.safetensors")
    assert max((start[k] - resumed[k]).abs().max().item() for k in expected) > 1e-4  # the resume did train
