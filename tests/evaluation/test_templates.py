"""Zero-shot that matches the training captions: a run records its captions' style and the templates
that match it; `templates: auto` (the default of predict, demo, eval and the evaluation sets) uses
them, an explicit choice still wins, and the export and its card carry them."""

import json

import pytest

from mmcl.apps.predict import load_for_inference, predict
from mmcl.artifacts import ZERO_SHOT_NAME
from mmcl.config import EvalSpec
from mmcl.evaluation.evaluators import evaluate_model
from mmcl.evaluation.zero_shot import caption_style, load_templates
from mmcl.publish import publish_run
from mmcl.training.loop import train
from tests.test_train import debug_config

NAMES = ["red heart", "grinning face", "1st place medal", "cat face", "flag: France", "banana", "rocket"]
SENTENCES = ["A man riding a wave on top of a surfboard.", "a photo of a dog on a couch",
             "Two giraffes standing next to each other in a field.", "the kitchen has white cabinets."]


def test_the_caption_style_picks_bare_names_for_name_captions_and_a_sentence_template_otherwise():
    assert caption_style(NAMES * 10) | {"captions": 0} == {"caption_style": "names", "templates": "name",
                                                            "median_words": 2.0, "sentence_like_share": 0.0,
                                                            "captions": 0}
    style = caption_style(SENTENCES)
    assert style["caption_style"] == "sentences" and style["templates"] == "simple"
    assert caption_style([])["templates"] == "simple"
    assert load_templates("auto", "name") == ["{}"] and load_templates("auto", None) == ["a photo of a {}."]
    assert load_templates("ensemble", "name") != ["{}"]  # a named choice wins over the recommendation


@pytest.fixture(scope="module")
def trained(tmp_path_factory, emoji_cache):
    folder = tmp_path_factory.mktemp("templates")
    config = debug_config(folder, emoji_cache, "--hub.export=true")
    publish_run(str(folder), config.hub, train(config))  # as `mmcl train` does after training
    return folder


def test_a_run_saves_its_caption_style_and_auto_uses_it(trained, tmp_path, emoji_cache):
    final, export = trained / "final", trained / "export"
    saved = json.loads((final / ZERO_SHOT_NAME).read_text())
    assert saved["caption_style"] == "names" and saved["templates"] == "name"  # emoji names
    assert json.loads((export / ZERO_SHOT_NAME).read_text()) == saved
    bundle, accelerator = load_for_inference(str(final))
    assert bundle.templates == "name"
    image = tmp_path / "heart.png"
    from PIL import Image

    Image.new("RGB", (16, 16), (220, 20, 30)).save(image)
    labels = ["red heart", "green apple", "blue circle"]
    auto, name, simple = (predict(bundle, accelerator, [image], labels, t)[0]["top"] for t in ("auto", "name", "simple"))
    assert auto == name and auto != simple
    spec = dict(task="zero_shot", dataset="builtin:emoji", label_column="name", max_samples=40)
    results = {t: evaluate_model(str(final), EvalSpec(**spec, templates=t), cache_dir=emoji_cache)["top1"]
               for t in ("auto", "name")}
    assert results["auto"] == results["name"]
    card = (export / "README.md").read_text()
    assert "prompt each class as `{}`" in card and "'{}'.format(label)" in card


def test_a_model_without_a_recorded_style_keeps_the_simple_template(trained, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(trained / "final", bare)
    (bare / ZERO_SHOT_NAME).unlink()
    bundle, _ = load_for_inference(str(bare))
    assert bundle.templates is None and load_templates("auto", bundle.templates) == ["a photo of a {}."]
