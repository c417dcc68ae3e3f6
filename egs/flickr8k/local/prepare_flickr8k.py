#!/usr/bin/env python3
"""Stage 0 of egs/flickr8k: the Flickr8k + Flickr Audio Caption distribution -> Kaldi data dirs.

    python local/prepare_flickr8k.py --root $FLICKR8K --out_dir data [--sets train dev test]

Input: ``--root`` is the folder where the three archives were unpacked side by side:
  Flickr8k_Dataset.zip  -> Flicker8k_Dataset/<image>.jpg (sic: the archive's folder is misspelt;
                           Flickr8k_Dataset/ and Images/ are accepted too), plus __MACOSX/ metadata (ignored)
  Flickr8k_text.zip     -> Flickr8k.token.txt, Flickr_8k.{train,dev,test}Images.txt (also under Flickr8k_text/)
  flickr_audio.tar.gz   -> flickr_audio/wavs/<image>_<n>.wav, flickr_audio/wav2capt.txt, flickr_audio/wav2spk.txt

Pairing: one utterance per line of ``wav2capt.txt`` (``<wav> <image>.jpg #<n>``): its caption is caption n of
that image in ``Flickr8k.token.txt`` (``<image>.jpg#<n><TAB><caption>``) and its speaker comes from
``wav2spk.txt`` (``<wav> <speaker number>``). The reference guessed the caption from the digit after the last
"_" of the wav name; this uses the corpus's own mapping instead. Splits are the three image lists.

Output per set: data/<set>/{wav.scp,text,utt2spk,spk2utt,utt2img,img.scp}, absolute paths, LC_ALL=C order.
  utterance id  spk<NNN>-<wav name without .wav>   e.g. spk057-1000268201_693b08cb0e_0 (unique: wav names are)
  speaker id    spk<NNN>                          (wav2spk's number, zero-padded to 3 digits)
  image id      <image name without .jpg>          e.g. 1000268201_693b08cb0e
  text          the caption, whitespace collapsed, the distribution's trailing " ." removed
Each set is written to a temporary directory and renamed into place. The junk of the real archives is skipped
and counted (caption groups of images that do not exist, images in no split, macOS metadata, wavs without a
caption, image, speaker or split); the counts go to stdout and data/local/flickr8k_prep.json.
Exit status 0, or 1 with a message naming what to download and the FLICKR8K variable when the corpus is missing.
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
from typing import Dict, List, Optional, Sequence, Tuple

from speechclip_plus.data.datadir import write_data_dir
from speechclip_plus.io import atomic_write_text

SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}
IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images")
TEXT_DIRS = ("", "Flickr8k_text")
TOKEN_FILE = "Flickr8k.token.txt"
SKIP_REASONS = (  # what is left out, counted in data/local/flickr8k_prep.json
    "macos_metadata_files",  # __MACOSX/ entries and ._* AppleDouble files
    "caption_groups_without_image",  # token-file images that are not in the image folder (e.g. <id>.jpg.1)
    "captions_without_image",  # their captions
    "split_images_not_found",  # images named in a split list but not in the image folder
    "images_in_no_split",  # images in the folder but in none of the three lists
    "wavs_listed_but_not_found",  # wav2capt.txt entries without a wav file
    "wavs_not_in_wav2capt",  # wav files that wav2capt.txt does not list
    "wavs_without_caption",  # wav2capt.txt points at a caption the token file does not have
    "wavs_with_empty_caption",
    "wavs_without_image",
    "wavs_without_speaker",  # not in wav2spk.txt
    "wavs_of_images_in_no_split",
)

DOWNLOAD = """\
The Flickr8k corpus was not found under {root} ({what}).
Flickr8k needs three archives, unpacked side by side in one folder:
  Flickr8k_Dataset.zip and Flickr8k_text.zip: the Flickr 8k images and captions (Hodosh, Young and
      Hockenmaier, 2013), from the University of Illinois page "Framing Image Description as a Ranking
      Task": https://hockenmaier.cs.illinois.edu/Framing_Image_Description/KCCA.html (request form).
  flickr_audio.tar.gz: the Flickr Audio Caption Corpus (Harwath and Glass, 2015), from the MIT SLS page
      https://groups.csail.mit.edu/sls/downloads/flickraudio/
