"""Kaldi data-dir files: the ``<key> <value>`` table format (parsing, reading, writing in ``LC_ALL=C`` order),
``DataDir`` (read access to a whole dir) and ``write_data_dir``; ``DataError`` for every data problem.

The format, the file list and the error style are documented in ``speechclip_plus.data.datadir``.
"""
from __future__ import annotations

import logging
import math
import os
import re
from functools import cached_property
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

from speechclip_plus.io import atomic_write_text

log = logging.getLogger(__name__)

REQUIRED_FILES = ("wav.scp", "text", "utt2spk", "spk2utt", "utt2img", "img.scp")
EXCLUDED_FILE = "excluded.txt"  # items left out by --skip_bad (stages 0-2) or --fix_dir, with the reason
OPTIONAL_FILES = ("utt2dur",)
UTT_FILES = ("wav.scp", "text", "utt2spk", "utt2img", "utt2dur")  # keyed by utterance
MAX_SHOWN = 10

_LINE = re.compile(r"[ \t]*([^ \t]+)(?:[ \t]+(.*?))?[ \t]*$")
Entry = Tuple[int, str, str]  # (line number, key, value)


class DataError(ValueError):
    """Malformed or inconsistent data (data dir files, audio, images, embeddings)."""


def sort_key(key: str) -> bytes:
    """``LC_ALL=C`` collation: compare the UTF-8 bytes."""
    return key.encode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------------------------- reading
