"""Export a trained mmcl model to a folder that loads without mmcl installed.

- transformers: `CLIPModel` (CLIP towers) or `VisionTextDualEncoderModel` (any pair) when both
  poolings are "pooler": each projects its towers' `pooler_output` and returns features that are
  not normalised (normalise them, as mmcl does). "cls" and "mean" have no native class.
- sentence-transformers, always: over a native class, `Transformer` (get_*_features) + `Normalize`;
  otherwise a `Router` with one route per modality: `Transformer` (the tower) + `Pooling` (mmcl's
  pooling) + `Dense` (the projection: no bias, identity) and then `Normalize`.

Every route is compared with mmcl's embeddings before it is kept. Weights are safetensors only;
nothing sets `trust_remote_code`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

EXPORT_INFO = "mmcl_export.json"
COPIED = ("mmcl_training_config.yaml", "mmcl_info.json")  # metadata for the model card
TOLERANCE = 1e-4  # max abs difference of unit-norm embeddings accepted at export time
PROBE_TEXTS = ["a photo of a cat", "red apple", " ".join(["a long caption, longer than any max length"] * 40)]
Probe = dict[str, torch.Tensor]  # probe inputs and mmcl's embeddings of them ("text", "image")


@dataclass
class ExportReport:
    """What `export_model` wrote and why; `notes` is plain text meant for the model card."""

    native_class: str | None  # "CLIPModel", "VisionTextDualEncoderModel" or None
    sentence_transformers: bool
    text_pooling: str
    vision_pooling: str
    logit_scale: float  # ln(1 / temperature); the ST route does not carry it, so it is kept here
    notes: list[str] = field(default_factory=list)
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # "<route> <modality>" -> vs mmcl

    def __str__(self) -> str:
        lines = [f"transformers native class: {self.native_class or 'none'}",
                 f"sentence-transformers: {'yes' if self.sentence_transformers else 'no'}"]
        lines += [f"max |diff| vs mmcl, {k}: {v:.2e}" for k, v in self.max_abs_diff.items()]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def native_class_for(model: Any) -> tuple[str | None, str | None]:
    """(the transformers class that can hold `model`, or None; why not, if None)."""
    from transformers import CLIPTextModel, CLIPVisionModel

    cfg = model.config
    if cfg.text_pooling != "pooler" or cfg.vision_pooling != "pooler":
        return None, (f"pooling text={cfg.text_pooling!r}, vision={cfg.vision_pooling!r} has no native "
                      "transformers class: CLIPModel and VisionTextDualEncoderModel project each tower's "
                      "pooler_output, so only pooling 'pooler' on both towers can be expressed; use the "
                      "sentence-transformers route")
    if isinstance(model.text_model, CLIPTextModel) and isinstance(model.vision_model, CLIPVisionModel):
        return "CLIPModel", None
    return "VisionTextDualEncoderModel", None


def build_native(model: Any, name: str) -> Any:
    """A `CLIPModel` / `VisionTextDualEncoderModel` holding `model`'s weights (in eval mode)."""
    from transformers import CLIPConfig, CLIPModel, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    text, vision = model.text_model, model.vision_model
    dim, scale = model.config.projection_dim, model.logit_scale.item()
    if name == "CLIPModel":
        native = CLIPModel(CLIPConfig(text_config=text.config.to_dict(), vision_config=vision.config.to_dict(),
                                      projection_dim=dim, logit_scale_init_value=scale))
        native.text_model.load_state_dict(text.state_dict())
        native.vision_model.load_state_dict(vision.state_dict())
    else:
        config = VisionTextDualEncoderConfig.from_vision_text_configs(
            vision.config, text.config, projection_dim=dim, logit_scale_init_value=scale)
        native = VisionTextDualEncoderModel(config, vision_model=vision, text_model=text)
    native.text_projection.load_state_dict(model.text_projection.state_dict())
    native.visual_projection.load_state_dict(model.visual_projection.state_dict())
    native.logit_scale.data.copy_(model.logit_scale.data)
    return native.eval()


