#!/usr/bin/env python3
"""Generate the offline mini corpus: rendered shape scenes, their captions, and espeak-ng speech.

Every image holds one or two objects; an object is (shape, colour, size, position) drawn from
7 shapes x 8 colours x 2 sizes, placed left/right/top/bottom/middle over one of 5 background kinds.
Each image gets ``captions_per_image`` captions from distinct templates, every caption naming all four
attributes of every object, so a caption identifies its scene. Each attribute value has exactly one word (no
synonyms such as big/large or top/above): a keyword then hits the transcription only when it is the word that
was spoken, and the templates vary the sentence around those words. Each caption is spoken by a different
voice variant (espeak-ng voice + speed + pitch), resampled 22.05 kHz -> 16 kHz, written as 16-bit PCM.

With ``--eval_group_size G`` > 1 the dev and test images come in groups of G consecutive images of
near-identical scenes: a base scene and G - 1 variants that each differ from it by one edit (an object's colour,
shape or size; two objects trading places, colours, shapes or sizes; a left/right pair turned top/bottom). A
caption then identifies its image only if its every word is heard and bound to the right object, so retrieval
on these splits is far harder than on independent scenes; training images stay independent.

Everything is a pure function of (seed, image index): image ``i`` uses ``random.Random(f"{seed}:{i}")``
(and its group's base scene ``random.Random(f"{seed}:group<split start>:<group>")``), so images, captions and
voice choices do not depend on the worker count or on the order of work.

Outputs
  <corpus_dir>/images/<img>.png, <corpus_dir>/wavs/<utt>.wav, <corpus_dir>/manifest.tsv,
  <corpus_dir>/params.json (written first) and <corpus_dir>/.done (written last; its presence = complete);
  <data_dir>/{train,dev,test}/{wav.scp,text,utt2spk,spk2utt,utt2img,img.scp}, LC_ALL=C sorted, absolute paths.
Utterance ids are ``<voice>-<image id>-<n>`` (speaker = voice). Splits are by image: the first images
are train, then dev, then test (training images are i.i.d., so a contiguous range is unbiased).
Re-running with the same options skips the synthesis; files already written by an interrupted run are
kept (every file is written to a temp name and renamed, so an existing file is a complete one; temp files of a
killed run are removed).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from speechclip_plus.io import atomic_path, atomic_write_text, remove_stale_temps

LOG = logging.getLogger("make_corpus")

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond", "heart")
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 75, 215),
    "yellow": (240, 215, 30),
    "purple": (135, 50, 175),
    "orange": (245, 135, 25),
    "white": (248, 248, 248),
    "black": (12, 12, 12),
}
SIZES: Tuple[str, ...] = ("small", "big")
SIZE_WORDS = {"small": ("small",), "big": ("big",)}  # one word per attribute: a keyword's hit is unambiguous
SINGLE_POSITIONS: Tuple[str, ...] = ("left", "right", "top", "bottom", "middle")
PAIR_LAYOUTS: Tuple[Tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))
POSITION_PHRASES = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "middle": ("in the middle", "right in the middle"),
}
# Object centre as a fraction of the image side, before jitter.
CENTRES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
           "middle": (0.5, 0.5)}
RADIUS = {"small": 0.11, "big": 0.20}  # fraction of the image side
BACKGROUNDS: Tuple[str, ...] = ("flat", "noise", "gradient", "stripes", "checker")
SUPERSAMPLE = 4
ESPEAK_RATE = 22050
TARGET_RATE = 16000
SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Voice:
    """A speaker: an espeak-ng voice+variant, words per minute and pitch (0-99)."""

    name: str
    voice: str
    speed: int
    pitch: int


VOICES: Tuple[Voice, ...] = (
    Voice("usm3", "en-us+m3", 165, 45),
    Voice("usf2", "en-us+f2", 150, 60),
    Voice("gbm1", "en-gb+m1", 175, 40),
    Voice("gbf4", "en-gb+f4", 160, 55),
    Voice("scm2", "en-gb-scotland+m2", 155, 50),
    Voice("cbf1", "en-029+f1", 170, 65),
    Voice("rpm4", "en-gb-x-rp+m4", 185, 35),
    Voice("nyf3", "en-us-nyc+f3", 145, 50),
    Voice("wmm7", "en-gb-x-gbcwmd+m7", 160, 40),
    Voice("lcf5", "en-gb-x-gbclan+f5", 180, 58),
)


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    position: str


# ----------------------------------------------------------------------------------------------- scenes
def sample_scene(rng: random.Random) -> List[Obj]:
    """One object (30%) at one of 5 positions, or two distinct objects left/right or top/bottom."""
    if rng.random() < 0.3:
        positions: Sequence[str] = (rng.choice(SINGLE_POSITIONS),)
    else:
        positions = rng.choice(PAIR_LAYOUTS)
    objs: List[Obj] = []
    for pos in positions:
        while True:
            obj = Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), pos)
            if not any((o.shape, o.colour, o.size) == (obj.shape, obj.colour, obj.size) for o in objs):
                break
        objs.append(obj)
    return objs


# One-change edits that turn a scene into a near-identical one (the dev/test groups, see ``scene_variants``).
EDITS: Tuple[str, ...] = ("colour", "shape", "size", "position", "swap_colours", "swap_shapes", "swap_sizes",
                          "layout")
MAX_GROUP = 16  # a one-object scene has 18 one-edit variants (7 colours, 6 shapes, 1 size, 4 positions)
SWAPS = {"swap_colours": "colour", "swap_shapes": "shape", "swap_sizes": "size"}
TURN = {"left": "top", "right": "bottom", "top": "left", "bottom": "right"}


def _valid(objs: Sequence[Obj]) -> bool:
    return len({(o.shape, o.colour, o.size) for o in objs}) == len(objs)


def edit_scene(objs: Sequence[Obj], kind: str, rng: random.Random) -> Optional[Tuple[Obj, ...]]:
    """``objs`` with one change of ``kind`` (one of EDITS), or None where it does not apply or would make the
    two objects alike. colour/shape/size: one object's attribute; position: the single object moves, or the two
    objects trade places; swap_*: the two objects trade that attribute; layout: a left/right pair becomes
    top/bottom or back."""
    objs = list(objs)
    pair = len(objs) == 2
    if kind in ("colour", "shape", "size"):
        k = rng.randrange(len(objs))
        o = objs[k]
        if kind == "colour":
            objs[k] = replace(o, colour=rng.choice([c for c in COLOURS if c != o.colour]))
        elif kind == "shape":
            objs[k] = replace(o, shape=rng.choice([s for s in SHAPES if s != o.shape]))
        else:
            objs[k] = replace(o, size=SIZES[1 - SIZES.index(o.size)])
    elif kind == "position":
        if pair:
            a, b = objs
            objs = [replace(a, position=b.position), replace(b, position=a.position)]
        else:
            objs[0] = replace(objs[0], position=rng.choice([p for p in SINGLE_POSITIONS if p != objs[0].position]))
    elif kind in SWAPS:
        attr = SWAPS[kind]
        if not pair or getattr(objs[0], attr) == getattr(objs[1], attr):
            return None
        a, b = objs
        objs = [replace(a, **{attr: getattr(b, attr)}), replace(b, **{attr: getattr(a, attr)})]
    elif kind == "layout":
        if not pair:
            return None
        objs = [replace(o, position=TURN[o.position]) for o in objs]
    else:
        raise ValueError(f"unknown edit {kind!r} (one of {', '.join(EDITS)})")
    return tuple(objs) if _valid(objs) else None


def scene_variants(base: Sequence[Obj], rng: random.Random, n: int) -> List[Tuple[Obj, ...]]:
    """``base`` and ``n - 1`` distinct scenes that each differ from it by one edit, the edit kinds taken in
    turns (shuffled each round) so that every applicable kind is about equally common."""
    out, seen = [tuple(base)], {frozenset(base)}
    for _ in range(4 * n):
        kinds = list(EDITS)
        rng.shuffle(kinds)
        for kind in kinds:
            if len(out) == n:
                return out
            for _ in range(8):
                scene = edit_scene(base, kind, rng)
                if scene is not None and frozenset(scene) not in seen:
                    out.append(scene)
                    seen.add(frozenset(scene))
                    break
    if len(out) < n:
        raise ValueError(f"could not make {n} distinct variants of {base}")
    return out


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
    """Vertices of ``shape`` centred on (cx, cy) with outer radius r (circle/heart are drawn elsewhere)."""
    if shape == "square":
        h = 0.82 * r
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        pts = [(0.0, -r), (0.95 * r, 0.72 * r), (-0.95 * r, 0.72 * r)]
    elif shape == "diamond":
        pts = [(0.0, -r), (0.68 * r, 0.0), (0.0, r), (-0.68 * r, 0.0)]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(ang), rad * math.sin(ang)))
    elif shape == "cross":
        a, b = 0.3 * r, 0.95 * r
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a),
               (-b, -a), (-a, -a)]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    return [(cx + x, cy + y) for x, y in pts]


def _draw_mask(shape: str, cx: float, cy: float, r: float, side: int) -> Image.Image:
    """Anti-aliased coverage mask (mode L, ``side`` px) of one shape, drawn at SUPERSAMPLE x and reduced."""
    s = SUPERSAMPLE
    big = Image.new("L", (side * s, side * s), 0)
    draw = ImageDraw.Draw(big)
    cx, cy, r = cx * s, cy * s, r * s
    if shape == "circle":
        draw.ellipse([cx - 0.9 * r, cy - 0.9 * r, cx + 0.9 * r, cy + 0.9 * r], fill=255)
    elif shape == "heart":
        lobe = 0.5 * r
        for sx in (-1, 1):
            lx, ly = cx + sx * 0.46 * r, cy - 0.3 * r
            draw.ellipse([lx - lobe, ly - lobe, lx + lobe, ly + lobe], fill=255)
        draw.polygon([(cx - 0.93 * r, cy - 0.15 * r), (cx + 0.93 * r, cy - 0.15 * r), (cx, cy + 0.95 * r)],
                     fill=255)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r), fill=255)
    return big.resize((side, side), Image.BOX)


def _background(rng: random.Random, side: int) -> np.ndarray:
    """(side, side, 3) float background: grey level 70-185 with a slight tint, in one of 5 textures."""
    kind = rng.choice(BACKGROUNDS)
    level = rng.uniform(70, 185)
    base = np.array([level + rng.uniform(-12, 12) for _ in range(3)])
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
    img = np.broadcast_to(base, (side, side, 3)).copy()
    nrng = np.random.default_rng(rng.getrandbits(63))
    if kind == "noise":
        img += nrng.normal(0.0, rng.uniform(6, 16), size=(side, side, 1))
    elif kind == "gradient":
        ang = rng.uniform(0, 2 * math.pi)
        ramp = (np.cos(ang) * xx + np.sin(ang) * yy) / side
        img += (rng.uniform(25, 55) * (ramp - ramp.mean()))[..., None]
    elif kind == "stripes":
        period = rng.randint(4, 10)
        coord = xx if rng.random() < 0.5 else yy
        img += np.where((coord // period) % 2 == 0, 1.0, -1.0)[..., None] * rng.uniform(6, 14)
    elif kind == "checker":
        period = rng.randint(4, 12)
        img += np.where(((xx // period) + (yy // period)) % 2 == 0, 1.0, -1.0)[..., None] * rng.uniform(6, 14)
    return img


def render(objs: Sequence[Obj], rng: random.Random, side: int) -> Image.Image:
    """RGB image of the scene: background, then each object with +-4% position and +-8% size jitter."""
    img = _background(rng, side)
    for obj in objs:
        fx, fy = CENTRES[obj.position]
        jit = 0.05 if len(objs) == 2 else 0.06
        cx = (fx + rng.uniform(-jit, jit)) * side
        cy = (fy + rng.uniform(-jit, jit)) * side
        r = RADIUS[obj.size] * rng.uniform(0.92, 1.08) * side
        alpha = np.asarray(_draw_mask(obj.shape, cx, cy, r, side), dtype=np.float64)[..., None] / 255.0
        colour = np.array([min(255.0, max(0.0, c + rng.uniform(-12, 12))) for c in COLOURS[obj.colour]])
        img = img * (1.0 - alpha) + colour * alpha
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------------- captions
def _noun(obj: Obj, rng: random.Random) -> str:
    return f"{rng.choice(SIZE_WORDS[obj.size])} {obj.colour} {obj.shape}"


def _where(obj: Obj, rng: random.Random) -> str:
    return rng.choice(POSITION_PHRASES[obj.position])


def _ordered(objs: Sequence[Obj], rng: random.Random) -> List[Obj]:
    out = list(objs)
    rng.shuffle(out)
    return out


def _t_plain(objs, rng):
    return " and ".join(f"a {_noun(o, rng)} {_where(o, rng)}" for o in _ordered(objs, rng))


def _t_there(objs, rng):
    return "there is " + " and ".join(f"a {_noun(o, rng)} {_where(o, rng)}" for o in _ordered(objs, rng))


def _t_count(objs, rng):
    head = "one shape: " if len(objs) == 1 else "two shapes: "
    return head + " and ".join(f"a {_noun(o, rng)} {_where(o, rng)}" for o in _ordered(objs, rng))


def _t_position_first(objs, rng):
    return " and ".join(f"{_where(o, rng)} is a {_noun(o, rng)}" for o in _ordered(objs, rng))


RELATIONS = {"left": "to the left of", "right": "to the right of"}


def _t_relation(objs, rng):
    """Left/right pairs by relation; other scenes name each position (no synonym such as above = top)."""
    a, b = (_ordered(objs, rng) + [None])[:2]
    if b is not None and a.position in RELATIONS:
        return f"a picture of a {_noun(a, rng)} {RELATIONS[a.position]} a {_noun(b, rng)}"
    return "a picture of " + " and ".join(f"a {_noun(o, rng)} {_where(o, rng)}" for o in _ordered(objs, rng))


def _t_keywords(objs, rng):
    return " ".join(f"{o.size} {o.colour} {o.shape} {o.position}" for o in _ordered(objs, rng))


TEMPLATES: Tuple[Callable[[Sequence[Obj], random.Random], str], ...] = (
    _t_plain, _t_there, _t_count, _t_position_first, _t_relation, _t_keywords,
)


def make_captions(objs: Sequence[Obj], rng: random.Random, n: int) -> List[str]:
    """``n`` captions, distinct templates; each names shape, colour, size and position of every object."""
    if not 1 <= n <= len(TEMPLATES):
        raise ValueError(f"captions_per_image must be in 1..{len(TEMPLATES)}, got {n}")
    return [t(objs, rng) for t in rng.sample(TEMPLATES, n)]


# ----------------------------------------------------------------------------------------------- items
@dataclass(frozen=True)
class Utt:
    utt: str
    image: str
    voice: str
    text: str


@dataclass(frozen=True)
class ImageItem:
    index: int
    image_id: str
    objs: Tuple[Obj, ...]
    utts: Tuple[Utt, ...]


def image_id(index: int) -> str:
    return f"img{index:05d}"


@dataclass(frozen=True)
class Groups:
    """Image index ranges (the dev and test splits) whose images come in groups of ``size`` consecutive
    indices: one base scene and its ``size - 1`` one-edit variants (``scene_variants``). size 1: none."""

    ranges: Tuple[Tuple[int, int], ...] = ()
    size: int = 1

    def scene(self, seed: int, index: int) -> Optional[Tuple[Obj, ...]]:
        """The scene of image ``index`` when it belongs to a group, else None (an independent scene)."""
        if self.size <= 1:
            return None
        for start, stop in self.ranges:
            if start <= index < stop:
                group, member = divmod(index - start, self.size)
                rng = random.Random(f"{seed}:group{start}:{group}")
                return scene_variants(sample_scene(rng), rng, self.size)[member]
        return None


def plan_image(seed: int, index: int, captions_per_image: int, voices: Sequence[Voice],
               groups: Groups = Groups()) -> Tuple[ImageItem, random.Random]:
    """Scene, captions and voices of image ``index``; also returns the rng state to render it with."""
    if captions_per_image > len(voices):
        raise ValueError(f"captions_per_image={captions_per_image} needs as many voices, got {len(voices)}")
    rng = random.Random(f"{seed}:{index}")
    grouped = groups.scene(seed, index)
    objs = tuple(sample_scene(rng)) if grouped is None else grouped
    texts = make_captions(objs, rng, captions_per_image)
    spk = rng.sample(list(voices), captions_per_image)
    img = image_id(index)
    utts = tuple(Utt(f"{v.name}-{img}-{n}", img, v.name, t) for n, (v, t) in enumerate(zip(spk, texts)))
    return ImageItem(index, img, objs, utts), rng


# --------------------------------------------------------------------------------------------- writing
_RESAMPLERS: Dict[int, object] = {}


def resample(wav: np.ndarray, rate: int) -> np.ndarray:
    """``wav`` at ``rate`` -> TARGET_RATE with torchaudio's ``Resample`` (its filter made once per rate)."""
    import torch
    import torchaudio

    if rate not in _RESAMPLERS:
        _RESAMPLERS[rate] = torchaudio.transforms.Resample(rate, TARGET_RATE)
    with torch.no_grad():
        return _RESAMPLERS[rate](torch.from_numpy(wav)).clamp_(-1.0, 1.0).numpy()


