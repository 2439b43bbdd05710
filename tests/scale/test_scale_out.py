"""Scaling out on CPU processes (gloo), through the shipped launch configs and torchrun:

- FSDP2 with 2 processes takes the same steps as DDP with 2 processes and as 1 process with the
  global batch, with the text tower partly locked (LiT-style, the last layer unlocked); a sharded
  checkpoint resumes exactly.
- Two "nodes" (two torchrun --nnodes 2 launches meeting at localhost) equal one 2-process launch.
- A process killed mid-run: the survivor stops within a bounded time naming the lost rank, and the
  job resumes from the last checkpoint to the same weights as an uninterrupted run.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import DEBUG_CONFIG, REPO, free_port

LAUNCH_CONFIGS = REPO / "configs" / "accelerate"
TOLERANCE = 1e-5  # measured max difference: see the closing note of issue 10 (about 1e-7)
# Weights after 6 AdamW steps: where a gradient is near adam_epsilon (1e-6), the update moves by up to
# lr / eps = 1e3 x the gradient's rounding difference between a 2-process reduction and 1 process. Most
# runs differ by under 1e-6; with one session's tokenizer two tests differed by 1.2e-5 and 1.6e-5.
WEIGHT_TOLERANCE = 1e-4
LOST_PROCESS_BOUND_S = 60  # the roll call waits 15 s for the lost rank; the rest is exit and teardown
STEPS = 6


def train_args(out, emoji_cache, small_emoji, tokenizer, batch, *extra):
    return ["mmcl.cli", "train", str(DEBUG_CONFIG), f"--model.tokenizer={tokenizer}", f"--train.output_dir={out}",
            f"--data.cache_dir={emoji_cache}", f"--data.train={small_emoji}", "--data.validation=null", "--data.validation_share=0",
            f"--train.per_device_batch_size={batch}", f"--train.max_steps={STEPS}", "--train.log_every=1",
            "--train.checkpoint_every=3", "--train.keep_last=0", "--train.progress_bar=false",
            "--train.warmup_steps=0", "--hub.export=false", *extra]


def start(cmd, **env):
    """A launcher in its own process group, so that a timeout can stop its workers too."""
    return subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc, timeout):
    """-> (exit code, output); a launch still running after `timeout` s is killed with its workers."""
    try:
        out = proc.communicate(timeout=timeout)[0]
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def launch(cmd, timeout=600):
    code, out = finish(start(cmd), timeout)
    assert code == 0, out[-4000:]
    return out


def accelerate(config, port, args):
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH_CONFIGS / config),
            "--main_process_port", str(port), "-m", *args]


def torchrun(args, port, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port),
            "-m", *args]


def node(rank, port, module_args):
    """One of two single-process "nodes" of a job; node 0's launcher holds the job's store at
    localhost:port (static rendezvous, as configs/accelerate/multi_node*.yaml). With torchrun's c10d
    rendezvous on one machine the store's holder could finish first and take it down under the other
    launcher, which then failed after a good run (seen in CI)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
            "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port), *module_args]


def two_nodes(port, module_args, timeout=600, **env):
    """Both nodes' launches, run together; -> (their exit codes, their outputs)."""
    procs = [start(node(r, port, module_args), **env) for r in (0, 1)]
    done = [finish(p, timeout) for p in procs]
    return [code for code, _ in done], [out for _, out in done]


