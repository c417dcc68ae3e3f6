"""Stage 0's shared corpus writer: a corpus's sets -> Kaldi data dirs, with nothing left out silently.

Every recipe's ``local/data.sh`` (its ``prepare_*.py``) parses its own corpus layout and hands the result to a
``CorpusWriter``, which applies the data-integrity policy the same way for every corpus:

1. **Known quirks** of the official distribution (``skip``): left out, each listed by name in
   ``<out_dir>/local/skipped.tsv`` (``item<TAB>reason``, a header line first) and counted in the log.
2. **Faults** (``fault``; and the writer's own checks: a duplicate utterance id, an empty caption, an image
   of a set with no utterance, a wav whose header cannot be read or holds no samples, an image that is
   missing or does not decode): any of them stops ``write`` with ``CorpusFaults`` (the first ten lines
   ``<where>: <item>: <what>`` and the count) and nothing is written.
3. **--skip_bad** (``skip_bad=True``): faults become exclusions. An excluded image takes its utterances with
   it, and an image whose utterances are all excluded is excluded too. Each excluded item is listed with its
   reason in ``<out_dir>/<set>/excluded.txt`` (``<item> <reason>``, the format and writer of stages 1-2,
   ``datadir.add_excluded``), or in ``<out_dir>/local/excluded.txt`` when it belongs to no set; the log
   says how many and where.

Each set is written to a temporary directory renamed into place (leftovers of an interrupted run are removed
first), so a re-run after fixing the corpus replaces every output. Corpus files are only read.

    w = CorpusWriter(("train", "dev", "test"), skip_bad=False)
    w.skip("__MACOSX/", "macOS metadata of the zip archive")
    w.add_image("test", "img1", "/corpus/img1.jpg", where="/corpus/test.lst:3")
    w.add_utterance("test", "spk1-u1", wav="/corpus/u1.wav", text="a dog", speaker="spk1", image="img1",
                    where="/corpus/wav2txt.txt:8")
    w.fault("u2.wav", "no transcription: ...", where="/corpus/wav2txt.txt:9", dset="test")
    w.check_media(nj=4)               # every wav header and every image, in parallel processes
    w.write("data", summary_name="mycorpus_prep.json")
"""
from __future__ import annotations

import argparse
import codecs
import gc
import glob
import json
import multiprocessing
import os
import re
import shutil
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from speechclip_plus.data.datadir import (
    EXCLUDED_FILE,
    MAX_SHOWN,
    DataError,
    add_excluded,
    image_problem,
    sort_key,
    write_data_dir,
)
from speechclip_plus.io import atomic_write_text

SKIPPED_FILE = "skipped.tsv"
LOCAL_DIR = "local"


@dataclass(frozen=True)
class Fault:
    """A problem that would drop or change an item: ``<where>: <item>: <what>``.

    ``item`` is the key a user looks for (an utterance or image id of the data dir when there is one);
    ``dset`` the set it belongs to, or None when it belongs to no set.
    """

    item: str
    what: str
    where: str = ""
    dset: Optional[str] = None

    def __str__(self) -> str:
        return f"{self.where}: {self.item}: {self.what}" if self.where else f"{self.item}: {self.what}"


class CorpusFaults(DataError):
    """Stage 0 found faults and ``skip_bad`` is off: nothing was written."""


class _Utt(NamedTuple):  # a tuple of strings: untracked by the garbage collector, small
    wav: str
    text: str
    speaker: str
    image: str
    where: str


