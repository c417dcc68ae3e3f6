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
Each set goes to a temporary directory renamed into place. Entries that cannot be used are skipped and counted
(image outside the split, image or wav file not found, empty caption); the counts go to stdout and
data/local/spokencoco_prep.json. Exit 1 with a message naming what to download and which variable to set
when a part of the corpus is missing.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
from collections import Counter
from typing import Dict, Iterable, List, Optional, Tuple

from speechclip_plus.data.datadir import write_data_dir
from speechclip_plus.io import atomic_write_text

SETS = ("train", "dev", "test")
KARPATHY_TO_SET = {"train": "train", "restval": "train", "val": "dev", "test": "test"}
KSPLIT_FILES = {"train": "SpokenCOCO_ksplit_train.json", "dev": "SpokenCOCO_ksplit_val.json",
                "test": "SpokenCOCO_ksplit_test.json"}
ORIGINAL_FILES = ("SpokenCOCO_train.json", "SpokenCOCO_val.json")
SKIP_REASONS = (  # what is left out, counted in data/local/spokencoco_prep.json
    "images_not_in_karpathy_split",  # SpokenCOCO images that dataset_coco.json does not list
    "utterances_of_images_not_in_split",
    "karpathy_images_without_speech",  # dataset_coco.json images with no SpokenCOCO entry
    "images_not_found",  # image file missing under MSCOCO
    "utterances_of_images_not_found",
    "wavs_not_found",
    "empty_captions",
)

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


def load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: top level must be an object")
    return data


def karpathy_splits(path: str) -> Dict[str, str]:
    """``{image file name: set}`` from dataset_coco.json (train/restval -> train, val -> dev, test -> test)."""
    data = load_json(path)
    images = data.get("images")
    if not isinstance(images, list):
        raise FormatError(f"{path}: no 'images' list (is this the Karpathy dataset_coco.json?)")
    out: Dict[str, str] = {}
    for k, img in enumerate(images):
        if not isinstance(img, dict) or "filename" not in img or "split" not in img:
            raise FormatError(f"{path}: images[{k}]: needs 'filename' and 'split'")
        if img["split"] not in KARPATHY_TO_SET:
            raise FormatError(f"{path}: images[{k}] ({img['filename']}): unknown split {img['split']!r}; "
                              f"expected one of {', '.join(KARPATHY_TO_SET)}")
        out[os.path.basename(img["filename"])] = KARPATHY_TO_SET[img["split"]]
    return out


def entries(path: str) -> Iterable[Tuple[str, dict]]:
    """(``path: data[k]`` label, entry) of a SpokenCOCO json, checking the fields used."""
    data = load_json(path).get("data")
    if not isinstance(data, list):
        raise FormatError(f"{path}: no 'data' list (is this a SpokenCOCO json?)")
    for k, entry in enumerate(data):
        where = f"{path}: data[{k}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) \
                or not isinstance(entry.get("captions"), list):
            raise FormatError(f"{where}: needs 'image' (string) and 'captions' (list)")
        for j, cap in enumerate(entry["captions"]):
            if not isinstance(cap, dict) or not all(isinstance(cap.get(k), str) for k in ("wav", "text")):
                raise FormatError(f"{where}.captions[{j}]: needs 'wav' and 'text' strings")
        yield where, entry


def speaker_and_utt(cap: dict) -> Tuple[str, str]:
    """(speaker id, utterance id) of a caption: the ``speaker`` field and the wav name, speaker-prefixed."""
    stem = os.path.splitext(os.path.basename(cap["wav"]))[0]
    spk = cap.get("speaker") or stem.split("-", 1)[0]
    spk = re.sub(r"\s+", "_", str(spk))
    utt = stem if stem.startswith(f"{spk}-") else f"{spk}-{stem}"
    return spk, re.sub(r"\s+", "_", utt)


