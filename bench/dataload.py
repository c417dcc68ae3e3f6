"""Data-pipeline throughput vs the model's consumption rate, egs/mini h+ config (target: the loader is never
the bottleneck).

Run: ``python bench/dataload.py`` (``--quick`` for a smaller run that does not touch RESULTS.md). The model runs
on the GPU when CUDA is available (``--device``; the loader stays on the CPU, as in training).

Data: a generated data dir in a temp dir (``make_corpus``): ``--utts`` 16 kHz 16-bit PCM WAV files of 2-4 s
written with soundfile, 5 captions per image, tiny PNG images, ``utt2dur`` (as stage 1 leaves it) and an
``img_embed.{ark,scp}`` (the toolkit's writer) of random float32 vectors of the CLIP's embedding size.

Everything goes through the real training code: a ``Trainer`` is built from ``egs/mini/conf/mini_hplus.yaml``
(overridden: ``model.clip.pretrained null`` because the recipe's teacher CLIP file may not exist -- same shape,
random weights -- and the generated data paths), so the dataset (``SpeechImageDataset``), sampler
(``LengthBucketSampler``, the config's batch size) and DataLoader (``Trainer._loader``: ``collate``, workers) are
the ones training uses.

1. loader throughput: one epoch of ``Trainer._loader`` batches with 0, 1 and 2 workers (each epoch a fresh
   DataLoader, as in training, so worker start-up is included), and with 0 workers and one intra-op torch
   thread in the main process; utterances/s, best of ``--epochs`` interleaved rounds.
2. the training loop as ``Trainer.fit`` runs it (``Trainer._epoch_batches``, then ``_forward_backward`` +
   ``_optimizer_step``: forward, backward, clipping, Adam, schedule, the config's autocast) for ``--steps``
   steps (fewer, at least 3, when ``--budget`` runs out), once with the config's ``train.num_workers`` (loader
   and model share the 2 cores) and once with 0: the time waiting for each batch is measured apart from the
   computation. Model rate = utterances / compute seconds; "waiting share" = waits after the epoch's first
   batch / loop time after it (the first wait, worker start-up plus one batch, is paid once per epoch and
   reported on its own). Waits are host wall time; compute time is wall time on the CPU and CUDA events
   (``bench/_device.py``) on a GPU.

Writes its tables to bench/RESULTS.md under "## Data loading" (on a GPU: "## Data loading, GPU: <name>"; other
sections are left alone).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _device import add_device_option, choose_device, describe, section, stopwatch  # noqa: E402

MINI_CONFIG = ROOT / "egs" / "mini" / "conf" / "mini_hplus.yaml"
WORDS = ("a", "dog", "red", "ball", "runs", "on", "the", "grass", "blue", "boat", "near", "water", "small", "kite")


# ---------------------------------------------------------------------------------------------- data
def make_corpus(root: str, n_utts: int, min_sec: float, max_sec: float, embed_dim: int,
                captions_per_image: int = 5, seed: int = 0, sample_rate: int = 16000) -> Tuple[str, str]:
    """Write a Kaldi data dir and an image-embedding scp under ``root``; returns (data dir, scp path).

    Utterance i (``benchNNNNN``) lasts U(min_sec, max_sec) seconds (a few decaying tones plus noise, 16-bit PCM),
    belongs to image i // captions_per_image and speaker i % 4; its text is 4-10 random words.
    """
    import soundfile as sf
    from PIL import Image

    from speechclip_plus.data.datadir import write_data_dir
    from speechclip_plus.data.kaldi_ark import write_ark_scp

    rng = np.random.default_rng(seed)
    root = os.path.abspath(root)
    wav_dir, img_dir = os.path.join(root, "wav"), os.path.join(root, "img")
    os.makedirs(wav_dir, exist_ok=True)
    os.makedirs(img_dir, exist_ok=True)
    n_images = -(-n_utts // captions_per_image)
    img = {}
    for k in range(n_images):
        image_id = f"img{k:05d}"
        path = os.path.join(img_dir, image_id + ".png")
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
        img[image_id] = path
    wav, text, utt2spk, utt2img, utt2dur = {}, {}, {}, {}, {}
    for i in range(n_utts):
        utt = f"bench{i:05d}"
        n = int(round(rng.uniform(min_sec, max_sec) * sample_rate))
        t = np.arange(n) / sample_rate
        x = sum(0.2 * np.sin(2 * np.pi * f * t) * np.exp(-t * d)
                for f, d in zip(rng.uniform(100, 3000, 3), rng.uniform(0.1, 2.0, 3)))
        x = x + 0.02 * rng.standard_normal(n)
        path = os.path.join(wav_dir, utt + ".wav")
        sf.write(path, np.clip(x, -1, 1).astype(np.float32), sample_rate, subtype="PCM_16")
        wav[utt], utt2spk[utt], utt2img[utt] = path, f"spk{i % 4}", f"img{i // captions_per_image:05d}"
        text[utt] = " ".join(rng.choice(WORDS, int(rng.integers(4, 11))))
        utt2dur[utt] = n / sample_rate
    data_dir = os.path.join(root, "data")
    write_data_dir(data_dir, wav, text, utt2spk, utt2img, img, utt2dur)
    vectors = ((image_id, rng.standard_normal(embed_dim).astype(np.float32)) for image_id in sorted(img))
    scp, _ = write_ark_scp(root, "img_embed", vectors)  # the toolkit's one ark/scp writer
    return data_dir, scp


def clip_embed_dim(cfg: Dict) -> int:
    """Joint embedding size of the config's CLIP: read from its open_clip model-config json."""
    name = cfg["model"]["clip"]["name"]
    if not str(name).endswith(".json"):
        raise ValueError(f"model.clip.name={name}: this benchmark needs an open_clip model-config .json")
    with open(name, encoding="utf-8") as f:
        return int(json.load(f)["embed_dim"])


