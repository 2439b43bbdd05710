"""Export a trained mmcl model to a folder that loads without mmcl installed.

- transformers: `CLIPModel` (CLIP towers) or `VisionTextDualEncoderModel` (any pair) when both
  poolings are "pooler": each projects its towers' `pooler_output` and returns features that are
  not normalised (normalise them, as mmcl does). "cls" and "mean" have no native class.
- sentence-transformers, always: over a native class, `Transformer` (get_*_features) + `Normalize`;
  otherwise a `Router` with one route per modality: `Transformer` (the tower) + `Pooling` (mmcl's
  pooling) + `Dense` (the projection: no bias, identity) and then `Normalize`.

- without a native class, also mmcl's own weights and config, and a config.json whose auto_map names
  the `modeling_mmcl.py` copied beside it: transformers loads that with `trust_remote_code=True`, which
  only the user passes (the card says so); mmcl reads the folder as its own and never runs that file.

Every route is compared with mmcl's embeddings before it is kept. Weights are safetensors only.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..artifacts import EXPORT_INFO_NAME, INFO_NAME, MODEL_CONFIG_NAME, TRAINING_CONFIG_NAME, ZERO_SHOT_NAME, atomic_dir
from ..secrets import scrub_config_files
from ..towers.backbones import BackboneTower, NoTransformersCopy, as_transformers
from ..towers.inference import EncoderBundle, load_encoder
from ..towers.heads import TRAINING_HEADS
from ..towers.model import DualEncoder, tower_width

COPIED = (TRAINING_CONFIG_NAME, INFO_NAME, ZERO_SHOT_NAME)  # metadata for the model card; the templates for mmcl
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
    logit_bias: float | None = None  # the SigLIP loss's learned bias, kept here (no exported class holds it)
    notes: list[str] = field(default_factory=list)
    remote_code_class: str | None = None  # without a native class: transformers with trust_remote_code=True
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # "<route> <modality>" -> vs mmcl

    def __str__(self) -> str:
        lines = [f"transformers native class: {self.native_class or 'none'}"
                 + (f" (remote code: {self.remote_code_class}, trust_remote_code=True)" if self.remote_code_class else ""),
                 f"sentence-transformers: {'yes' if self.sentence_transformers else 'no'}"]
        lines += [f"max |diff| vs mmcl, {k}: {v:.2e}" for k, v in self.max_abs_diff.items()]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


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
    if isinstance(tower, BackboneTower):  # its transformers copy's pooler_output is the features
        tower, pooling = as_transformers(tower), "pooler"
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


def _st_router(bundle: EncoderBundle, probe: Probe) -> Any:
    """sentence-transformers without a native class: a Router with one route per modality."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Router

    with tempfile.TemporaryDirectory(prefix="mmcl-export-") as tmp:
        routes = {m: _st_route(bundle.encoder, m, processor, probe, Path(tmp))
                  for m, processor in (("text", bundle.tokenizer), ("image", bundle.image_processor))}
    return SentenceTransformer(modules=[Router(routes), Normalize()], device="cpu")


def _probe_images() -> list[Any]:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
            for h, w in ((32, 32), (40, 24))]


@torch.no_grad()
def _probe(bundle: EncoderBundle) -> Probe:
    """mmcl's embeddings of the probe texts (one longer than any max length) and images, with their inputs."""
    enc = bundle.tokenizer(PROBE_TEXTS, padding="longest", truncation=True, return_tensors="pt")
    pixels = bundle.image_processor(images=_probe_images(), return_tensors="pt")["pixel_values"]
    out = bundle.encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "pixel_values": pixels,
            "text": out.text_embeds, "image": out.image_embeds}


def _diffs(route: str, text: torch.Tensor, image: torch.Tensor, probe: Probe) -> dict[str, float]:
    return {f"{route} {m}": (e.detach().float().cpu() - probe[m]).abs().max().item()
            for m, e in (("text", text), ("image", image))}


@torch.no_grad()
def _export_native(bundle: EncoderBundle, name: str, folder: Path, report: ExportReport, probe: Probe) -> None:
    """Write the native model and processor, unless they do not reproduce mmcl (then a note says so)."""
    try:
        native = bundle.encoder.to_hf(name)
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
    build_processor(name, bundle.tokenizer, bundle.image_processor).save_pretrained(folder)
    report.native_class = name
    report.max_abs_diff.update(diffs)


def _export_st(bundle: EncoderBundle, folder: Path, report: ExportReport, probe: Probe) -> None:
    """Write the sentence-transformers modules; reload them as a user would and compare with mmcl."""
    if report.native_class:
        st = _st_native(folder)
    else:
        model = bundle.encoder
        try:
            st = _st_router(bundle, probe)
        except NoTransformersCopy as err:
            report.notes.append(str(err))
            return
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


REMOTE_CODE = Path(__file__).with_name("remote") / "modeling_mmcl.py"  # copied into exports, never imported here
REMOTE_CLASSES = {"AutoConfig": "modeling_mmcl.MmclDualEncoderConfig", "AutoModel": "modeling_mmcl.MmclDualEncoderModel"}


