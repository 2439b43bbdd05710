"""Every mistake a user can make on the command line ends with one line, `mmcl <command>:
error: ...`, naming what is wrong, and exit status 2: no traceback, no silently ignored flag."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from tests.conftest import DEBUG_CONFIG, save_tiny_model

# (arguments, what the one error line must say); {model} is a real tiny model folder
CASES = [
    (["predict", "{model}", "missing.png", "--labels", "a,b"], "mmcl predict: error: missing.png: no such image file"),
    (["predict", "{model}", "imgs/red.png"], "mmcl predict: error: give --labels"),
    (["predict", "{model}", "imgs", "--labels", "a,b", "--topk", "3"], "mmcl predict: error: unrecognized arguments: --topk 3"),
    (["eval", "runs/nope/final", "--dataset", "pairs.csv"], "mmcl eval: error: runs/nope/final: no such model folder"),
    (["eval", "notamodel", "--dataset", "pairs.csv"], "mmcl eval: error: notamodel: not a model folder"),
    (["eval", "{model}", "--dataset", "pairs.csv", "--task", "zero_shot", "--label-column", "nope"],
     "mmcl eval: error: pairs.csv: no column 'nope'"),
    (["eval", "{model}", "--dataset", "pairs.csv", "--task", "zeroshot"],
     "mmcl eval: error: 'eval.task' is 'zeroshot'; choose one of retrieval, zero_shot"),
    (["eval", "{model}", "--dataset", "pairs.csv", "--topk", "3"], "mmcl eval: error: unrecognized arguments: --topk"),
    (["embed", "{model}", "pairs.csv", "--output", "e.npz", "--topk", "3"], "mmcl embed: error: unrecognized arguments"),
    (["embed", "{model}", "imgs", "--output", "e.txt"], "mmcl embed: error: --output e.txt: write embeddings to a .npz"),
    (["search", "{model}", "imgs", "red", "--topk", "3"], "mmcl search: error: unrecognized arguments: --topk"),
    (["search", "{model}", "no_folder", "red"], "mmcl search: error: no_folder: no such image file or folder"),
    (["data", "check", "pairs.csv", "--foo"], "mmcl data check: error: unrecognized arguments: --foo"),
    (["data", "convert", "pairs.csv", "out", "--to", "hf", "--shards", "2"],
     "mmcl data convert: error: unrecognized arguments: --shards"),
    (["data", "convert", "pairs.csv", "out", "--to", "tar"], "mmcl data convert: error: argument --to: invalid choice"),
    (["export", "{model}", "out", "--force"], "mmcl export: error: unrecognized arguments: --force"),
    (["export", "nope", "out"], "mmcl export: error: nope: no such model folder"),
    (["push", "{model}", "--repo-id", "me/x", "--token", "abc"], "mmcl push: error: unrecognized arguments: --token"),
    (["push", "{model}", "--repo-id", "me/x"], "mmcl push: error: no Hugging Face token: set HF_TOKEN"),
    (["train", "bad.yaml"], "mmcl train: error: bad.yaml: not valid YAML (line 3"),
    (["train", "nope.yaml"], "mmcl train: error: config file nope.yaml does not exist"),
    (["train", str(DEBUG_CONFIG), "--train.max_steps=ten"], "mmcl train: error: 'train.max_steps' must be int, got 'ten'"),
    (["train", str(DEBUG_CONFIG), "--train.max_step=3"],
     "mmcl train: error: unknown config key 'train.max_step': did you mean 'max_steps'?"),
    (["train", str(DEBUG_CONFIG), "--train.mixed_precision=fp8"],
     "mmcl train: error: 'train.mixed_precision' is 'fp8'; choose one of auto, no, bf16, fp16"),
    (["train", "--max_steps=3"], "mmcl train: error: 'max_steps' needs a section, e.g. --train.max_steps"),
    # an override whose value has spaces is still an override (argparse alone would take it for the config file)
    (["train", str(DEBUG_CONFIG), "--data.augment_options={{blurr: 0.5, flip: true}}"],
     "mmcl train: error: data.augment_options: unknown option(s) blurr; known: scale"),
    (["train", "--model.vision_model=backbone:resnet9000"], "mmcl train: error: model.vision_model / vision_config: "
                                                             "unknown backbone 'resnet9000': use one of efficientnet-lite0"),
    (["trian"], "mmcl: error: argument COMMAND: invalid choice: 'trian'"),
    # a folder whose config.json has no model_type, and one that asks to run its own code (auto_map)
    (["eval", "nomodeltype", "--dataset", "pairs.csv"], "mmcl eval: error: nomodeltype: cannot load its config"),
    (["predict", "nomodeltype", "imgs", "--labels", "a,b"], "mmcl predict: error: nomodeltype: cannot load its config"),
    (["demo", "nomodeltype"], "mmcl demo: error: nomodeltype: cannot load its config"),
    (["data", "mine-negatives", "pairs.csv", "--model", "nomodeltype", "--out", "mined"],
     "mmcl data mine-negatives: error: nomodeltype: cannot load its config"),
    (["eval", "remotecode", "--dataset", "pairs.csv"], "mmcl eval: error: remotecode: cannot load its config"),
    # a 0-byte CSV
    (["train", str(DEBUG_CONFIG), "--data.train=empty.csv"], "mmcl train: error: empty.csv is empty (0 bytes)"),
    (["data", "convert", "empty.csv", "out", "--to", "hf"], "mmcl data convert: error: empty.csv is empty (0 bytes)"),
    # a Hub dataset while offline (the tests run with HF_DATASETS_OFFLINE=1)
    (["train", str(DEBUG_CONFIG), "--data.train=someone/some-dataset"],
     "mmcl train: error: someone/some-dataset: not a local file or folder, and the Hub dataset cannot be loaded"),
    # every image unreadable; a top-k of 0
    (["predict", "{model}", "badimgs", "--labels", "a,b"], "mmcl predict: error: none of the 1 image(s) could be read"),
    (["search", "{model}", "imgs", "red", "--top-k", "0"], "mmcl search: error: argument --top-k: must be at least 1"),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_model(root / "model", "a photo of a red square")
    (root / "imgs").mkdir()
    Image.new("RGB", (20, 20), "red").save(root / "imgs" / "red.png")
    (root / "pairs.csv").write_text("image,caption\nimgs/red.png,a red square\n")
    (root / "bad.yaml").write_text("train:\n  max_steps: [1, 2\n")
    (root / "notamodel").mkdir()
    (root / "notamodel" / "notes.txt").write_text("not a model")
    (root / "nomodeltype").mkdir()
    (root / "nomodeltype" / "config.json").write_text("{}")
    (root / "remotecode").mkdir()
    (root / "remotecode" / "config.json").write_text('{"model_type": "mine", "auto_map": {"AutoConfig": "conf.Mine"}}')
    (root / "empty.csv").write_text("")
    (root / "badimgs").mkdir()
    (root / "badimgs" / "broken.png").write_bytes(b"not a png")
    return root


def run(argv: list[str], cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}  # the push case needs no token anywhere
    env.update(HF_HOME=str(cwd / "hf_home"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "mmcl.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)


def test_each_mistake_is_one_clean_line_and_exit_status_2(workdir):
    argvs = [[a.format(model=workdir / "model") for a in argv] for argv, _ in CASES]
    with ThreadPoolExecutor(2) as pool:  # two at a time: most fail within a second
        results = list(pool.map(lambda argv: run(argv, workdir), argvs))
    problems = []
    for (argv, expected), done in zip(CASES, results):
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if ": error: " in line]
        ok = (done.returncode == 2 and "Traceback" not in done.stderr and len(errors) == 1
              and lines[-1] == errors[0] and errors[0].startswith(expected))
        if not ok:
            problems.append(f"mmcl {' '.join(argv)} -> exit {done.returncode}:\n{done.stderr[-1500:]}")
    assert not problems, "\n\n".join(problems)
    assert len(CASES) >= 15


def test_data_check_reports_an_unreadable_file_in_its_verdict(workdir):
    """`mmcl data check` is the report: a file it cannot read is its finding (exit 1), not a usage error."""
    done = run(["data", "check", "empty.csv"], workdir)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-1500:]
    assert "error: empty.csv is empty (0 bytes)" in done.stdout and done.stdout.rstrip().endswith("verdict: CANNOT TRAIN")
