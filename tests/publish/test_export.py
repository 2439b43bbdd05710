"""Export: the exported folder loads WITHOUT mmcl (transformers and sentence-transformers) and
gives mmcl's embeddings.

Each exported folder is loaded in a separate Python process, run isolated (`-I`: PYTHONPATH and
the user site ignored) from the temporary folder, in which importing mmcl fails (a meta-path
finder refuses it, as if it were not installed) and which asserts at its end that `mmcl` is not
in `sys.modules`.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mmcl.training.checkpoint import save_final
from mmcl.config import Config, ModelConfig
from mmcl.publish.export import ExportReport, export_model
from mmcl.towers.build import build_model
from mmcl.towers.model import DualEncoder
from mmcl.towers.build import build_image_processor, fit_text_config, train_tokenizer

BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 32}
VIT = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
       "intermediate_size": 64, "image_size": 16, "patch_size": 4}
CLIP_TEXT = {"model_type": "clip_text_model", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 32}
CLIP_VISION = {"model_type": "clip_vision_model", "hidden_size": 32, "num_hidden_layers": 2,
               "num_attention_heads": 2, "intermediate_size": 64, "image_size": 16, "patch_size": 4}
RESNET = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
          "layer_type": "basic"}
CAPTIONS = ["a red apple", "a green tree", "the flag of japan", "a smiling face with sunglasses",
            "a blue car on a road", "two cats asleep"] * 5
# the last is longer than max_text_length (16 tokens): every route must truncate where mmcl does
TEXTS = ["a red apple", "flag of japan and a tree", "cats", " ".join(["a smiling red apple on a tree"] * 5)]

# Runs in a clean process: nothing from mmcl, only what a user of the exported folder has.
LOADER = r"""
import json, sys


class NoMmcl:  # as if mmcl were not installed (it is, editable, in this venv)
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "mmcl":
            raise ImportError("mmcl is not installed here")


sys.meta_path.insert(0, NoMmcl())
import numpy as np
import torch
from PIL import Image

folder, native, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
texts = json.loads(sys.argv[4])
rng = np.random.default_rng(0)
images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((16, 16), (30, 20))]
result = {}
if native:
    from transformers import AutoModel, AutoProcessor
    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    with torch.no_grad():
        text = processor(text=texts, padding=True, truncation=True, return_tensors="pt")
        t = model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        i = model.get_image_features(pixel_values=pixels).pooler_output
    result["class"] = type(model).__name__
    result["logit_scale"] = model.logit_scale.item()
    result["hf_text"] = torch.nn.functional.normalize(t, dim=-1).tolist()
    result["hf_image"] = torch.nn.functional.normalize(i, dim=-1).tolist()
else:  # the Router's tower folders are plain transformers folders
    from transformers import AutoModel, AutoProcessor
    towers = [AutoModel.from_pretrained(f"{folder}/{m}_0_Transformer") for m in ("text", "image")]
    result["towers"] = [type(t).__name__ for t in towers]
    # and the whole model through the remote code the export ships (the card's snippet, as a user runs it)
    import os
    if os.path.exists(f"{folder}/modeling_mmcl.py"):  # no backbone tower
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        with torch.no_grad():
            res = model(**processor(text=texts, images=images, padding=True, truncation=True, return_tensors="pt"))
        result["class"] = type(model).__name__
        result["logit_scale"] = model.logit_scale.item()
        result["hf_text"], result["hf_image"] = res.text_embeds.tolist(), res.image_embeds.tolist()
        result["probs"] = res.logits_per_image.softmax(dim=-1).tolist()
from sentence_transformers import SentenceTransformer
st = SentenceTransformer(folder, device="cpu")
result["st_text"] = st.encode(texts).tolist()
result["st_image"] = st.encode(images).tolist()
assert "mmcl" not in sys.modules, "the loader imported mmcl"
with open(out, "w") as f:
    json.dump(result, f)
