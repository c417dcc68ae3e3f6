#!/usr/bin/env python3
"""Stage 0 of egs/flickr8k: the Flickr8k + Flickr Audio Caption distribution -> Kaldi data dirs.

    python local/prepare_flickr8k.py --root $FLICKR8K --out_dir data [--sets train dev test]
        [--skip_bad true|false] [--nj N] [--encoding utf-8]

Input: ``--root`` is the folder where the three archives were unpacked side by side:
  Flickr8k_Dataset.zip  -> Flicker8k_Dataset/<image>.jpg (sic: the archive's folder is misspelt;
                           Flickr8k_Dataset/ and Images/ are accepted too), plus __MACOSX/ metadata
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

Nothing is left out silently (``speechclip_plus.data.corpus``): the known quirks of the distribution below are
skipped and listed in data/local/skipped.tsv; anything else that would leave out an utterance, image or
caption stops with exit 1 and one line per problem (``<file>:<line>: <item>: <what and what to do>``), unless
``--skip_bad true``, which lists each excluded item in data/<set>/excluded.txt (data/local/excluded.txt for an
item of no set). Faults: a listed wav missing, unreadable or empty; an image of a split missing or not
decodable; an empty caption; a wav without a transcription (no caption in the token file, or no line in
wav2capt.txt), a speaker or a split; a caption of a split image without a wav; a caption group of an image in
no split and not in the archive; a key repeated with another value (an image in two split lists, a wav with
two captions or speakers, a caption with two texts); a text line that is not valid UTF-8 (or --encoding).
A line that does not have its file's format is an error in any case. Wavs and images are checked in --nj
processes. Exit 1 with a message naming what to download and the FLICKR8K variable when the corpus is missing.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Set, Tuple

from speechclip_plus.data.corpus import CorpusWriter, add_arguments, read_lines
from speechclip_plus.data.datadir import DataError

SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}
IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images")
TEXT_DIRS = ("", "Flickr8k_text")
TOKEN_FILE = "Flickr8k.token.txt"

# Known quirks of the official distribution: skipped, each listed by name in data/local/skipped.tsv.
# (1) The zip archives were made on macOS: Flickr8k_Dataset.zip unpacks a __MACOSX/ folder of AppleDouble
#     files beside the images, and such "._*" (and ".DS_Store") files are not corpus data wherever they are.
QUIRK_MACOS = "macOS metadata of the zip archives (__MACOSX/, ._* and .DS_Store files), not corpus data"
MACOS_DIR = "__MACOSX"
# (2) Flickr8k.token.txt (Flickr8k_text.zip) has 8,092 caption groups for the 8,091 images of
#     Flickr8k_Dataset.zip: the extra group is named "2258277193_586949ec62.jpg.1", which is no image file.
KNOWN_GROUPS_WITHOUT_IMAGE = ("2258277193_586949ec62.jpg.1",)
QUIRK_GROUP = "caption group of Flickr8k.token.txt under a name that is no image of Flickr8k_Dataset.zip"
# (3) Flickr_8k.{train,dev,test}Images.txt name 6,000 + 1,000 + 1,000 of the 8,091 images; the other 91 have
#     captions but are in no split, and the Flickr Audio Caption Corpus (40,000 wavs) has no speech for them.
QUIRK_NO_SPLIT = "image in none of Flickr_8k.{train,dev,test}Images.txt (it has captions but no speech)"

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


def _lines(path: str, encoding: str) -> List[Tuple[int, str]]:
    """Non-blank lines of a list file; a line that does not decode is a format error."""
    lines, bad = read_lines(path, encoding)
    if bad:
        lineno, _, problem = bad[0]
        raise FormatError(f"{path}:{lineno}: {problem}; give the file's encoding with --encoding")
    return lines


def normalize_caption(text: str) -> str:
    """Collapse whitespace and drop one trailing "." (the distribution ends every caption with " .")."""
    text = " ".join(text.split())
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


_CAPTION_KEY = re.compile(r"(.+)#(\d+)")
Caption = Tuple[str, int]  # (image file name, caption number)


def read_captions(path: str, encoding: str = "utf-8"
                  ) -> Tuple[Dict[Caption, Tuple[str, int]], Dict[Caption, Tuple[int, str]]]:
    """``({(image, n): (caption, line)}, {(image, n): (line, problem)})`` of ``<image>#<n><TAB><caption>`` lines.

    Problems: a line that is not valid ``encoding``, a caption key repeated with another text (an identical
    repeat changes nothing). A line without ``#<n><TAB>`` is a ``FormatError``.
    """
    lines, undecodable = read_lines(path, encoding)
    captions: Dict[Caption, Tuple[str, int]] = {}
    problems: Dict[Caption, Tuple[int, str]] = {}

    def key_of(lineno: int, line: str) -> Tuple[Caption, str]:
        key, sep, caption = line.partition("\t")
        m = _CAPTION_KEY.fullmatch(key.strip())
        if not sep or m is None:
            raise FormatError(f"{path}:{lineno}: expected '<image>.jpg#<n><TAB><caption>', got {line[:80]!r}")
        return (m.group(1), int(m.group(2))), caption

    for lineno, text, problem in undecodable:
        item, _ = key_of(lineno, text)
        problems.setdefault(item, (lineno, f"caption {problem}: correct the line, or pass --encoding with the "
                                           "file's encoding"))
    for lineno, line in lines:
        item, caption = key_of(lineno, line)
        if item in captions and captions[item][0] != caption:
            problems.setdefault(item, (lineno, f"caption {item[0]}#{item[1]} has a second, different text "
                                               f"(first on line {captions[item][1]}): keep one"))
        captions.setdefault(item, (caption, lineno))
    return captions, problems


def read_split(path: str, encoding: str = "utf-8") -> List[Tuple[int, str]]:
    """(line, image file name) of a split list."""
    out = []
    for lineno, line in _lines(path, encoding):
        fields = line.split()
        if len(fields) != 1:
            raise FormatError(f"{path}:{lineno}: expected one image file name, got {line[:80]!r}")
        out.append((lineno, fields[0]))
    return out


def read_wav2capt(path: str, encoding: str = "utf-8") -> List[Tuple[int, str, str, int]]:
    """(line, wav name, image file name, caption number) from ``<wav> <image>.jpg #<n>`` lines."""
    out = []
    for lineno, line in _lines(path, encoding):
        fields = line.split()
        if len(fields) == 2 and "#" in fields[1]:  # tolerate "<image>.jpg#<n>" written without the space
            fields = [fields[0], *fields[1].rsplit("#", 1)]
            fields[2] = "#" + fields[2]
        if len(fields) != 3 or not re.fullmatch(r"#\d+", fields[2]):
            raise FormatError(f"{path}:{lineno}: expected '<wav> <image>.jpg #<n>', got {line[:80]!r}")
        out.append((lineno, fields[0], fields[1], int(fields[2][1:])))
    return out