def losses(out):
    return [json.loads(line)["train/loss"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in line]


def final(out):
    return load_file(out / "final" / "model.safetensors")


def assert_same_steps(a, b, what):
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == STEPS, (la, lb)
    assert max(abs(x - y) for x, y in zip(la, lb)) < TOLERANCE, (what, la, lb)
    wa, wb = final(a), final(b)
    assert wa.keys() == wb.keys(), what
    worst, name = max(((wa[n] - wb[n]).abs().max().item(), n) for n in wa)
    assert worst < WEIGHT_TOLERANCE, (what, worst, name)
    return worst


def initial_weights(tokenizer, *overrides):
    """The weights a run starts from (the Trainer seeds, then builds the model)."""
    from accelerate.utils import set_seed

    from mmcl.towers.build import build_model, build_tokenizer, fit_text_config
    from mmcl.config_loader import load_config

    config = load_config(str(DEBUG_CONFIG), [f"--model.tokenizer={tokenizer}", *overrides])
    fit_text_config(config.model, build_tokenizer(config.model))
    set_seed(config.train.seed)
    return build_model(config.model).state_dict()


def assert_fsdp_resume_is_exact(tmp_path, step3, args):
    """A fresh FSDP2 job from the sharded step-3 checkpoint of run "fsdp" takes steps 4-6 as it did."""
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(step3, resumed / "checkpoints" / step3.name)
    shutil.copytree(tmp_path / "fsdp" / "processor", resumed / "processor")
    launch(accelerate("fsdp2_cpu.yaml", free_port(), args("resumed", 16, "--train.resume=latest")))
    a, b = final(tmp_path / "fsdp"), final(resumed)
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    print("max |difference| fsdp resumed-uninterrupted", worst)
    assert worst < TOLERANCE
    assert losses(resumed)[-3:] == pytest.approx(losses(tmp_path / "fsdp")[-3:], abs=TOLERANCE)


LIT = ("--model.lock_text=true", "--model.unlock_text_layers=1")


# evaluated through the sharded model at steps 3 and 6, the best model kept by R@1 (saved from shards)
EVAL = ("--data.validation={small}", "--data.max_validation_samples=48", "--train.eval_every=3",
        "--eval.best_metric=val/image_to_text_R@1")


def test_fsdp2_takes_the_steps_of_ddp_and_of_one_process_and_resumes_exactly(tmp_path, emoji_cache, small_emoji,
                                                                             small_tokenizer):
    evals = [e.format(small=small_emoji) for e in EVAL]
    args = lambda out, batch, *extra: train_args(tmp_path / out, emoji_cache, small_emoji, small_tokenizer, batch,
                                                 *LIT, *evals, *extra)
    launch([sys.executable, "-m", *args("one", 32)])
    launch(accelerate("multi_gpu_cpu.yaml", free_port(), args("ddp", 16)))
    launch(accelerate("fsdp2_cpu.yaml", free_port(), args("fsdp", 16)))
    print("max |difference| fsdp-ddp", assert_same_steps(tmp_path / "fsdp", tmp_path / "ddp", "fsdp vs ddp"))
    print("max |difference| fsdp-one", assert_same_steps(tmp_path / "fsdp", tmp_path / "one", "fsdp vs 1 process"))
    metrics = {run: json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "ddp", "fsdp")}
    recall = {run: m["val/image_to_text_R@1"] for run, m in metrics.items()}
    assert recall["fsdp"] == recall["ddp"] == recall["one"], recall
    best = load_file(tmp_path / "fsdp" / "best" / "model.safetensors")
    assert best.keys() == final(tmp_path / "fsdp").keys()
    assert json.loads((tmp_path / "fsdp" / "best" / "mmcl_info.json").read_text())["step"] in (3, 6)

    # the checkpoint gathers the shards into safetensors and JSON (no pickle: DCP's .metadata is one),
    # with each process's random state
    step3 = tmp_path / "fsdp" / "checkpoints" / "step-00000003"
    names = sorted(p.name for p in step3.iterdir())
    assert {"model.safetensors", "optimizer.safetensors", "rng_0.safetensors", "rng_1.safetensors"} <= set(names)
    assert not [n for n in names if n.endswith((".bin", ".pkl", ".pt", ".distcp", ".metadata"))], names
    assert load_file(step3 / "model.safetensors").keys() == final(tmp_path / "fsdp").keys()

    # LiT: the locked text layers did not move, the unlocked last one and the vision tower did
    start, end = initial_weights(small_tokenizer, *LIT), final(tmp_path / "fsdp")
    moved = {n for n in end if (end[n] - start[n].reshape(end[n].shape)).abs().max() > 1e-6}
    assert "text_model.encoder.layer.0.attention.self.query.weight" not in moved
    assert "text_model.embeddings.word_embeddings.weight" not in moved
    assert {"text_model.encoder.layer.1.attention.self.query.weight", "logit_scale",
            "vision_model.layers.0.attention.q_proj.weight"} <= moved

    # resume: a fresh job from the sharded step-3 checkpoint takes steps 4-6 as the uninterrupted run
    assert_fsdp_resume_is_exact(tmp_path, step3, args)


