"""Data stages 0, 1 and 3 at Flickr8k size and at 5x: cost per 1,000 utterances, peak memory, and a projection
to SpokenCOCO (target: the cost per utterance at 5x within 1.2x of that at 1x, i.e. linear or better).

Run: ``python bench/data_stages.py`` (``--quick`` for a small run that does not touch RESULTS.md).

Corpus: the Flickr8k + Flickr Audio layout (``Flicker8k_Dataset/``, ``Flickr8k.token.txt``, the three split
lists, ``flickr_audio/{wavs/,wav2capt.txt,wav2spk.txt}``, with the distribution's known quirks: ``__MACOSX/``,
the ``2258277193_586949ec62.jpg.1`` caption group, images in no split) at 8,000 images / 40,000 utterances
(scale 1) and 40,000 / 200,000 (scale 5), split 6:1:1 like Flickr8k, 183 speakers. Its files are hard links to
``--distinct-wavs`` real 16 kHz 16-bit WAV files of 3-6 s and ``--distinct-images`` real 500x375 JPEGs (Flickr8k's
usual size; crops of matplotlib's sample photograph), so the corpus takes almost no disk; reads come from the
page cache (disk I/O is not measured).
Captions are 8-14 words drawn from a Zipf-distributed vocabulary of 3,000 made-up words.

Each stage runs the project's own code in a fresh process (so its peak memory is its own) with ``--nj``
processes where the stage has them:
  stage 0  ``egs/flickr8k/local/prepare_flickr8k.py`` (parse the corpus files; check every wav header and
           every image, ``CorpusWriter.check_media``; write the data dirs) and ``validate_data`` on the three
           sets, as the engine runs it; each part timed.
  stage 1  ``format_audio`` on each set (every wav read in full; nothing to convert, as with the real corpus).
  stage 3  ``make_vocab --spm_vocab_size 500`` on the training text (CLIP BPE usage + sentencepiece).
Cost: CPU seconds (user + system, ``getrusage``) of the stage's process and its workers, the figure that a
shared machine disturbs least (wall seconds are reported too). Peak memory: the largest resident set of the
stage's process and its workers (``ru_maxrss``).

The two scales run in one invocation, each stage ``--repeats`` times (the run with the least CPU time kept) in
the order 1x, 5x, 1x, 5x so that a load change on the shared machine hits both. The generated corpora are
deleted at the end. Writes its tables to bench/RESULTS.md under "## Data stages" (other sections are left
alone).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PREPARE = ROOT / "egs" / "flickr8k" / "local" / "prepare_flickr8k.py"
SETS = ("train", "dev", "test")
SPOKENCOCO = {"utterances": 590_000, "images": 123_287}
FLICKR8K_IMAGES = 8000  # scale 1
SPEAKERS = 183


# ---------------------------------------------------------------------------------------------- corpus
def _words(rng: np.random.Generator, n: int = 3000) -> List[str]:
    syl = ["ka", "to", "ri", "man", "sel", "po", "dun", "e", "va", "lo", "gri", "ste", "a", "bo", "nir", "tu"]
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(syl, size=rng.integers(1, 4))))
    return sorted(words)


def make_distinct(root: Path, n_wavs: int, n_images: int, seed: int = 0) -> Dict[str, List[Path]]:
    """``n_wavs`` real WAV files (3-6 s, a few tones and noise), ``n_images`` real 500x375 JPEGs, and the same
    crops at 640x480 (COCO's usual size, for the image-check cost only)."""
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(seed)
    out: Dict[str, List[Path]] = {"wav": [], "image": [], "image_640x480": []}
    for sub in ("wav", "img", "img640"):
        (root / sub).mkdir(parents=True)
    for k in range(n_wavs):
        t = np.arange(int(16000 * rng.uniform(3, 6))) / 16000
        x = sum(0.1 * np.sin(2 * np.pi * f * t) for f in rng.uniform(120, 900, 3)) + 0.01 * rng.standard_normal(len(t))
        path = root / "wav" / f"w{k}.wav"
        sf.write(str(path), x.astype(np.float32), 16000, subtype="PCM_16")
        out["wav"].append(path)
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as photo:  # a real photograph (matplotlib's)
        photo = photo.convert("RGB")
    for k in range(n_images):  # crops of it, flipped and tinted: photo-like content at Flickr8k's usual size
        w = int(rng.integers(300, photo.width + 1))
        h = int(w * 375 / 500)
        x0, y0 = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        crop, tint = photo.crop((x0, y0, x0 + w, y0 + h)), rng.uniform(0.7, 1.2, 3)
        for size, sub, key in (((500, 375), "img", "image"), ((640, 480), "img640", "image_640x480")):
            pixels = np.asarray(crop.resize(size), dtype=np.float32) * tint
            if k % 2:
                pixels = pixels[:, ::-1]
            path = root / sub / f"i{k}.jpg"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)
            out[key].append(path)
    return out