Unpack them (unzip Flickr8k_Dataset.zip; unzip Flickr8k_text.zip; tar xzf flickr_audio.tar.gz) in one folder
and set FLICKR8K to it: FLICKR8K=/path/to/flickr8k ./run.sh (or edit db.sh). About 1.1 GB of images and
4.2 GB of audio."""


class CorpusMissing(RuntimeError):
    """The corpus (or one of its archives) is not where FLICKR8K points."""


class FormatError(ValueError):
    """A corpus file does not have the expected format; the message names file and line."""


def _read_lines(path: str) -> List[Tuple[int, str]]:
    """(line number, text) of the non-blank lines; UTF-8, with a Latin-1 fallback per line."""
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("latin-1")
            line = line.rstrip("\r\n")
            if line.strip():
                out.append((lineno, line))
    return out


def normalize_caption(text: str) -> str:
    """Collapse whitespace and drop one trailing "." (the distribution ends every caption with " .")."""
    text = " ".join(text.split())
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def read_captions(path: str) -> Dict[Tuple[str, int], str]:
    """``{(image file name, n): caption}`` from ``<image>#<n><TAB><caption>`` lines."""
    captions: Dict[Tuple[str, int], str] = {}
    for lineno, line in _read_lines(path):
        key, sep, caption = line.partition("\t")
        m = re.fullmatch(r"(.+)#(\d+)", key.strip())
        if not sep or m is None:
            raise FormatError(f"{path}:{lineno}: expected '<image>.jpg#<n><TAB><caption>', got {line[:80]!r}")
        item = (m.group(1), int(m.group(2)))
        if item in captions:
            raise FormatError(f"{path}:{lineno}: caption {key} appears twice")
        captions[item] = caption
    return captions


def read_split(path: str) -> List[str]:
    names = []
    for lineno, line in _read_lines(path):
        fields = line.split()
        if len(fields) != 1:
            raise FormatError(f"{path}:{lineno}: expected one image file name, got {line[:80]!r}")
        names.append(fields[0])
    return names


def read_wav2capt(path: str) -> List[Tuple[int, str, str, int]]:
    """(line, wav name, image file name, caption number) from ``<wav> <image>.jpg #<n>`` lines."""
    out = []
    for lineno, line in _read_lines(path):
        fields = line.split()
        if len(fields) == 2 and "#" in fields[1]:  # tolerate "<image>.jpg#<n>" written without the space
            fields = [fields[0], *fields[1].rsplit("#", 1)]
            fields[2] = "#" + fields[2]
        if len(fields) != 3 or not re.fullmatch(r"#\d+", fields[2]):
            raise FormatError(f"{path}:{lineno}: expected '<wav> <image>.jpg #<n>', got {line[:80]!r}")
        out.append((lineno, fields[0], fields[1], int(fields[2][1:])))
    return out