def build_processor(name: str, tokenizer: Any, image_processor: Any) -> Any:
    """The processor for `AutoProcessor.from_pretrained`: CLIPProcessor only with a CLIP tokenizer
    (another one could come back as CLIP's, with other ids); else VisionTextDualEncoderProcessor."""
    from transformers import CLIPProcessor, VisionTextDualEncoderProcessor

    if name == "CLIPModel" and type(tokenizer).__name__.startswith("CLIPTokenizer"):
        return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _st_native(folder: Path) -> Any:
    """sentence-transformers over the native folder: get_*_features -> Normalize."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer

    modality_config = {m: {"method": f"get_{m}_features", "method_output_name": "pooler_output"}
                       for m in ("text", "image")}
    encoder = Transformer(str(folder), modality_config=modality_config, module_output_name="sentence_embedding")
    return SentenceTransformer(modules=[encoder, Normalize()], device="cpu")


def _with_zero_pooler(tower: Any) -> Any:
    """The tower with the pooler head that mmcl dropped (pooling cls/mean never calls it) restored as
    zeros: `AutoModel.from_pretrained` builds one, and would fill it at random and warn of missing weights."""
    if getattr(tower, "pooler", 0) is not None:
        return tower
    full = type(tower)(tower.config)
    missing = full.load_state_dict(tower.state_dict(), strict=False).missing_keys
    assert all(k.startswith("pooler.") for k in missing), missing
    for param in full.pooler.parameters():
        torch.nn.init.zeros_(param)
    return full


@torch.no_grad()
def _st_route(model: Any, modality: str, processor: Any, probe: Probe, tmp: Path) -> list[Any]:
    """One modality's sentence-transformers modules: Transformer (the tower) (+ Pooling) + Dense.

    A (B, C, 1, 1) pooler_output (ResNet) arrives as (B, 1, C) tokens: a mean Pooling flattens it."""
    from sentence_transformers.base.modules import Dense, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    text = modality == "text"
    tower = model.text_model if text else model.vision_model
    projection = model.text_projection if text else model.visual_projection
    pooling = model.config.text_pooling if text else model.config.vision_pooling
    inputs = {k: probe[k] for k in (("input_ids", "attention_mask") if text else ("pixel_values",))}
    flat = pooling == "pooler" and tower(**inputs).pooler_output.dim() == 2
    folder = tmp / modality  # the Transformer module loads its tower from a folder
    _with_zero_pooler(tower).save_pretrained(folder)
    processor.save_pretrained(folder)
    output = "pooler_output" if pooling == "pooler" else "last_hidden_state"
    encoder = Transformer(str(folder), modality_config={modality: {"method": "forward", "method_output_name": output}},
                          module_output_name="sentence_embedding" if flat else "token_embeddings")
    dense = Dense(projection.in_features, projection.out_features, bias=False, activation_function=None,
                  init_weight=projection.weight.detach().clone())
    if flat:
        return [encoder, dense]
    mode = "mean" if pooling == "pooler" else pooling
    return [encoder, Pooling(projection.in_features, pooling_mode=mode), dense]


def _st_router(model: Any, tokenizer: Any, image_processor: Any, probe: Probe) -> Any:
    """sentence-transformers without a native class: a Router with one route per modality."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Router

    with tempfile.TemporaryDirectory(prefix="mmcl-export-") as tmp:
        routes = {m: _st_route(model, m, processor, probe, Path(tmp))
                  for m, processor in (("text", tokenizer), ("image", image_processor))}
    return SentenceTransformer(modules=[Router(routes), Normalize()], device="cpu")


def _probe_images() -> list[Any]:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
            for h, w in ((32, 32), (40, 24))]


@torch.no_grad()
def _probe(model: Any, tokenizer: Any, image_processor: Any) -> Probe:
    """mmcl's embeddings of the probe texts (one longer than any max length) and images, with their inputs."""
    enc = tokenizer(PROBE_TEXTS, padding="longest", truncation=True, return_tensors="pt")
    pixels = image_processor(images=_probe_images(), return_tensors="pt")["pixel_values"]
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "pixel_values": pixels,
            "text": model.get_text_features(enc["input_ids"], enc["attention_mask"]),
            "image": model.get_image_features(pixels)}


def _diffs(route: str, text: torch.Tensor, image: torch.Tensor, probe: Probe) -> dict[str, float]:
    return {f"{route} {m}": (e.detach().float().cpu() - probe[m]).abs().max().item()
            for m, e in (("text", text), ("image", image))}


