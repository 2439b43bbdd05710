"""`mmcl data check`: what is wrong with an image–caption source, before GPU hours go into it.

Every image is decoded exactly as training decodes it (`mmcl.data.images.load_image`) and every caption
is read as training reads it (`mmcl.data.pairs.caption_list`), so a row this check calls bad is a row
training would skip, and the other way round. An image over `PIL.Image.MAX_IMAGE_PIXELS` is a
decompression bomb: bad here and skipped in training (Pillow itself only warns up to twice the
limit; `load_image` turns that warning into an error).
"""

from __future__ import annotations

import json
import statistics
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

from ..config import ConfigError, SourceSpec
from .images import describe, stable_id
from .rows import caption_problem, iter_cells, iter_image_infos
from .pairs import caption_list
from .sources import load_source, pair_columns, require_columns


class _Groups:
    """Rows that share a key (image bytes, caption text); memory only for the repeated keys."""

    def __init__(self) -> None:
        self.first: dict[int, int] = {}
        self.repeated: dict[int, list[int]] = {}

    def add(self, key: int, row: int) -> None:
        if key not in self.first:
            self.first[key] = row
        elif row != self.first[key]:
            self.repeated.setdefault(key, [self.first[key]]).append(row)

    def report(self, limit: int) -> tuple[int, int, list[list[int]]]:
        """(groups, rows in them, the first `limit` groups' rows)."""
        groups = list(self.repeated.values())
        return len(groups), sum(map(len, groups)), [g[:10] for g in groups[:limit]]


def _stats(values: array) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else {}


@dataclass
class DataReport:
    """The findings of `check_data`; `summary()` for people, `to_json()` for programs."""

    spec: str
    split: str
    image_column: str
    caption_column: str
    rows: int = 0
    columns: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the source cannot be used at all
    trainable_rows: int = 0  # a readable image and at least one caption
    bad_images: int = 0
    bad_image_kinds: dict[str, int] = field(default_factory=dict)
    bad_image_examples: list[dict[str, Any]] = field(default_factory=list)  # row, source, kind, reason
    pixel_limit: int = 0  # PIL.Image.MAX_IMAGE_PIXELS: larger images are decompression bombs, skipped
    bad_captions: int = 0
    bad_caption_kinds: dict[str, int] = field(default_factory=dict)
    bad_caption_examples: list[dict[str, Any]] = field(default_factory=list)  # row, value, kind
    captions: int = 0  # usable captions (a row may hold several)
    length_unit: str = "words"  # "tokens" with a tokenizer, else whitespace words
    tokenizer: str | None = None
    max_length: int = 77
    truncated: int = 0  # captions longer than max_length, in length_unit
    truncation_rate: float = 0.0
    longest: dict[str, Any] = field(default_factory=dict)  # row, length, caption
    duplicate_image_groups: int = 0
    duplicate_image_rows: int = 0
    duplicate_image_examples: list[dict[str, Any]] = field(default_factory=list)  # rows, source
    duplicate_caption_groups: int = 0
    duplicate_caption_rows: int = 0
    duplicate_caption_examples: list[dict[str, Any]] = field(default_factory=list)  # rows, caption
    width: dict[str, float] = field(default_factory=dict)  # min, median, max of readable images
    height: dict[str, float] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)
    formats: dict[str, int] = field(default_factory=dict)
    can_train: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)

    def summary(self) -> str:
        return format_summary(self)


def _load_tokenizer(tokenizer: Any) -> tuple[Any, str | None]:
    """(tokenizer, its name) from a tokenizer, a name or path, or None."""
    if tokenizer is None:
        return None, None
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        from ..artifacts import load_pretrained

        return load_pretrained(AutoTokenizer, tokenizer, "tokenizer"), tokenizer
    return tokenizer, getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _lengths(texts: list[str], tokenizer: Any) -> list[int]:
    if tokenizer is None:
        return [len(t.split()) for t in texts]
    # with the special tokens, as the training collator counts them against max_length
    return [len(ids) for ids in tokenizer(texts, truncation=False, verbose=False)["input_ids"]]