def synthesize(text: str, voice: Voice) -> np.ndarray:
    """espeak-ng speech of ``text`` as float32 mono at TARGET_RATE."""
    import soundfile as sf

    cmd = ["espeak-ng", "-v", voice.voice, "-s", str(voice.speed), "-p", str(voice.pitch), "--stdout", text]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0 or not proc.stdout:
        err = proc.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"espeak-ng failed ({' '.join(cmd)}): {err}")
    wav, rate = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    if wav.ndim != 1:
        wav = wav.mean(axis=1)
    return resample(wav, rate)


_WORKER: Dict[str, object] = {}


def _init_worker(corpus_dir: str, seed: int, captions_per_image: int, voices: Tuple[Voice, ...],
                 side: int, groups: Groups) -> None:
    import torch

    torch.set_num_threads(1)
    _WORKER.update(corpus_dir=Path(corpus_dir), seed=seed, cpi=captions_per_image,
                   voices=voices, side=side, groups=groups)


def _make_one(index: int) -> int:
    """Render image ``index`` and speak its captions, skipping files that exist. Returns files written."""
    import soundfile as sf

    corpus: Path = _WORKER["corpus_dir"]  # type: ignore[assignment]
    voices = {v.name: v for v in _WORKER["voices"]}  # type: ignore[union-attr]
    item, rng = plan_image(_WORKER["seed"], index, _WORKER["cpi"],  # type: ignore[arg-type]
                           tuple(voices.values()), _WORKER["groups"])  # type: ignore[arg-type]
    written = 0
    png = corpus / "images" / f"{item.image_id}.png"
    if not png.exists():
        with atomic_path(png) as tmp:
            render(item.objs, rng, _WORKER["side"]).save(tmp, format="PNG")  # type: ignore[arg-type]
        written += 1
    for u in item.utts:
        wav_path = corpus / "wavs" / f"{u.utt}.wav"
        if wav_path.exists():
            continue
        with atomic_path(wav_path) as tmp:
            sf.write(tmp, synthesize(u.text, voices[u.voice]), TARGET_RATE, subtype="PCM_16", format="WAV")
        written += 1
    return written


