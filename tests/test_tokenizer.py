"""The tokenizer trained on a run's captions: the same captions give the same tokenizer in any
process (byte for byte), and a second run with the same captions reuses the cached one."""

import subprocess
import sys

from mmcl.towers import build
from mmcl.towers.build import cached_tokenizer, train_tokenizer
from tests.conftest import REPO

CAPTIONS = ["red apple", "green apple", "flag: Japan", "flag: France", "dog face", "cat face", "rocket",
            "grinning face with big eyes", "face with tears of joy", "red heart", "blue heart"] * 3

TRAIN = ("import sys; from mmcl.towers.build import train_tokenizer; from tests.test_tokenizer import CAPTIONS; "
         "sys.stdout.write(train_tokenizer(CAPTIONS, 300).backend_tokenizer.to_str())")


def test_training_is_deterministic_across_processes():
    runs = [subprocess.run([sys.executable, "-c", TRAIN], cwd=REPO, capture_output=True, text=True, timeout=120)
            for _ in range(3)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout == runs[2].stdout and len(runs[0].stdout) > 1000
    tokenizer = train_tokenizer(CAPTIONS, 300)
    assert tokenizer.backend_tokenizer.to_str() == runs[0].stdout  # and the same here
    ids = tokenizer("Red apple")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id == 3  # not 2: see train_tokenizer
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "red apple"


def test_a_second_run_reuses_the_cached_tokenizer(tmp_path, monkeypatch):
    first = cached_tokenizer(iter(CAPTIONS), 300, tmp_path)
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1
    monkeypatch.setattr(build, "train_tokenizer", lambda *a: (_ for _ in ()).throw(AssertionError("trained again")))
    again = cached_tokenizer(iter(CAPTIONS), 300, tmp_path)
    assert again.get_vocab() == first.get_vocab() and again("rocket")["input_ids"] == first("rocket")["input_ids"]
    monkeypatch.undo()
    cached_tokenizer(CAPTIONS[:-1], 300, tmp_path)  # other captions: another tokenizer
    assert len(list((tmp_path / "tokenizers").iterdir())) == 2