def make_flickr8k_layout(root: Path, n_images: int, distinct: Dict[str, List[Path]], seed: int = 0) -> Dict:
    """The Flickr8k layout with ``n_images`` split images (6:1:1) and 5 spoken captions each, plus 1 % more
    images in no split (a known quirk), files hard-linked to ``distinct``. Returns counts."""
    rng = np.random.default_rng(seed)
    words = _words(rng)
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    images_dir, wav_dir = root / "Flicker8k_Dataset", root / "flickr_audio" / "wavs"
    images_dir.mkdir(parents=True)
    wav_dir.mkdir(parents=True)
    (root / "__MACOSX" / "Flicker8k_Dataset").mkdir(parents=True)
    n_extra = n_images // 100
    names = [f"{1000000000 + 37 * i}_{i:010x}" for i in range(n_images + n_extra)]
    n_train, n_dev = n_images * 6 // 8, n_images // 8
    split_lists = {"train": names[:n_train], "dev": names[n_train:n_train + n_dev],
                   "test": names[n_train + n_dev:n_images]}
    token, capt, spk = [], [], []
    n_wavs = 0
    for i, name in enumerate(names):
        os.link(distinct["image"][i % len(distinct["image"])], images_dir / f"{name}.jpg")
        for n in range(5):
            caption = " ".join(rng.choice(words, size=rng.integers(8, 15), p=zipf))
            token.append(f"{name}.jpg#{n}\t{caption} .")
            if i < n_images:
                wav = f"{name}_{n}.wav"
                os.link(distinct["wav"][n_wavs % len(distinct["wav"])], wav_dir / wav)
                capt.append(f"{wav} {name}.jpg #{n}")
                spk.append(f"{wav} {n_wavs % SPEAKERS + 1}")
                n_wavs += 1
    token += [f"2258277193_586949ec62.jpg.1#{n}\ta caption group without its image ." for n in range(5)]
    (root / "Flickr8k.token.txt").write_text("\n".join(token) + "\n", encoding="utf-8")
    for split, listed in split_lists.items():
        name = {"train": "train", "dev": "dev", "test": "test"}[split]
        (root / f"Flickr_8k.{name}Images.txt").write_text("".join(f"{x}.jpg\n" for x in listed), encoding="utf-8")
    (root / "flickr_audio" / "wav2capt.txt").write_text("\n".join(capt) + "\n", encoding="utf-8")
    (root / "flickr_audio" / "wav2spk.txt").write_text("\n".join(spk) + "\n", encoding="utf-8")
    (root / "__MACOSX" / "Flicker8k_Dataset" / f"._{names[0]}.jpg").write_bytes(b"\x00\x05\x16\x07")
    return {"images": n_images, "utterances": n_wavs, "images_in_no_split": n_extra}