# ------------------------------------------------------------------------------------------ data dirs
def split_sizes(num_images: int, dev_fraction: float, test_fraction: float) -> Dict[str, range]:
    """Contiguous image-index ranges per split; dev and test get at least one image each."""
    n_test = max(1, round(test_fraction * num_images))
    n_dev = max(1, round(dev_fraction * num_images))
    n_train = num_images - n_dev - n_test
    if n_train < 1:
        raise ValueError(f"num_images={num_images} leaves no training images (dev={n_dev}, test={n_test})")
    return {"train": range(0, n_train), "dev": range(n_train, n_train + n_dev),
            "test": range(n_train + n_dev, num_images)}


def _lines(pairs: Iterable[Tuple[str, str]]) -> str:
    return "".join(f"{k} {v}\n" for k, v in sorted(pairs, key=lambda kv: kv[0].encode()))


def eval_groups(splits: Dict[str, range], size: int) -> Groups:
    """The dev and test ranges of ``split_sizes`` in groups of ``size`` (``Groups``)."""
    return Groups(tuple((splits[s].start, splits[s].stop) for s in ("dev", "test")), size)


def write_data_dir(out: Path, items: Sequence[ImageItem], corpus: Path) -> None:
    """Kaldi data dir for ``items``: every file key-sorted in byte order (LC_ALL=C) with absolute paths."""
    out.mkdir(parents=True, exist_ok=True)
    utts = [u for it in items for u in it.utts]
    spk2utt: Dict[str, List[str]] = {}
    for u in utts:
        spk2utt.setdefault(u.voice, []).append(u.utt)
    files = {
        "wav.scp": _lines((u.utt, str(corpus / "wavs" / f"{u.utt}.wav")) for u in utts),
        "text": _lines((u.utt, u.text) for u in utts),
        "utt2spk": _lines((u.utt, u.voice) for u in utts),
        "utt2img": _lines((u.utt, u.image) for u in utts),
        "spk2utt": _lines((s, " ".join(sorted(us, key=str.encode))) for s, us in spk2utt.items()),
        "img.scp": _lines((it.image_id, str(corpus / "images" / f"{it.image_id}.png")) for it in items),
    }
    for name, content in files.items():
        atomic_write_text(out / name, content)