def read_wav2spk(path: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for lineno, line in _read_lines(path):
        fields = line.split()
        if len(fields) != 2:
            raise FormatError(f"{path}:{lineno}: expected '<wav> <speaker>', got {line[:80]!r}")
        if fields[0] in out and out[fields[0]] != fields[1]:
            raise FormatError(f"{path}:{lineno}: {fields[0]} has two speakers ({out[fields[0]]}, {fields[1]})")
        out[fields[0]] = fields[1]
    return out


def speaker_id(raw: str) -> str:
    """``spk<NNN>`` for wav2spk's numbers; other labels keep their [A-Za-z0-9_] characters."""
    if raw.isdigit():
        return f"spk{int(raw):03d}"
    return "spk" + re.sub(r"[^A-Za-z0-9_]", "_", raw)


def locate(root: str) -> Dict[str, str]:
    """Paths of the corpus parts under ``root``; ``CorpusMissing`` names the first missing one."""
    if not os.path.isdir(root):
        raise CorpusMissing(DOWNLOAD.format(root=root, what="no such directory"))
    found: Dict[str, str] = {}
    for d in IMAGE_DIRS:
        if os.path.isdir(os.path.join(root, d)):
            found["images"] = os.path.join(root, d)
            break
    else:
        raise CorpusMissing(DOWNLOAD.format(root=root, what=f"no image folder {' or '.join(IMAGE_DIRS)}/: "
                                            "unzip Flickr8k_Dataset.zip there"))
    for d in TEXT_DIRS:
        if os.path.isfile(os.path.join(root, d, TOKEN_FILE)):
            found["text"] = os.path.join(root, d)
            break
    else:
        raise CorpusMissing(DOWNLOAD.format(root=root, what=f"no {TOKEN_FILE}: unzip Flickr8k_text.zip there"))
    for split, name in SPLIT_FILES.items():
        if not os.path.isfile(os.path.join(found["text"], name)):
            raise CorpusMissing(DOWNLOAD.format(root=root, what=f"no {name} beside {TOKEN_FILE}: "
                                                "unzip the complete Flickr8k_text.zip"))
    audio = os.path.join(root, "flickr_audio")
    for name in ("wavs", "wav2capt.txt", "wav2spk.txt"):
        if not os.path.exists(os.path.join(audio, name)):
            raise CorpusMissing(DOWNLOAD.format(root=root, what=f"no flickr_audio/{name}: "
                                                "unpack flickr_audio.tar.gz there"))
    found["audio"] = audio
    return found


def _list_files(path: str) -> Tuple[set, int]:
    """(regular file names, number of macOS '._*' metadata files) in ``path``."""
    names, apple = set(), 0
    with os.scandir(path) as it:
        for e in it:
            if e.name.startswith("._"):
                apple += 1
            elif e.is_file():
                names.add(e.name)
    return names, apple


def _count_tree(path: str) -> int:
    return sum(len(files) for _, _, files in os.walk(path)) if os.path.isdir(path) else 0


def prepare(root: str, sets: Sequence[str] = ("train", "dev", "test")) -> Tuple[Dict[str, dict], Dict[str, int]]:
    """Build the data-dir tables of ``sets``: ``({set: {wav, text, utt2spk, utt2img, img}}, skipped counts)``."""
    root = os.path.abspath(root)
    where = locate(root)
    skipped: Counter = Counter({reason: 0 for reason in SKIP_REASONS})
    skipped["macos_metadata_files"] = _count_tree(os.path.join(root, "__MACOSX"))

    image_files, apple = _list_files(where["images"])
    skipped["macos_metadata_files"] += apple
    token_path = os.path.join(where["text"], TOKEN_FILE)
    captions = read_captions(token_path)
    caption_images = {img for img, _ in captions}
    missing_groups = caption_images - image_files
    skipped["caption_groups_without_image"] = len(missing_groups)
    skipped["captions_without_image"] = sum(1 for img, _ in captions if img in missing_groups)

    split_of: Dict[str, str] = {}
    for split, name in SPLIT_FILES.items():
        path = os.path.join(where["text"], name)
        for img in read_split(path):
            if img in split_of and split_of[img] != split:
                raise FormatError(f"{path}: image {img} is also in the {split_of[img]} list")
            split_of[img] = split
    listed_missing = {img for img in split_of if img not in image_files}
    skipped["split_images_not_found"] = len(listed_missing)
    skipped["images_in_no_split"] = len(image_files - set(split_of))

    wav_dir = os.path.join(where["audio"], "wavs")
    wav_files, apple = _list_files(wav_dir)
    skipped["macos_metadata_files"] += apple
    wav2spk = read_wav2spk(os.path.join(where["audio"], "wav2spk.txt"))
    pairs = read_wav2capt(os.path.join(where["audio"], "wav2capt.txt"))
    listed_wavs = set()
    tables = {s: {"wav": {}, "text": {}, "utt2spk": {}, "utt2img": {}, "img": {}} for s in sets}
    for lineno, wav, img, n in pairs:
        if wav in listed_wavs:
            raise FormatError(f"{where['audio']}/wav2capt.txt:{lineno}: {wav} listed twice")
        listed_wavs.add(wav)
        caption = normalize_caption(captions.get((img, n), ""))
        if wav not in wav_files:
            skipped["wavs_listed_but_not_found"] += 1
        elif (img, n) not in captions:
            skipped["wavs_without_caption"] += 1
        elif not caption:
            skipped["wavs_with_empty_caption"] += 1
        elif img not in image_files:
            skipped["wavs_without_image"] += 1
        elif wav not in wav2spk:
            skipped["wavs_without_speaker"] += 1
        elif img not in split_of:
            skipped["wavs_of_images_in_no_split"] += 1
        elif split_of[img] in tables:
            t = tables[split_of[img]]
            stem = os.path.splitext(wav)[0]
            spk = speaker_id(wav2spk[wav])
            utt = f"{spk}-{stem}"
            image_id = os.path.splitext(img)[0]
            t["wav"][utt] = os.path.join(wav_dir, wav)
            t["text"][utt] = caption
            t["utt2spk"][utt] = spk
            t["utt2img"][utt] = image_id
            t["img"][image_id] = os.path.join(where["images"], img)
    skipped["wavs_not_in_wav2capt"] = len(wav_files - listed_wavs)
    return tables, {k: v for k, v in sorted(skipped.items())}


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
    parser.add_argument("--root", required=True, help="folder holding the unpacked archives ($FLICKR8K)")
    parser.add_argument("--out_dir", default="data", help="parent of the data dirs")
    parser.add_argument("--sets", nargs="+", default=["train", "dev", "test"], choices=list(SPLIT_FILES))
    args = parser.parse_args(argv)
    try:
        tables, skipped = prepare(args.root, args.sets)
    except CorpusMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (FormatError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name in args.sets:
        if not tables[name]["wav"]:
            print(f"error: {args.root}: no usable utterance for the {name} set (skipped: {skipped})",
                  file=sys.stderr)
            return 1
    os.makedirs(args.out_dir, exist_ok=True)
    summary = {"root": os.path.abspath(args.root), "sets": {}, "skipped": skipped}
    for name in args.sets:
        t = tables[name]
        write_set(args.out_dir, name, t)
        summary["sets"][name] = {"utterances": len(t["wav"]), "images": len(t["img"]),
                                 "speakers": len(set(t["utt2spk"].values()))}
        print(f"{os.path.join(args.out_dir, name)}: {len(t['wav'])} utterances, {len(t['img'])} images, "
              f"{summary['sets'][name]['speakers']} speakers")
    for reason, count in skipped.items():
        if count:
            print(f"skipped: {count} {reason.replace('_', ' ')}")
    atomic_write_text(os.path.join(args.out_dir, "local", "flickr8k_prep.json"),
                      json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
