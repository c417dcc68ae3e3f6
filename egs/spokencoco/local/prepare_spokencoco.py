#!/usr/bin/env python3
"""Stage 0 of egs/spokencoco: SpokenCOCO + MSCOCO 2014 images + the Karpathy split -> Kaldi data dirs.

    python local/prepare_spokencoco.py --spokencoco $SPOKENCOCO --mscoco $MSCOCO \
        [--karpathy_split $KARPATHY_SPLIT] [--split_source auto|karpathy|ksplit] --out_dir data

Inputs
  --spokencoco  where SpokenCOCO.tar.gz was unpacked: SpokenCOCO/ holding SpokenCOCO_train.json,
                SpokenCOCO_val.json and wavs/ (the SpokenCOCO/ folder itself is accepted too). Each json
                holds ``{"data": [{"image": "val2014/COCO_val2014_000000123456.jpg", "captions": [{"text",
                "speaker", "uttid", "wav": "wavs/val/0/<speaker>-<...>.wav"}, ...]}, ...]}``; wav paths are
                relative to SpokenCOCO/.
  --mscoco      the folder holding the COCO 2014 images train2014/ and val2014/ (json "image" is relative to it).
  --karpathy_split  dataset_coco.json of the Karpathy split: ``{"images": [{"filename", "split"}, ...]}`` with
                split train | restval | val | test. Sets: train = train + restval, dev = val, test = test.
  Alternative (``--split_source ksplit``, or ``auto`` when dataset_coco.json is absent): the per-split files
  SpokenCOCO/SpokenCOCO_ksplit_{train,val,test}.json used by the reference (same entry format; a numeric
  ``reassign_id`` may be present and is ignored), val -> dev.

Output per set: data/<set>/{wav.scp,text,utt2spk,spk2utt,utt2img,img.scp}, absolute paths, LC_ALL=C order.
  utterance id  the wav name without .wav, which SpokenCOCO already starts with "<speaker>-" (else it is
                prefixed), e.g. m071506418gb9vo0w5xq3-3LUY3GC63Z0R9PYEETJGN5HO4UEP7B_325114_629297
  speaker id    the caption's "speaker" field (else the wav name up to the first "-")
  image id      the image name without .jpg, e.g. COCO_val2014_000000325114 (unique across train2014/val2014)
  text          the caption, lower-cased (as the reference), whitespace collapsed

Nothing is left out silently (``speechclip_plus.data.corpus``). No known quirk of the distribution leaves
anything out (see KNOWN QUIRKS below), so data/local/skipped.tsv lists nothing; anything that would leave out an
utterance, image or caption stops with exit 1 and one line per problem (``<file>: <entry>: <item>: <what and
what to do>``), unless ``--skip_bad true``, which lists each excluded item in data/<set>/excluded.txt
(data/local/excluded.txt for an item of no set). Faults: a wav missing, unreadable or empty; an image missing
or not decodable; an empty caption; a caption without text; an image outside the split; an image of the
Karpathy split without any spoken caption; a repeated utterance id; an image given two sets; a json file that
is not valid UTF-8 (or --encoding: a json file cannot be read in part, so this one stops even with
--skip_bad). An entry without the fields used is an error in any case. Wavs and images are checked in --nj
processes. Exit 1 with a message naming what to download and which variable to set when a part of the corpus
is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Dict, Iterable, Optional, Sequence, Tuple

from speechclip_plus.data.corpus import CorpusWriter, add_arguments
from speechclip_plus.data.datadir import DataError

SETS = ("train", "dev", "test")
KARPATHY_TO_SET = {"train": "train", "restval": "train", "val": "dev", "test": "test"}
KSPLIT_FILES = {"train": "SpokenCOCO_ksplit_train.json", "dev": "SpokenCOCO_ksplit_val.json",
                "test": "SpokenCOCO_ksplit_test.json"}
ORIGINAL_FILES = ("SpokenCOCO_train.json", "SpokenCOCO_val.json")

# KNOWN QUIRKS of the distribution: none leaves anything out, so nothing is skipped. The specifics handled here
# change no item: the Karpathy split (caption_datasets.zip, dataset_coco.json) names all 123,287 COCO 2014
# images (82,783 train2014 + 40,504 val2014) as train 113,287 (its "train" + "restval"), val 5,000 and test
# 5,000, while SpokenCOCO's own two json files follow COCO's folders; COCO images have 4 to 7 captions, and
# SpokenCOCO speaks a varying number of them; SpokenCOCO stores the text in capitals; the reference's
# SpokenCOCO_ksplit_*.json files carry a "reassign_id" that is not needed.

DOWNLOAD_SPOKENCOCO = """\
SpokenCOCO was not found ({what}).
Download SpokenCOCO.tar.gz (spoken captions of MSCOCO, Hsu et al. 2021; MIT CSAIL) from
  https://data.csail.mit.edu/placesaudio/SpokenCOCO.tar.gz