def _check_images(ds: Any, source: SourceSpec, report: DataReport, num_workers: int, limit: int) -> set[int]:
    bad, kinds, modes, formats = set(), Counter(), Counter(), Counter()
    widths, heights, groups = array("q"), array("q"), _Groups()
    for info in iter_image_infos(ds, source.image_column, num_workers, desc="data check"):
        if info.kind:
            bad.add(info.row)
            kinds[info.kind] += 1
            if len(report.bad_image_examples) < limit:
                report.bad_image_examples.append({"row": info.row, "source": info.source, "kind": info.kind,
                                                  "reason": info.reason})
            continue
        widths.append(info.width)
        heights.append(info.height)
        modes[info.mode] += 1
        formats[info.format or "in memory"] += 1
        if info.image_id is not None:
            groups.add(info.image_id, info.row)
    report.bad_images, report.bad_image_kinds = len(bad), dict(kinds.most_common())
    report.width, report.height = _stats(widths), _stats(heights)
    report.modes, report.formats = dict(modes.most_common()), dict(formats.most_common())
    n, rows, examples = groups.report(limit)
    report.duplicate_image_groups, report.duplicate_image_rows = n, rows
    cells = ds.select_columns([source.image_column])
    report.duplicate_image_examples = [{"rows": g, "source": describe(cells[g[0]][source.image_column])}
                                       for g in examples]
    return bad


def _check_captions(ds: Any, column: str, report: DataReport, tokenizer: Any, limit: int) -> set[int]:
    bad, kinds, groups, texts = set(), Counter(), _Groups(), {}
    longest, truncated, total = (0, -1, ""), 0, 0
    pending: list[tuple[int, str]] = []  # tokenized in batches

    def measure() -> None:
        nonlocal longest, truncated, total
        for (row, text), n in zip(pending, _lengths([t for _, t in pending], tokenizer)):
            total, truncated = total + 1, truncated + (n > report.max_length)
            longest = max(longest, (n, -row, text))
        pending.clear()

    for row, cell in enumerate(c[column] for c in iter_cells(ds, [column])):
        problem = caption_problem(cell)
        if problem:
            bad.add(row)
            kinds[problem] += 1
            if len(report.bad_caption_examples) < limit:
                report.bad_caption_examples.append({"row": row, "value": repr(cell)[:100], "kind": problem})
            continue
        for text in dict.fromkeys(caption_list(cell)):  # a caption repeated inside one row counts once
            key = stable_id(text.encode("utf-8"))  # the text_id training masks duplicates by
            groups.add(key, row)
            if key in groups.repeated and len(texts) < limit:
                texts.setdefault(key, text)
            pending.append((row, text))
        if len(pending) >= 4096:
            measure()
    measure()
    report.bad_captions, report.bad_caption_kinds = len(bad), dict(kinds.most_common())
    report.captions, report.truncated = total, truncated
    report.truncation_rate = truncated / total if total else 0.0
    if total:
        report.longest = {"row": -longest[1], "length": longest[0], "caption": longest[2][:300]}
    n, rows, _ = groups.report(limit)
    report.duplicate_caption_groups, report.duplicate_caption_rows = n, rows
    report.duplicate_caption_examples = [{"rows": groups.repeated[k][:10], "caption": t[:200]}
                                         for k, t in texts.items()]
    return bad


