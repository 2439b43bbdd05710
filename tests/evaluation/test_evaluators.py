"""Zero-shot and retrieval evaluation end to end, on a toy model whose right answers are known."""

import json
import os
import subprocess
import sys

import datasets
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image

from mmcl.config import ConfigError, EvalConfig, EvalSpec
from mmcl.evaluation.evaluators import evaluate_model, run_eval
from mmcl.evaluation.zero_shot import class_labels
from mmcl.towers.inference import EncoderBundle
from mmcl.towers.model import DualEncoderOutput, Encoder
from mmcl.towers.build import train_tokenizer
from mmcl.config import ModelConfig
from mmcl.towers.build import build_image_processor
from tests.conftest import REPO, free_port, save_tiny_model

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
          "cyan": (0, 255, 255), "magenta": (255, 0, 255)}


class ColorOracle(torch.nn.Module):
    """Embeds a solid-colour image as its mean RGB and a text as the RGB of the colour word in
    it: the right answer to every query is known in advance. An `Encoder`: evaluation calls it."""

    embed_dim = 3

    def __init__(self, tokenizer):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6))
        tokens = {w: tokenizer.tokenize(w) for w in COLORS}  # byte-level: " red" -> ["Ġred"]
        assert all(len(t) == 1 for t in tokens.values()), tokens
        self.word_to_rgb = {tokenizer.convert_tokens_to_ids(tokens[w][0]): torch.tensor(c, dtype=torch.float) - 127.5
                            for w, c in COLORS.items()}

    def get_image_features(self, pixel_values):
        return F.normalize(pixel_values.mean(dim=(2, 3)), dim=-1)

    def get_text_features(self, input_ids, attention_mask=None):
        rows = []
        for ids in input_ids.tolist():
            found = [self.word_to_rgb[i] for i in ids if i in self.word_to_rgb]
            rows.append(found[0] if found else torch.zeros(3))
        return F.normalize(torch.stack(rows) / 127.5, dim=-1)

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None):
        text = None if input_ids is None else self.get_text_features(input_ids, attention_mask)
        image = None if pixel_values is None else self.get_image_features(pixel_values)
        return DualEncoderOutput(image, text, self.logit_scale)


@pytest.fixture(scope="module")
def oracle():
    tokenizer = train_tokenizer([f"a photo of a {c}." for c in COLORS] * 3 + ["an emoji of the large small"], 400)
    processor = build_image_processor(ModelConfig(image_size=8))
    return EncoderBundle(ColorOracle(tokenizer), tokenizer, processor, max_length=16)


def color_dataset(n_per_class=3, labels="classlabel"):
    names = list(COLORS)
    rows = [(i, name) for i, name in enumerate(names) for _ in range(n_per_class)]
    images = [Image.new("RGB", (8, 8), COLORS[name]) for _, name in rows]
    captions = [[f"a {name}", f"the {name} one"] for _, name in rows]
    label = [i for i, _ in rows] if labels != "string" else [name for _, name in rows]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.List(datasets.Value("string")),
                                  "label": datasets.ClassLabel(names=names) if labels == "classlabel"
                                  else datasets.Value("string" if labels == "string" else "int64")})
    return datasets.Dataset.from_dict({"image": images, "caption": captions, "label": label}, features=features)


@pytest.mark.parametrize("templates", ["simple", "ensemble"])
def test_zero_shot_oracle_is_perfect(oracle, templates):
    spec = EvalSpec(task="zero_shot", dataset="colors", templates=templates)
    results = run_eval(oracle, color_dataset(), spec, Accelerator(cpu=True), EvalConfig(batch_size=4))
    assert results["top1"] == 1.0 and results["top5"] == 1.0 and results["mean_per_class_recall"] == 1.0
    assert results["per_class_accuracy"] == {name: 1.0 for name in COLORS}
    assert torch.equal(results["confusion"], torch.eye(6, dtype=torch.long) * 3)


def test_retrieval_oracle_with_two_captions_per_image(oracle):
    # 6 distinct colours, one image each: every caption's image is the only right one
    spec = EvalSpec(task="retrieval", dataset="colors")
    results = run_eval(oracle, color_dataset(n_per_class=1), spec, Accelerator(cpu=True),
                       EvalConfig(batch_size=4, retrieval_ks=[1, 5]))
    assert results["texts"] == 12 and results["images"] == 6
    assert results["image_to_text_R@1"] == 1.0 and results["text_to_image_R@1"] == 1.0


