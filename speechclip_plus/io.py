"""Atomic file output: write to a temporary name in the destination directory, then rename.

``os.replace`` within one directory is atomic on POSIX, so readers see either the old file or the complete
new one, never a partial write. On an exception the temporary file is removed and the destination is left
untouched. The temporary name keeps the destination's extension (``.x.tmp-<host>-<pid>-1a2b3c4d.wav`` for
``x.wav``) so tools that pick a format from the extension (soundfile, torch) behave the same.

A process killed during a write (SIGKILL, power loss) leaves its temporary file behind, never a partial file
under the final name. ``remove_stale_temps(dir)`` deletes such leftovers: temporary files of this host whose
process is gone (a live writer's files, and other hosts' files on a shared file system, are left alone).
Every writer of the toolkit (recipes and benchmarks included) goes through this module, so every temporary file
it can leave has a name ``remove_stale_temps`` recognises.

A replaced file keeps its permission bits (as an in-place write would), unless ``atomic_path(mode=...)`` sets them.
``cache_dir()`` is where downloaded or rebuilt files are kept between runs.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import stat
import uuid
from typing import Any, Iterator, List, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


_TEMP_RE = re.compile(r"^\..*\.tmp-(?P<host>[A-Za-z0-9_-]*)-(?P<pid>\d+)-[0-9a-f]{8}(\.[^.]*)?$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32]


def temp_path_for(path: PathLike) -> str:
    """A fresh hidden temporary name beside ``path`` (same directory, so the final rename is atomic)."""
    path = os.fspath(path)
    directory, base = os.path.split(path)
    stem, ext = os.path.splitext(base)
    return os.path.join(directory, f".{stem}.tmp-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{ext}")


def cache_dir() -> str:
    """``$SPEECHCLIP_PLUS_CACHE``, else ``$XDG_CACHE_HOME/speechclip_plus``, else ``~/.cache/speechclip_plus``."""
    if os.environ.get("SPEECHCLIP_PLUS_CACHE"):
        return os.environ["SPEECHCLIP_PLUS_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "speechclip_plus")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(directory: PathLike) -> List[str]:
    """Delete the temporary files (``temp_path_for`` names) in ``directory`` left by dead processes of this
    host; returns their paths. A missing directory is fine."""
    directory = os.fspath(directory)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    host, removed = _host(), []
    for name in names:
        m = _TEMP_RE.match(name)
        if m is None or m.group("host") != host or _alive(int(m.group("pid"))):
            continue
        path = os.path.join(directory, name)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_path(path: PathLike, mode: Optional[int] = None) -> Iterator[str]:
    """Yield a temporary path; when the block exits normally it is renamed to ``path``.

    The block must create the file. Parent directories of ``path`` are created. The file gets the permission
    bits ``mode``; with None, those of the file it replaces (a new file keeps what the block created). On error
    the temporary file is deleted and the exception propagates.
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
        if mode is None and os.path.isfile(path):
            mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode is not None:
            os.chmod(tmp, mode)
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