def check_data_dir(d: Path) -> None:
    """Minimal validation: files present, byte-sorted unique keys, consistent keys, referenced files exist."""
    tables: Dict[str, List[Tuple[str, str]]] = {}
    for name in ("wav.scp", "text", "utt2spk", "spk2utt", "utt2img", "img.scp"):
        path = d / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing")
        rows = []
        for ln, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            key, _, value = line.partition(" ")
            if not key or not value:
                raise ValueError(f"{path}:{ln}: expected '<key> <value>', got {line!r}")
            rows.append((key, value))
        keys = [k.encode() for k, _ in rows]
        if keys != sorted(set(keys)):
            raise ValueError(f"{path}: keys not unique and sorted in C byte order")
        tables[name] = rows
    utt_keys = {k for k, _ in tables["wav.scp"]}
    for name in ("text", "utt2spk", "utt2img"):
        if {k for k, _ in tables[name]} != utt_keys:
            raise ValueError(f"{d / name}: utterance keys differ from {d / 'wav.scp'}")
    spk_utts = {u for _, us in tables["spk2utt"] for u in us.split()}
    if spk_utts != utt_keys:
        raise ValueError(f"{d / 'spk2utt'}: utterances differ from {d / 'wav.scp'}")
    images = dict(tables["img.scp"])
    for utt, img in tables["utt2img"]:
        if img not in images:
            raise ValueError(f"{d / 'utt2img'}: {utt} -> {img}, not in {d / 'img.scp'}")
    for name in ("wav.scp", "img.scp"):
        for key, path in tables[name]:
            if not os.path.isabs(path) or not os.path.isfile(path):
                raise FileNotFoundError(f"{d / name}: {key} -> {path}: not an existing absolute path")