def read_wav2spk(path: str, encoding: str = "utf-8") -> Tuple[Dict[str, str], Dict[str, str]]:
    """(``{wav: speaker}``, ``{wav: problem}`` for a wav given two different speakers)."""
    out: Dict[str, Tuple[str, int]] = {}
    problems: Dict[str, str] = {}
    for lineno, line in _lines(path, encoding):
        fields = line.split()
        if len(fields) != 2:
            raise FormatError(f"{path}:{lineno}: expected '<wav> <speaker>', got {line[:80]!r}")
        wav, spk = fields
        if wav in out and out[wav][0] != spk:
            problems.setdefault(wav, f"two speakers in {path} (line {out[wav][1]}: {out[wav][0]}, line {lineno}: "
                                     f"{spk}): keep one")
        out.setdefault(wav, (spk, lineno))
    return {w: s for w, (s, _) in out.items()}, problems


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


def _corpus_files(root: str, folder: str, writer: CorpusWriter) -> Set[str]:
    """Names of the regular files in ``folder``; macOS metadata files are skipped (a known quirk)."""
    names = set()
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith("._") or e.name == ".DS_Store":
                writer.skip(os.path.relpath(e.path, root), QUIRK_MACOS)
            elif e.is_file():
                names.add(e.name)
    return names


