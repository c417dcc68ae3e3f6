"""Kaldi-style data directories: reading, writing, validation and surgery (subset, combine, fix).

A data dir holds text files with one entry a line, ``<key> <value>``: the key is the first field (no
whitespace), the value the rest of the line (so paths may contain spaces). Files are sorted by key in
``LC_ALL=C`` byte order (for UTF-8 keys that is code-point order, what ``sorted`` gives for ``str``).

=============  ==========================================  =========
file           entry                                       required
=============  ==========================================  =========
``wav.scp``    utt -> absolute audio path                  yes
``text``       utt -> transcription                        yes
``utt2spk``    utt -> speaker id                           yes
``spk2utt``    speaker -> its utts (space separated)       yes
``utt2img``    utt -> image id                             yes
``img.scp``    image id -> absolute image path             yes
``utt2dur``    utt -> duration in seconds (stage 1)        no
=============  ==========================================  =========

Errors name ``file:line: key: what is wrong``. Lines ending in CR LF are accepted (the CR is removed and a
warning logged). ``python -m speechclip_plus.data.datadir {subset,combine,fix} ...`` is the command line of
the ``utils/*_data_dir.sh`` wrappers.

Tools that drop utterances from a data dir in place (``fix_data_dir``, ``format_audio(skip_bad=True)``,
``embed_images --skip_bad``) first copy its files to a fresh ``<dir>/.backup[.N]/`` (``backup_data_dir``) and
list every dropped utterance with its reason in ``<dir>/excluded.txt`` (``<item> <reason>``, merged over runs;
``add_excluded``, also the writer of stage 0's lists, ``data.corpus``).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import random
import re
import shutil
import sys
from functools import cached_property
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

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


# ---------------------------------------------------------------------------------------------- validation
def _check_path(f: str, lineno: int, key: str, path: str, check_files: bool) -> Optional[str]:
    if path.rstrip().endswith("|"):
        return f"{f}:{lineno}: {key}: commands ('... |') are not supported, give a file path: {path}"
    if not os.path.isabs(path):
        return f"{f}:{lineno}: {key}: path is not absolute: {path}"
    if check_files and not os.path.isfile(path):
        return f"{f}:{lineno}: {key}: file not found: {path}"
    return None


def image_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a usable image (missing, or Pillow cannot decode it), or None.

    Pillow's ``verify()`` (structure and checksums, e.g. PNG chunk CRCs), then a decode of the pixel data: a
    JPEG in Pillow's draft mode at 1/8 scale (libjpeg still reads every coefficient, so a truncated or broken
    stream fails as in a full decode, in about half the time), other formats in full.
    """
    if not os.path.isfile(path):
        return f"file not found: {path}"
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()  # truncated files fail here, not at Image.open
    except Exception as e:  # PIL raises OSError, UnidentifiedImageError, SyntaxError, ... by format
        return f"cannot decode {path} ({type(e).__name__}: {e})"
    return None