"""


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)  # the same images as the loader makes
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((16, 16), (30, 20))]


def _train_like_folder(tmp_path, text, vision, text_pooling, vision_pooling, **heads):
    """A trained-model folder as `save_final` writes it (max_text_length 16); `heads`: build_model's
    training-only heads (image_ssl_dim, predictor_hidden, swav_prototypes)."""
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=120)
    cfg = ModelConfig(text_config=dict(text), vision_config=dict(vision), projection_dim=8, image_size=16,
                      text_pooling=text_pooling, vision_pooling=vision_pooling, max_text_length=16)
    fit_text_config(cfg, tokenizer)
    torch.manual_seed(0)
    model = build_model(cfg, **heads)
    with torch.no_grad():
        model.logit_scale.fill_(3.3)
    folder = tmp_path / "mmcl_model"
    save_final(model, tokenizer, build_image_processor(cfg), Config(model=cfg).to_dict(), folder)
    return folder


def _load_clean(folder, native: bool, out) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["TRANSFORMERS_VERBOSITY"] = "warning"  # as a user sees it: no missing-weight warnings
    proc = subprocess.run([sys.executable, "-I", "-c", LOADER, str(folder), "1" if native else "0", str(out),
                           json.dumps(TEXTS)], cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "MISSING" not in proc.stderr and "newly initialized" not in proc.stderr, proc.stderr[-4000:]
    return json.loads(out.read_text())


@torch.no_grad()
def _mmcl_embeddings(folder) -> tuple[torch.Tensor, torch.Tensor]:
    from mmcl.towers.inference import load_processors

    model = DualEncoder.from_pretrained(folder)
    tokenizer, image_processor = load_processors(folder)
    enc = tokenizer(TEXTS, padding="longest", truncation=True, max_length=16, return_tensors="pt")
    pixels = image_processor(images=_images(), return_tensors="pt")["pixel_values"]
    return (model.get_text_features(enc["input_ids"], enc["attention_mask"]),
            model.get_image_features(pixels))


CASES = {
    "bert+vit pooler": (BERT, VIT, "pooler", "pooler", "VisionTextDualEncoderModel"),
    "clip pooler": (CLIP_TEXT, CLIP_VISION, "pooler", "pooler", "CLIPModel"),
    "bert mean + vit cls": (BERT, VIT, "mean", "cls", None),
    # VisionTextDualEncoderModel cannot hold a ResNet (no hidden_size); the Router takes pooler_output,
    # (B, H) for BERT and (B, C, 1, 1) for ResNet
    "bert pooler + resnet pooler": (BERT, RESNET, "pooler", "pooler", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_without_mmcl_and_matches(tmp_path, case):
    text, vision, text_pooling, vision_pooling, expected = CASES[case]
    folder = _train_like_folder(tmp_path, text, vision, text_pooling, vision_pooling)
    out_dir = tmp_path / "exported"
    report = export_model(folder, out_dir)

    assert isinstance(report, ExportReport)
    assert report.native_class == expected
    assert report.sentence_transformers
    assert all(v < 1e-5 for v in report.max_abs_diff.values()), report.max_abs_diff
    if expected is None:  # the card must say why there is no native class
        assert any("VisionTextDualEncoderModel" in note for note in report.notes), report.notes
    assert not list(out_dir.rglob("*.bin")) and not list(out_dir.rglob("*.pt")) and not list(out_dir.rglob("*.pth"))
    saved = json.loads((out_dir / "mmcl_export.json").read_text())
    assert saved["native_class"] == expected and saved["logit_scale"] == pytest.approx(3.3)

    got = _load_clean(out_dir, expected is not None, tmp_path / "embeddings.json")
    ref_text, ref_image = _mmcl_embeddings(folder)
    keys = ["st_text", "st_image", "hf_text", "hf_image"]  # a native class, else the remote-code model
    for key in keys:
        ref = ref_text if key.endswith("text") else ref_image
        emb = torch.tensor(got[key])
        assert emb.shape == ref.shape, key
        assert torch.allclose(emb.norm(dim=-1), torch.ones(len(emb)), atol=1e-5), key
        assert (emb - ref).abs().max().item() < 1e-5, key
    if expected:
        assert got["class"] == expected
        assert got["logit_scale"] == pytest.approx(3.3)
    else:
        model = DualEncoder.from_pretrained(folder)
        assert got["towers"] == [type(model.text_model).__name__, type(model.vision_model).__name__]
        assert got["class"] == "MmclDualEncoderModel" and got["logit_scale"] == pytest.approx(3.3)
        expected_probs = torch.tensor(3.3).exp() * ref_image @ ref_text.T
        assert torch.allclose(torch.tensor(got["probs"]), expected_probs.softmax(dim=-1), atol=1e-5)
    # mmcl's own commands read every export: the mmcl route where there is no native class, else transformers'
    from mmcl.towers.inference import load_encoder

    bundle = load_encoder(str(out_dir))
    with torch.no_grad():
        enc = bundle.tokenizer(TEXTS, padding="longest", truncation=True, max_length=bundle.max_length,
                               return_tensors="pt")
        again = bundle.encoder.get_text_features(enc["input_ids"], enc["attention_mask"])
    assert (torch.nn.functional.normalize(again, dim=-1) - ref_text).abs().max().item() < 1e-5


def test_the_training_heads_stay_out_of_the_export(tmp_path):
    """SLIP's / BYOL's head and predictor and SwAV's prototypes train the model; the export is the encoder."""
    from safetensors import safe_open

    folder = _train_like_folder(tmp_path, BERT, VIT, "mean", "cls", image_ssl_dim=4, predictor_hidden=6,
                                swav_prototypes=5)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {"predictor.0.weight", "prototypes.pairs.weight", "image_ssl_head.0.weight"} <= set(f.keys())
    report = export_model(folder, tmp_path / "exported")
    assert all(v < 1e-5 for v in report.max_abs_diff.values()), report.max_abs_diff
    for path in (tmp_path / "exported").rglob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            assert not [k for k in f.keys() if k.startswith(("image_ssl_head.", "predictor.", "prototypes."))], path
    saved = json.loads((tmp_path / "exported" / "mmcl_config.json").read_text())
    assert (saved["image_ssl_dim"], saved["predictor_hidden"], saved["swav_prototypes"]) == (None, None, None)


