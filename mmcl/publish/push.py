"""Publish a trained model folder to the Hugging Face Hub: an allow-list of files, never a token.

Only files a user of the model needs are uploaded: weights as safetensors, model / tokenizer /
processor configs, sentence-transformers module files and the model card. Pickles (`*.bin`,
`*.pkl`, `*.pt`), optimizer and RNG states, checkpoints and logs never leave the machine, whatever
else the folder holds.

Only regular files inside the folder are sent: a symlink (to /etc/passwd, or to a folder outside) is
left out whatever its name, and so is any path whose resolved location is outside the folder. Each
`*.safetensors` file is opened and its header checked before it is sent. A file holding a
token-shaped string (`hf_...`) stops the push, naming the file.

The token comes from the `token` argument, else huggingface_hub resolves it (`HF_TOKEN`, then the
`hf auth login` file); mmcl never prints, logs or writes it. Before anything is sent, the files to
upload are checked not to contain it.

Heavy imports live inside the functions: `mmcl --help` imports this module.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import logging
import os
import re
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from ..artifacts import (EXPORT_INFO_NAME, MODEL_CONFIG_NAME, TRAINING_CONFIG_NAME, load_training_config,
                         ZERO_SHOT_NAME, metrics_for, read_json)
from ..secrets import HF_TOKEN_SHAPE, secret_keys
from ..config import ConfigError, HubConfig
from .card import write_model_card

logger = logging.getLogger(__name__)
# Files at the top of the folder, by exact name (a `*.json` pattern would also take metrics.json,
# trainer states or a stray credentials file).
TOP_LEVEL_FILES = frozenset({
    "README.md", "config.json", MODEL_CONFIG_NAME, TRAINING_CONFIG_NAME, "generation_config.json",
    "model.safetensors.index.json",
    # tokenizer
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
    # image processor / processor
    "preprocessor_config.json", "processor_config.json", "image_processor_config.json",
    # sentence-transformers (router_config.json: a Router as the root module)
    "modules.json", "config_sentence_transformers.json", "sentence_bert_config.json", "router_config.json",
    # mmcl: the recommended zero-shot templates
    ZERO_SHOT_NAME,
})
REMOTE_CODE_FILE = "modeling_mmcl.py"  # an export without a native class: the one code file, at the top level
WEIGHT_PATTERN = "*.safetensors"
# Inside a sentence-transformers module folder (1_Pooling/, 2_Dense/, a Router's text_0_Transformer/
# ...): its config files (`config.json`, `sentence_bert_config.json`, ...), weights and tokenizer files.
MODULE_FILE_PATTERNS = ("*config.json", WEIGHT_PATTERN, *sorted(TOP_LEVEL_FILES - {"README.md", ZERO_SHOT_NAME}))
# Never uploaded, even if a rule above matched: pickles and other executable-on-load formats.
FORBIDDEN_PATTERNS = ("*.bin", "*.pkl", "*.pickle", "*.pt", "*.pth", "*.ckpt", "*.joblib", "*.npy",
                      "*.npz", "*.h5", "*.msgpack", "*.tfevents*")


def _matches(name: str, patterns: tuple[str, ...] | frozenset[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _safe_subdir(base: PurePosixPath, name: str) -> PurePosixPath | None:
    sub = PurePosixPath(str(name).replace("\\", "/"))
    if sub.is_absolute() or ".." in sub.parts:
        return None  # a path that would escape the folder
    return base / sub


def _module_dirs(folder: Path) -> list[PurePosixPath]:
    """The sentence-transformers module folders, relative to `folder` (the root is "."): those
    `modules.json` lists, and inside any of them with a `router_config.json`, the Router's
    sub-modules (its `types` keys), recursively."""
    path = folder / "modules.json"
    if not path.is_file():
        return []
    modules = json.loads(path.read_text(encoding="utf-8"))
    listed = [_safe_subdir(PurePosixPath("."), m.get("path", "")) for m in modules]
    todo, dirs = [d for d in listed if d is not None], []
    while todo:
        module = todo.pop()
        if module in dirs:
            continue
        dirs.append(module)
        router = folder / module / "router_config.json"
        if router.is_file():
            subs = json.loads(router.read_text(encoding="utf-8")).get("types", {})
            todo += [d for d in (_safe_subdir(module, name) for name in subs) if d is not None]
    return [d for d in dirs if str(d) != "."]


def regular_files(folder: Path) -> tuple[list[Path], list[str]]:
    """(the regular files under `folder`, sorted; what was left out and why: links and anything else
    that is not a regular file inside the folder). Links are never followed."""
    root, files, left_out = folder.resolve(), [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in sorted(dirnames):
            if (Path(dirpath) / name).is_symlink():
                left_out.append(f"{(Path(dirpath) / name).relative_to(folder)} (a link to a folder)")
        for name in filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                left_out.append(f"{path.relative_to(folder)} (a link)")
            elif not stat.S_ISREG(info.st_mode):
                left_out.append(f"{path.relative_to(folder)} (not a regular file)")
            elif not path.resolve().is_relative_to(root):
                left_out.append(f"{path.relative_to(folder)} (outside the folder)")
            else:
                files.append(path)
    return sorted(files), left_out


def select_files(folder: str | Path) -> list[str]:
    """The files of `folder` that a push uploads (POSIX paths relative to `folder`, sorted).

    Top level: `*.safetensors` and the names in `TOP_LEVEL_FILES`. Sentence-transformers module
    folders (see `_module_dirs`): config files, safetensors and tokenizer files. Only regular files
    inside the folder (`regular_files`); hidden files and anything matching `FORBIDDEN_PATTERNS` are
    left out everywhere.
    """
    folder = Path(folder)
    modules = _module_dirs(folder)
    chosen = []
    for path in regular_files(folder)[0]:
        rel = PurePosixPath(path.relative_to(folder).as_posix())
        if _matches(rel.name, FORBIDDEN_PATTERNS) or any(part.startswith(".") for part in rel.parts):
            continue
        if len(rel.parts) == 1:
            keep = rel.name in TOP_LEVEL_FILES or rel.name == REMOTE_CODE_FILE or _matches(rel.name, (WEIGHT_PATTERN,))
        else:
            keep = any(rel.is_relative_to(m) for m in modules) and _matches(rel.name, MODULE_FILE_PATTERNS)
        if keep:
            chosen.append(str(rel))
    return chosen


def check_safetensors(path: Path) -> None:
    """A `*.safetensors` file whose header parses and whose tensors lie inside the file (safetensors
    checks both when it opens the file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as err:
        raise ConfigError(f"{path} is not a valid safetensors file ({type(err).__name__}: {err}); not pushing it") \
            from None


def _holds(path: Path, pattern: re.Pattern[bytes], chunk: int = 1 << 24) -> bool:
    """Whether `pattern` (at most `TOKEN_SPAN` bytes long) occurs in the file, read in bounded chunks:
    a weights file of many GB is scanned without loading it."""
    tail = b""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            window = tail + block
            if pattern.search(window):
                return True
            tail = window[-TOKEN_SPAN:]
    return False


TOKEN_SPAN = 256  # longer than any Hub token


def _check_files(folder: Path, files: list[str], token: str | None) -> list[str]:
    """Drop a training config holding credential-like keys; refuse a broken safetensors file, and any
    file holding a token-shaped string or the token itself."""
    import yaml

    if TRAINING_CONFIG_NAME in files:
        text = (folder / TRAINING_CONFIG_NAME).read_text(encoding="utf-8")
        keys = secret_keys(yaml.safe_load(text))
        if keys or HF_TOKEN_SHAPE.search(text):
            logger.warning("not uploading %s: it has credential-like keys %s or a token-shaped value",
                           TRAINING_CONFIG_NAME, keys)
            files = [f for f in files if f != TRAINING_CONFIG_NAME]
    secrets = [HF_TOKEN_SHAPE.pattern.encode()] + ([re.escape(token.encode())] if token else [])
    pattern = re.compile(b"|".join(secrets))
    for name in files:
        if name.endswith(".safetensors"):
            check_safetensors(folder / name)
        if _holds(folder / name, pattern):
            raise ConfigError(f"{folder / name} contains a Hugging Face token (or a string shaped like one); "
                              "remove it before pushing")
    return files


def plan(folder: str | Path) -> str:
    """`mmcl push --dry-run`: what would be sent (each file with its size) and what is left out."""
    folder = Path(folder)
    files = _check_files(folder, select_files(folder), None)
    sizes = {f: (folder / f).stat().st_size for f in files}
    lines = [f"would upload {len(files)} files, {sum(sizes.values()):,} bytes, from {folder}:"]
    lines += [f"  {size:>14,}  {name}" for name, size in sizes.items()]
    left = regular_files(folder)[1]
    if left:
        lines.append("left out: " + "; ".join(left))
    return "\n".join(lines)


def require_token(token: str | None = None) -> str:
    """The Hub token: `token`, else `HF_TOKEN` or the saved login; a clear error when there is none."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise ConfigError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (mmcl never reads a token "
                          "from a config file)")
    return token


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, token: str | None = None) -> str:
    """Upload the allow-listed files of a model folder (see `select_files`) in one commit.

    Creates the repo if needed (`private` applies on creation; pushing with `private=True` to an
    existing public repo is refused rather than publishing), and the branch `revision` if it is
    missing. Files already in the repo but absent here are left alone.

    Args:
        folder: the model folder (e.g. `<output_dir>/final` or an export folder).
        repo_id: `user/name` or `org/name`.
        private: create the repo private.
        revision: the branch to commit to (created from the default branch if missing); default main.
        commit_message: default "Upload mmcl model".
        token: a Hub token; default: `HF_TOKEN` or the saved login, resolved by huggingface_hub.
    Returns:
        The URL of the commit.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    token = require_token(token)
    files = _check_files(folder, select_files(folder), token)
    if not any(_matches(f, (WEIGHT_PATTERN,)) for f in files):
        raise ConfigError(f"{folder}: has no *.safetensors weights: not a model folder to push")
    try:
        return _upload(HfApi(), folder, files, repo_id, private, revision, commit_message, token)
    except ConfigError:
        raise
    except Exception as err:  # offline, no network, refused: one line naming the cause (never the token)
        if not _network_error(err):
            raise
        cause = " ".join(str(err).replace(token, "<token>").split())[:200]
        raise ConfigError(f"could not push {folder} to {repo_id}: {type(err).__name__}: {cause} (offline? "
                          "HF_HUB_OFFLINE set, no network, or the token lacks write access)") from None


def _network_error(err: Exception) -> bool:
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    return isinstance(err, (OSError, httpx.HTTPError, HfHubHTTPError))


def _upload(api: Any, folder: Path, files: list[str], repo_id: str, private: bool, revision: str | None,
            commit_message: str | None, token: str) -> str:
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
    if private and not api.repo_info(repo_id, token=token).private:
        raise ConfigError(f"{repo_id} already exists and is public; make it private on the Hub or push "
                         "without --private")
    if revision and revision != "main" and not revision.startswith("refs/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=folder, revision=revision, token=token,
        commit_message=commit_message or "Upload mmcl model",
        allow_patterns=[glob.escape(f) for f in files],  # exact paths: fnmatch's `*` crosses folders
        ignore_patterns=list(FORBIDDEN_PATTERNS))
    return info.commit_url


def ensure_model_card(folder: str | Path, repo_id: str | None = None, model_name: str | None = None) -> Path:
    """Write `folder/README.md` from the saved training config and metrics unless there is one."""
    folder = Path(folder)
    card = folder / "README.md"
    if card.is_file():
        return card
    exported = read_json(folder / EXPORT_INFO_NAME)  # what the export could and could not express natively
    notes = exported.get("notes") if isinstance(exported, dict) else None
    return write_model_card(folder, load_training_config(folder), metrics_for(folder), export_notes=notes,
                            repo_id=repo_id, model_name=model_name)


def push_with_config(folder: str | Path, hub: HubConfig) -> str:
    """The end-of-training push: `hub` is the `HubConfig` section (push, repo_id, private, ...)."""
    if not hub.repo_id:
        raise ConfigError("hub.push is true but hub.repo_id is empty; set hub.repo_id=user/name")
    ensure_model_card(folder, hub.repo_id)
    return push_folder(folder, hub.repo_id, private=hub.private, revision=hub.revision,
                       commit_message=hub.commit_message)