def _short(items: Iterable[str], n: int = 3) -> str:
    items = sorted(items, key=sort_key)
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def validate_data_dir(path: Union[str, os.PathLike], check_files: bool = True,
                      check_images: bool = False) -> List[str]:
    """Every problem of a data dir, one ``file:line: key: what`` string each (empty list = valid).

    Checks: required files exist and parse (UTF-8, key + value, no blank lines); no duplicate keys;
    ``LC_ALL=C`` order; the utterance files have exactly the keys of ``wav.scp``; each utt's image is in
    ``img.scp``; captions are not empty; speaker and image ids are single tokens; ``spk2utt`` is the
    inverse of ``utt2spk``; durations are positive numbers; audio and image paths are absolute and (when
    ``check_files``) exist; with ``check_images`` every image is decoded in full (slow on a large corpus).
    Audio content is checked by stage 1 (``format_audio``), which reads every file.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        return [f"{path}: data dir not found"]
    problems: List[str] = []
    files: Dict[str, Dict[str, Tuple[int, str]]] = {}  # name -> key -> (line, value)
    for name in REQUIRED_FILES + OPTIONAL_FILES:
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            if name in REQUIRED_FILES:
                problems.append(f"{f}: missing (required file)")
            continue
        entries, file_problems = parse_entries(f, allow_empty=(name == "text"))
        problems += file_problems
        table: Dict[str, Tuple[int, str]] = {}
        prev: Optional[str] = None
        for lineno, key, value in entries:
            if key in table:
                problems.append(f"{f}:{lineno}: {key}: duplicate key (first on line {table[key][0]})")
                continue
            if prev is not None and sort_key(key) < sort_key(prev):
                problems.append(f"{f}:{lineno}: {key}: not sorted (LC_ALL=C order): comes after {prev}")
            prev = key
            table[key] = (lineno, value)
        files[name] = table

    def where(name: str) -> str:
        return os.path.join(path, name)

    wav = files.get("wav.scp")
    if wav is not None:
        for name in UTT_FILES[1:]:
            table = files.get(name)
            if table is None:
                continue
            for key, (lineno, _) in table.items():
                if key not in wav:
                    problems.append(f"{where(name)}:{lineno}: {key}: utterance not in wav.scp")
            for key, (lineno, _) in wav.items():
                if key not in table:
                    problems.append(f"{where(name)}: {key}: missing (utterance on wav.scp line {lineno})")
        for key, (lineno, value) in wav.items():
            problem = _check_path(where("wav.scp"), lineno, key, value, check_files)
            if problem:
                problems.append(problem)
    for key, (lineno, value) in files.get("text", {}).items():
        if not value.strip():
            problems.append(f"{where('text')}:{lineno}: {key}: empty caption")
    img = files.get("img.scp")
    if img is not None:
        for key, (lineno, value) in img.items():
            problem = _check_path(where("img.scp"), lineno, key, value, check_files)
            if problem:
                problems.append(problem)
            elif check_images:
                bad = image_problem(value)
                if bad:
                    problems.append(f"{where('img.scp')}:{lineno}: {key}: {bad}")
    for key, (lineno, value) in files.get("utt2img", {}).items():
        if len(value.split()) != 1:
            problems.append(f"{where('utt2img')}:{lineno}: {key}: image id must be one token: {value!r}")
        elif img is not None and value not in img:
            problems.append(f"{where('utt2img')}:{lineno}: {key}: image {value} not in img.scp")
    utt2spk = files.get("utt2spk")
    if utt2spk is not None:
        for key, (lineno, value) in utt2spk.items():
            if len(value.split()) != 1:
                problems.append(f"{where('utt2spk')}:{lineno}: {key}: speaker id must be one token: {value!r}")
        spk2utt = files.get("spk2utt")
        if spk2utt is not None:
            expected = spk2utt_from_utt2spk({k: v for k, (_, v) in utt2spk.items()})
            for spk, (lineno, value) in spk2utt.items():
                listed = value.split()
                if spk not in expected:
                    problems.append(f"{where('spk2utt')}:{lineno}: {spk}: speaker not in utt2spk")
                elif set(listed) != set(expected[spk]) or len(listed) != len(expected[spk]):
                    missing = set(expected[spk]) - set(listed)
                    extra = set(listed) - set(expected[spk])
                    parts = [f"missing {_short(missing)}"] if missing else []
                    parts += [f"extra {_short(extra)}"] if extra else []
                    detail = "; ".join(parts) or "an utterance is listed twice"
                    problems.append(f"{where('spk2utt')}:{lineno}: {spk}: does not match utt2spk ({detail})")
            for spk, utts in expected.items():
                if spk not in spk2utt:
                    problems.append(
                        f"{where('spk2utt')}: {spk}: missing (speaker of {len(utts)} utt(s) in utt2spk)")
    for key, (lineno, value) in files.get("utt2dur", {}).items():
        if _positive_float(value) is None:
            problems.append(f"{where('utt2dur')}:{lineno}: {key}: duration {value!r} is not a positive number")
    return problems


def check_data_dir(path: Union[str, os.PathLike], check_files: bool = True) -> None:
    """Raise ``DataError`` listing the first problems of ``validate_data_dir`` and their total count."""
    problems = validate_data_dir(path, check_files=check_files)
    if problems:
        shown = "\n  ".join(problems[:MAX_SHOWN])
        more = f"\n  ... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        raise DataError(f"{os.fspath(path)}: {len(problems)} problem(s) in the data dir:\n  {shown}{more}")


# ---------------------------------------------------------------------------------------------- writing / surgery
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


def _same_dir(a: str, b: str) -> bool:
    return os.path.exists(b) and os.path.samefile(a, b)


def subset_data_dir(src: Union[str, os.PathLike], dest: Union[str, os.PathLike], utts: Iterable[str]) -> int:
    """Write the data dir of the utterances ``utts`` of ``src`` to ``dest``; returns their number.

    ``img.scp`` keeps only the images those utterances use. Unknown utterance ids are an error.
    """
    src, dest = os.fspath(src), os.fspath(dest)
    if _same_dir(src, dest):
        raise DataError(f"subset: source and destination are the same directory: {src}")
    d = DataDir(src)
    keep = set(utts)
    unknown = keep - set(d.wav)
    if unknown:
        raise DataError(f"{src}: {len(unknown)} requested utterance(s) not in wav.scp: {_short(unknown)}")
    if not keep:
        raise DataError(f"subset of {src}: no utterances selected")
    images = {d.utt2img[u] for u in keep}
    missing = images - set(d.img)
    if missing:
        raise DataError(f"{src}/img.scp: image(s) {_short(missing)} used in utt2img are missing")
    durs = d.utt2dur
    write_data_dir(
        dest,
        wav={u: d.wav[u] for u in keep},
        text={u: d.text[u] for u in keep},
        utt2spk={u: d.utt2spk[u] for u in keep},
        utt2img={u: d.utt2img[u] for u in keep},
        img={i: d.img[i] for i in images},
        utt2dur=None if durs is None else {u: durs[u] for u in keep},
    )
    return len(keep)


def combine_data_dirs(dest: Union[str, os.PathLike], srcs: Sequence[Union[str, os.PathLike]]) -> int:
    """Union of data dirs into ``dest``; returns the number of utterances.

    Utterance ids must be unique across the sources; an image id may be shared only with the same path.
    ``utt2dur`` is written only when every source has one.
    """
    dest = os.fspath(dest)
    srcs = [os.fspath(s) for s in srcs]
    if not srcs:
        raise DataError("combine: no source data dirs")
    for s in srcs:
        if _same_dir(s, dest):
            raise DataError(f"combine: the destination {dest} is also a source")
    wav: Dict[str, str] = {}
    text: Dict[str, str] = {}
    utt2spk: Dict[str, str] = {}
    utt2img: Dict[str, str] = {}
    img: Dict[str, str] = {}
    utt2dur: Optional[Dict[str, float]] = {}
    origin: Dict[str, str] = {}
    img_origin: Dict[str, str] = {}
    for s in srcs:
        d = DataDir(s)
        for u in d.utts:
            if u in origin:
                raise DataError(f"combine: utterance {u} is in both {origin[u]} and {s}")
            origin[u] = s
            wav[u], text[u], utt2spk[u], utt2img[u] = d.wav[u], d.text[u], d.utt2spk[u], d.utt2img[u]
        for i, p in d.img.items():
            if i in img and img[i] != p:
                raise DataError(f"combine: image {i} is {img[i]} in {img_origin[i]} but {p} in {s}")
            img[i] = p
            img_origin.setdefault(i, s)
        durs = d.utt2dur
        if durs is None:
            if utt2dur is not None:
                log.warning("combine: %s has no utt2dur; the combined dir will have none", s)
            utt2dur = None
        elif utt2dur is not None:
            utt2dur.update(durs)
    write_data_dir(dest, wav, text, utt2spk, utt2img, img, utt2dur)
    return len(wav)


def backup_data_dir(path: Union[str, os.PathLike]) -> str:
    """Copy the data-dir files of ``path`` (and ``excluded.txt``) into a new ``<path>/.backup/``, or
    ``.backup.2/``, ``.backup.3/``, ... when earlier backups exist (never overwritten); returns its path."""
    path = os.fspath(path)
    backup, n = os.path.join(path, ".backup"), 1
    while os.path.exists(backup):
        n += 1
        backup = os.path.join(path, f".backup.{n}")
    tmp = backup + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in REQUIRED_FILES + OPTIONAL_FILES + ("wav.scp.orig", EXCLUDED_FILE):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            shutil.copy2(f, os.path.join(tmp, name))
    os.replace(tmp, backup)  # complete or absent
    return backup


def read_excluded(path: Union[str, os.PathLike]) -> Dict[str, str]:
    """``{utt: reason}`` of ``<path>/excluded.txt`` (empty when there is none)."""
    f = os.path.join(os.fspath(path), EXCLUDED_FILE)
    return read_kv(f) if os.path.isfile(f) else {}


def add_excluded(path: Union[str, os.PathLike], reasons: Mapping[str, str]) -> str:
    """Merge ``{item: reason}`` into ``<path>/excluded.txt`` (one ``<item> <reason>`` line each, sorted,
    written atomically; an item already listed keeps its first reason). An item is an utterance id, or for
    stage 0 an image id or the corpus's own name of what was left out. Returns the file path."""
    merged = read_excluded(path)
    for utt, reason in reasons.items():
        merged.setdefault(utt, " ".join(str(reason).split()) or "excluded")
    f = os.path.join(os.fspath(path), EXCLUDED_FILE)
    write_kv(f, merged)
    return f


