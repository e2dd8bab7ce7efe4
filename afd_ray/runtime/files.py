"""Durable writes: nothing the runtime writes is ever seen half-written (temp file, fsync, rename)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("afd_ray")


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (the directory entry itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader (or a crash) sees the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def append_line(path: Path, record: dict) -> None:
    """Append one JSON line and fsync it (after a line a crash cut short, on a line of its own)."""
    torn = False
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with open(path, "a") as f:
        f.write(("\n" if torn else "") + json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_lines(path: Path) -> list[dict]:
    """JSON lines of ``path``. A last line cut short by a crash is dropped with a warning; a bad line
    anywhere else is an error naming the file and line."""
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # after the last newline: a line the writer did not finish
                log.warning("%s: dropping a half-written last line (%d bytes): the run stopped while writing it",
                            path, len(line))
                break
            raise ValueError(f"{path}, line {i + 1}: not JSON ({e}); the file was changed by hand or damaged") from None
    return out
