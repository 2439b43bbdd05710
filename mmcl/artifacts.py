"""What a run writes, and how: every file and folder name of a run or model folder, one way to
write a folder atomically, and the saved training config (scrubbed of secrets by `mmcl.secrets`).

A run folder (`train.output_dir`):

    checkpoints/step-00000200/   the training state (Accelerate's files + mmcl_train_state.json; frozen
                                 weights left out, rebuilt from the config on resume)
    processor/                   the tokenizer and image processor, saved once at the start
    logs/metrics.jsonl           the tracker's log (or tensorboard files)
    final/  best/                model folders: model.safetensors, mmcl_config.json, tokenizer,
                                 image processor, mmcl_training_config.yaml (+ mmcl_info.json)
    export/                      the model for transformers / sentence-transformers, with a card
    metrics.json                 the final metrics
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from .config import ConfigError, StopError
from .secrets import scrub_secrets

# --- names -----------------------------------------------------------------------------------------
WEIGHTS_NAME = "model.safetensors"
MODEL_CONFIG_NAME = "mmcl_config.json"  # what DualEncoder.from_pretrained rebuilds the architecture from
TRAINING_CONFIG_NAME = "mmcl_training_config.yaml"  # the resolved Config, scrubbed
INFO_NAME = "mmcl_info.json"  # e.g. the step and metric value of a best model
EXPORT_INFO_NAME = "mmcl_export.json"  # what an export holds and why
ZERO_SHOT_NAME = "mmcl_zero_shot.json"  # the training captions' style and the prompt templates that match it
STATE_NAME = "mmcl_train_state.json"  # written last into a checkpoint: its presence marks it complete
METRICS_NAME = "metrics.json"
CHECKPOINTS_DIR, PROCESSOR_DIR, LOGS_DIR = "checkpoints", "processor", "logs"
FINAL_DIR, BEST_DIR, EXPORT_DIR = "final", "best", "export"
LOG_NAME = "metrics.jsonl"
LOCK_NAME = ".mmcl-run.lock"  # held by the run writing the folder: its pid, host and start
MARKER_NAME = ".mmcl-output"  # in every folder mmcl writes as a whole: what wrote it (and so may replace it)


def default_cache_dir() -> Path:
    """Where mmcl caches what it builds (the built-in datasets, trained tokenizers): ~/.cache/mmcl."""
    return Path.home() / ".cache" / "mmcl"


# --- atomic folders --------------------------------------------------------------------------------
def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished `tmp` to `final`; an older `final` is removed only afterwards (set aside as
    `.old-<name>` between the two renames: `restore_aside` puts it back after a crash there)."""
    restore_aside(final)
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def restore_aside(final: Path) -> None:
    """After a crash inside `replace_dir`: a `final` set aside and not yet replaced is put back (it is
    the last complete one); one that was replaced loses its leftover old copy."""
    old = final.with_name(f".old-{final.name}")
    if not old.exists():
        return
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, final)


def staging_dir(final: Path, unique: bool = False) -> Path:
    """The hidden temporary folder beside `final` that is renamed to it when complete; `unique`
    for writers that may race (each gets its own)."""
    suffix = f"-{os.getpid()}-{uuid.uuid4().hex[:8]}" if unique else ""
    return final.with_name(f".tmp-{final.name}{suffix}")


# --- folders mmcl may replace -----------------------------------------------------------------------
def written_by_mmcl(folder: Path) -> bool:
    """A folder mmcl wrote: its marker, or (written before markers) one of mmcl's own files."""
    signs = (MARKER_NAME, MODEL_CONFIG_NAME, EXPORT_INFO_NAME, TRAINING_CONFIG_NAME, f"{LOGS_DIR}/{LOG_NAME}")
    return any((folder / name).is_file() for name in signs) or any(folder.glob(f"{CHECKPOINTS_DIR}/step-*/{STATE_NAME}"))