def prepare(root: str, writer: CorpusWriter, encoding: str = "utf-8") -> Dict[str, str]:
    """Hand the corpus under ``root`` to ``writer``: the images and utterances of its sets, the known quirks
    and every fault. Returns the facts for the summary file."""
    root = os.path.abspath(root)
    where = locate(root)
    sets = set(writer.sets)
    if os.path.isdir(os.path.join(root, MACOS_DIR)):
        writer.skip(MACOS_DIR + "/", QUIRK_MACOS)
    image_files = _corpus_files(root, where["images"], writer)
    wav_dir = os.path.join(where["audio"], "wavs")
    wav_files = _corpus_files(root, wav_dir, writer)

    # splits: an image named by two lists belongs to neither
    split_of: Dict[str, str] = {}
    listed_at: Dict[str, str] = {}
    two_splits: Dict[str, Tuple[str, str]] = {}  # image -> (where, problem)
    for split, name in SPLIT_FILES.items():
        path = os.path.join(where["text"], name)
        for lineno, img in read_split(path, encoding):
            if img in split_of and split_of[img] != split:
                two_splits.setdefault(img, (f"{path}:{lineno}", f"also in the {split_of[img]} list "
                                                                 f"({listed_at[img]}): an image belongs to one split"))
            split_of.setdefault(img, split)
            listed_at.setdefault(img, f"{path}:{lineno}")
    for img, (at, problem) in two_splits.items():
        writer.fault(img, problem, at)
        del split_of[img]
    for img, split in split_of.items():
        if split in sets:
            writer.add_image(split, os.path.splitext(img)[0], os.path.join(where["images"], img), listed_at[img])

    token_path = os.path.join(where["text"], TOKEN_FILE)
    captions, caption_problems = read_captions(token_path, encoding)
    first_line: Dict[str, int] = {}
    for (img, _), (_, lineno) in sorted(captions.items(), key=lambda kv: kv[1][1]):
        first_line.setdefault(img, lineno)
    for img, lineno in first_line.items():
        if img in image_files or img in split_of or img in two_splits:
            continue  # an image of the archive, or of a split (a missing split image fails the media check)
        if img in KNOWN_GROUPS_WITHOUT_IMAGE:
            writer.skip(img, QUIRK_GROUP)
        else:
            writer.fault(img, f"caption group of an image that is neither in {os.path.basename(where['images'])}/ "
                              "nor in a split list: restore the official Flickr8k.token.txt",
                         f"{token_path}:{lineno}")
    for img in sorted(image_files - set(split_of) - set(two_splits)):
        writer.skip(img, QUIRK_NO_SPLIT)

    wav2spk, speaker_problems = read_wav2spk(os.path.join(where["audio"], "wav2spk.txt"), encoding)
    wav2capt_path = os.path.join(where["audio"], "wav2capt.txt")
    first: Dict[str, Tuple[int, str, int]] = {}
    second_caption: Dict[str, str] = {}
    for lineno, wav, img, n in read_wav2capt(wav2capt_path, encoding):
        if wav in first and first[wav][1:] != (img, n):
            second_caption.setdefault(wav, f"listed again on line {lineno} with {img} #{n}: keep one line")
        first.setdefault(wav, (lineno, img, n))
    spoken: Set[Caption] = set()
    for wav, (lineno, img, n) in first.items():
        at = f"{wav2capt_path}:{lineno}"
        spk = wav2spk.get(wav)
        utt = f"{speaker_id(spk)}-{os.path.splitext(wav)[0]}" if spk and wav not in speaker_problems else wav
        split = split_of.get(img)
        if split is not None and split not in sets:
            continue  # a set that was not asked for
        spoken.add((img, n))
        if wav in second_caption:
            writer.fault(utt, second_caption[wav], at, split)
        elif img in two_splits:
            writer.fault(utt, f"its image {img} is in two split lists (see that line)", at)
        elif split is None:
            writer.fault(utt, f"its image {img} is in no split list"
                         + ("" if img in image_files else f" and not in {os.path.basename(where['images'])}/")
                         + ": wav2capt.txt or the split lists are not the official ones", at)
        elif wav in speaker_problems:
            writer.fault(utt, speaker_problems[wav], at, split)
        elif spk is None:
            writer.fault(utt, "no speaker: wav2spk.txt does not list this wav; add its line", at, split)
        elif (img, n) in caption_problems:
            line, problem = caption_problems[(img, n)]
            writer.fault(utt, problem, f"{token_path}:{line}", split)
        elif (img, n) not in captions:
            writer.fault(utt, f"no transcription: {TOKEN_FILE} has no caption {img}#{n}; restore the official "
                              f"{TOKEN_FILE} (Flickr8k_text.zip)", at, split)
        else:
            writer.add_utterance(split, utt, os.path.join(wav_dir, wav), normalize_caption(captions[(img, n)][0]),
                                 speaker_id(spk), os.path.splitext(img)[0], at)
    for wav in sorted(wav_files - set(first)):
        writer.fault(wav, "wav without a transcription: wav2capt.txt does not list it; add its line or remove it",
                     wav_dir + "/")
    for item in sorted(set(captions) | set(caption_problems)):
        img, n = item
        if split_of.get(img) in sets and item not in spoken:
            line = captions[item][1] if item in captions else caption_problems[item][0]
            writer.fault(f"{img}#{n}", "caption without speech: wav2capt.txt lists no wav for it (every caption of "
                                       "the split images is spoken in the official corpus)",
                         f"{token_path}:{line}", split_of[img])
    return {"root": root}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="folder holding the unpacked archives ($FLICKR8K)")
    parser.add_argument("--out_dir", default="data", help="parent of the data dirs")
    parser.add_argument("--sets", nargs="+", default=["train", "dev", "test"], choices=list(SPLIT_FILES))
    add_arguments(parser)
    args = parser.parse_args(argv)
    writer = CorpusWriter(args.sets, skip_bad=args.skip_bad)
    try:
        info = prepare(args.root, writer, args.encoding)
        writer.check_media(args.nj, audio_fix="restore it from flickr_audio.tar.gz",
                           image_fix="restore it from Flickr8k_Dataset.zip")
        writer.write(args.out_dir, "flickr8k_prep.json", info)
    except (CorpusMissing, FormatError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