def parse_entries(path: str, allow_empty: bool = False) -> Tuple[List[Entry], List[str]]:
    """All well-formed ``(line, key, value)`` entries of ``path`` in file order, and the problems found.

    Problems (each ``file:line: key: what``): a line that is not UTF-8, a blank line, a key without a value
    (unless ``allow_empty``, then the value is ``""``). Duplicates are not checked here.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:
        raw_lines = f.read().split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    entries: List[Entry] = []
    problems: List[str] = []
    crlf = 0
    for lineno, raw in enumerate(raw_lines, 1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
            crlf += 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            fields = raw.split(maxsplit=1)
            key = fields[0].decode("utf-8", "replace") if fields else ""
            problems.append(f"{path}:{lineno}: {key}: not valid UTF-8 (bad byte at column {e.start + 1})")
            continue
        m = _LINE.match(line)
        if m is None:  # only blanks (spaces/tabs) on the line
            problems.append(f"{path}:{lineno}: empty line")
            continue
        key, value = m.group(1), m.group(2) or ""
        if not value and not allow_empty:
            problems.append(f"{path}:{lineno}: {key}: missing value")
            continue
        entries.append((lineno, key, value))
    if crlf:
        log.warning("%s: %d line(s) end with CR LF (Windows line ends); the CR was removed", path, crlf)
    return entries, problems


def read_kv(path: Union[str, os.PathLike], allow_empty: bool = False) -> Dict[str, str]:
    """``{key: value}`` of a data-dir file, in file order.

    Raises ``DataError`` (``file:line: key: what``) on a missing file, non-UTF-8 line, blank line, missing
    value (unless ``allow_empty``) or duplicate key. Order is not checked (see ``validate_data_dir``).
    """
    path = os.fspath(path)
    entries, problems = parse_entries(path, allow_empty=allow_empty)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s) in this file)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    out: Dict[str, str] = {}
    first: Dict[str, int] = {}
    for lineno, key, value in entries:
        if key in out:
            raise DataError(f"{path}:{lineno}: {key}: duplicate key (first on line {first[key]})")
        out[key] = value
        first[key] = lineno
    return out


def write_kv(path: Union[str, os.PathLike], mapping: Mapping[str, object]) -> None:
    """Write ``key value`` lines sorted in ``LC_ALL=C`` order, atomically.

    A value may be a string, a number or a sequence of strings (joined by single spaces, as in
    ``spk2utt``). Keys must be non-empty without whitespace; values non-empty without line breaks.
    """
    path = os.fspath(path)
    lines = []
    for key in sorted(mapping, key=sort_key):
        value = mapping[key]
        if isinstance(value, (list, tuple)):
            value = " ".join(str(v) for v in value)
        value = str(value)
        if not key or re.search(r"\s", key):
            raise ValueError(f"{path}: bad key {key!r} (must be non-empty, without whitespace)")
        if not value.strip() or "\n" in value or "\r" in value:
            raise ValueError(f"{path}: {key}: bad value {value!r} (must be non-empty, on one line)")
        lines.append(f"{key} {value}\n")
    atomic_write_text(path, "".join(lines))


def spk2utt_from_utt2spk(utt2spk: Mapping[str, str]) -> Dict[str, List[str]]:
    """Invert ``utt2spk``: speaker -> its utterances in ``LC_ALL=C`` order."""
    out: Dict[str, List[str]] = {}
    for utt in sorted(utt2spk, key=sort_key):
        out.setdefault(utt2spk[utt], []).append(utt)
    return out


class DataDir:
    """Read access to a data dir; each file is parsed on first use (``DataError`` if missing or bad)."""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise DataError(f"{self.path}: data dir not found")

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def has(self, name: str) -> bool:
        return os.path.isfile(self.file(name))

    @cached_property
    def wav(self) -> Dict[str, str]:
        return read_kv(self.file("wav.scp"))

    @cached_property
    def text(self) -> Dict[str, str]:
        return read_kv(self.file("text"))

    @cached_property
    def utt2spk(self) -> Dict[str, str]:
        return read_kv(self.file("utt2spk"))

    @cached_property
    def spk2utt(self) -> Dict[str, List[str]]:
        return {spk: utts.split() for spk, utts in read_kv(self.file("spk2utt")).items()}

    @cached_property
    def utt2img(self) -> Dict[str, str]:
        return read_kv(self.file("utt2img"))

    @cached_property
    def img(self) -> Dict[str, str]:
        return read_kv(self.file("img.scp"))

    @cached_property
    def utt2dur(self) -> Optional[Dict[str, float]]:
        """Durations in seconds, or None when ``utt2dur`` does not exist (stage 1 writes it)."""
        if not self.has("utt2dur"):
            return None
        path = self.file("utt2dur")
        entries, problems = parse_entries(path)
        if problems:
            raise DataError(problems[0])
        out: Dict[str, float] = {}
        for lineno, key, value in entries:
            dur = _positive_float(value)
            if dur is None:
                raise DataError(f"{path}:{lineno}: {key}: duration {value!r} is not a positive number")
            if key in out:
                raise DataError(f"{path}:{lineno}: {key}: duration key seen twice")
            out[key] = dur
        return out

    @cached_property
    def utts(self) -> List[str]:
        """Utterance ids (keys of ``wav.scp``) in ``LC_ALL=C`` order."""
        return sorted(self.wav, key=sort_key)

    def __len__(self) -> int:
        return len(self.utts)

    def __repr__(self) -> str:
        return f"DataDir({self.path!r})"


def _positive_float(value: str) -> Optional[float]:
    try:
        x = float(value)
    except ValueError:
        return None
    return x if math.isfinite(x) and x > 0 else None


# ---------------------------------------------------------------------------------------------- writing
def write_data_dir(
    path: Union[str, os.PathLike],
    wav: Mapping[str, str],
    text: Mapping[str, str],
    utt2spk: Mapping[str, str],
    utt2img: Mapping[str, str],
    img: Mapping[str, str],
    utt2dur: Optional[Mapping[str, float]] = None,
) -> None:
    """Write a complete data dir (``spk2utt`` derived from ``utt2spk``), each file atomically and sorted.

    Any stale ``utt2dur`` is removed when ``utt2dur`` is None.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    write_kv(os.path.join(path, "wav.scp"), wav)
    write_kv(os.path.join(path, "text"), text)
    write_kv(os.path.join(path, "utt2spk"), utt2spk)
    write_kv(os.path.join(path, "spk2utt"), spk2utt_from_utt2spk(utt2spk))
    write_kv(os.path.join(path, "utt2img"), utt2img)
    write_kv(os.path.join(path, "img.scp"), img)
    dur_file = os.path.join(path, "utt2dur")
    if utt2dur is not None:
        write_kv(dur_file, {k: format_duration(v) for k, v in utt2dur.items()})
    elif os.path.exists(dur_file):
        os.remove(dur_file)


def format_duration(seconds: float) -> str:
    return f"{float(seconds):.4f}"


def _short(items: Iterable[str], n: int = 3) -> str:
    items = sorted(items, key=sort_key)
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
