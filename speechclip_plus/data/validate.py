"""Data-dir validation: every problem of a data dir as ``file:line: key: what`` (``validate_data_dir``), raised
together (``check_data_dir``); ``image_problem`` tells whether one image decodes."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple, Union

from speechclip_plus.data.tables import (MAX_SHOWN, OPTIONAL_FILES, REQUIRED_FILES, UTT_FILES, DataError,
                                         _positive_float, _short, parse_entries, sort_key, spk2utt_from_utt2spk)


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
