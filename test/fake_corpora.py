"""Tiny fake corpora in the ORIGINAL distribution layouts, for the recipe tests (test/test_recipes.py).

Each generator writes a few dozen small JPEG images (a coloured shape on a textured background) with templated
captions, speaks every caption with espeak-ng (several voices = several speakers), and returns a ``Fake``
record of what a correct data preparation must produce (per-set utterance/image counts, the junk planted).

``make_flickr8k(root)``: what unpacking Flickr8k_Dataset.zip, Flickr8k_text.zip and flickr_audio.tar.gz side
by side gives: ``Flicker8k_Dataset/*.jpg`` (the archive's misspelling), ``__MACOSX/`` metadata,
``Flickr8k.token.txt`` (``<image>.jpg#<n><TAB><caption> .``), ``Flickr_8k.{train,dev,test}Images.txt``,
``flickr_audio/wavs/<image>_<n>.wav`` (16 kHz, as the real corpus), ``flickr_audio/wav2capt.txt``
(``<wav> <image>.jpg #<n>``) and ``wav2spk.txt`` (``<wav> <speaker number>``). Planted junk: a caption group
for an image that does not exist (``<id>.jpg.1``, as in the real token file), an image in no split (captions,
no audio), a ``._`` AppleDouble file; and one image whose wav numbers are a permutation of its caption numbers
in wav2capt.txt, so a preparation that guesses the caption from the wav name gets those texts wrong.

``make_spokencoco(root)``: ``SpokenCOCO/SpokenCOCO_{train,val}.json`` + ``SpokenCOCO/wavs/{train,val}/0/*.wav``
(16 kHz, upper-case text, ``<speaker>-<hit>_<cocoid>_<n>.wav``), ``mscoco/{train2014,val2014}/COCO_*.jpg`` and
``dataset_coco.json`` (Karpathy split: train2014 -> train, val2014 -> restval/val/test), plus the reference's
per-split ``SpokenCOCO/SpokenCOCO_ksplit_{train,val,test}.json`` describing the same split. Planted: a val2014
image with speech but outside the Karpathy split, a Karpathy image without speech, images with 4 and 6 captions.

``make_plain(root)``: a third corpus in no known layout (``manifest.tsv``: split, image, wav, speaker, caption;
22.05 kHz wavs, so stage 1 must resample), for the recipe made with egs/TEMPLATE/setup.sh.

``make_csv(root)``: what a researcher brings on a first day: ``metadata.csv`` (header ``split,image,audio,
speaker,caption``; captions with commas and double quotes, so csv quotes them), PNG images and audio in FLAC
at 22.05 kHz and MP3 at 44.1 kHz (stage 1 converts both).

Everything is a function of ``seed``. Requires espeak-ng (``have_espeak()``).
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import string
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

VOICES: Tuple[Tuple[str, int, int], ...] = (  # espeak-ng voice, words per minute, pitch
    ("en-us+m3", 190, 45), ("en-gb+f2", 180, 62), ("en-gb-scotland+m1", 200, 38), ("en-029+f4", 185, 55))
COLOURS = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 210), "yellow": (235, 210, 40),
           "black": (20, 20, 20), "white": (245, 245, 245)}
FLICKR8K_GROUP_WITHOUT_IMAGE = "2258277193_586949ec62.jpg.1"  # the real token file's caption group without an image
THINGS = ("dog", "ball", "boat", "house", "kite", "bird")
PLACES = ("on the grass", "near the water", "in the snow", "on a road", "by a tree")
TEMPLATES = ("A {c} {t} {p} .", "The {t} is {c} .", "A small {c} {t} sits {p} .", "There is a {c} {t} {p} .",
             "Someone looks at a {c} {t} .", "A {t} that is {c} .", "Look at the {c} {t} {p} .")


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


@dataclass
class Fake:
    """What a correct preparation of a generated corpus yields."""

    root: Path
    utterances: Dict[str, int]  # set -> number of utterances
    images: Dict[str, int]  # set -> number of images
    speakers: int  # distinct speakers over all sets
    junk: Dict[str, str] = field(default_factory=dict)  # planted known quirk (as skipped.tsv names it) -> its kind
    texts: Dict[str, str] = field(default_factory=dict)  # wav file name -> the caption it speaks (normalised)
    env: Dict[str, str] = field(default_factory=dict)  # db.sh variables pointing at this corpus
    permuted_image: str = ""  # Flickr8k: the image whose wav numbers differ from its caption numbers


# ----------------------------------------------------------------------------------------------- media
def _image(path: Path, rng: random.Random, colour: str, fmt: str = "JPEG") -> None:
    """A 40x40 image (``fmt``: JPEG, PNG): noisy background and a filled shape of ``colour``."""
    side = 40
    base = np.full((side, side, 3), rng.randint(60, 190), np.float32)
    base += np.random.default_rng(rng.getrandbits(32)).normal(0, 12, (side, side, 1))
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    x, y, r = rng.randint(12, 28), rng.randint(12, 28), rng.randint(6, 11)
    box = [x - r, y - r, x + r, y + r]
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=COLOURS[colour])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def _caption(rng: random.Random, colour: str, thing: str) -> str:
    return rng.choice(TEMPLATES).format(c=colour, t=thing, p=rng.choice(PLACES))


def _speak(text: str, voice: Tuple[str, int, int]) -> Tuple[np.ndarray, int]:
    cmd = ["espeak-ng", "-v", voice[0], "-s", str(voice[1]), "-p", str(voice[2]), "--stdout", text]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(f"espeak-ng failed: {' '.join(cmd)}: {proc.stderr.decode(errors='replace')}")
    wav, rate = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    return (wav if wav.ndim == 1 else wav.mean(axis=1)), rate


def _hum(text: str, voice: Tuple[str, int, int], rate: int) -> Tuple[np.ndarray, int]:
    """A stand-in for speech when only the files matter: a tone whose pitch and length follow voice and text."""
    t = np.arange(int(rate * (0.3 + 0.02 * len(text)))) / rate
    return (0.3 * np.sin(2 * np.pi * (2 * voice[2] + 3 * len(text)) * t)).astype(np.float32), rate


def synthesize(jobs: Sequence[Tuple[Path, str, Tuple[str, int, int]]], sample_rate: int, speech: bool = True) -> None:
    """Speak each ``(path, text, voice)`` (``speech=False``: a tone instead, no espeak-ng needed); write it at
    ``sample_rate`` (resampled from espeak's rate) in the format of the file extension: 16-bit PCM (WAV, FLAC)
    or MPEG layer III (``.mp3``)."""
    def one(job):
        path, text, voice = job
        wav, rate = _speak(text.rstrip(" ."), voice) if speech else _hum(text.rstrip(" ."), voice, sample_rate)
        if rate != sample_rate:
            import torch
            import torchaudio.functional as AF

            wav = AF.resample(torch.from_numpy(wav), rate, sample_rate).clamp(-1, 1).numpy()
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), wav, sample_rate, subtype=None if path.suffix == ".mp3" else "PCM_16")

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(one, jobs))


def _normalise(text: str) -> str:
    text = " ".join(text.split())
    return text[:-1].rstrip() if text.endswith(".") else text


# ----------------------------------------------------------------------------------------------- Flickr8k
def make_flickr8k(root: Path, per_split: Tuple[int, int, int] = (8, 3, 3), seed: int = 0,
                  sample_rate: int = 16000, speech: bool = True) -> Fake:
    """Flickr8k + Flickr Audio Caption Corpus layout under ``root`` (see the module docstring)."""
    rng = random.Random(f"flickr:{seed}")
    root = Path(root)
    images_dir = root / "Flicker8k_Dataset"
    speakers = [rng.randint(1, 183) for _ in VOICES]
    while len(set(speakers)) < len(VOICES):
        speakers = [rng.randint(1, 183) for _ in VOICES]
    n_images = sum(per_split) + 1  # + one image in no split
    names = [f"{1000000000 + 7919 * i + rng.randint(0, 999)}_{rng.getrandbits(40):010x}"
             for i in range(n_images)]
    split_names = ("train", "dev", "test")
    split_of = {}
    k = 0
    for split, n in zip(split_names, per_split):
        for _ in range(n):
            split_of[names[k]] = split
            k += 1
    token_lines, wav2capt, wav2spk, jobs, texts = [], [], [], [], {}
    for i, name in enumerate(names):
        colour, thing = rng.choice(list(COLOURS)), rng.choice(THINGS)
        _image(images_dir / f"{name}.jpg", rng, colour)
        caps = [_caption(rng, colour, thing) for _ in range(5)]
        token_lines += [f"{name}.jpg#{n}\t{cap}" for n, cap in enumerate(caps)]
        if name not in split_of:
            continue  # the real corpus has no speech for images outside the splits
        order = list(range(5))
        if i == 1:  # wav <name>_<k>.wav speaks caption #order[k] (wav2capt.txt says so)
            order = [2, 0, 4, 1, 3]
        for k, n in enumerate(order):
            wav = f"{name}_{k}.wav"
            voice = (i + k) % len(VOICES)
            wav2capt.append(f"{wav} {name}.jpg #{n}")
            wav2spk.append(f"{wav} {speakers[voice]}")
            jobs.append((root / "flickr_audio" / "wavs" / wav, caps[n], VOICES[voice]))
            texts[wav] = _normalise(caps[n])
    # the real token file's junk: a caption group under a name that is not an image of the archive
    token_lines += [f"{FLICKR8K_GROUP_WITHOUT_IMAGE}#{n}\tA photo that is not in the archive ." for n in range(5)]
    rng.shuffle(wav2capt)
    (root / "Flickr8k.token.txt").write_text("\n".join(token_lines) + "\n", encoding="utf-8")
    for split, fname in zip(split_names, ("Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt",
                                          "Flickr_8k.testImages.txt")):
        listed = [f"{n}.jpg" for n in names if split_of.get(n) == split]
        (root / fname).write_text("\n".join(listed) + "\n", encoding="utf-8")
    (root / "flickr_audio").mkdir(parents=True, exist_ok=True)
    (root / "flickr_audio" / "wav2capt.txt").write_text("\n".join(wav2capt) + "\n", encoding="utf-8")
    (root / "flickr_audio" / "wav2spk.txt").write_text("\n".join(sorted(wav2spk)) + "\n", encoding="utf-8")
    for apple in (root / "__MACOSX" / "Flicker8k_Dataset" / f"._{names[0]}.jpg", images_dir / f"._{names[0]}.jpg"):
        apple.parent.mkdir(parents=True, exist_ok=True)
        apple.write_bytes(b"\x00\x05\x16\x07macOS metadata")
    synthesize(jobs, sample_rate, speech)
    no_split = [n for n in names if n not in split_of]
    return Fake(root=root, utterances={s: 5 * n for s, n in zip(split_names, per_split)},
                images=dict(zip(split_names, per_split)), speakers=len(VOICES),
                junk={"__MACOSX/": "macos", f"Flicker8k_Dataset/._{names[0]}.jpg": "macos",
                      FLICKR8K_GROUP_WITHOUT_IMAGE: "group", f"{no_split[0]}.jpg": "no_split"},
                texts=texts, env={"FLICKR8K": str(root)}, permuted_image=names[1])


# ----------------------------------------------------------------------------------------------- SpokenCOCO
def make_spokencoco(root: Path, n_train2014: int = 6, val2014: Tuple[int, int, int] = (2, 3, 3), seed: int = 0,
                    sample_rate: int = 16000, speech: bool = True) -> Fake:
    """SpokenCOCO + MSCOCO 2014 + Karpathy split under ``root`` (see the module docstring).

    ``val2014`` = numbers of val2014 images in Karpathy restval, val and test.
    """
    rng = random.Random(f"coco:{seed}")
    root = Path(root)
    sc = root / "SpokenCOCO"
    mscoco = root / "mscoco"
    speakers = ["".join(rng.choices(string.ascii_lowercase + string.digits, k=20)) for _ in VOICES]
    speakers = [("m" if i % 2 == 0 else "f") + s[1:] for i, s in enumerate(speakers)]

    # (coco folder, karpathy split, number of spoken captions)
    plan: List[Tuple[str, str, int]] = [("train2014", "train", 5) for _ in range(n_train2014)]
    for split, n in zip(("restval", "val", "test"), val2014):
        plan += [("val2014", split, 5) for _ in range(n)]
    plan[0] = (plan[0][0], plan[0][1], 6)  # COCO has images with more and fewer than 5 captions
    plan[-1] = (plan[-1][0], plan[-1][1], 4)
    karpathy, spoken = [], {"train": [], "val": []}
    ksplit: Dict[str, list] = {"train": [], "val": [], "test": []}
    jobs, texts = [], {}
    to_set = {"train": "train", "restval": "train", "val": "dev", "test": "test"}
    utterances = {"train": 0, "dev": 0, "test": 0}
    images = {"train": 0, "dev": 0, "test": 0}
    for i, (folder, split, n_caps) in enumerate(plan):
        cocoid = 100000 + 3571 * i + rng.randint(0, 999)
        fname = f"COCO_{folder}_{cocoid:012d}.jpg"
        colour, thing = rng.choice(list(COLOURS)), rng.choice(THINGS)
        _image(mscoco / folder / fname, rng, colour)
        caps = [_caption(rng, colour, thing).rstrip(" .").upper() for _ in range(max(n_caps, 5))]
        karpathy.append({"filepath": folder, "filename": fname, "imgid": i, "split": split, "cocoid": cocoid,
                         "sentids": list(range(5 * i, 5 * i + 5)),
                         "sentences": [{"raw": c.capitalize(), "tokens": c.lower().split(), "imgid": i,
                                        "sentid": 5 * i + j} for j, c in enumerate(caps[:5])]})
        sub = "train" if folder == "train2014" else "val"
        captions = []
        for j in range(n_caps):
            voice = (i + j) % len(VOICES)
            hit = "".join(rng.choices(string.ascii_uppercase + string.digits, k=30))
            stem = f"{speakers[voice]}-{hit}_{cocoid}_{rng.randint(100000, 999999)}"
            wav = f"wavs/{sub}/0/{stem}.wav"
            captions.append({"text": caps[j], "speaker": speakers[voice], "uttid": stem, "wav": wav})
            jobs.append((sc / wav, caps[j], VOICES[voice]))
            texts[f"{stem}.wav"] = caps[j].lower()
        entry = {"image": f"{folder}/{fname}", "captions": captions}
        spoken[sub].append(entry)
        dset = to_set[split]
        utterances[dset] += n_caps
        images[dset] += 1
        ksplit[{"train": "train", "dev": "val", "test": "test"}[dset]].append(
            {"image": entry["image"], "reassign_id": i, "captions": captions})
    rng.shuffle(karpathy)
    sc.mkdir(parents=True, exist_ok=True)
    for sub in ("train", "val"):
        (sc / f"SpokenCOCO_{sub}.json").write_text(json.dumps({"data": spoken[sub]}), encoding="utf-8")
    for split, data in ksplit.items():
        (sc / f"SpokenCOCO_ksplit_{split}.json").write_text(json.dumps({"data": data}), encoding="utf-8")
    karpathy_json = json.dumps({"images": karpathy, "dataset": "coco"})
    (root / "dataset_coco.json").write_text(karpathy_json, encoding="utf-8")
    synthesize(jobs, sample_rate, speech)
    return Fake(root=root, utterances=utterances, images=images, speakers=len(VOICES), texts=texts,
                env={"SPOKENCOCO": str(root), "MSCOCO": str(mscoco), "KARPATHY_SPLIT": str(root / "dataset_coco.json")})


# ----------------------------------------------------------------------------------------------- plain corpus
def make_plain(root: Path, per_split: Tuple[int, int, int] = (8, 3, 3), captions: int = 2, seed: int = 0,
               sample_rate: int = 22050, speech: bool = True) -> Fake:
    """``root/manifest.tsv`` (split, image, wav, speaker, caption; paths relative to root) + images/ + wavs/."""
    rng = random.Random(f"plain:{seed}")
    root = Path(root)
    rows, jobs, texts = [], [], {}
    k = 0
    for split, n in zip(("train", "dev", "test"), per_split):
        for _ in range(n):
            colour, thing = rng.choice(list(COLOURS)), rng.choice(THINGS)
            image = f"images/pic{k:03d}.jpg"
            _image(root / image, rng, colour)
            for j in range(captions):
                voice = (k + j) % len(VOICES)
                wav = f"wavs/pic{k:03d}_{j}.wav"
                cap = _normalise(_caption(rng, colour, thing)).lower()
                rows.append("\t".join((split, image, wav, f"voice{voice}", cap)))
                jobs.append((root / wav, cap, VOICES[voice]))
                texts[os.path.basename(wav)] = cap
            k += 1
    (root / "manifest.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    synthesize(jobs, sample_rate, speech)
    return Fake(root=root, utterances={s: captions * n for s, n in zip(("train", "dev", "test"), per_split)},
                images=dict(zip(("train", "dev", "test"), per_split)), speakers=len(VOICES), texts=texts,
                env={"CORPUS": str(root)})


# ----------------------------------------------------------------------------------------------- CSV corpus
CSV_FIELDS = ("split", "image", "audio", "speaker", "caption")


def make_csv(root: Path, per_split: Tuple[int, int, int] = (6, 3, 3), captions: int = 2, seed: int = 0,
             speech: bool = True) -> Fake:
    """``root/metadata.csv`` (``CSV_FIELDS``, paths relative to root) + ``images/*.png`` + ``audio/`` with the
    captions of even-numbered images in FLAC at 22.05 kHz and the others in MP3 at 44.1 kHz. ``texts`` maps
    an audio file name to its caption (whitespace as written). ``speech=False``: tones instead of espeak-ng."""
    import csv

    rng = random.Random(f"csv:{seed}")
    root = Path(root)
    rows, jobs, texts = [], {22050: [], 44100: []}, {}
    k = 0
    for split, n in zip(("train", "dev", "test"), per_split):
        for _ in range(n):
            colour, thing = rng.choice(list(COLOURS)), rng.choice(THINGS)
            image = f"images/photo {k:03d}.png"  # a space in the file name, as real corpora have
            _image(root / image, rng, colour, fmt="PNG")
            ext, rate = (".flac", 22050) if k % 2 == 0 else (".mp3", 44100)
            for j in range(captions):
                voice = (k + j) % len(VOICES)
                audio = f"audio/photo{k:03d}_{j}{ext}"
                cap = f'{_caption(rng, colour, thing).rstrip(" .")}, the "{colour}" one.'  # a comma, quotes
                rows.append({"split": split, "image": image, "audio": audio, "speaker": f"reader{voice}",
                             "caption": cap})
                jobs[rate].append((root / audio, cap.replace('"', ""), VOICES[voice]))
                texts[os.path.basename(audio)] = cap
            k += 1
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    for rate, rate_jobs in jobs.items():
        synthesize(rate_jobs, rate, speech)
    return Fake(root=root, utterances={s: captions * n for s, n in zip(("train", "dev", "test"), per_split)},
                images=dict(zip(("train", "dev", "test"), per_split)), speakers=len(VOICES), texts=texts,
                env={"CORPUS": str(root)})


# ----------------------------------------------------------------------------------------------- one-fault copies
@dataclass
class Faulty:
    """A copy of a generated corpus with one fault, and what stage 0 must do with it."""

    fake: Fake  # the copy (its root and env point at it)
    named: Tuple[str, ...]  # strings that one line of the fatal error holds together (the item, its file)
    excluded: Dict[str, set]  # with --skip_bad: set name (or "local": no set) -> the items listed as excluded
    fixed_by: Tuple[str, ...] = ()  # prepare options that make the copy clean (e.g. --encoding latin-1)


def copy_corpus(fake: Fake, dest: Path) -> Fake:
    """``fake`` under ``dest``: text and json files copied, wavs and images symlinked (a fault replaces a link,
    never the generated file)."""
    dest = Path(dest)
    for src in fake.root.rglob("*"):
        target = dest / src.relative_to(fake.root)
        if src.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix in (".wav", ".jpg"):
            target.symlink_to(src)
        else:
            shutil.copy2(src, target)
    env = {k: v.replace(str(fake.root), str(dest)) for k, v in fake.env.items()}
    return Fake(root=dest, utterances=dict(fake.utterances), images=dict(fake.images), speakers=fake.speakers,
                junk=dict(fake.junk), texts=dict(fake.texts), env=env, permuted_image=fake.permuted_image)


def _replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    _replace(path, data[: len(data) // 2])


def _empty_wav(path: Path) -> None:
    path.unlink()
    sf.write(str(path), np.zeros(0, np.float32), 16000)


class _Flickr:
    """The tables of a Flickr8k-layout copy, to plant faults in it."""

    def __init__(self, root: Path):
        self.root = root
        self.wavs = root / "flickr_audio" / "wavs"
        self.images = root / "Flicker8k_Dataset"
        self.token = root / "Flickr8k.token.txt"
        self.capt = [line.split() for line in (root / "flickr_audio" / "wav2capt.txt").read_text().splitlines()]
        self.spk = dict(line.split() for line in (root / "flickr_audio" / "wav2spk.txt").read_text().splitlines())
        self.split_of = {}
        for split, name in (("train", "train"), ("dev", "dev"), ("test", "test")):
            for img in (root / f"Flickr_8k.{name}Images.txt").read_text().split():
                self.split_of[img] = split

    def utt(self, wav: str) -> str:
        return f"spk{int(self.spk[wav]):03d}-{wav[:-4]}"

    def wav_of(self, split: str) -> Tuple[str, str, int]:
        """(wav, image file name, caption number) of the first wav (by name) of ``split``."""
        wav, img, n = min(c for c in self.capt if self.split_of[c[1]] == split)
        return wav, img, int(n[1:])

    def image_of(self, split: str) -> Tuple[str, set]:
        """(image file name, its utterance ids) of the first image (by name) of ``split``."""
        img = min(i for i, s in self.split_of.items() if s == split)
        return img, {self.utt(c[0]) for c in self.capt if c[1] == img}

    def edit_token(self, key: str, line: Optional[bytes] = None) -> None:
        """Replace (or with ``line`` None delete) the token-file line of caption ``key`` (``<image>#<n>``)."""
        prefix, out = key.encode() + b"\t", []
        for x in self.token.read_bytes().split(b"\n"):
            if not x.startswith(prefix):
                out.append(x)
            elif line is not None:
                out.append(line)
        self.token.write_bytes(b"\n".join(out))


def flickr8k_fault(fake: Fake, dest: Path, fault: str) -> Faulty:
    """A copy of a ``make_flickr8k`` corpus under ``dest`` with the one fault named (``FLICKR8K_FAULTS``)."""
    copy = copy_corpus(fake, dest)
    f = _Flickr(copy.root)
    wav, img, n = f.wav_of("test")
    utt = f.utt(wav)
    named: Tuple[str, ...] = (utt,)
    excluded: Dict[str, set] = {"test": {utt}}
    fixed_by: Tuple[str, ...] = ()
    if fault == "missing_wav":
        (f.wavs / wav).unlink()
        named = (utt, str(f.wavs / wav), "not found")
    elif fault == "unreadable_wav":
        _replace(f.wavs / wav, b"RIFF....not a wav file")
        named = (utt, "cannot read audio")
    elif fault == "empty_wav":
        _empty_wav(f.wavs / wav)
        named = (utt, "no samples")
    elif fault in ("missing_image", "corrupt_image"):
        split = "dev" if fault == "missing_image" else "train"
        image, utts = f.image_of(split)
        (f.images / image).unlink() if fault == "missing_image" else _truncate(f.images / image)
        named = (image[:-4], "Images.txt", "file not found" if fault == "missing_image" else "cannot decode")
        excluded = {split: {image[:-4], *utts}}
    elif fault == "empty_caption":
        f.edit_token(f"{img}#{n}", f"{img}#{n}\t .".encode())
        named = (utt, "wav2capt.txt", "empty caption")
    elif fault == "caption_not_utf8":
        f.edit_token(f"{img}#{n}", f"{img}#{n}\t".encode() + "A caf\u00e9 by the road .".encode("latin-1"))
        named = (utt, "Flickr8k.token.txt", "not valid UTF-8", "--encoding")
        fixed_by = ("--encoding", "latin-1")
    elif fault == "caption_two_texts":
        with open(f.token, "a", encoding="utf-8") as out:
            out.write(f"{img}#{n}\tAnother text for the same caption .\n")
        named = (utt, "Flickr8k.token.txt", "second, different text")
    elif fault == "caption_missing":
        f.edit_token(f"{img}#{n}")
        named = (utt, "wav2capt.txt", "no transcription")
    elif fault == "image_captions_missing":
        image, utts = f.image_of("dev")
        for k in range(5):
            f.edit_token(f"{image}#{k}")
        named = (sorted(utts)[0], "no transcription")
        excluded = {"dev": {image[:-4], *utts}}
    elif fault == "wav_not_listed":
        (f.wavs / f"{img[:-4]}_9.wav").symlink_to(os.readlink(f.wavs / wav))
        named = (f"{img[:-4]}_9.wav", "wav2capt.txt does not list it")
        excluded = {"local": {f"{img[:-4]}_9.wav"}}
    elif fault == "wav_without_speaker":
        spk_file = copy.root / "flickr_audio" / "wav2spk.txt"
        spk_file.write_text("".join(line + "\n" for line in spk_file.read_text().splitlines()
                                    if line.split()[0] != wav))
        named = (wav, "no speaker")
        excluded = {"test": {wav}}
    elif fault == "wav_listed_twice":
        with open(copy.root / "flickr_audio" / "wav2capt.txt", "a") as out:
            out.write(f"{wav} {img} #{(n + 1) % 5}\n")
        named = (utt, "listed again")
    elif fault == "image_in_two_splits":
        image, utts = f.image_of("train")
        with open(copy.root / "Flickr_8k.testImages.txt", "a") as out:
            out.write(f"{image}\n")
        named = (image, "Flickr_8k.trainImages.txt", "Flickr_8k.testImages.txt")
        excluded = {"local": {image, *utts}}
    elif fault == "unknown_caption_group":
        with open(f.token, "a") as out:
            out.write("".join(f"9999999999_0123456789.jpg#{k}\tA caption of no image .\n" for k in range(5)))
        named = ("9999999999_0123456789.jpg", "Flickr8k.token.txt", "neither in")
        excluded = {"local": {"9999999999_0123456789.jpg"}}
    elif fault == "wav_of_image_in_no_split":
        image = next(k for k, v in fake.junk.items() if v == "no_split")
        new = f"{image[:-4]}_0.wav"
        (f.wavs / new).symlink_to(os.readlink(f.wavs / wav))
        with open(copy.root / "flickr_audio" / "wav2capt.txt", "a") as out:
            out.write(f"{new} {image} #0\n")
        with open(copy.root / "flickr_audio" / "wav2spk.txt", "a") as out:
            out.write(f"{new} {f.spk[wav]}\n")
        new_utt = f"spk{int(f.spk[wav]):03d}-{new[:-4]}"
        named = (new_utt, "no split list")
        excluded = {"local": {new_utt}}
    else:
        raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FLICKR8K_FAULTS)}")
    return Faulty(copy, named, excluded, fixed_by)


FLICKR8K_FAULTS = ("missing_wav", "unreadable_wav", "empty_wav", "missing_image", "corrupt_image", "empty_caption",
                   "caption_not_utf8", "caption_two_texts", "caption_missing", "image_captions_missing",
                   "wav_not_listed", "wav_without_speaker", "wav_listed_twice", "image_in_two_splits",
                   "unknown_caption_group", "wav_of_image_in_no_split")


def spokencoco_fault(fake: Fake, dest: Path, fault: str) -> Faulty:
    """A copy of a ``make_spokencoco`` corpus under ``dest`` with the one fault named (``SPOKENCOCO_FAULTS``)."""
    copy = copy_corpus(fake, dest)
    sc = copy.root / "SpokenCOCO"
    val_json, karpathy_json = sc / "SpokenCOCO_val.json", copy.root / "dataset_coco.json"
    val = json.loads(val_json.read_text())
    karpathy = json.loads(karpathy_json.read_text())
    to_set = {"train": "train", "restval": "train", "val": "dev", "test": "test"}
    set_of = {k["filename"]: to_set[k["split"]] for k in karpathy["images"]}

    def entry_of(split: str) -> dict:
        return min((e for e in val["data"] if set_of[os.path.basename(e["image"])] == split),
                   key=lambda e: e["image"])

    def utt_of(cap: dict) -> str:
        return os.path.basename(cap["wav"])[:-4]

    entry = entry_of("test")
    cap = entry["captions"][0]
    utt = utt_of(cap)
    named: Tuple[str, ...] = (utt,)
    excluded: Dict[str, set] = {"test": {utt}}
    fixed_by: Tuple[str, ...] = ()
    if fault == "missing_wav":
        (sc / cap["wav"]).unlink()
        named = (utt, "not found")
    elif fault == "unreadable_wav":
        _replace(sc / cap["wav"], b"RIFF....not a wav file")
        named = (utt, "cannot read audio")
    elif fault == "empty_wav":
        _empty_wav(sc / cap["wav"])
        named = (utt, "no samples")
    elif fault in ("missing_image", "corrupt_image"):
        split = "dev" if fault == "missing_image" else "train"
        e = entry_of(split) if split == "dev" else min(
            (x for x in json.loads((sc / "SpokenCOCO_train.json").read_text())["data"]), key=lambda x: x["image"])
        image = copy.root / "mscoco" / e["image"]
        image.unlink() if fault == "missing_image" else _truncate(image)
        image_id = os.path.basename(e["image"])[:-4]
        named = (image_id, "file not found" if fault == "missing_image" else "cannot decode")
        excluded = {split: {image_id, *(utt_of(c) for c in e["captions"])}}
    elif fault == "empty_caption":
        cap["text"] = "   "
        named = (utt, "captions[0]", "empty caption")
    elif fault == "caption_without_text":
        del cap["text"]
        named = (utt, "captions[0]", "no transcription")
    elif fault == "utterance_twice":
        entry["captions"].append(dict(cap))
        named = (utt, "duplicate utterance id")
    elif fault == "caption_not_utf8":
        cap["text"] = "A CAF\u00c9 BY THE ROAD"
        named = ("SpokenCOCO_val.json:1", "not valid UTF-8", "CAF", "--encoding")
        excluded = {}  # a json file cannot be read in part: --skip_bad does not help
        fixed_by = ("--encoding", "latin-1")
    elif fault == "image_not_in_split":
        name = os.path.basename(entry["image"])
        karpathy["images"] = [k for k in karpathy["images"] if k["filename"] != name]
        named = (utt, name, "not in the Karpathy split")
        excluded = {"local": {utt_of(c) for c in entry["captions"]}}
    elif fault == "split_image_without_speech":
        name = "COCO_val2014_000000999999.jpg"
        (copy.root / "mscoco" / "val2014" / name).symlink_to(os.readlink(copy.root / "mscoco" / entry["image"]))
        karpathy["images"].append({"filepath": "val2014", "filename": name, "split": "test"})
        named = (name[:-4], "dataset_coco.json", "without any spoken caption")
        excluded = {"test": {name[:-4]}}
    elif fault == "image_in_two_splits":
        name = os.path.basename(entry["image"])
        record = next(k for k in karpathy["images"] if k["filename"] == name)
        karpathy["images"].append(dict(record, split="val"))
        named = (name, "dataset_coco.json", "one split")
        excluded = {"local": {name, *(utt_of(c) for c in entry["captions"])}}
    else:
        raise ValueError(f"unknown fault {fault!r}; known: {', '.join(SPOKENCOCO_FAULTS)}")
    val_json.write_bytes(json.dumps(val, ensure_ascii=False).encode(
        "latin-1" if fault == "caption_not_utf8" else "utf-8"))
    karpathy_json.write_text(json.dumps(karpathy), encoding="utf-8")
    return Faulty(copy, named, excluded, fixed_by)


SPOKENCOCO_FAULTS = ("missing_wav", "unreadable_wav", "empty_wav", "missing_image", "corrupt_image", "empty_caption",
                     "caption_without_text", "utterance_twice", "caption_not_utf8", "image_not_in_split",
                     "split_image_without_speech", "image_in_two_splits")
