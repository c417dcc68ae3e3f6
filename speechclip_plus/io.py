"""Atomic file output: write to a temporary name in the destination directory, then rename.

``os.replace`` within one directory is atomic on POSIX, so readers see either the old file or the complete
new one, never a partial write. On an exception the temporary file is removed and the destination is left
untouched. The temporary name keeps the destination's extension (``.x.tmp-1a2b3c4d.wav`` for ``x.wav``) so
tools that pick a format from the extension (soundfile, torch) behave the same.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def temp_path_for(path: PathLike) -> str:
    """A fresh hidden temporary name beside ``path`` (same directory, so the final rename is atomic)."""
    path = os.fspath(path)
    directory, base = os.path.split(path)
    stem, ext = os.path.splitext(base)
    return os.path.join(directory, f".{stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{ext}")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary path; when the block exits normally it is renamed to ``path``.

    The block must create the file. Parent directories of ``path`` are created. On error the temporary
    file is deleted and the exception propagates.
    """
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        if not os.path.exists(tmp):
            raise FileNotFoundError(f"atomic write of {path}: nothing was written to the temporary file {tmp}")
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (flushed and fsynced before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding=encoding, newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def torch_save_atomic(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file and a rename."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