# ------------------------------------------------------------------------------------------------- main
CORPUS_VERSION = 3  # bumped when the generator's output changes (2: one word per attribute; 3: dev/test groups)


def corpus_params(args: argparse.Namespace, voices: Sequence[Voice]) -> Dict[str, object]:
    return {"version": CORPUS_VERSION, "seed": args.seed, "num_images": args.num_images,
            "captions_per_image": args.captions_per_image, "image_size": args.image_size,
            "dev_fraction": args.dev_fraction, "test_fraction": args.test_fraction,
            "eval_group_size": args.eval_group_size, "voices": [asdict(v) for v in voices]}


def build_corpus(args: argparse.Namespace) -> Path:
    """Create (or reuse) the corpus and write the data dirs; returns the absolute corpus dir."""
    corpus = Path(args.corpus_dir).resolve()
    data = Path(args.data_dir).resolve()
    if not 1 <= args.num_voices <= len(VOICES):
        raise ValueError(f"--num_voices must be in 1..{len(VOICES)}, got {args.num_voices}")
    voices = VOICES[: args.num_voices]
    params = corpus_params(args, voices)
    splits = split_sizes(args.num_images, args.dev_fraction, args.test_fraction)
    groups = eval_groups(splits, args.eval_group_size)
    params_file, done = corpus / "params.json", corpus / ".done"
    if params_file.exists():
        old = json.loads(params_file.read_text(encoding="utf-8"))
        if old != params:
            diff = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
            raise SystemExit(f"{corpus} holds a corpus made with other options ({', '.join(diff)} differ, "
                             f"see {params_file}); remove it or pass another --corpus_dir")
    items = [plan_image(args.seed, i, args.captions_per_image, voices, groups)[0] for i in range(args.num_images)]
    expected = [corpus / "images" / f"{it.image_id}.png" for it in items]
    expected += [corpus / "wavs" / f"{u.utt}.wav" for it in items for u in it.utts]
    if done.exists():
        missing = [p for p in expected if not p.exists()]
        if missing:
            LOG.warning("%s exists but %d files are missing (e.g. %s): making them again", done, len(missing),
                        missing[0])
            done.unlink()
    if done.exists():
        LOG.info("corpus %s is complete (%s exists): skipping synthesis", corpus, done)
    else:
        if shutil.which("espeak-ng") is None:
            raise SystemExit("espeak-ng not found: install it (apt-get install espeak-ng)")
        for sub in ("images", "wavs"):
            (corpus / sub).mkdir(parents=True, exist_ok=True)
            remove_stale_temps(corpus / sub)  # left by an interrupted run
        atomic_write_text(params_file, json.dumps(params, indent=1) + "\n")
        from tqdm import tqdm

        init = (str(corpus), args.seed, args.captions_per_image, tuple(voices), args.image_size, groups)
        LOG.info("synthesising %d images x %d captions with %d voices, %d workers into %s",
                 args.num_images, args.captions_per_image, len(voices), args.nj, corpus)
        written = 0
        indices = range(args.num_images)
        bar = tqdm(total=args.num_images, desc="mini corpus", unit="img", disable=args.no_progress)
        if args.nj <= 1:
            _init_worker(*init)
            for i in indices:
                written += _make_one(i)
                bar.update(1)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(args.nj, initializer=_init_worker, initargs=init) as pool:
                for n in pool.imap_unordered(_make_one, indices, chunksize=8):
                    written += n
                    bar.update(1)
        bar.close()
        rows = sorted((u.utt, it.image_id, split, u.voice, u.text)
                      for split, rng_ in splits.items() for it in (items[i] for i in rng_) for u in it.utts)
        atomic_write_text(corpus / "manifest.tsv",
                          "utt\timage\tsplit\tvoice\ttext\n" + "".join("\t".join(r) + "\n" for r in rows))
        LOG.info("wrote %d new files", written)
        atomic_write_text(done, json.dumps(params, indent=1) + "\n")

    for split, idx in splits.items():
        write_data_dir(data / split, [items[i] for i in idx], corpus)
        check_data_dir(data / split)
        LOG.info("%s: %d images, %d utterances -> %s", split, len(idx), len(idx) * args.captions_per_image,
                 data / split)
    return corpus


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--corpus_dir", default="downloads/mini_corpus", help="where images and wavs go")
    p.add_argument("--data_dir", default="data", help="parent of the train/dev/test Kaldi data dirs")
    p.add_argument("--num_images", type=int, default=1000)
    p.add_argument("--captions_per_image", type=int, default=5, help=f"1..{len(TEMPLATES)}")
    p.add_argument("--num_voices", type=int, default=len(VOICES), help=f"first N of the {len(VOICES)} voices")
    p.add_argument("--image_size", type=int, default=64, help="image side in pixels")
    p.add_argument("--dev_fraction", type=float, default=0.1)
    p.add_argument("--test_fraction", type=float, default=0.15)
    p.add_argument("--eval_group_size", type=int, default=1,
                   help=f"dev/test images in groups of this many near-identical scenes (1..{MAX_GROUP}; 1 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nj", type=int, default=2, help="synthesis worker processes")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = get_parser().parse_args(argv)
    if args.num_images < 3:
        raise SystemExit("--num_images must be >= 3 (one image per split at least)")
    if not 1 <= args.eval_group_size <= MAX_GROUP:
        raise SystemExit(f"--eval_group_size must be in 1..{MAX_GROUP}, got {args.eval_group_size}")
    build_corpus(args)


if __name__ == "__main__":
    sys.exit(main())