# ---------------------------------------------------------------------------------------------- stages
def _cpu() -> float:
    """CPU seconds (user + system) of this process and its reaped children so far."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _peak_mib() -> float:
    """Largest resident set of this process and of its reaped children, MiB (Linux: ru_maxrss in KiB)."""
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024


def _quiet(fn, *args):
    """Run ``fn(*args)`` with its stdout/stderr discarded; its return value."""
    import contextlib

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args)


def run_stage(stage: str, corpus: str, work: str, nj: int) -> Dict:
    """One stage in this process (called in a fresh subprocess by ``measure``): wall and CPU seconds per part,
    and the peak MiB."""
    import importlib.util
    import logging

    logging.disable(logging.CRITICAL)
    data = os.path.join(work, "data")
    wall: Dict[str, float] = {}
    cpu: Dict[str, float] = {}
    clock = [time.perf_counter(), _cpu()]

    def done(part: str) -> None:
        now = [time.perf_counter(), _cpu()]
        wall[part], cpu[part] = now[0] - clock[0], now[1] - clock[1]
        clock[:] = now

    if stage == "0":
        from speechclip_plus.bin.validate_data import main as validate
        from speechclip_plus.data.corpus import CorpusWriter

        spec = importlib.util.spec_from_file_location("prepare_flickr8k", PREPARE)
        prep = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(prep)
        writer = CorpusWriter(SETS)
        prep.prepare(corpus, writer)
        done("parse")
        writer.check_media(nj)
        done("check media")
        _quiet(writer.write, data, "flickr8k_prep.json")
        done("write")
        if _quiet(validate, [os.path.join(data, s) for s in SETS]) != 0:
            raise SystemExit("validate_data failed")
        done("validate")
    elif stage == "1":
        from speechclip_plus.bin.format_audio import main as format_audio

        for s in SETS:
            if format_audio(["--data_dir", os.path.join(data, s), "--dump_dir", os.path.join(work, "dump", s),
                             "--nj", str(nj), "--no_progress"]) != 0:
                raise SystemExit(f"format_audio failed on {s}")
            done(s)
    else:
        from speechclip_plus.bin.make_vocab import main as make_vocab

        if make_vocab(["--text", os.path.join(data, "train", "text"), "--out_dir", os.path.join(work, "tok"),
                       "--spm_vocab_size", "500"]) != 0:
            raise SystemExit("make_vocab failed")
        done("vocab")
    return {"wall": wall, "cpu": cpu, "seconds": sum(wall.values()), "cpu_seconds": sum(cpu.values()),
            "peak_mib": _peak_mib()}


def measure(stage: str, corpus: Path, work: Path, nj: int) -> Dict:
    """``run_stage`` in a fresh process; stage 1 and 3 start from the data dirs stage 0 left in ``work``."""
    if stage == "1":  # a re-run must redo the work: drop what the previous stage-1 run added
        for s in SETS:
            for name in ("utt2dur", "wav.scp.orig"):
                if (work / "data" / s / name).exists():
                    os.remove(work / "data" / s / name)
    if stage == "3":
        shutil.rmtree(work / "tok", ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, __file__, "--_stage", stage, str(corpus), str(work), str(nj)],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} on {corpus} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def image_check_costs(distinct: Dict[str, List[Path]], repeats: int = 3) -> Dict[str, float]:
    """CPU ms per image in this process, best of ``repeats``: the stage-0 check (``datadir.image_problem``: verify +
    JPEG draft decode), a full decode (what the check did before), and the check at 640x480 (COCO's usual
    size; the same crops)."""
    from PIL import Image

    from speechclip_plus.data.datadir import image_problem

    def full(path):
        with Image.open(path) as im:
            im.load()

    out = {}
    for label, fn, files in (("check", image_problem, distinct["image"]), ("full decode", full, distinct["image"]),
                             ("check 640x480", image_problem, distinct["image_640x480"])):
        best = float("inf")
        for _ in range(repeats):
            t = time.process_time()
            for p in files:
                fn(str(p))
            best = min(best, time.process_time() - t)
        out[label] = 1000 * best / len(files)
    return out


# ---------------------------------------------------------------------------------------------- report
def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", type=int, nargs=2, default=[1, 5], help="the two corpus sizes, x 8,000 images")
    ap.add_argument("--images", type=int, default=FLICKR8K_IMAGES, help="split images at scale 1")
    ap.add_argument("--nj", type=int, default=2, help="processes for the stages that have --nj")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each stage per scale (best kept)")
    ap.add_argument("--distinct-wavs", type=int, default=300)
    ap.add_argument("--distinct-images", type=int, default=200)
    ap.add_argument("--workdir", default=None, help="where the corpora go (default: a temp dir, deleted)")
    ap.add_argument("--quick", action="store_true", help="1,000 images at scale 1; implies --no-write")
    ap.add_argument("--no-write", action="store_true", help="print only, do not update bench/RESULTS.md")
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    ap.add_argument("--_stage", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._stage:
        stage, corpus, work, nj = args._stage
        print(json.dumps(run_stage(stage, corpus, work, int(nj))))
        return
    if args.quick:
        args.images, args.repeats, args.no_write = 1000, 1, True
        args.distinct_wavs, args.distinct_images = 60, 40

    t_start = time.perf_counter()
    load_start = load_average()
    base = Path(tempfile.mkdtemp(prefix="bench_data_stages.", dir=args.workdir))
    try:
        t = time.perf_counter()
        distinct = make_distinct(base / "distinct", args.distinct_wavs, args.distinct_images)
        corpora = {}
        for scale in args.scales:
            corpora[scale] = make_flickr8k_layout(base / f"corpus_x{scale}", args.images * scale, distinct)
        print(f"generated the corpora in {time.perf_counter() - t:.0f} s: " + ", ".join(
            f"x{s}: {c['utterances']} utterances, {c['images']} images" for s, c in corpora.items()),
            file=sys.stderr, flush=True)
        runs: Dict[int, Dict[str, List[Dict]]] = {s: {st: [] for st in "013"} for s in args.scales}
        for _ in range(args.repeats):
            for scale in args.scales:
                corpus, work = base / f"corpus_x{scale}", base / f"work_x{scale}"
                for stage in "013":
                    r = measure(stage, corpus, work, args.nj)
                    runs[scale][stage].append(r)
                    print(f"  x{scale} stage {stage}: {r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU, "
                          f"{r['peak_mib']:.0f} MiB ({', '.join(f'{k} {v:.1f}' for k, v in r['cpu'].items())})",
                          file=sys.stderr, flush=True)
        costs = image_check_costs(distinct)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    small, large = args.scales
    n = {s: corpora[s]["utterances"] for s in args.scales}
    # best run of each stage by CPU time (the CPU cost of the work; wall time waits for the other jobs' cores)
    best = {s: {st: min(rs, key=lambda r: r["cpu_seconds"]) for st, rs in runs[s].items()} for s in args.scales}
    per_k = {s: {st: 1000 * best[s][st]["cpu_seconds"] / n[s] for st in "013"} for s in args.scales}
    wall_k = {s: {st: 1000 * min(r["seconds"] for r in runs[s][st]) / n[s] for st in "013"} for s in args.scales}
    names = {"0": "0: corpus -> data dirs (+ validate)", "1": "1: audio check (every wav read)",
             "3": "3: vocabularies (train text)"}
    lines = [
        f"`python bench/data_stages.py`: Flickr8k layout at {n[small]:,} utterances / {corpora[small]['images']:,} "
        f"images (x{small}) and {n[large]:,} / {corpora[large]['images']:,} (x{large}), files hard-linked to "
        f"{args.distinct_wavs} real 3-6 s WAVs and {args.distinct_images} real 500x375 JPEGs (page cache: disk "
        f"reads not measured); --nj {args.nj}; each stage in a fresh process, {args.repeats} run(s) per scale in "
        f"the order x{small}, x{large}, ...; {platform.machine()}, {os.cpu_count()} CPUs; load average "
        f"{load_start} at start, {load_average()} at end (1/5/15 min); {time.perf_counter() - t_start:.0f} s in all.",
        "",
        "Cost = CPU seconds (user + system) of the stage's process and its workers, best run: on the shared "
        "2-core machine wall time mostly measures the other jobs (wall seconds per 1,000 utterances, best run, "
        "in the last columns).",
        "",
        f"| stage | x{small} CPU s | x{large} CPU s | x{small} CPU s per 1,000 utt | x{large} CPU s per 1,000 utt | "
        f"x{large} / x{small} per utt | x{small} peak MiB | x{large} peak MiB | wall s per 1,000 utt x{small} / "
        f"x{large} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    worst = 0.0
    for st in "013":
        ratio = per_k[large][st] / per_k[small][st]
        worst = max(worst, ratio)
        lines.append(f"| {names[st]} | {best[small][st]['cpu_seconds']:.1f} | {best[large][st]['cpu_seconds']:.1f} | "
                     f"{per_k[small][st]:.3f} | {per_k[large][st]:.3f} | {ratio:.2f} | "
                     f"{best[small][st]['peak_mib']:.0f} | {best[large][st]['peak_mib']:.0f} | "
                     f"{wall_k[small][st]:.3f} / {wall_k[large][st]:.3f} |")
    parts0 = {s: best[s]["0"]["cpu"] for s in args.scales}
    lines += [
        "",
        f"Stage 0 by part, CPU seconds per 1,000 utterances (x{small} / x{large}): " + ", ".join(
            f"{k} {1000 * parts0[small][k] / n[small]:.3f} / {1000 * parts0[large][k] / n[large]:.3f}"
            for k in parts0[small]) + ".",
        "",
        f"Image check, CPU ms per image in one process (best of 3 over the {args.distinct_images} distinct JPEGs): "
        f"the stage-0 check (`image_problem`: `verify()` + draft-mode decode) {costs['check']:.2f}, a full decode "
        f"{costs['full decode']:.2f} ({costs['full decode'] / costs['check']:.1f}x the check), the check on the "
        f"same crops at 640x480 (COCO's usual size) {costs['check 640x480']:.2f}.",
    ]
    verdict = "met" if worst <= 1.2 else "NOT met"
    lines += ["", f"Target (CPU cost per utterance at x{large} within 1.2x of x{small}, every stage): **{verdict}** "
                  f"(worst ratio {worst:.2f})."]
    # SpokenCOCO: the larger run's cost per utterance; memory extrapolated along its growth from x1 to x5
    n_utt, n_img = SPOKENCOCO["utterances"], SPOKENCOCO["images"]
    lines += [
        "",
        f"Projection to SpokenCOCO ({n_utt:,} utterances, {n_img:,} images: {n_utt / n_img:.1f} utterances an "
        f"image, about as here) with --nj {args.nj}: CPU time = the x{large} CPU cost per utterance x {n_utt:,} "
        f"(wall time on {args.nj} free cores: at least CPU time / {args.nj}); peak memory = the x{large} peak + "
        f"its growth per utterance from x{small} to x{large} x the {n_utt - n[large]:,} more utterances.",
        "",
        "| stage | projected CPU minutes | projected peak MiB | peak growth, KiB per 1,000 utterances |",
        "|---|---:|---:|---:|",
    ]
    for st in "013":
        growth = max(0.0, (best[large][st]["peak_mib"] - best[small][st]["peak_mib"]) / (n[large] - n[small]))
        lines.append(f"| {names[st]} | {per_k[large][st] * n_utt / 1000 / 60:.0f} | "
                     f"{best[large][st]['peak_mib'] + growth * (n_utt - n[large]):.0f} | {growth * 1024 * 1000:.0f} |")
    extra_img = (costs["check 640x480"] - costs["check"]) * n_img / 1000
    lines += [
        "",
        f"COCO's 640x480 images take {costs['check 640x480'] / costs['check']:.2f}x as long to check as these "
        f"500x375 ones, which changes stage 0's projection by about {extra_img / 60:+.1f} CPU minutes. Stage 1 "
        "grows with the audio: the generated wavs last 4.5 s on average; SpokenCOCO's last about 4.4 s (some 740 "
        "hours in 600,000 captions). Stage 3's cost is mostly fixed (imports, sentencepiece's set-up), so its "
        "cost per utterance falls with the corpus.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        from speechclip_plus.eval.report import write_md_section

        write_md_section(args.results, "Data stages", body, header="# Benchmarks")
        print(f"updated {args.results}")


if __name__ == "__main__":
    main()