@torch.no_grad()
def _export_native(model: Any, name: str, tokenizer: Any, image_processor: Any, folder: Path,
                   report: ExportReport, probe: Probe) -> None:
    """Write the native model and processor, unless they do not reproduce mmcl (then a note says so)."""
    try:
        native = build_native(model, name)
        text = native.get_text_features(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"])
        image = native.get_image_features(pixel_values=probe["pixel_values"])
        diffs = _diffs("transformers", F.normalize(text.pooler_output, dim=-1),
                       F.normalize(image.pooler_output, dim=-1), probe)
    except Exception as err:  # an unusual tower (no hidden_size, a 4-D pooler...): say so, keep the ST route
        report.notes.append(f"{name} cannot hold this model ({type(err).__name__}: {err})")
        return
    if max(diffs.values()) > TOLERANCE:
        report.notes.append(f"{name} does not reproduce mmcl's embeddings ({diffs}); not exported")
        return
    native.save_pretrained(folder)  # safetensors: the only format transformers 5 writes
    build_processor(name, tokenizer, image_processor).save_pretrained(folder)
    report.native_class = name
    report.max_abs_diff.update(diffs)


def _export_st(model: Any, tokenizer: Any, image_processor: Any, folder: Path, report: ExportReport,
               probe: Probe) -> None:
    """Write the sentence-transformers modules; reload them as a user would and compare with mmcl."""
    if report.native_class:
        st = _st_native(folder)
    else:
        st = _st_router(model, tokenizer, image_processor, probe)
        report.notes.append("sentence-transformers: a Router sends texts and images to their own tower "
                            "(text_0_Transformer / image_0_Transformer: transformers folders that AutoModel "
                            "loads), then the mmcl pooling, the projection (Dense) and Normalize")
        towers = {"text": model.text_model, "image": model.vision_model}
        zeroed = [m for m, tower in towers.items() if getattr(tower, "pooler", 0) is None]
        if zeroed:
            report.notes.append(f"the {' and '.join(zeroed)} tower folders hold a zero pooler head, unused by "
                                "their pooling, so that they load without missing weights: ignore pooler_output")
    st.save(str(folder), create_model_card=False)
    st = type(st)(str(folder), device="cpu")
    diffs = _diffs("sentence-transformers", st.encode(PROBE_TEXTS, convert_to_tensor=True),
                   st.encode(_probe_images(), convert_to_tensor=True), probe)
    report.max_abs_diff.update(diffs)
    report.sentence_transformers = max(diffs.values()) <= TOLERANCE
    if not report.sentence_transformers:  # without modules.json, nothing claims to be a ST model
        (folder / "modules.json").unlink()
        report.notes.append(f"sentence-transformers does not reproduce mmcl's embeddings ({diffs}); not exported")


def _load(model_dir: Path) -> tuple[Any, Any, Any]:
    """The mmcl model, and its tokenizer truncating at the caption length it was trained with."""
    from .inference import load_encoder
    from .model import CONFIG_NAME

    if not (model_dir / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{model_dir} has no {CONFIG_NAME}: export takes an mmcl model folder "
                                "(a transformers folder loads without mmcl already)")
    loaded = load_encoder(str(model_dir))
    loaded.tokenizer.model_max_length = loaded.max_length  # transformers and ST truncate there too
    return loaded.encoder.eval(), loaded.tokenizer, loaded.image_processor


def _export_into(model_dir: Path, folder: Path) -> ExportReport:
    model, tokenizer, image_processor = _load(model_dir)
    name, why_not = native_class_for(model)
    report = ExportReport(None, False, model.config.text_pooling, model.config.vision_pooling,
                          model.logit_scale.item(), [why_not] if why_not else [])
    probe = _probe(model, tokenizer, image_processor)
    if name:
        _export_native(model, name, tokenizer, image_processor, folder, report, probe)
    _export_st(model, tokenizer, image_processor, folder, report, probe)
    if not (report.native_class or report.sentence_transformers):
        raise RuntimeError(f"no route reproduces this model without mmcl:\n{report}")
    for meta in COPIED:
        if (model_dir / meta).is_file():
            shutil.copy(model_dir / meta, folder / meta)
    (folder / EXPORT_INFO).write_text(json.dumps(asdict(report), indent=2), encoding="utf-8")
    return report


def export_model(model_dir: str | Path, out_dir: str | Path) -> ExportReport:
    """Export the mmcl model in `model_dir` to `out_dir` (new, empty, or an earlier export, which is
    replaced): the transformers-native model and processor when the towers and pooling allow it, the
    sentence-transformers modules, the training config, and this report as `mmcl_export.json`.
    Each route is kept only if it reproduces mmcl's embeddings of probe texts and images.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir).resolve()
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / EXPORT_INFO).is_file():
        raise FileExistsError(f"{out_dir} is not empty and is not an earlier export: not writing there")
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")  # written whole, then renamed into place
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        report = _export_into(model_dir, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return report


def _export_command(args: argparse.Namespace, overrides: list[str]) -> int:
    if overrides:
        raise SystemExit(f"mmcl export: unknown arguments {overrides}; see mmcl export --help")
    report = export_model(args.model_dir, args.out_dir)
    print(f"exported to {args.out_dir}\n{report}")
    return 0


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    """Register `mmcl export MODEL_DIR OUT_DIR` on the CLI's subparsers."""
    parser = sub.add_parser("export", help="export a trained model for transformers / sentence-transformers",
                            description="mmcl export MODEL_DIR OUT_DIR: a folder that loads without mmcl, with "
                                        "transformers (when the pooling allows) and sentence-transformers.")
    parser.add_argument("model_dir", help="an mmcl model folder (e.g. runs/NAME/final)")
    parser.add_argument("out_dir", help="the folder to write: new, empty, or an earlier export (replaced)")
    parser.set_defaults(func=_export_command)
