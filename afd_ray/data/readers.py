"""Read demonstrations and preferences from local files, Hub names or the offline sets.

A source is one of:
  - a local file: ``.jsonl`` (one object per line), ``.json`` (a list of objects) or ``.parquet``;
  - ``offline:chatterbot`` / ``offline:chitchat`` / ``offline:chitchat-questions`` (``afd_ray.data.offline``, no
    network);
  - a Hub dataset name, read with ``datasets.load_dataset``; the known ones get their adapter
    (HuggingFaceH4/ultrachat_200k ``train_sft``, CarperAI/openai_summarize_tldr, Anthropic/hh-rlhf); a
    folder inside a dataset repository follows a colon: ``Anthropic/hh-rlhf:harmless-base``.

Bad rows raise ``DataError`` (default) or, with ``on_bad_row="skip"``, are counted in ``Loaded.skipped``
and reported in a warning; more than ``max_skip_fraction`` of the rows bad is an error. Nothing is dropped
silently.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from afd_ray.data.schema import (
    DataError,
    Demonstration,
    Loaded,
    Preference,
    check_skip_fraction,
    parse_demonstration,
    parse_preference,
)

log = logging.getLogger(__name__)
BAD_ROW_POLICIES = ("error", "skip")
FILE_LIKE = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt")  # treated as local paths, never Hub names

# Hub datasets with a known layout: default split and a function mapping a raw row to our schema. The
# schema itself recognises TL;DR (prompt/label) and HH-RLHF (chosen/rejected) rows, so a local copy of either
# loads the same way; the adapters only drop the columns that are not read.
HUB_DEMOS: dict[str, tuple[str, Callable[[dict], dict]]] = {
    "HuggingFaceH4/ultrachat_200k": ("train_sft", lambda r: {"messages": r["messages"]}),
    "CarperAI/openai_summarize_tldr": ("train", lambda r: {"prompt": r["prompt"], "label": r["label"]}),
    "Anthropic/hh-rlhf": ("train", lambda r: {"chosen": r["chosen"]}),  # the chosen side as demonstrations
}
HUB_PREFERENCES: dict[str, tuple[str, Callable[[dict], dict]]] = {
    "Anthropic/hh-rlhf": ("test", lambda r: {"chosen": r["chosen"], "rejected": r["rejected"]}),
}


def iter_file_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (row, object) from a jsonl, json or parquet file. Rows are 1-based line numbers for jsonl and
    0-based list indices for json and parquet. Undecodable bytes and broken JSON raise DataError; a
    broken line of a jsonl file is reported as that row (so ``skip`` can step over it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield lineno, DataError(str(path), lineno, None,
                                            f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                                            "not_utf8")
                    continue
                if not text.strip():
                    continue
                try:
                    yield lineno, json.loads(text)
                except json.JSONDecodeError as e:
                    yield lineno, DataError(str(path), lineno, None, f"broken JSON: {e.msg} at column {e.colno}",
                                            "broken_json")
    elif suffix == ".json":
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise DataError(str(path), None, None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} on line {line})",
                            "not_utf8") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(str(path), None, None, f"broken JSON: {e.msg} at line {e.lineno} column {e.colno}",
                            "broken_json") from None
        if not isinstance(data, list):
            raise DataError(str(path), None, None, f"a .json data file must hold a list of rows, got "
                            f"{type(data).__name__} (use .jsonl for one object per line)", "wrong_type")
        yield from enumerate(data)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist())
    else:
        raise ValueError(f"data file {path}: unsupported extension {suffix!r}; use .jsonl, .json or .parquet")


def _hub_rows(source: str, split: str | None, adapters: dict) -> tuple[str, Iterator[tuple[int, Any]]]:
    """``name`` or ``name:folder`` (a data_dir inside the repository, e.g. Anthropic/hh-rlhf:harmless-base)."""
    name, _, data_dir = source.partition(":")
    default_split, adapt = adapters.get(name, (None, lambda r: r))
    split = split or default_split or "train"
    try:
        import datasets

        ds = datasets.load_dataset(name, data_dir=data_dir or None, split=split)
    except Exception as e:  # network, auth, missing split: one message that says what to do
        raise RuntimeError(
            f"could not load Hub dataset {source!r} split {split!r} ({type(e).__name__}: {e}). Without network, "
            "use a local .jsonl/.json/.parquet file or an offline set (offline:chatterbot, offline:chitchat, "
            "offline:chitchat-questions)."
        ) from e
    return f"{source}[{split}]", ((i, adapt(r)) for i, r in enumerate(ds))


def _rows(source: str, split: str | None, adapters: dict, kind: str) -> tuple[str, Iterator[tuple[int, Any]]]:
    if source.startswith("offline:"):
        from afd_ray.data import offline

        return source, offline.rows(source.removeprefix("offline:"), kind)
    if Path(source).exists() or Path(source).suffix.lower() in FILE_LIKE:
        return source, iter_file_rows(source)
    return _hub_rows(source, split, adapters)


def _load(source, split, adapters, kind, parse, on_bad_row, limit, max_skip_fraction) -> Loaded:
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
    name, rows = _rows(str(source), split, adapters, kind)
    out = Loaded(items=[])
    skipped: Counter[str] = Counter()
    for row, data in rows:
        if limit is not None and len(out.items) >= limit:
            break
        try:
            if isinstance(data, DataError):
                raise data
            out.items.append(parse(data, name, row))
        except DataError as e:
            if on_bad_row == "error":
                raise
            skipped[e.kind] += 1
            if len(out.examples) < 5:
                out.examples.append(str(e))
    out.skipped = dict(skipped)
    if out.num_skipped:
        log.warning("%s: skipped %d bad %s rows %s; first: %s", name, out.num_skipped, kind, out.skipped,
                    out.examples[0])
    if not out.items:
        raise DataError(name, None, None, f"no usable {kind} rows (skipped: {out.skipped})", "empty_dataset")
    if out.num_skipped:
        check_skip_fraction(name, kind, out.skipped, len(out.items) + out.num_skipped, max_skip_fraction,
                            out.examples[0])
    return out


def load_demonstrations(source: str | Path, split: str | None = None, on_bad_row: str = "error",
                        limit: int | None = None, *, max_skip_fraction: float = 0.1) -> Loaded:
    """Demonstrations (x, y*) from a file, a Hub name or an offline set. ``Loaded.items``: list[Demonstration]."""
    return _load(source, split, HUB_DEMOS, "demonstration", parse_demonstration, on_bad_row, limit,
                 max_skip_fraction)


def load_preferences(source: str | Path, split: str | None = None, on_bad_row: str = "error",
                     limit: int | None = None, *, max_skip_fraction: float = 0.1) -> Loaded:
    """Preferences (x, y_w, y_l). ``Loaded.items``: list[Preference]."""
    return _load(source, split, HUB_PREFERENCES, "preference", parse_preference, on_bad_row, limit,
                 max_skip_fraction)


__all__ = ["Demonstration", "Preference", "Loaded", "DataError", "load_demonstrations", "load_preferences",
           "iter_file_rows"]