def test_export_rejects_a_folder_that_is_not_mmcl(tmp_path):
    with pytest.raises(FileNotFoundError, match="mmcl_config.json"):
        export_model(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".tmp-out").exists()


def test_export_never_writes_into_a_folder_that_is_not_an_earlier_export(tmp_path):
    folder = _train_like_folder(tmp_path, BERT, VIT, "mean", "cls")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="taken holds files mmcl did not write"):
        export_model(folder, tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    export_model(folder, tmp_path / "out")
    (tmp_path / "out" / "stale.txt").write_text("from an earlier export")
    export_model(folder, tmp_path / "out")  # an earlier export is replaced whole
    assert not (tmp_path / "out" / "stale.txt").exists()


def test_export_subcommand_is_registered():
    from mmcl.cli import build_parser

    args = build_parser().parse_args(["export", "runs/x/final", "out"])
    assert (args.model_dir, args.out_dir) == ("runs/x/final", "out") and callable(args.func)


def test_siglip_init_keeps_its_heads_and_bias_and_exports_as_a_native_siglip_model(tmp_path):
    """A small random SiglipModel on disk stands in for a Hub checkpoint: `init_from` reproduces its
    features and bias, a SigLIP-loss training step runs, and the export is a SiglipModel that
    transformers loads with AutoModel in a process without mmcl, matching mmcl's embeddings."""
    from transformers import SiglipConfig, SiglipModel

    from mmcl.config import LossConfig
    from mmcl.towers.inference import load_processors
    from mmcl.losses import build_loss, init_logit_bias

    tokenizer = train_tokenizer(CAPTIONS, vocab_size=120)
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                vocab_size=len(tokenizer), max_position_embeddings=32)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
                  patch_size=4)
    torch.manual_seed(0)
    source = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():
        source.logit_scale.fill_(2.3)
        source.logit_bias.fill_(-7.0)
    hub_like = tmp_path / "siglip"
    source.save_pretrained(hub_like)
    tokenizer.save_pretrained(hub_like)
    build_image_processor(ModelConfig(image_size=16)).save_pretrained(hub_like)

    cfg = ModelConfig(init_from=str(hub_like), max_text_length=16)
    model = build_model(cfg, init_logit_bias(LossConfig(name="siglip"))).eval()
    assert model.logit_bias.item() == pytest.approx(-7.0) and model.logit_scale.item() == pytest.approx(2.3)
    enc = tokenizer(TEXTS, padding="longest", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        ours = model.get_text_features(enc["input_ids"], enc["attention_mask"])
        ref = source.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
    assert (ours - torch.nn.functional.normalize(ref, dim=-1)).abs().max().item() < 1e-6

    model.train()  # one step of SigLIP's loss moves the towers and the bias
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    image_pixels = torch.randn(len(TEXTS), 3, 16, 16)
    build_loss(LossConfig(name="siglip"))(model(**enc, pixel_values=image_pixels)).backward()
    optimizer.step()
    assert model.logit_bias.item() != pytest.approx(-7.0)
    folder = tmp_path / "mmcl_model"
    save_final(model.eval(), tokenizer, load_processors(hub_like)[1], Config(model=cfg).to_dict(), folder)

    report = export_model(folder, tmp_path / "exported")
    assert report.native_class == "SiglipModel" and report.sentence_transformers
    assert report.logit_bias == pytest.approx(model.logit_bias.item())
    got = _load_clean(tmp_path / "exported", True, tmp_path / "embeddings.json")
    ref_text, ref_image = _mmcl_embeddings(folder)
    for key, ref in (("hf_text", ref_text), ("hf_image", ref_image), ("st_text", ref_text), ("st_image", ref_image)):
        assert (torch.tensor(got[key]) - ref).abs().max().item() < 1e-5, key
    assert got["class"] == "SiglipModel" and got["logit_scale"] == pytest.approx(model.logit_scale.item())



def test_a_siglip2_naflex_folder_is_refused_with_the_fixed_resolution_route(tmp_path):
    """SigLIP 2's fixed-resolution checkpoints are SiglipModel folders (the test above); its NaFlex
    variant (Siglip2Model) needs a patch mask mmcl does not feed yet: a clear error, not a traceback."""
    from transformers import Siglip2Config, Siglip2Model

    from mmcl.config import ConfigError

    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    Siglip2Model(Siglip2Config(text_config=dict(tiny, vocab_size=50), vision_config=dict(tiny, num_patches=16))
                 ).save_pretrained(tmp_path / "naflex")
    with pytest.raises(ConfigError, match="NaFlex.*google/siglip2-base-patch16-224"):
        build_model(ModelConfig(init_from=str(tmp_path / "naflex")))