@torch.no_grad()
def _export_remote_code(bundle: EncoderBundle, folder: Path, report: ExportReport, probe: Probe) -> None:
    """No native class: a transformers model anyway, `modeling_mmcl.py` beside `config.json` (`auto_map`,
    loaded with `trust_remote_code=True`), whose weights file is also mmcl's own (`mmcl_config.json`), so
    that mmcl's commands read the export. Kept only if both reproduce mmcl's embeddings."""
    model: DualEncoder = bundle.encoder
    cfg = model.config
    state = {k: v for k, v in model.state_dict().items()
             if k.split(".", 1)[0] not in TRAINING_HEADS}  # used only in training
    plain = DualEncoder(replace(cfg, **dict.fromkeys(TRAINING_HEADS.values()), extra={}))
    plain.load_state_dict(state)
    plain.save_pretrained(folder)  # model.safetensors and mmcl_config.json: mmcl's format
    build_processor("", bundle.tokenizer, bundle.image_processor).save_pretrained(folder)
    if isinstance(model.text_model, BackboneTower) or isinstance(model.vision_model, BackboneTower):
        report.notes.append("no transformers model with remote code: a backbone tower is no transformers model "
                            "(mmcl reads this folder as its own)")
        return
    config = {"model_type": "mmcl_dual_encoder", "architectures": ["MmclDualEncoderModel"], "auto_map": REMOTE_CLASSES,
              "text_tower": model.text_model.config.to_diff_dict() | {"model_type": model.text_model.config.model_type},
              "vision_tower": model.vision_model.config.to_diff_dict() | {
                  "model_type": model.vision_model.config.model_type},
              "text_pooling": cfg.text_pooling, "vision_pooling": cfg.vision_pooling,
              "projection_dim": cfg.projection_dim, "identity_projection": cfg.identity_projection,
              "text_width": tower_width(model.text_model), "vision_width": tower_width(model.vision_model),
              "has_logit_bias": model.logit_bias is not None}
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str), encoding="utf-8")
    shutil.copy(REMOTE_CODE, folder / REMOTE_CODE.name)
    mmcl = load_encoder(str(folder)).encoder  # what mmcl's commands will read
    remote = _remote_model(folder)
    diffs = _diffs("transformers (remote code)", remote.get_text_features(probe["input_ids"], probe["attention_mask"]),
                   remote.get_image_features(probe["pixel_values"]), probe)
    diffs |= _diffs("mmcl", mmcl.get_text_features(probe["input_ids"], probe["attention_mask"]),
                    mmcl.get_image_features(probe["pixel_values"]), probe)
    report.max_abs_diff.update(diffs)
    if max(diffs.values()) > TOLERANCE:
        for name in ("config.json", REMOTE_CODE.name):
            (folder / name).unlink()
        report.notes.append(f"the remote-code transformers model does not reproduce mmcl's embeddings ({diffs}); "
                            "not exported")
        return
    report.remote_code_class = "MmclDualEncoderModel"
    report.notes.append("transformers: AutoModel.from_pretrained(folder, trust_remote_code=True) runs modeling_mmcl.py "
                        "(shipped in this folder: the towers, mmcl's pooling and projections) and gives unit-norm "
                        "text_embeds / image_embeds and logits_per_image; read the file before trusting it")


def _remote_model(folder: Path) -> Any:
    """The exported remote-code model, built from mmcl's own copy of modeling_mmcl.py (not the folder's):
    the same class transformers loads with trust_remote_code=True."""
    from safetensors.torch import load_file

    from .remote.modeling_mmcl import MmclDualEncoderConfig, MmclDualEncoderModel

    values = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    kept = {k: v for k, v in values.items() if k not in ("auto_map", "model_type", "architectures")}
    model = MmclDualEncoderModel(MmclDualEncoderConfig(**kept))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()


def _load(model_dir: Path) -> EncoderBundle:
    """The mmcl model, and its tokenizer truncating at the caption length it was trained with."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such model folder")
    if not (model_dir / MODEL_CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{model_dir}: has no {MODEL_CONFIG_NAME}: export takes an mmcl model folder "
                          "(e.g. runs/NAME/final; a transformers folder loads without mmcl already)")
    bundle = load_encoder(str(model_dir))
    bundle.tokenizer.model_max_length = bundle.max_length  # transformers and ST truncate there too
    return bundle


def _export_into(model_dir: Path, folder: Path) -> ExportReport:
    bundle = _load(model_dir)
    model: DualEncoder = bundle.encoder
    name, why_not = model.hf_class()
    report = ExportReport(None, False, model.config.text_pooling, model.config.vision_pooling,
                          model.logit_scale.item(), notes=[why_not] if why_not else [])
    if model.logit_bias is not None:
        report.logit_bias = model.logit_bias.item()
    if model.logit_bias is not None and name != "SiglipModel":
        report.notes.append(f"the learned logit bias ({report.logit_bias:.4f}, SigLIP loss) is not part of the "
                            "exported classes and is kept in mmcl_export.json: cosine similarities and rankings "
                            "do not need it; sigmoid probabilities are sigmoid(exp(logit_scale) * cos + logit_bias)")
    probe = _probe(bundle)
    if name:
        _export_native(bundle, name, folder, report, probe)
    _export_st(bundle, folder, report, probe)
    if not report.native_class:  # transformers loads it anyway (remote code), and mmcl loads it as its own
        _export_remote_code(bundle, folder, report, probe)
    if not (report.native_class or report.sentence_transformers):
        raise RuntimeError(f"no route reproduces this model without mmcl:\n{report}")
    for meta in COPIED:
        if (model_dir / meta).is_file():
            shutil.copy(model_dir / meta, folder / meta)
    (folder / EXPORT_INFO_NAME).write_text(json.dumps(asdict(report), indent=2), encoding="utf-8")
    return report


def export_model(model_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> ExportReport:
    """Export the mmcl model in `model_dir` to `out_dir` (new, empty, or one mmcl wrote, which is
    replaced; `overwrite`: any folder): the transformers-native model and processor when the towers and pooling allow it, the
    sentence-transformers modules, the training config, and this report as `mmcl_export.json`.
    Each route is kept only if it reproduces mmcl's embeddings of probe texts and images.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir).absolute()
    with atomic_dir(out_dir, overwrite=overwrite, kind="export") as tmp:  # written whole, then renamed into place
        report = _export_into(model_dir, tmp)
        scrub_config_files(tmp)
        return report