def check_data(source: SourceSpec, tokenizer: Any = None, max_length: int = 77, num_workers: int = 0,
               max_examples: int = 10, cache_dir: str | None = None) -> DataReport:
    """Read a source as `mmcl train` would (its image and caption columns) and report what is
    wrong with it. Never raises for bad data: an unusable source gives `can_train=False` and the
    reason in `errors`.

    tokenizer: a tokenizer or its name/path; without one, caption length is counted in whitespace
        words (a lower bound on tokens, so on the truncation count).
    max_length: the text tower's limit in tokens (model.max_text_length), special tokens included.
    num_workers: DataLoader worker processes that decode images; 0 decodes in this process.
    max_examples: how many of each kind of problem are listed (all are counted).
    """
    tokenizer, name = _load_tokenizer(tokenizer)
    report = DataReport(source.dataset, source.split, source.image_column, source.caption_column,
                        max_length=max_length, tokenizer=name, length_unit="words" if tokenizer is None else "tokens",
                        pixel_limit=Image.MAX_IMAGE_PIXELS)
    try:
        ds = load_source(source, cache_dir)
    except (ConfigError, OSError) as err:  # no such file or Hub dataset, not UTF-8, no rows
        report.errors.append(str(err))
        return report
    report.rows, report.columns = len(ds), list(ds.column_names)
    report.errors += [f"{source.dataset}: no column '{column}' {why}; columns are: {', '.join(ds.column_names)}"
                      for column, why in pair_columns(source).items() if column not in ds.column_names]
    if report.errors:
        return report
    try:
        ds = require_columns(ds, source, pair_columns(source))
    except ConfigError as err:  # no rows
        report.errors.append(str(err))
        return report
    bad = _check_images(ds, source, report, num_workers, max_examples)
    bad |= _check_captions(ds, source.caption_column, report, tokenizer, max_examples)
    report.trainable_rows = report.rows - len(bad)
    if report.trainable_rows == 0:
        report.errors.append(f"{source.dataset}: no row has both a readable image and a caption")
    report.can_train = not report.errors
    return report


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counts.items())


def format_summary(r: DataReport) -> str:
    """The report for people: counts, examples with rows and paths, and the verdict."""
    lines = [f"data check: {r.spec} (split {r.split}; image column '{r.image_column}', "
             f"caption column '{r.caption_column}')",
             f"rows: {r.rows:,}   columns: {', '.join(r.columns) or '-'}"]
    if r.captions + r.bad_captions:  # the rows were read (every row has captions or a bad one)
        lines.append(f"trainable rows: {r.trainable_rows:,} ({r.trainable_rows / r.rows:.1%}); "
                     f"training skips the other {r.rows - r.trainable_rows:,}")
    if r.bad_images:
        lines.append(f"bad images: {r.bad_images:,} ({_counts(r.bad_image_kinds)})")
        lines += [f"  row {e['row']}: {e['source']} [{e['kind']}] {e['reason']}" for e in r.bad_image_examples]
    if r.bad_captions:
        lines.append(f"bad captions: {r.bad_captions:,} ({_counts(r.bad_caption_kinds)})")
        lines += [f"  row {e['row']}: {e['value']} [{e['kind']}]" for e in r.bad_caption_examples]
    if r.captions:
        unit = f"tokens ({r.tokenizer})" if r.length_unit == "tokens" else \
            "whitespace words (no tokenizer given: a lower bound on tokens)"
        lines.append(f"captions: {r.captions:,}, lengths in {unit}; longer than {r.max_length}: "
                     f"{r.truncated:,} ({r.truncation_rate:.2%}) will be truncated")
        lines.append(f"  longest: {r.longest['length']} (row {r.longest['row']}): {r.longest['caption'][:100]!r}")
    for what, groups, rows, examples, key in (
            ("images (same bytes)", r.duplicate_image_groups, r.duplicate_image_rows, r.duplicate_image_examples,
             "source"),
            ("captions", r.duplicate_caption_groups, r.duplicate_caption_rows, r.duplicate_caption_examples,
             "caption")):
        if groups:
            lines.append(f"duplicate {what}: {groups:,} group(s) covering {rows:,} rows "
                         f"(not used as each other's negatives in training)")
            lines += [f"  rows {', '.join(map(str, e['rows']))}: {str(e[key])[:100]!r}" for e in examples]
    if r.width:
        lines.append("image size (min / median / max): width {min:g} / {median:g} / {max:g}, ".format(**r.width)
                     + "height {min:g} / {median:g} / {max:g}".format(**r.height))
        lines.append(f"modes: {_counts(r.modes)}   formats: {_counts(r.formats)}")
    lines += [f"error: {e}" for e in r.errors]
    lines.append("verdict: can train" if r.can_train else "verdict: CANNOT TRAIN")
    return "\n".join(lines)