def build_trainer(config: Path, overrides: Sequence[str], data_dir: str, scp: str, exp_dir: str,
                  device: Union[str, torch.device] = "cpu"):
    """A real ``Trainer`` (model, sampler, optimiser) on ``device`` and the generated data; never validates or
    saves."""
    from speechclip_plus.config import load_config
    from speechclip_plus.train.distributed import DistInfo
    from speechclip_plus.train.trainer import Trainer

    big = "1000000"
    cfg = load_config(str(config), list(overrides) + [
        "--train.train_data", data_dir, "--train.image_embeds", scp, "--train.max_steps", big,
        "--train.valid_every", big, "--train.log_every", big])
    trainer = Trainer(cfg, exp_dir, DistInfo(device=str(device)), progress=False, console=False)
    logging.getLogger("speechclip_plus.train").setLevel(logging.WARNING)
    return trainer


def plural(workers: int) -> str:
    return f"{workers} worker{'' if workers == 1 else 's'}"


def train_step(trainer, batch: Dict) -> None:
    """One optimiser step exactly as ``Trainer.fit`` does it with accum_grad = 1."""
    window = [trainer._forward_backward(batch, sync=True)]
    ok, _ = trainer._optimizer_step(window)
    if not ok:
        raise RuntimeError("non-finite loss in the benchmark step")