def check_output_folder(folder: Path, overwrite: bool = False, flag: str = "--overwrite") -> None:
    """A folder mmcl is about to replace or fill: absent, empty, or written by mmcl; otherwise a
    one-line error (`flag` replaces it anyway). A file in its place is never replaced."""
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir() or folder.is_symlink():
        raise ConfigError(f"{folder} is a file or a link, not a folder: mmcl writes only folders it can replace "
                          "whole; choose another output")
    entries = sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)
    if entries and not overwrite and not written_by_mmcl(folder):
        shown = ", ".join(entries[:3]) + (f", ... ({len(entries)} entries)" if len(entries) > 3 else "")
        raise ConfigError(f"{folder} holds files mmcl did not write ({shown}); choose a new or empty folder, or "
                          f"pass {flag} to replace it")


def mark_folder(folder: Path, kind: str) -> None:
    """Say that mmcl wrote `folder` (what `written_by_mmcl` and `check_output_folder` read)."""
    from . import __version__

    write_json(folder / MARKER_NAME, {"written_by": "mmcl", "version": __version__, "kind": kind})


@contextmanager
def atomic_dir(final: str | os.PathLike, replace: bool = True, overwrite: bool = False,
               kind: str = "folder") -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`, renamed to `final` when the block succeeds
    and removed when it fails: no reader, and no crash, ever sees a half-written `final`. The
    folder is marked as mmcl's (`kind`); an existing `final` that mmcl did not write is refused
    unless `overwrite` (`check_output_folder`).

    replace=False: when `final` appeared meanwhile (another process built the same thing), keep
    that one and discard this copy.
    """
    final = Path(final)
    if replace:
        check_output_folder(final, overwrite)
    tmp = staging_dir(final, unique=not replace)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        mark_folder(tmp, kind)
        yield tmp
        if replace:
            replace_dir(tmp, final)
        elif not final.exists():
            try:
                os.replace(tmp, final)
            except OSError:  # lost a race: `final` is there now
                if not final.exists():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class SaveError(StopError):
    """A checkpoint or model folder could not be written: a full disk, a quota, a read-only or
    unwritable folder. What was there before is intact (every folder is written aside first)."""


FULL_OR_READ_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)
# How the writers that are not Python's `open` word the same failures: torch.save ("file write
# failed"), safetensors (an IoError with the OS's code and message)
WRITE_FAILURE = re.compile(r"no space left|quota|file too large|read-only file system|permission denied|"
                           r"file write failed|(code: |os error )(28|122|27|30|13)\b", re.IGNORECASE)


def folder_sha256(folder: Path) -> str:
    """A SHA-256 of a folder's regular files (names and bytes, in name order; hidden files left out)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@contextmanager
def explain_write_errors(final: Path, need_bytes: Callable[[], int], intact: Path | None = None) -> Iterator[None]:
    """Turn a full disk or an unwritable folder met while writing `final` into a `SaveError` that
    names the path, the bytes needed (about `need_bytes()`, asked only then) and free, and the
    folder left intact."""
    try:
        yield
    except Exception as err:
        need, base = need_bytes(), final
        while not base.exists() and base != base.parent:
            base = base.parent
        free = shutil.disk_usage(base).free
        if isinstance(err, OSError) and err.errno in FULL_OR_READ_ONLY:
            what = f"{err.strerror} ({err.filename or final})"
        elif WRITE_FAILURE.search(str(err)) or free < need:
            what = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        else:
            raise
        kept = f"; {intact} is intact" if intact is not None and intact.exists() else ""
        raise SaveError(f"could not write {final}: {what}; it needs about {need:,} bytes and {free:,} are "
                        f"free there{kept}. Free space or choose another train.output_dir, then continue with "
                        "--train.resume=latest") from err


# --- one run per folder ----------------------------------------------------------------------------
class RunLock:
    """One live run per output folder: an exclusive `flock` on `<folder>/.mmcl-run.lock`, held for
    the run's life, and the owner's pid, host and start written in it. The kernel drops the lock
    when its process dies, however it dies, so a lock left by a killed run is stale: it is taken
    over (`acquire` returns a warning that says whose it was)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Lock the folder; returns a warning when a gone run's lock was taken over, or when the
        file system cannot lock (then the run goes on unguarded). FileExistsError: a live run has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FileExistsError(f"{self.path.parent} is in use by another run ({self._owner()}); wait for it "
                                      "to end, or choose another train.output_dir") from None
            except OSError as err:  # ENOLCK, EOPNOTSUPP: some network and FUSE file systems
                os.close(fd)
                return f"{self.path.parent}: this file system cannot lock files ({err.strerror}); nothing stops a " \
                       "second run from writing to the same folder"
            if self.path.exists() and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the holder released and removed the file meanwhile: lock the new one
        self.fd, previous = fd, self._owner()
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        return f"took over the lock of a run that is gone ({previous})" if previous != "unknown" else None

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiter re-checks the file it locked
            os.close(self.fd)
            self.fd = None

    def _owner(self) -> str:
        try:
            owner = json.loads(self.path.read_text(encoding="utf-8"))
            return f"pid {owner['pid']} on {owner['host']} since {owner['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "unknown"


# --- secrets ---------------------------------------------------------------------------------------
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DATA_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet", ".txt", ".tsv", ".arrow", ".yaml", ".yml", ".tar")


def is_hub_id(name: str | None) -> bool:
    """`org/name` or `name` that is not an existing local path nor a data file name."""
    if not name or name.startswith(("builtin:", "pkg:")) or not _HUB_ID.match(name):
        return False
    return not Path(name).expanduser().exists() and not name.lower().endswith(_DATA_SUFFIXES)


def check_model_reference(name: str) -> None:
    """A clear error for a model folder that is not there or holds no model, before transformers
    says something about connecting to the Hub."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not ((path / MODEL_CONFIG_NAME).is_file() or (path / "config.json").is_file()):
            raise ConfigError(f"{name}: not a model folder (it has neither {MODEL_CONFIG_NAME} nor config.json); "
                              "give an mmcl model folder (e.g. runs/NAME/final) or a transformers CLIP-format folder")
    elif path.exists():
        raise ConfigError(f"{name}: is a file; give a model folder (e.g. runs/NAME/final) or a Hub id")
    elif not is_hub_id(name):
        raise ConfigError(f"{name}: no such model folder")


def load_pretrained(auto_class: Any, name: str, what: str, trust_remote_code: bool = False) -> Any:
    """`auto_class.from_pretrained(name)` (AutoModel, AutoTokenizer, ...), its OSError (not found,
    offline, no such file in the folder) turned into a one-line error naming `name` and `what`."""
    try:
        return auto_class.from_pretrained(str(name), trust_remote_code=trust_remote_code)
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError) as err:  # not found, offline; an unknown model_type; remote code
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = "" if Path(name).exists() else "not a local folder, and "
        raise ConfigError(f"{name}: {where}cannot load its {what} ({first})") from err


# --- the saved training config and metrics ---------------------------------------------------------
def save_training_config(folder: Path, config: dict[str, Any]) -> None:
    """The resolved config beside a model, without anything secret-looking."""
    with open(folder / TRAINING_CONFIG_NAME, "w", encoding="utf-8") as f:
        yaml.safe_dump(scrub_secrets(config), f, sort_keys=False)


def load_training_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The resolved config saved beside a trained model, if any."""
    path = Path(folder) / TRAINING_CONFIG_NAME
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def trained_text_inputs(folder: str | os.PathLike, default_length: int = 77) -> tuple[int, str]:
    """(max caption length, padding) a model was trained with, from its saved training config."""
    model = (load_training_config(folder) or {}).get("model") or {}
    return int(model.get("max_text_length") or default_length), str(model.get("text_padding") or "longest")


def recommended_templates(folder: str | os.PathLike) -> str | None:
    """The prompt templates a model folder recommends for zero-shot (`simple`, `name`, ...: the style of
    the captions it was trained on), or None when it records none (a model from elsewhere)."""
    found = read_json(Path(folder) / ZERO_SHOT_NAME) if Path(folder).is_dir() else None
    templates = found.get("templates") if isinstance(found, dict) else None
    return templates if isinstance(templates, str) and templates in ("simple", "ensemble", "name") else None


def write_json(path: Path, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)


def read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def metrics_for(folder: Path) -> dict[str, float] | None:
    """`metrics.json` in a model folder, else beside a `final` folder (`<output_dir>/metrics.json`);
    a file that is not a JSON object is skipped."""
    for path in (folder / METRICS_NAME, folder.parent / METRICS_NAME if folder.name == FINAL_DIR else None):
        metrics = read_json(path) if path is not None else None
        if isinstance(metrics, dict):
            return metrics
    return None
