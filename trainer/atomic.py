"""Files that appear whole or not at all. Each is written under a temporary name beside
its place, flushed to disk, and renamed over it (a rename is atomic within a
filesystem); then its folder is flushed, so the rename survives a crash of the node.
A reader, on this node or another one sharing the volume, sees the old file or the new
one, never half of one. Temporaries are hidden files (`.NAME.tmp-HOST-PID`), which the
checkpoint manifest and the image listings skip. The host is in the name because
processes of different pods may share a PID and a folder (jobs sharing class images)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, BinaryIO, Callable


def write_bytes(path: Path, data: bytes) -> None:
    _replace(path, lambda handle: handle.write(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, value: Any, *, indent: int = 2, sort_keys: bool = False) -> None:
    write_text(path, json.dumps(value, indent=indent, sort_keys=sort_keys))


def save_image(image, path: Path, *, format: str = "PNG") -> None:
    """A PIL image."""
    _replace(path, lambda handle: image.save(handle, format=format))


def _replace(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    with open(temporary, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
