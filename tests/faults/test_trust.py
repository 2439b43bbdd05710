"""Data never runs code: a pickle payload planted in any file of a checkpoint is never executed
(resume fails with one line instead), and a model folder that names a backbone module in the
current folder does not get it imported, even under `python -m mmcl.cli` (where the current folder
is on the import path), unless the user passes --trust-backbone."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest

from mmcl.training.loop import train
from tests.conftest import DEBUG_CONFIG, REPO, save_tiny_model
from tests.test_train import debug_config


class Payload:
    """Unpickling this creates the file `path`: proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, emoji_cache, small_emoji):
    out = tmp_path_factory.mktemp("trusted") / "run"
    train(debug_config(out, emoji_cache, f"--data.train={small_emoji}", "--data.validation=null", "--data.validation_share=0",
                       "--train.max_steps=2", "--train.checkpoint_every=2", "--loss.queue_size=16"))
    return out


def resume(out, emoji_cache, small_emoji):
    cmd = [sys.executable, "-m", "mmcl.cli", "train", str(DEBUG_CONFIG), f"--train.output_dir={out}",
           f"--data.cache_dir={emoji_cache}", f"--data.train={small_emoji}", "--data.validation=null", "--data.validation_share=0",
           "--train.max_steps=3", "--train.checkpoint_every=2", "--loss.queue_size=16", "--train.progress_bar=false",
           "--hub.export=false", "--train.resume=latest"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_a_pickle_planted_in_any_checkpoint_file_never_runs(checkpoint, tmp_path, emoji_cache, small_emoji):
    step = checkpoint / "checkpoints" / "step-00000002"
    names = sorted(p.name for p in step.iterdir())
    assert {"model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", "rng_0.safetensors",
            "rng_0.json", "objective.safetensors", "mmcl_train_state.json"} <= set(names)
    assert not [n for n in names if n.endswith((".bin", ".pkl", ".pt"))]  # nothing pickled is written
    planted = []
    for name in names + ["optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"]:  # the old names too
        out = tmp_path / name
        shutil.copytree(checkpoint, out, ignore=shutil.ignore_patterns("*.lock"))
        marker = tmp_path / f"ran-{name}"
        (out / "checkpoints" / "step-00000002" / name).write_bytes(pickle.dumps(Payload(marker)))
        if name.startswith(("optimizer.bin", "random", "custom")):  # an old-format checkpoint: it has no new files
            for new in ("optimizer.safetensors", "optimizer.json"):
                (out / "checkpoints" / "step-00000002" / new).unlink()
        done = resume(out, emoji_cache, small_emoji)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        planted.append((name, done.returncode, marker.exists(), lines[-1:] if lines else []))
    ran = [p for p in planted if p[2]]
    assert not ran, ran
    for name, code, _, last in planted:  # each refused with one line, never a traceback
        assert code == 2 and last and last[0].startswith("mmcl train: error: "), (name, code, last)


def test_a_model_folder_cannot_import_a_module_from_the_current_folder(tmp_path):
    model = save_tiny_model(tmp_path / "model", "a red square")
    config = json.loads((model / "mmcl_config.json").read_text())
    config["vision_config"] = {"model_type": "mmcl_backbone", "backbone": "evil:SPEC", "hidden_size": 32}
    (model / "mmcl_config.json").write_text(json.dumps(config))
    (tmp_path / "evil.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\nSPEC = None\n")
    (tmp_path / "pairs.csv").write_text("image,caption\nred.png,a red square\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "mmcl.cli", "eval", "model", "--dataset", "pairs.csv"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and not (tmp_path / "imported").exists(), done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "names the backbone 'evil:SPEC'" in last and "--trust-backbone" in last and "Traceback" not in done.stderr
    trusted = subprocess.run([sys.executable, "-m", "mmcl.cli", "eval", "model", "--dataset", "pairs.csv",
                              "--trust-backbone"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert (tmp_path / "imported").exists(), trusted.stderr[-2000:]  # the user said so: it is imported
