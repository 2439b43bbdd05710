"""The same config and seed give the same numbers: two fresh `mmcl train` processes, each training its
own tokenizer on the captions (separate caches), end with identical weights and metrics.json, bit for
bit, apart from the measurements of time and memory."""

import json
import os
import subprocess
import sys

from safetensors.torch import load_file

from tests.conftest import DEBUG_CONFIG, REPO

MEASURED = {"train/wall_s", "train/tflops", "train/mfu", "train/data_wait", "train/peak_memory_mb"}


def run(out, cache, *overrides):
    cmd = [sys.executable, "-m", "mmcl.cli", "train", str(DEBUG_CONFIG), f"--train.output_dir={out}",
           f"--data.cache_dir={cache}", "--train.progress_bar=false", "--hub.export=false", "--train.seed=7",
           "--data.max_validation_samples=48", *overrides]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text()), load_file(out / "final" / "model.safetensors")


def test_two_fresh_runs_with_one_seed_give_the_same_numbers(tmp_path, emoji_cache):
    import shutil

    caches = [tmp_path / "cache-a", tmp_path / "cache-b"]
    for cache in caches:  # the built-in set copied: each run trains its own tokenizer in its own cache
        shutil.copytree(emoji_cache, cache, ignore=shutil.ignore_patterns("tokenizers"))
    (a, wa), (b, wb) = run(tmp_path / "a", caches[0]), run(tmp_path / "b", caches[1])
    assert [p.name for p in (caches[0] / "tokenizers").iterdir()] == [p.name for p in (caches[1] / "tokenizers").iterdir()]
    assert a.keys() == b.keys() and MEASURED <= a.keys()
    assert {k: v for k, v in a.items() if k not in MEASURED} == {k: v for k, v in b.items() if k not in MEASURED}
    assert all(wa[k].equal(wb[k]) for k in wa)
    # and the seed matters: another one gives other numbers
    c, _ = run(tmp_path / "c", caches[0], "--train.seed=8")
    assert c["val/image_to_text_R@1"] != a["val/image_to_text_R@1"] or c["train/loss"] != a["train/loss"]