# every loss option that keeps state or runs parameters outside the forward, at once: GradCache (chunks
# of 5), a momentum queue (its EMA copy sharded), BYOL (its EMA target sharded, its predictor on the
# gathered batch) and SwAV (Sinkhorn over both processes, its queue). Adam's epsilon as in
# tests/losses/test_distributed.py (BYOL); SwAV's epsilon at the paper's 0.05: Sinkhorn's exp(score / eps)
# amplifies the processes' rounding differences, at the default 0.02 the losses differed by 5.3e-5 by step 4.
EVERY_OPTION = ("--loss.cache_chunk=5", "--loss.queue_size=32", "--loss.momentum=0.9", "--loss.byol_weight=1.0",
                "--loss.swav_weight=0.5", "--loss.swav_queue_size=32", "--loss.swav_epsilon=0.05",
                "--loss.image_ssl_dim=16",
                "--train.adam_epsilon=1e-4")


def test_fsdp2_runs_every_loss_option_as_one_process_and_resumes_exactly(tmp_path, emoji_cache, small_emoji,
                                                                         small_tokenizer):
    args = lambda out, batch, *extra: train_args(tmp_path / out, emoji_cache, small_emoji, small_tokenizer, batch,
                                                 *LIT, *EVERY_OPTION, *extra)
    launch([sys.executable, "-m", *args("one", 32)])
    launch(accelerate("fsdp2_cpu.yaml", free_port(), args("fsdp", 16)))
    print("max |difference| fsdp-one", assert_same_steps(tmp_path / "fsdp", tmp_path / "one", "fsdp vs 1 process"))
    logged = json.loads((tmp_path / "fsdp" / "logs" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train/loss_byol", "train/loss_swav_views", "train/loss_swav_pairs"} <= set(logged)

    # the checkpoint holds the EMA copies gathered (whole tensors, as one process saves them)
    step3 = tmp_path / "fsdp" / "checkpoints" / "step-00000003"
    single = tmp_path / "one" / "checkpoints" / "step-00000003"
    shapes = lambda folder: {k: tuple(v.shape) for k, v in load_file(folder / "objective.safetensors").items()}
    assert shapes(step3) == shapes(single)
    assert any(k.startswith("byol.target.vision_model.") for k in shapes(step3))
    assert any(k.startswith("queue.momentum_model.") for k in shapes(step3))

    assert_fsdp_resume_is_exact(tmp_path, step3, args)


def test_two_nodes_equal_one_node_and_a_lost_process_is_named_and_resumed(tmp_path, emoji_cache, small_emoji,
                                                                          small_tokenizer):
    args = lambda out, *extra: train_args(tmp_path / out, emoji_cache, small_emoji, small_tokenizer, 16, *extra)
    launch(torchrun(args("one-node"), free_port()))
    codes, outs = two_nodes(free_port(), ["-m", *args("two-nodes")])
    assert codes == [0, 0], outs
    print("max |difference| 2 nodes - 1 node", assert_same_steps(tmp_path / "two-nodes", tmp_path / "one-node", "nodes"))

    # rank 1 (the second node's only process) is killed after 4 steps; the step-3 checkpoint is complete
    stamp = tmp_path / "killed-at"
    codes, outs = two_nodes(free_port(), [str(REPO / "tests" / "scale" / "kill_worker.py"), *args("killed")[1:]],
                            timeout=300, MMCL_KILL_RANK="1", MMCL_KILL_STEP="4", MMCL_KILL_STAMP=str(stamp))
    ended = time.time()
    assert stamp.is_file(), outs[1][-3000:]
    waited = ended - float(stamp.read_text())
    print(f"the survivor stopped {waited:.1f} s after rank 1 was killed")
    assert codes[0] != 0 and codes[1] != 0
    assert "lost a process at step 4: rank 1 of 2 did not answer" in outs[0], outs[0][-4000:]
    assert waited < LOST_PROCESS_BOUND_S
    assert [p.name for p in Path(tmp_path / "killed" / "checkpoints").glob("step-*")] == ["step-00000003"]

    codes, outs = two_nodes(free_port(), ["-m", *args("killed", "--train.resume=latest")])
    assert codes == [0, 0], outs
    a, b = final(tmp_path / "one-node"), final(tmp_path / "killed")
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    print("max |difference| killed+resumed - uninterrupted", worst)
    assert worst < TOLERANCE