# ---------------------------------------------------------------------------------------------- media checks
def audio_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a usable audio file from its header (missing, unreadable, no samples), or None.
    Stage 1 reads every file in full later."""
    from speechclip_plus.data.audio import audio_duration

    try:
        seconds = audio_duration(path)
    except DataError as e:
        return str(e)
    return None if seconds > 0 else f"{path}: audio file has no samples"


def _media_problem(job: Tuple[str, str]) -> Optional[str]:
    kind, path = job
    return image_problem(path) if kind == "image" else audio_problem(path)


def parallel_map(fn: Callable, items: Sequence, nj: int = 1, desc: str = "") -> List:
    """``[fn(x) for x in items]`` in ``nj`` forked processes (in order; a progress bar on a terminal).

    The parent's objects are frozen out of the garbage collector while the workers run (``gc.freeze``), so a
    worker's collections neither walk nor copy-on-write the parent's heap, whatever its size.
    """
    from tqdm import tqdm

    bar = tqdm(total=len(items), desc=desc, unit="file", disable=None, leave=False)
    out = []
    if nj <= 1 or len(items) < 2:
        for x in items:
            out.append(fn(x))
            bar.update()
    else:
        chunk = max(1, min(256, len(items) // (4 * nj)))
        gc.freeze()
        try:
            with ProcessPoolExecutor(max_workers=nj, mp_context=multiprocessing.get_context("fork")) as ex:
                for r in ex.map(fn, items, chunksize=chunk):
                    out.append(r)
                    bar.update()
        finally:
            gc.unfreeze()
    bar.close()
    return out


def check_images(images: Mapping[str, str], nj: int = 1) -> Dict[str, str]:
    """``{image id: problem}`` for the images (id -> path) that are missing or do not decode
    (``datadir.image_problem``), checked in ``nj`` processes."""
    ids = sorted(images, key=sort_key)
    problems = parallel_map(_media_problem, [("image", images[i]) for i in ids], nj, "check images")
    return {i: p for i, p in zip(ids, problems) if p}


# ---------------------------------------------------------------------------------------------- options
def add_arguments(parser) -> None:
    """The policy's options for a ``prepare_*.py`` command line: ``--skip_bad true|false``, ``--nj N``,
    ``--encoding NAME`` (of the corpus's text files)."""
    parser.add_argument("--skip_bad", type=_bool, default=False, metavar="true|false",
                        help="leave out faulty items instead of stopping, each listed in <out_dir>/<set>/excluded.txt")
    parser.add_argument("--nj", type=int, default=1, help="processes for checking the wav and image files")
    parser.add_argument("--encoding", type=_encoding, default="utf-8",
                        help="encoding of the corpus's text files (a line that does not decode is a fault)")


def _bool(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return value.lower() == "true"


def _encoding(value: str) -> str:
    try:
        codecs.lookup(value)
    except LookupError:
        raise argparse.ArgumentTypeError(f"unknown encoding {value!r} (e.g. utf-8, latin-1, cp1252)") from None
    return value


# ---------------------------------------------------------------------------------------------- reading
def read_lines(path: str, encoding: str = "utf-8") -> Tuple[List[Tuple[int, str]], List[Tuple[int, str, str]]]:
    """The non-blank lines of a text file as ``(line number, text)`` (a CR before the LF is dropped), and the
    lines that are not valid ``encoding`` as ``(line number, text with U+FFFD for the bad bytes, problem)``:
    nothing is guessed (no silent Latin-1 fallback)."""
    label = "UTF-8" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    good: List[Tuple[int, str]] = []
    bad: List[Tuple[int, str, str]] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\n").rstrip(b"\r")
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as e:
                bad.append((lineno, raw.decode(encoding, "replace"),
                            f"not valid {label} (bad byte at column {e.start + 1})"))
                continue
            if line.strip():
                good.append((lineno, line))
    return good, bad


# ---------------------------------------------------------------------------------------------- the writer
class CorpusWriter:
    """Collects the sets of one corpus preparation, its known quirks and faults, checks the media, and writes
    the data dirs (see the module docstring for the policy)."""

    def __init__(self, sets: Sequence[str], skip_bad: bool = False):
        self.sets = tuple(sets)
        self.skip_bad = skip_bad
        self.utts: Dict[str, Dict[str, _Utt]] = {s: {} for s in self.sets}
        self.images: Dict[str, Dict[str, Tuple[str, str]]] = {s: {} for s in self.sets}  # id -> (path, where)
        self.faults: List[Fault] = []
        self.skipped: List[Tuple[str, str]] = []
        self._utt_at: Dict[str, Tuple[str, str]] = {}  # utt -> (set, where) of its first occurrence
        self._image_set: Dict[str, str] = {}

    # -- input
    def skip(self, item: str, reason: str) -> None:
        """A known quirk of the distribution: left out, listed in ``local/skipped.tsv``."""
        self.skipped.append((item, reason))

    def fault(self, item: str, what: str, where: str = "", dset: Optional[str] = None) -> None:
        """Anything else that would drop or change ``item`` (an utterance or image id of ``dset`` is excluded
        under ``skip_bad``). ``what`` says what is wrong and what to do."""
        if dset is not None and dset not in self.utts:
            raise ValueError(f"unknown set {dset!r} (sets: {', '.join(self.sets)})")
        self.faults.append(Fault(item, what, where, dset))

    def add_image(self, dset: str, image_id: str, path: str, where: str = "") -> None:
        """Image ``image_id`` (absolute ``path``) belongs to ``dset``; adding it again with the same path is a
        no-op. An image in two sets is the caller's fault to report, so it is a ``ValueError`` here."""
        _check_token("image id", image_id)
        if self._image_set.setdefault(image_id, dset) != dset:
            raise ValueError(f"image {image_id} added to {dset} but already in {self._image_set[image_id]}")
        old = self.images[dset].setdefault(image_id, (path, where))
        if old[0] != path:
            raise ValueError(f"image {image_id} added with two paths: {old[0]}, {path}")

    def add_utterance(self, dset: str, utt: str, wav: str, text: str, speaker: str, image: str,
                      where: str = "") -> None:
        """Utterance ``utt`` of ``dset`` (its image added first). A repeated id or an empty caption is a fault."""
        for name, token in (("utterance id", utt), ("speaker id", speaker)):
            _check_token(name, token)
        if image not in self.images[dset]:
            raise ValueError(f"utterance {utt}: image {image} is not in the {dset} set (add_image first)")
        if utt in self._utt_at:
            first_set, first_where = self._utt_at[utt]
            self.fault(utt, f"duplicate utterance id (first at {first_where}): give each wav one entry", where,
                       first_set)
            return
        self._utt_at[utt] = (dset, where)
        self.utts[dset][utt] = _Utt(wav, text, speaker, image, where)
        if not text.strip():
            self.fault(utt, "empty caption: give it its text (or leave the entry out of the corpus)", where, dset)

    def check_media(self, nj: int = 1, audio_fix: str = "", image_fix: str = "") -> None:
        """Fault every wav whose header cannot be read or holds no samples (``audio_problem``; stage 1 reads
        the audio in full) and every image that is missing or does not decode (``datadir.image_problem``:
        Pillow's ``verify`` and a decode), in ``nj`` processes. ``audio_fix`` / ``image_fix`` (e.g. "restore
        it from flickr_audio.tar.gz") end each such fault's line."""
        fixes = {"audio": f"; {audio_fix}" if audio_fix else "", "image": f"; {image_fix}" if image_fix else ""}
        jobs, owners = [], []
        for s in self.sets:
            for i, (path, where) in self.images[s].items():
                jobs.append(("image", path))
                owners.append(Fault(i, "", where, s))
            for u, rec in self.utts[s].items():
                jobs.append(("audio", rec.wav))
                owners.append(Fault(u, "", rec.where, s))
        for (kind, _), owner, problem in zip(jobs, owners, parallel_map(_media_problem, jobs, nj, "check media")):
            if problem:
                self.fault(owner.item, problem + fixes[kind], owner.where, owner.dset)

    # -- output
    def write(self, out_dir: str, summary_name: str = "prep.json", info: Optional[Mapping] = None,
              log: Callable[[str], None] = print) -> dict:
        """Write ``<out_dir>/<set>/`` for every set, ``<out_dir>/local/skipped.tsv`` and the summary
        ``<out_dir>/local/<summary_name>`` (``info`` added to it); returns the summary.

        ``CorpusFaults`` (nothing written) when there are faults and ``skip_bad`` is off; ``DataError`` when a
        set would be left without utterances.
        """
        for s in self.sets:
            used = {rec.image for rec in self.utts[s].values()}
            for i, (_, where) in self.images[s].items():
                if i not in used:
                    self.fault(i, f"image of the {s} set without any utterance (the {s} images would lose it)",
                               where, s)
        if self.faults and not self.skip_bad:
            raise CorpusFaults(self._faults_message(out_dir))
        excluded, local = self._exclusions()
        kept = {s: {u: rec for u, rec in self.utts[s].items() if u not in excluded[s]} for s in self.sets}
        for s in self.sets:
            if not kept[s]:
                left = f" once {len(excluded[s])} item(s) are excluded" if excluded[s] else ""
                raise DataError(f"{os.path.join(out_dir, s)}: no utterance in the {s} set{left}; nothing was "
                                "written")

        os.makedirs(os.path.join(out_dir, LOCAL_DIR), exist_ok=True)
        summary: dict = {**(info or {}), "skip_bad": self.skip_bad, "sets": {}}
        for s in self.sets:
            utts = kept[s]
            images = {rec.image for rec in utts.values()}

            def fill(tmp: str) -> None:
                write_data_dir(tmp, {u: r.wav for u, r in utts.items()}, {u: r.text for u, r in utts.items()},
                               {u: r.speaker for u, r in utts.items()}, {u: r.image for u, r in utts.items()},
                               {i: self.images[s][i][0] for i in images})
                if excluded[s]:
                    add_excluded(tmp, excluded[s])

            _replace_dir(out_dir, s, fill)
            speakers = len({r.speaker for r in utts.values()})
            summary["sets"][s] = {"utterances": len(utts), "images": len(images), "speakers": speakers,
                                  "excluded": len(excluded[s])}
            log(f"{os.path.join(out_dir, s)}: {len(utts)} utterances, {len(images)} images, {speakers} speakers")
        local_excluded = os.path.join(out_dir, LOCAL_DIR, EXCLUDED_FILE)
        if os.path.exists(local_excluded):  # from an earlier run
            os.remove(local_excluded)
        if local:
            add_excluded(os.path.join(out_dir, LOCAL_DIR), local)
        skipped_tsv = os.path.join(out_dir, LOCAL_DIR, SKIPPED_FILE)
        rows = sorted({(_tsv(item), _tsv(reason)) for item, reason in self.skipped}, key=lambda r: (r[1], r[0]))
        atomic_write_text(skipped_tsv, "item\treason\n" + "".join(f"{i}\t{r}\n" for i, r in rows))
        counts = Counter(reason for _, reason in rows)
        summary["skipped"] = dict(sorted(counts.items()))
        summary["excluded_no_set"] = len(local)
        atomic_write_text(os.path.join(out_dir, LOCAL_DIR, summary_name), json.dumps(summary, indent=1) + "\n")
        if rows:
            log(f"skipped {len(rows)} known quirk(s) of the distribution, listed in {skipped_tsv}:")
            for reason, n in counts.items():
                log(f"  {n} x {reason}")
        n_excluded = sum(len(e) for e in excluded.values()) + len(local)
        if n_excluded:
            where = [os.path.join(out_dir, s, EXCLUDED_FILE) for s in self.sets if excluded[s]]
            where += [local_excluded] if local else []
            log(f"--skip_bad: excluded {n_excluded} item(s) for {len(self.faults)} fault(s), listed with their "
                f"reasons in {', '.join(where)}")
        return summary

    # -- helpers
    def _faults_message(self, out_dir: str) -> str:
        lines = [str(f) for f in self.faults]
        shown = "\n  ".join(lines[:MAX_SHOWN])
        more = f"\n  ... and {len(lines) - MAX_SHOWN} more" if len(lines) > MAX_SHOWN else ""
        return (f"{len(lines)} problem(s) in the corpus; nothing was written:\n  {shown}{more}\n"
                "Fix them as each line says and run stage 0 again, or pass --skip_bad true to leave these items "
                f"out (each is then listed by name in {out_dir}/<set>/{EXCLUDED_FILE}, or in "
                f"{out_dir}/{LOCAL_DIR}/{EXCLUDED_FILE} when it belongs to no set).")

    def _exclusions(self) -> Tuple[Dict[str, Dict[str, str]], Dict[str, str]]:
        """(``{set: {item: reason}}``, ``{item: reason}`` of items in no set): the faulted items, the
        utterances of excluded images, and images whose utterances are all excluded."""
        excluded: Dict[str, Dict[str, str]] = {s: {} for s in self.sets}
        local: Dict[str, str] = {}
        for f in self.faults:
            (excluded[f.dset] if f.dset else local).setdefault("_".join(f.item.split()), str(f))
        for s in self.sets:
            ex = excluded[s]
            for u, rec in self.utts[s].items():
                if u not in ex and rec.image in ex:
                    ex[u] = ex[rec.image]
            used = {rec.image for u, rec in self.utts[s].items() if u not in ex}
            for i in self.images[s]:
                if i not in used and i not in ex:
                    ex[i] = f"{i}: all its utterances were excluded"
        return excluded, local


_TOKEN = re.compile(r"\S+")


def _check_token(name: str, value: str) -> None:
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"{name} {value!r} must be non-empty without whitespace")


def _tsv(text: str) -> str:
    return " ".join(str(text).split())


def _replace_dir(out_dir: str, name: str, fill: Callable[[str], object]) -> None:
    """Build ``out_dir/name`` as ``.<name>.tmp<pid>`` with ``fill(tmp)``, then swap it in; leftovers of an
    interrupted earlier run (``.<name>.tmp*``, ``.<name>.old*``) are removed first."""
    pattern = os.path.join(glob.escape(out_dir), f".{glob.escape(name)}")
    for stale in glob.glob(pattern + ".tmp*") + glob.glob(pattern + ".old*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".{name}.tmp{os.getpid()}")
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(final):
        old = os.path.join(out_dir, f".{name}.old{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old:
        shutil.rmtree(old)