def remove_utterances(path: Union[str, os.PathLike], reasons: Mapping[str, str]) -> Dict[str, str]:
    """Drop the utterances ``reasons`` names from the data dir ``path`` in place (a backup first, the reasons
    added to ``excluded.txt``); unused images leave ``img.scp``, ``spk2utt`` is rebuilt. Returns
    ``{"backup": dir, "excluded": file}``. ``DataError`` if no utterance would remain."""
    path = os.fspath(path)
    d = DataDir(path)
    keep = [u for u in d.utts if u not in reasons]
    if not keep:
        raise DataError(f"{path}: excluding the bad utterances would leave none ({len(reasons)} excluded)")
    backup = backup_data_dir(path)
    excluded = add_excluded(path, reasons)
    durs = d.utt2dur
    images = {d.utt2img[u] for u in keep}
    write_data_dir(path, {u: d.wav[u] for u in keep}, {u: d.text[u] for u in keep},
                   {u: d.utt2spk[u] for u in keep}, {u: d.utt2img[u] for u in keep},
                   {i: d.img[i] for i in images}, None if durs is None else {u: durs[u] for u in keep})
    return {"backup": backup, "excluded": excluded}


_PROBLEM_KEY = re.compile(r"^.*?:(\d+): (\S+): ")


def _read_lenient(path: str, allow_empty: bool, dropped: List[str],
                  bad_keys: Dict[str, str]) -> Dict[str, Tuple[int, str]]:
    """``{key: (line, value)}`` of ``path`` without malformed lines and identical duplicates (noted in
    ``dropped``; a malformed line's problem is also kept in ``bad_keys[key]``)."""
    entries, problems = parse_entries(path, allow_empty=allow_empty)
    dropped += problems
    for problem in problems:
        m = _PROBLEM_KEY.match(problem[len(path):]) if problem.startswith(path) else None
        if m:
            bad_keys.setdefault(m.group(2), problem)
    out: Dict[str, Tuple[int, str]] = {}
    for lineno, key, value in entries:
        if key in out:
            if out[key][1] != value:
                raise DataError(f"{path}:{lineno}: {key}: duplicate key with a different value "
                                f"(first on line {out[key][0]}); fix it by hand")
            dropped.append(f"{path}:{lineno}: {key}: identical duplicate line removed")
            continue
        out[key] = (lineno, value)
    return out