unpack it (tar xzf SpokenCOCO.tar.gz, which creates SpokenCOCO/) and set SPOKENCOCO to the folder holding
SpokenCOCO/: SPOKENCOCO=/path/to/dir ./run.sh (or edit db.sh). It is over 600,000 utterances (about 740 hours
of 16 kHz speech), tens of GB."""
DOWNLOAD_MSCOCO = """\
The MSCOCO 2014 images were not found ({what}).
Download train2014.zip and val2014.zip from the COCO download page (https://cocodataset.org/#download):
  http://images.cocodataset.org/zips/train2014.zip (about 13 GB), http://images.cocodataset.org/zips/val2014.zip
  (about 6 GB)
unzip both in one folder (it then holds train2014/ and val2014/) and set MSCOCO to it: MSCOCO=/path ./run.sh."""
DOWNLOAD_KARPATHY = """\
The Karpathy split was not found ({what}).
Download caption_datasets.zip from Andrej Karpathy's "Deep Visual-Semantic Alignments" page
  https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip
unzip it and set KARPATHY_SPLIT to its dataset_coco.json: KARPATHY_SPLIT=/path/dataset_coco.json ./run.sh.
(Alternatively put the reference's per-split files SpokenCOCO_ksplit_{{train,val,test}}.json in SpokenCOCO/.)"""


class CorpusMissing(RuntimeError):
    """A part of the corpus is not where the db.sh variables point."""


class FormatError(ValueError):
    """A corpus file does not have the expected format; the message names the file and entry."""


def find_spokencoco_dir(root: str) -> str:
    """The folder holding the SpokenCOCO json files: ``root/SpokenCOCO`` or ``root`` itself."""
    if not os.path.isdir(root):
        raise CorpusMissing(DOWNLOAD_SPOKENCOCO.format(what=f"SPOKENCOCO={root}: no such directory"))
    for d in (os.path.join(root, "SpokenCOCO"), root):
        names = set(os.listdir(d)) if os.path.isdir(d) else set()
        if set(ORIGINAL_FILES) <= names or set(KSPLIT_FILES.values()) <= names:
            return d
    raise CorpusMissing(DOWNLOAD_SPOKENCOCO.format(
        what=f"no {' / '.join(ORIGINAL_FILES)} in {root}/SpokenCOCO or {root}"))


def load_json(path: str, encoding: str = "utf-8") -> dict:
    """The json object in ``path``; a file that is not valid ``encoding`` or not JSON is a ``FormatError``
    naming the line (a json file cannot be read in part, so ``--skip_bad`` does not help here)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        label = "UTF-8" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
        near = raw[max(0, e.start - 30):e.start + 10].decode(encoding, "replace")
        raise FormatError(f"{path}:{line}: not valid {label} (bad byte at column {column}, in {near!r}): correct "
                          "the file, or pass --encoding with its encoding") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: top level must be an object")
    return data


class Split:
    """The Karpathy split of ``dataset_coco.json``: ``set_of[file name]``, ``where[file name]`` (``path:
    images[k]``), ``path_of[file name]`` (``<folder>/<file name>``) and ``twice[file name]`` (``(where,
    problem)``: the image has two splits)."""

    def __init__(self, path: str, encoding: str = "utf-8"):
        images = load_json(path, encoding).get("images")
        if not isinstance(images, list):
            raise FormatError(f"{path}: no 'images' list (is this the Karpathy dataset_coco.json?)")
        self.set_of: Dict[str, str] = {}
        self.where: Dict[str, str] = {}
        self.path_of: Dict[str, str] = {}
        self.twice: Dict[str, Tuple[str, str]] = {}
        for k, img in enumerate(images):
            if not isinstance(img, dict) or "filename" not in img or "split" not in img:
                raise FormatError(f"{path}: images[{k}]: needs 'filename' and 'split'")
            if img["split"] not in KARPATHY_TO_SET:
                raise FormatError(f"{path}: images[{k}] ({img['filename']}): unknown split {img['split']!r}; "
                                  f"expected one of {', '.join(KARPATHY_TO_SET)}")
            name, dset = os.path.basename(img["filename"]), KARPATHY_TO_SET[img["split"]]
            if name in self.set_of and self.set_of[name] != dset:
                problem = f"also in the {self.set_of[name]} set ({self.where[name]}): an image belongs to one split"
                self.twice.setdefault(name, (f"{path}: images[{k}]", problem))
            self.set_of.setdefault(name, dset)
            self.where.setdefault(name, f"{path}: images[{k}]")
            folder = img.get("filepath") or name.split("_")[1]  # COCO_<folder>_<id>.jpg
            self.path_of.setdefault(name, f"{folder}/{name}")


def entries(path: str, encoding: str = "utf-8") -> Iterable[Tuple[str, dict]]:
    """(``path: data[k]`` label, entry) of a SpokenCOCO json, checking the fields used (a caption's text may
    be missing: that is a fault of its utterance, not of the file)."""
    data = load_json(path, encoding).get("data")
    if not isinstance(data, list):
        raise FormatError(f"{path}: no 'data' list (is this a SpokenCOCO json?)")
    for k, entry in enumerate(data):
        where = f"{path}: data[{k}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) \
                or not isinstance(entry.get("captions"), list):
            raise FormatError(f"{where}: needs 'image' (string) and 'captions' (list)")
        for j, cap in enumerate(entry["captions"]):
            if not isinstance(cap, dict) or not isinstance(cap.get("wav"), str) \
                    or not isinstance(cap.get("text", ""), (str, type(None))):
                raise FormatError(f"{where}.captions[{j}]: needs a 'wav' string and a 'text' string")
        yield where, entry


def speaker_and_utt(cap: dict) -> Tuple[str, str]:
    """(speaker id, utterance id) of a caption: the ``speaker`` field and the wav name, speaker-prefixed."""
    stem = os.path.splitext(os.path.basename(cap["wav"]))[0]
    spk = cap.get("speaker") or stem.split("-", 1)[0]
    spk = re.sub(r"\s+", "_", str(spk))
    utt = stem if stem.startswith(f"{spk}-") else f"{spk}-{stem}"
    return spk, re.sub(r"\s+", "_", utt)


def resolve_split_source(sc_dir: str, mscoco: str, karpathy_split: Optional[str], split_source: str) -> str:
    """``karpathy`` or ``ksplit`` (``auto``: dataset_coco.json when it exists); ``CorpusMissing`` names what is
    missing."""
    have_karpathy = bool(karpathy_split) and os.path.isfile(karpathy_split)
    have_ksplit = all(os.path.isfile(os.path.join(sc_dir, f)) for f in KSPLIT_FILES.values())
    if split_source == "auto":
        split_source = "karpathy" if have_karpathy or not have_ksplit else "ksplit"
    if split_source == "karpathy":
        if not have_karpathy:
            raise CorpusMissing(DOWNLOAD_KARPATHY.format(what=f"KARPATHY_SPLIT={karpathy_split or '(empty)'}: "
                                                         "no such file"))
        for f in ORIGINAL_FILES:
            if not os.path.isfile(os.path.join(sc_dir, f)):
                raise CorpusMissing(DOWNLOAD_SPOKENCOCO.format(what=f"no {f} in {sc_dir}"))
    elif not have_ksplit:
        missing = [f for f in KSPLIT_FILES.values() if not os.path.isfile(os.path.join(sc_dir, f))]
        raise CorpusMissing(DOWNLOAD_KARPATHY.format(what=f"no {', '.join(missing)} in {sc_dir}"))
    for sub in ("train2014", "val2014"):
        if not os.path.isdir(os.path.join(mscoco, sub)):
            raise CorpusMissing(DOWNLOAD_MSCOCO.format(what=f"MSCOCO={mscoco}: no {sub}/ folder"))
    return split_source


def prepare(spokencoco: str, mscoco: str, karpathy_split: Optional[str], writer: CorpusWriter,
            split_source: str = "auto", encoding: str = "utf-8") -> Dict[str, str]:
    """Hand the corpus to ``writer`` (images, utterances, faults); returns the facts for the summary file,
    among them the split source used."""
    sc_dir = os.path.abspath(find_spokencoco_dir(spokencoco))
    mscoco = os.path.abspath(mscoco)
    split_source = resolve_split_source(sc_dir, mscoco, karpathy_split, split_source)
    info = {"spokencoco": os.path.abspath(spokencoco), "mscoco": mscoco, "split_source": split_source}
    if split_source == "karpathy":
        split = Split(karpathy_split, encoding)
        info["karpathy_split"] = os.path.abspath(karpathy_split)
        sources = [(os.path.join(sc_dir, f), None) for f in ORIGINAL_FILES]
    else:
        split = None
        sources = [(os.path.join(sc_dir, f), s) for s, f in KSPLIT_FILES.items()]
    listed = [(where, entry, fixed) for path, fixed in sources for where, entry in entries(path, encoding)]

    set_of: Dict[str, str] = {}
    twice: Dict[str, Tuple[str, str]] = {}
    if split is not None:
        set_of, twice = split.set_of, split.twice
    else:  # the ksplit files: an image in two of them belongs to neither
        first: Dict[str, str] = {}
        for where, entry, fixed in listed:
            name = os.path.basename(entry["image"])
            if name in set_of and set_of[name] != fixed:
                twice.setdefault(name, (where, f"also in the {set_of[name]} set ({first[name]}): an image belongs "
                                               "to one split"))
            set_of.setdefault(name, fixed)
            first.setdefault(name, where)
    for name, (at, problem) in twice.items():
        writer.fault(name, problem, at)

    seen = set()
    for where, entry, _ in listed:
        name = os.path.basename(entry["image"])
        seen.add(name)
        dset = None if name in twice else set_of.get(name)
        image_id = os.path.splitext(name)[0]
        image_path = os.path.join(mscoco, entry["image"])
        known = writer.images[dset].get(image_id) if dset else None
        if name in twice:
            problem = f"its image {name} is in two splits (see that line)"
        elif dset is None:
            problem = (f"its image {name} is not in the Karpathy split ({karpathy_split}): the split file or the "
                       "SpokenCOCO json is not the official one")
        elif known and known[0] != image_path:
            problem = f"its image {image_id} is also given as {known[0]} ({known[1]}): keep one path"
        else:
            problem = None
            writer.add_image(dset, image_id, image_path, where)
        for j, cap in enumerate(entry["captions"]):
            at = f"{where}.captions[{j}]"
            spk, utt = speaker_and_utt(cap)
            if problem:
                writer.fault(utt, problem, at, dset)
            elif cap.get("text") is None:
                writer.fault(utt, "no transcription: the caption has no 'text'; restore the official SpokenCOCO "
                                  "json", at, dset)
            else:
                text = " ".join(cap["text"].lower().split())
                writer.add_utterance(dset, utt, os.path.join(sc_dir, cap["wav"]), text, spk, image_id, at)
    if split is not None:
        for name in sorted(set(split.set_of) - seen - set(twice)):
            writer.fault(os.path.splitext(name)[0], f"image of the Karpathy {split.set_of[name]} split without any "
                                                    "spoken caption: SpokenCOCO_{train,val}.json are not complete",
                         split.where[name], split.set_of[name])
    return info


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spokencoco", required=True, help="where SpokenCOCO.tar.gz was unpacked ($SPOKENCOCO)")
    parser.add_argument("--mscoco", required=True, help="folder holding train2014/ and val2014/ ($MSCOCO)")
    parser.add_argument("--karpathy_split", default="", help="dataset_coco.json ($KARPATHY_SPLIT)")
    parser.add_argument("--split_source", default="auto", choices=["auto", "karpathy", "ksplit"],
                        help="auto: dataset_coco.json when it exists, else SpokenCOCO_ksplit_*.json")
    parser.add_argument("--out_dir", default="data", help="parent of the data dirs")
    add_arguments(parser)
    args = parser.parse_args(argv)
    writer = CorpusWriter(SETS, skip_bad=args.skip_bad)
    try:
        info = prepare(args.spokencoco, args.mscoco, args.karpathy_split, writer, args.split_source, args.encoding)
        print(f"split source: {info['split_source']}")
        writer.check_media(args.nj, audio_fix="restore it from SpokenCOCO.tar.gz",
                           image_fix="restore it from train2014.zip / val2014.zip")
        writer.write(args.out_dir, "spokencoco_prep.json", info)
    except (CorpusMissing, FormatError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
