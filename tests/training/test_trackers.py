"""Trackers the way Accelerate has them: `train.report_to` takes a list; logs/metrics.jsonl is always
written; tensorboard, wandb (offline) and mlflow (a local file store) each receive the run's metric
names (MLflow's rules turn '@' into '_at_') and its config. Run in a subprocess under a time limit:
a tracker's background service that hangs fails the test instead of stalling the suite."""

import json
import os
import subprocess
import sys

import pytest

from mmcl.config import ConfigError
from mmcl.training.tracking import build_trackers, tracker_names
from tests.conftest import DEBUG_CONFIG

RUN_BOUND_S = 300


def test_names_are_checked_and_a_missing_package_is_an_error(tmp_path, monkeypatch):
    assert tracker_names("tensorboard, wandb") == ["tensorboard", "wandb"]
    assert tracker_names(["mlflow"]) == ["mlflow"]
    with pytest.raises(ConfigError, match="'wandbb' is not a tracker"):
        tracker_names("wandbb")
    assert [type(t).__name__ for t in build_trackers("none", tmp_path)] == ["JsonlTracker"]  # the log stays
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(ConfigError, match="comet_ml is not installed here: pip install comet-ml"):
        build_trackers("comet_ml", tmp_path)


@pytest.mark.slow
def test_tensorboard_wandb_and_mlflow_receive_the_same_metrics_and_config(tmp_path, monkeypatch):
    run = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", MLFLOW_ALLOW_FILE_STORE="true",
               MLFLOW_TRACKING_URI=(tmp_path / "mlruns").as_uri(), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "mmcl.cli", "train", str(DEBUG_CONFIG), f"--train.output_dir={run}",
                           "--train.report_to=[tensorboard, wandb, mlflow]", "--hub.export=false",
                           "--train.progress_bar=false"], env=env, capture_output=True, text=True, timeout=RUN_BOUND_S)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    names = {k for entry in logged for k in entry if k != "step"}
    assert {"train/loss", "val/image_to_text_R@1"} <= names
    config = json.loads((run / "logs" / "config.json").read_text())
    assert config["train.max_steps"] == 6

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [p for p in (run / "logs").rglob("events.out.tfevents.*")]
    assert events
    tags = set()
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert names <= tags, names - tags

    # wandb offline keeps the run as protobuf records in run-*.wandb (synced later by `wandb sync`); this
    # wandb ships no reader for it, but protobuf stores every key as its UTF-8 bytes
    (record,) = (run / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    payload = record.read_bytes()
    missing = {n for n in names if n.encode() not in payload}
    assert not missing and b"train.max_steps" in payload and b"model.projection_dim" in payload, missing

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's local file store, kept for such reads

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "mmcl"]
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert {n.replace("@", "_at_") for n in names} <= set(mlflow_run.data.metrics)
    assert mlflow_run.data.params["train.max_steps"] == "6"