def fix_data_dir(path: Union[str, os.PathLike], check_files: bool = False,
                 check_images: bool = False) -> Dict[str, int]:
    """Repair a data dir in place; its files are first copied to a new ``<dir>/.backup[.N]/``.

    Sorts every file; removes CRs, blank/malformed lines and identical duplicate lines; removes an
    incomplete ``utt2dur``; keeps only the utterances present in every utterance file with a non-empty
    caption and an image in ``img.scp`` (and, if ``check_files``, existing audio and image files; if
    ``check_images``, images that decode); drops unused images; rebuilds ``spk2utt``. Every dropped
    utterance is listed with its reason (``file:line: ...``) in ``<dir>/excluded.txt``. A key repeated with
    different values, a missing required file or an empty result is a ``DataError`` and changes nothing.
    Returns ``{"kept": n, "removed": m}``.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DataError(f"{path}: data dir not found")
    for name in ("wav.scp", "text", "utt2spk", "utt2img", "img.scp"):
        if not os.path.isfile(os.path.join(path, name)):
            raise DataError(f"{os.path.join(path, name)}: missing (required file); cannot fix")
    notes: List[str] = []
    tables: Dict[str, Dict[str, Tuple[int, str]]] = {}
    bad_lines: Dict[str, Dict[str, str]] = {}
    for name in UTT_FILES + ("img.scp",):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            bad_lines[name] = {}
            tables[name] = _read_lenient(f, allow_empty=(name == "text"), dropped=notes, bad_keys=bad_lines[name])

    def where(name: str, key: str) -> str:
        return f"{os.path.join(path, name)}:{tables[name][key][0]}"

    img = dict(tables["img.scp"])
    bad_image: Dict[str, str] = {}
    if check_files or check_images:
        for i, (_, p) in sorted(img.items()):
            problem = image_problem(p) if check_images else (None if os.path.isfile(p) else f"file not found: {p}")
            if problem:
                bad_image[i] = f"{where('img.scp', i)}: {i}: {problem}"
                notes.append(bad_image[i])
                del img[i]
    utts = set(tables["wav.scp"])
    if "utt2dur" in tables and utts - set(tables["utt2dur"]):
        notes.append(f"{path}/utt2dur: incomplete, removed (stage 1 / format_audio rewrites it)")
        del tables["utt2dur"]
    reasons: Dict[str, str] = {}
    for name in UTT_FILES[1:]:
        if name in tables:
            for u in sorted(utts - set(tables[name]), key=sort_key):
                reasons[u] = bad_lines[name].get(u) or f"{os.path.join(path, name)}: {u}: missing"
            utts -= set(reasons)
    for u in sorted(utts, key=sort_key):
        text, image, audio = tables["text"][u][1], tables["utt2img"][u][1], tables["wav.scp"][u][1]
        if not text.strip():
            reasons[u] = f"{where('text', u)}: {u}: empty caption"
        elif image in bad_image:
            reasons[u] = bad_image[image]
        elif image not in img:
            reasons[u] = f"{where('utt2img', u)}: {u}: image {image} not in img.scp"
        elif check_files and not os.path.isfile(audio):
            reasons[u] = f"{where('wav.scp', u)}: {u}: audio file not found: {audio}"
        elif "utt2dur" in tables and _positive_float(tables["utt2dur"][u][1]) is None:
            reasons[u] = f"{where('utt2dur', u)}: {u}: bad duration {tables['utt2dur'][u][1]!r}"
    utts -= set(reasons)
    notes += [f"{u}: removed: {r}" for u, r in sorted(reasons.items())]
    if not utts:
        raise DataError(f"{path}: fixing would remove every utterance:\n  " + "\n  ".join(notes[:MAX_SHOWN]))
    total = len(tables["wav.scp"])
    backup = backup_data_dir(path)
    if reasons:
        add_excluded(path, reasons)
    used = {tables["utt2img"][u][1] for u in utts}
    pick = {name: {u: t[u][1] for u in utts} for name, t in tables.items() if name in UTT_FILES}
    durs = pick.get("utt2dur")
    write_data_dir(
        path,
        pick["wav.scp"],
        pick["text"],
        pick["utt2spk"],
        pick["utt2img"],
        {i: img[i][1] for i in used},
        None if durs is None else {u: float(v) for u, v in durs.items()},
    )
    for note in notes[:MAX_SHOWN]:
        log.warning("fix: %s", note)
    if len(notes) > MAX_SHOWN:
        log.warning("fix: ... and %d more", len(notes) - MAX_SHOWN)
    log.info("fix: %s: kept %d of %d utterance(s)%s; originals in %s", path, len(utts), total,
             f", excluded ones listed in {os.path.join(path, EXCLUDED_FILE)}" if reasons else "", backup)
    return {"kept": len(utts), "removed": total - len(utts)}


# ---------------------------------------------------------------------------------------------- command line
def _read_list(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [line.split()[0] for line in f if line.strip()]


def _select(d: DataDir, args: argparse.Namespace) -> List[str]:
    utts = d.utts
    if args.utt_list:
        return _read_list(args.utt_list)
    if args.spk_list:
        speakers = set(_read_list(args.spk_list))
        return [u for u in utts if d.utt2spk[u] in speakers]
    if args.first is not None:
        return utts[: args.first]
    if args.last is not None:
        return utts[len(utts) - args.last :] if args.last else []
    if args.random is not None:
        return random.Random(args.seed).sample(utts, min(args.random, len(utts)))
    durs = d.utt2dur
    if durs is None:
        raise DataError(f"{d.path}: --shortest needs utt2dur (run stage 1 / format_audio first)")
    return sorted(utts, key=lambda u: (durs[u], sort_key(u)))[: args.shortest]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m speechclip_plus.data.datadir", description="Data-dir surgery (see utils/*.sh)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("subset", help="copy a subset of the utterances of a data dir")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--utt-list", "--utt_list", dest="utt_list", help="file whose first field is an utt id")
    how.add_argument("--spk-list", "--spk_list", dest="spk_list", help="file whose first field is a speaker id")
    how.add_argument("--first", type=int, help="the first N utterances (LC_ALL=C order)")
    how.add_argument("--last", type=int, help="the last N utterances")
    how.add_argument("--random", type=int, help="N utterances drawn at random (see --seed)")
    how.add_argument("--shortest", type=int, help="the N shortest utterances (needs utt2dur)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random")
    p.add_argument("src")
    p.add_argument("dest")
    p = sub.add_parser("combine", help="union of data dirs")
    p.add_argument("dest")
    p.add_argument("srcs", nargs="+")
    p = sub.add_parser("fix", help="sort, drop inconsistent utterances, rebuild spk2utt (backup in .backup/, "
                                   "dropped utterances in excluded.txt)")
    p.add_argument("--check-files", "--check_files", dest="check_files", action="store_true",
                   help="also drop utterances whose audio or image file is missing")
    p.add_argument("--check-images", "--check_images", dest="check_images", action="store_true",
                   help="also drop utterances whose image does not decode (slow)")
    p.add_argument("dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    for n in ("first", "last", "random", "shortest"):
        if getattr(args, n, None) is not None and getattr(args, n) < 0:
            parser.error(f"--{n} must be >= 0")
    try:
        if args.command == "subset":
            n = subset_data_dir(args.src, args.dest, _select(DataDir(args.src), args))
            log.info("subset: %d utterance(s) of %s -> %s", n, args.src, args.dest)
        elif args.command == "combine":
            n = combine_data_dirs(args.dest, args.srcs)
            log.info("combine: %d utterance(s) from %d dir(s) -> %s", n, len(args.srcs), args.dest)
        else:
            fix_data_dir(args.dir, check_files=args.check_files, check_images=args.check_images)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
