"""Every usage snippet an export's model card shows runs as written, in a process where mmcl cannot be
imported (isolated `-I`, a meta-path finder refusing `mmcl`): the native class's, the remote-code
model's (no native class) and sentence-transformers'. Each must rank the labels as mmcl does."""

import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from mmcl.apps.predict import load_for_inference, predict
from mmcl.publish.export import export_model
from mmcl.publish.push import ensure_model_card
from tests.publish.test_export import BERT, VIT, _train_like_folder

NO_MMCL = '''import sys
class NoMmcl:  # as if mmcl were not installed (it is, editable, in this venv)
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "mmcl":
            raise ImportError("mmcl is not installed here")
sys.meta_path.insert(0, NoMmcl())
'''
CHECK = '\nassert "mmcl" not in sys.modules, "the snippet imported mmcl"\n'
CASES = {"native (VisionTextDualEncoderModel)": ("pooler", "pooler"), "remote code": ("mean", "cls")}


def snippets(card: str) -> dict[str, str]:
    """{'transformers' | 'sentence-transformers': code} of the card's Usage section."""
    usage = card.split("## Usage", 1)[1]
    found = {}
    for title, code in re.findall(r"With `([\w-]+)`[^\n]*:\n\n```python\n(.*?)```", usage, flags=re.S):
        found[title] = code
    return found


@pytest.mark.parametrize("case", list(CASES))
def test_each_snippet_of_an_exports_card_runs_without_mmcl(tmp_path, case):
    text_pooling, vision_pooling = CASES[case]
    model = _train_like_folder(tmp_path, BERT, VIT, text_pooling, vision_pooling)
    export = tmp_path / "export"
    report = export_model(model, export)
    assert bool(report.native_class) == (case.startswith("native")) and report.sentence_transformers
    card = ensure_model_card(export, repo_id=str(export)).read_text(encoding="utf-8")
    found = snippets(card)
    assert set(found) == {"transformers", "sentence-transformers"}, card
    assert ("trust_remote_code=True" in found["transformers"]) == (case == "remote code")
    Image.new("RGB", (20, 20), (200, 30, 30)).save(tmp_path / "image.png")  # the file the snippets open
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    bundle, accelerator = load_for_inference(str(model))
    labels = ["red apple", "rocket", "dog face"]
    expected = predict(bundle, accelerator, [tmp_path / "image.png"], labels, "simple", top_k=3)[0]["top"]
    for kind, code in found.items():
        done = subprocess.run([sys.executable, "-I", "-c", NO_MMCL + code + CHECK], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (kind, done.stderr[-3000:])
        printed = done.stdout.strip().splitlines()[-1]
        if kind == "transformers":  # {label: probability}, as mmcl's zero-shot gives them
            probs = json.loads(printed.replace("'", '"'))
            for top in expected:
                assert probs[top["label"]] == pytest.approx(top["prob"], abs=1e-3), (probs, expected)
        else:  # the best label
            assert printed == expected[0]["label"], (printed, expected)
