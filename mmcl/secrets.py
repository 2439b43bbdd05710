"""Secrets never land in what mmcl writes or shows: the keys that name a credential, Hub-token-shaped
strings, and the scrubbing of configs and of the JSON files a model folder holds."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

# A key whose last word names a credential is dropped, with its whole value, before a config is written
# or shown: hf_token, use_auth_token, OPENAI_API_KEY, apiKey, db_password, client_secret, but not
# pad_token_id, token_type_ids, max_tokens or tokenizer (settings, not credentials).
_SECRET_WORDS = frozenset({"token", "secret", "password", "passwd", "apikey", "credential", "credentials",
                           "authorization"})
_KEY_KINDS = frozenset({"api", "private", "access", "secret", "auth"})  # api_key, private_key, ...
HF_TOKEN_SHAPE = re.compile(r"hf_[A-Za-z0-9]{20,}")  # what a Hub token looks like


def is_secret_key(key: Any) -> bool:
    """Whether a config key names a credential (case-insensitive; snake, kebab or camel case)."""
    words = [w for w in re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key)).lower()) if w]
    if not words:
        return False
    return words[-1] in _SECRET_WORDS or (words[-1] == "key" and len(words) > 1 and words[-2] in _KEY_KINDS)


def scrub_secrets(value: Any) -> Any:
    """A copy of `value` without any dict key that looks like a credential (recursively, also
    inside lists), and with Hub-token-shaped strings redacted."""
    if isinstance(value, dict):
        return {k: scrub_secrets(v) for k, v in value.items() if not is_secret_key(k)}
    if isinstance(value, (list, tuple)):
        return [scrub_secrets(v) for v in value]
    if isinstance(value, str):
        return HF_TOKEN_SHAPE.sub("<redacted>", value)
    return value


TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab")


def scrub_config_files(folder: Path) -> None:
    """`scrub_secrets` on every JSON config a model folder holds (mmcl's own, and those transformers and
    sentence-transformers wrote for it): what a config carried in is not written out. Tokenizer files
    are left alone: their keys (`bos_token`, `SpecialToken`) are vocabulary, not credentials."""
    for path in folder.rglob("*.json"):
        if path.is_symlink() or not path.is_file() or path.name.startswith(TOKENIZER_FILES):
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        clean = scrub_secrets(value)
        if clean != value:
            path.write_text(json.dumps(clean, indent=2), encoding="utf-8")


def secret_keys(value: Any, prefix: str = "") -> list[str]:
    """The dotted paths of credential-like keys inside a nested dict / list."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            dotted = f"{prefix}{key}"
            if is_secret_key(key):
                found.append(dotted)
            found += secret_keys(item, f"{dotted}.")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += secret_keys(item, f"{prefix}{i}.")
    return found


# --- references ------------------------------------------------------------------------------------