def prepare(spokencoco: str, mscoco: str, karpathy_split: Optional[str], split_source: str = "auto"
            ) -> Tuple[Dict[str, dict], Dict[str, int], str]:
    """Tables ``{set: {wav, text, utt2spk, utt2img, img}}``, skipped counts, and the split source used."""
    sc_dir = os.path.abspath(find_spokencoco_dir(spokencoco))
    mscoco = os.path.abspath(mscoco)
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

    if split_source == "karpathy":
        split_of = karpathy_splits(karpathy_split)
        sources = [(os.path.join(sc_dir, f), None) for f in ORIGINAL_FILES]
    else:
        split_of = None
        sources = [(os.path.join(sc_dir, f), s) for s, f in KSPLIT_FILES.items()]

    skipped: Counter = Counter({reason: 0 for reason in SKIP_REASONS})
    tables = {s: {"wav": {}, "text": {}, "utt2spk": {}, "utt2img": {}, "img": {}} for s in SETS}
    first_seen: Dict[str, str] = {}
    seen_images = set()
    for path, fixed_set in sources:
        for where, entry in entries(path):
            name = os.path.basename(entry["image"])
            seen_images.add(name)
            dset = fixed_set if split_of is None else split_of.get(name)
            if dset is None:
                skipped["images_not_in_karpathy_split"] += 1
                skipped["utterances_of_images_not_in_split"] += len(entry["captions"])
                continue
            image_path = os.path.join(mscoco, entry["image"])
            if not os.path.isfile(image_path):
                skipped["images_not_found"] += 1
                skipped["utterances_of_images_not_found"] += len(entry["captions"])
                continue
            image_id = os.path.splitext(name)[0]
            t = tables[dset]
            for j, cap in enumerate(entry["captions"]):
                text = " ".join(cap["text"].lower().split())
                wav_path = os.path.join(sc_dir, cap["wav"])
                if not text:
                    skipped["empty_captions"] += 1
                    continue
                if not os.path.isfile(wav_path):
                    skipped["wavs_not_found"] += 1
                    continue
                spk, utt = speaker_and_utt(cap)
                if utt in first_seen:
                    raise FormatError(f"{where}.captions[{j}]: utterance {utt} ({cap['wav']}) already seen at "
                                      f"{first_seen[utt]}")
                first_seen[utt] = f"{where}.captions[{j}]"
                t["wav"][utt] = wav_path
                t["text"][utt] = text
                t["utt2spk"][utt] = spk
                t["utt2img"][utt] = image_id
                t["img"][image_id] = image_path
    if split_of is None:
        for reason in ("images_not_in_karpathy_split", "utterances_of_images_not_in_split",
                       "karpathy_images_without_speech"):
            del skipped[reason]
    else:
        skipped["karpathy_images_without_speech"] = len(set(split_of) - seen_images)
    return tables, {k: v for k, v in sorted(skipped.items())}, split_source


def write_set(out_dir: str, name: str, table: dict) -> None:
    """Write data dir ``out_dir/name`` through a temporary directory renamed into place.

    Leftovers of an interrupted earlier run (``.<name>.tmp<pid>``, ``.<name>.old<pid>``) are removed first.
    """
    final = os.path.join(out_dir, name)
    for stale in glob.glob(os.path.join(glob.escape(out_dir), f".{glob.escape(name)}.tmp*")) + \
            glob.glob(os.path.join(glob.escape(out_dir), f".{glob.escape(name)}.old*")):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = os.path.join(out_dir, f".{name}.tmp{os.getpid()}")
    write_data_dir(tmp, table["wav"], table["text"], table["utt2spk"], table["utt2img"], table["img"])
    old = None
    if os.path.exists(final):
        old = os.path.join(out_dir, f".{name}.old{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old:
        shutil.rmtree(old)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spokencoco", required=True, help="where SpokenCOCO.tar.gz was unpacked ($SPOKENCOCO)")
    parser.add_argument("--mscoco", required=True, help="folder holding train2014/ and val2014/ ($MSCOCO)")
    parser.add_argument("--karpathy_split", default="", help="dataset_coco.json ($KARPATHY_SPLIT)")
    parser.add_argument("--split_source", default="auto", choices=["auto", "karpathy", "ksplit"],
                        help="auto: dataset_coco.json when it exists, else SpokenCOCO_ksplit_*.json")
    parser.add_argument("--out_dir", default="data", help="parent of the data dirs")
    args = parser.parse_args(argv)
    try:
        tables, skipped, source = prepare(args.spokencoco, args.mscoco, args.karpathy_split, args.split_source)
    except (CorpusMissing, FormatError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name in SETS:
        if not tables[name]["wav"]:
            print(f"error: no usable utterance for the {name} set (split source {source}; skipped: {skipped})",
                  file=sys.stderr)
            return 1
    os.makedirs(args.out_dir, exist_ok=True)
    summary = {"spokencoco": os.path.abspath(args.spokencoco), "mscoco": os.path.abspath(args.mscoco),
               "split_source": source, "sets": {}, "skipped": skipped}
    if source == "karpathy":
        summary["karpathy_split"] = os.path.abspath(args.karpathy_split)
    print(f"split source: {source}")
    for name in SETS:
        t = tables[name]
        write_set(args.out_dir, name, t)
        summary["sets"][name] = {"utterances": len(t["wav"]), "images": len(t["img"]),
                                 "speakers": len(set(t["utt2spk"].values()))}
        print(f"{os.path.join(args.out_dir, name)}: {len(t['wav'])} utterances, {len(t['img'])} images, "
              f"{summary['sets'][name]['speakers']} speakers")
    for reason, count in skipped.items():
        if count:
            print(f"skipped: {count} {reason.replace('_', ' ')}")
    atomic_write_text(os.path.join(args.out_dir, "local", "spokencoco_prep.json"),
                      json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
