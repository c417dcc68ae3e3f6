"""Data-dir surgery and repair: subset, combine, fix in place, and dropping utterances with a backup and a
reason in ``excluded.txt`` (the policy is described in ``speechclip_plus.data.datadir``)."""
from __future__ import annotations

import logging
import os
import re
import shutil
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from speechclip_plus.data.tables import (EXCLUDED_FILE, MAX_SHOWN, OPTIONAL_FILES, REQUIRED_FILES, UTT_FILES, DataDir,
                                         DataError, _positive_float, _short, parse_entries, read_kv, sort_key,
                                         write_data_dir, write_kv)
from speechclip_plus.data.validate import image_problem

log = logging.getLogger(__name__)


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