# ---------------------------------------------------------------------------------------------- measurements
def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` shows them."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def loader_epoch(trainer, epoch: int) -> Tuple[float, float, int]:
    """(seconds for the whole epoch, seconds after the first batch arrived, utterances) of one fresh loader."""
    trainer.sampler.set_epoch(epoch)
    t0 = time.perf_counter()
    first, n = None, 0
    for batch in trainer._loader(trainer.train_set, trainer.sampler, epoch):
        n += len(batch["wav_len"])
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return end - t0, end - (first or end), n


def training_loop(trainer, epoch: int, steps: int, deadline: float = float("inf"), min_steps: int = 3
                  ) -> Dict[str, float]:
    """The first ``steps`` optimiser steps of ``epoch`` as ``Trainer.fit`` runs them (its batch generator, then
    ``_forward_backward`` + ``_optimizer_step``), timing the wait for each batch apart from the computation.
    Stops early, after at least ``min_steps``, once ``time.perf_counter()`` passes ``deadline``."""
    trainer.epoch, trainer.batches_done = epoch, 0
    waits, computes, utts = [], [], 0
    batches = trainer._epoch_batches()
    t = time.perf_counter()
    for k in range(steps):
        if k >= min_steps and time.perf_counter() > deadline:
            break
        batch = next(batches)
        t1 = time.perf_counter()
        trainer.batches_done += 1
        with stopwatch(trainer.device) as step:
            train_step(trainer, batch)
        waits.append(t1 - t)
        t = time.perf_counter()
        computes.append(step.seconds)
        utts += len(batch["wav_len"])
    batches.close()  # the DataLoader iterator goes, its workers shut down
    later = sum(waits[1:])
    return {"steps": len(waits), "first_wait_s": waits[0], "later_wait_s": later,
            "stall": later / (later + sum(computes[1:]) or 1.0), "model_utt_s": utts / sum(computes)}


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--utts", type=int, default=640, help="generated utterances (2-4 s each)")
    ap.add_argument("--epochs", type=int, default=2, help="loader epochs per worker count (best is reported)")
    ap.add_argument("--steps", type=int, default=6, help="optimiser steps per training-loop run (<= an epoch)")
    ap.add_argument("--budget", type=float, default=60.0,
                    help="seconds for the two training loops (each stops early after 3 steps once past its half)")
    ap.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to measure")
    ap.add_argument("--config", default=str(MINI_CONFIG))
    ap.add_argument("--quick", action="store_true", help="fewer utterances and steps; implies --no-write")
    ap.add_argument("--no-write", action="store_true", help="print only, do not update bench/RESULTS.md")
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    add_device_option(ap)
    args = ap.parse_args(argv)
    device = choose_device(args.device)
    if args.quick:
        args.utts, args.epochs, args.steps, args.budget, args.no_write = 320, 1, 3, 30.0, True
    torch.set_num_threads(2)
    workers = [int(w) for w in args.workers.split(",")]
    load_start = load_average()
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="bench_dataload.") as tmp:
        from speechclip_plus.config import load_config

        overrides = ["--model.clip.pretrained", "null"]
        dim = clip_embed_dim(load_config(args.config, overrides))
        t0 = time.perf_counter()
        data_dir, scp = make_corpus(tmp, args.utts, 2.0, 4.0, dim)
        gen_s = time.perf_counter() - t0
        print(f"generated {args.utts} utterances in {gen_s:.1f} s", file=sys.stderr, flush=True)
        trainer = build_trainer(Path(args.config), overrides, data_dir, scp, os.path.join(tmp, "exp"), device)
        tc = trainer.tc
        config_workers = tc["num_workers"]
        n_batches = len(trainer.sampler)
        if n_batches < 2:
            sys.exit(f"--utts {args.utts} make {n_batches} batch(es) of {tc['batch_size']}: need at least 2")

        # 1. loader alone: interleaved rounds over the settings, so a load change hits all of them. Setting
        #    "0/1t" = no workers and 1 intra-op thread in the main process (its collate then runs single-threaded,
        #    as it does inside a worker).
        settings = [str(w) for w in workers] + (["0/1t"] if 0 in workers else [])
        runs: Dict[str, List[Tuple[float, float, int]]] = {k: [] for k in settings}
        epoch = 0
        for _ in range(args.epochs):
            for k in settings:
                tc["num_workers"] = int(k.split("/")[0])
                torch.set_num_threads(1 if k.endswith("/1t") else 2)
                runs[k].append(loader_epoch(trainer, epoch))
                epoch += 1
        torch.set_num_threads(2)
        loader: Dict[str, Dict[str, float]] = {}
        for k in settings:
            total, steady, n = min(runs[k])
            loader[k] = {"utt_s": n / total, "steady_utt_s": (n - n / n_batches) / steady if steady > 0 else
                         float("inf"), "first_batch_s": total - steady, "n": n}
            print(f"  loader, {k} worker(s): {loader[k]['utt_s']:.0f} utt/s", file=sys.stderr, flush=True)

        # 2. the training loop, as Trainer.fit runs it, with the config's workers and with none
        trainer.model.train()
        tc["num_workers"] = 0
        trainer.sampler.set_epoch(epoch)
        train_step(trainer, next(iter(trainer._loader(trainer.train_set, trainer.sampler, epoch))))  # warm-up
        steps = min(args.steps, n_batches)
        loops: Dict[int, Dict[str, float]] = {}
        for w in dict.fromkeys([config_workers, 0]):
            tc["num_workers"] = w
            epoch += 1
            loops[w] = training_loop(trainer, epoch, steps, deadline=time.perf_counter() + args.budget / 2)
            print(f"  training loop, {w} worker(s): model {loops[w]['model_utt_s']:.1f} utt/s, waiting "
                  f"{100 * loops[w]['stall']:.2f}% of the time", file=sys.stderr, flush=True)
        trainer.close()

    load_end = load_average()
    total_s = time.perf_counter() - t_start
    model_utt_s = statistics.median(r["model_utt_s"] for r in loops.values())
    from speechclip_plus.train.precision import precision_name
    amp = precision_name(device, tc["precision"])
    where = (f"{describe(device)}" if device.type != "cuda" else
             f"model on {describe(device)} (compute timed with CUDA events), host {platform.machine()}, "
             f"{os.cpu_count()} CPUs")
    lines = [
        f"`python bench/dataload.py`: egs/mini h+ config (`{Path(args.config).relative_to(ROOT)}`, "
        f"`model.clip.pretrained null`), batch size {tc['batch_size']}, {args.utts} generated utterances of 2-4 s "
        f"(16 kHz 16-bit WAV, kaldiio embedding scp), {n_batches} batches per epoch; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {amp}, {where}; "
        f"load average {load_start} at start, {load_end} at end (1/5/15 min); {total_s:.0f} s in all.",
        "",
        "| pipeline | utterances/s | loader / model |",
        "|---|---:|---:|",
    ]
    def name(k: str) -> str:
        return f"{plural(0)}, 1 torch thread in the main process" if k == "0/1t" else plural(int(k))

    for k in settings:
        lines.append(f"| loader alone, {name(k)} (fresh DataLoader per epoch, best of {args.epochs}) | "
                     f"{loader[k]['utt_s']:.0f} | {loader[k]['utt_s'] / model_utt_s:.0f}x |")
    lines.append(f"| model (forward, backward, optimiser step; training loops below, median) "
                 f"| {model_utt_s:.1f} | - |")
    lines += [
        "",
        "Loader alone, time to the first batch of an epoch: "
        + ", ".join(f"{name(k)} {loader[k]['first_batch_s']:.2f} s" for k in settings)
        + "; after the first batch: " + ", ".join(f"{loader[k]['steady_utt_s']:.0f}" for k in settings)
        + " utt/s. Without workers, `collate` runs in the main process with its 2 intra-op threads; its per-row "
        "copies into the padded batch are then parallel regions that stall whenever another process holds a "
        "core, which the single-thread row isolates.",
        "",
        "Training loop (`Trainer._epoch_batches` + `_forward_backward` + `_optimizer_step`): time spent waiting "
        "for the next batch.",
        "",
        "| train.num_workers | steps | first batch wait s | later waits, ms per step | share of loop time after "
        "the first batch | model utt/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for w, r in loops.items():
        lines.append(f"| {w}{' (config)' if w == config_workers else ''} | {r['steps']} | "
                     f"{r['first_wait_s']:.2f} | "
                     f"{1e3 * r['later_wait_s'] / max(1, r['steps'] - 1):.1f} | {100 * r['stall']:.2f}% | "
                     f"{r['model_utt_s']:.1f} |")
    worst = min(loader[k]["utt_s"] for k in settings)
    stall = loops[config_workers]["stall"]
    verdict = "met" if worst / model_utt_s >= 10 and stall <= 0.02 else "NOT met"
    lines += [
        "",
        f"Target \"the loader is never the bottleneck\" (slowest loader >= 10x the model's rate, and with the "
        f"config's workers the loop waits <= 2% of its time after an epoch's first batch): **{verdict}** "
        f"(slowest loader {worst / model_utt_s:.0f}x the model's rate, waiting {100 * stall:.2f}%). The loader "
        "rates and the model rate are measured one after the other on a shared machine, so their ratio moves "
        "with the load; the waiting share is measured inside one loop.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        from speechclip_plus.eval.report import write_md_section

        title = section("Data loading", device)
        write_md_section(args.results, title, body, header="# Benchmarks")
        print(f"updated {args.results} ({title})")


if __name__ == "__main__":
    main()