def test_class_names_from_strings_or_a_list_and_the_clear_errors():
    names, labels = class_labels(color_dataset(1, labels="string"), EvalSpec(dataset="d"))
    assert names == sorted(COLORS) and names[labels[0]] == "red"
    ints = color_dataset(1, labels="int")
    names, labels = class_labels(ints, EvalSpec(dataset="d", class_names=",".join(COLORS)))
    assert names == list(COLORS) and labels.tolist() == list(range(6))
    with pytest.raises(ConfigError, match="not a ClassLabel; give the class names"):
        class_labels(ints, EvalSpec(dataset="d"))
    with pytest.raises(ConfigError, match="there are 2 class names"):
        class_labels(ints, EvalSpec(dataset="d", class_names="red,green"))


def test_unknown_column_and_empty_dataset(tmp_path, oracle):
    color_dataset(1).save_to_disk(str(tmp_path / "colors"))
    with pytest.raises(ConfigError, match="no column 'nope' .*for the zero_shot task; columns are: image, caption, label"):
        evaluate_model(oracle, EvalSpec(task="zero_shot", dataset=str(tmp_path / "colors"), label_column="nope"))
    (tmp_path / "empty.csv").write_text("image,caption,label\n")
    with pytest.raises(ConfigError, match="empty.csv: the dataset has no rows"):
        evaluate_model(oracle, EvalSpec(task="zero_shot", dataset=str(tmp_path / "empty.csv")))


def test_one_and_two_processes_give_identical_metrics(tmp_path, emoji_cache):
    """`mmcl eval` on 37 emoji (odd: the second rank gets a padded batch) with 1 and 2 processes."""
    model_dir = save_tiny_model(tmp_path / "model", "emoji face hand heart cat dog flag", vocab_size=300)
    outputs = {}
    for nproc in (1, 2):
        out = tmp_path / f"results{nproc}.json"
        base = ["mmcl.cli", "eval", str(model_dir), "--dataset", "builtin:emoji", "--task", "zero_shot",
                "--label-column", "name", "--max-samples", "37", "--batch-size", "8", "--cache-dir", emoji_cache,
                "--output", str(out), "--output-format", "mmcl"]
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())] if nproc == 2 else []
        done = subprocess.run([sys.executable, *launcher, "-m", *base], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        outputs[nproc] = json.loads(out.read_text())["results"]
    assert outputs[1]["images"] == 37.0
    assert outputs[1] == outputs[2]


def test_rows_sharing_an_image_id_equal_a_caption_list(oracle):
    """COCO-style rows (one caption each, image repeated, an image_id) give exactly the metrics
    of one row per image with a list of captions."""
    listed = color_dataset(n_per_class=1)
    rows = {"image": [], "caption": [], "image_id": []}
    for i, example in enumerate(listed):
        for caption in example["caption"]:
            rows["image"].append(example["image"])
            rows["caption"].append(caption)
            rows["image_id"].append(f"img{i}")
    flat = datasets.Dataset.from_dict(rows)
    common = (Accelerator(cpu=True), EvalConfig(batch_size=4))
    a = run_eval(oracle, listed, EvalSpec(task="retrieval", dataset="d"), *common)
    b = run_eval(oracle, flat, EvalSpec(task="retrieval", dataset="d", image_id_column="image_id"), *common)
    assert a == b and b["images"] == 6 and b["texts"] == 12
    # without the id, each row would count as its own image: a different (worse) protocol
    c = run_eval(oracle, flat, EvalSpec(task="retrieval", dataset="d"), *common)
    assert c["images"] == 12 and c["text_to_image_R@1"] < 1.0


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_transformers_models_evaluate_through_the_same_path(tmp_path, kind):
    """A CLIPModel or SiglipModel folder (tiny, random) loads with load_encoder and evaluates;
    its embeddings are the model's own features, normalised."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    from mmcl.towers.inference import load_encoder

    tokenizer = train_tokenizer([f"a photo of a {c}." for c in COLORS], 300)
    torch.manual_seed(0)
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                vocab_size=len(tokenizer), max_position_embeddings=64)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
                  patch_size=4)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=dict(text, eos_token_id=3), vision_config=vision, projection_dim=8))
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    build_image_processor(ModelConfig(image_size=16)).save_pretrained(tmp_path)
    loaded = load_encoder(str(tmp_path))
    assert loaded.text_padding == ("max_length" if kind == "siglip" else "longest")
    spec = EvalSpec(task="zero_shot", dataset="colors")
    results = run_eval(loaded, color_dataset(), spec, Accelerator(cpu=True), EvalConfig(batch_size=4))
    assert 0.0 <= results["top1"] <= 1.0 and results["images"] == 18
    pixels = loaded.image_processor(color_dataset(1)[0]["image"], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ours = loaded.encoder.get_image_features(pixels)
        ref = model.eval().get_image_features(pixel_values=pixels)
    ref = getattr(ref, "pooler_output", ref)
    assert torch.allclose(ours, F.normalize(ref, dim=-1), atol=1e-6)
    assert isinstance(loaded.encoder, Encoder) and loaded.encoder.embed_dim == ours.shape[1]
