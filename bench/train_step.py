"""One SpeechCLIP+ h+ training step at base width, split by model part; image-embedding cache vs CLIP image tower.

Run: ``python bench/train_step.py`` (``--quick``: batch 8, fewer repeats, does not touch RESULTS.md). Runs on the
GPU when CUDA is available (``--device``).

Model: ``speechclip_plus/conf/base_hplus.yaml`` (d_model 768, 8-head MHA block, CIF, duration targets, full CLIP
vocabulary, the trainer's default precision: bf16 autocast on a CPU with native bf16, else float32) with two
stand-ins, both random (no download):
- CLIP: ``bench/clip_vit_b32_random.json``, open_clip's ViT-B-32 shape (text tower width 512, 12 layers, 8 heads;
  embed 512; image tower ViT-B/32 at 224 px), random init.
- upstream: a random HuBERT written by ``speechclip_plus.models.tiny.save_tiny_hubert`` with HuBERT Base's width
  (768-d states, 12 heads, FFN 3072, 320x downsampling) but ``--upstream-layers`` (2) transformer layers instead
  of 12 and ``--conv-dim`` (128) conv channels instead of 512, so the step fits the time budget on 2 cores. Its
  forward is therefore a fraction of HuBERT Base's, and the weighted sum mixes 3 states instead of 13: both make
  the upstream's share smaller than in real training and the overhead check below stricter, not looser.
  ``--upstream-layers 12 --conv-dim 512`` gives the real size.

Data: ``--batch`` utterances of 3-6 s (generated WAV files, one image each) through the real ``Trainer``: its
``SpeechImageDataset`` / ``LengthBucketSampler`` / ``collate`` make the batch, and each step is
``Trainer._forward_backward`` + ``Trainer._optimizer_step`` (forward, backward, gradient clipping, Adam, schedule),
exactly as ``Trainer.fit`` runs them. Two kinds of step, in interleaved rounds after a warm-up (one cached step
and one image-tower call):
- cache: the image embeddings come from the kaldiio cache (what the toolkit does);
- image tower: the batch's ``--batch`` images (random 3x224x224 tensors standing in for decoded, preprocessed
  pictures; decoding and resizing JPEGs would cost more) go through the frozen CLIP image tower
  (``SpeechCLIP.encode_image``, no grad, same autocast) every step, and those embeddings are used.

Split: every step runs under ``torch.profiler``; the model's own modules and methods are wrapped in
``record_function`` ranges from the outside (forward hooks, instance-method wrappers; no model code is copied or
changed). Forward time of a part = its range. Backward time of a part = the autograd nodes whose forward op ran
inside its range (matched by sequence number); "other backward" = the rest of the backward (gradient
accumulation into parameters, engine overhead). Figures are medians over the timed rounds.
On the CPU a range's time is its wall time. On a GPU it is the time of the kernels launched inside it
(``device_time_total``; the autograd engine runs the backward of CUDA ops in its own thread, whose nodes are
matched the same way), the step's time comes from CUDA events (``bench/_device.py``), so the gap between the
step and its parts is time the GPU sat idle (launch overhead, host reads, the profiler's own cost; an
unprofiled cached step is timed too), and the peak GPU memory of a step is recorded
(``torch.cuda.max_memory_allocated``, reset before the step).

Check: step time <= 1.3 x (upstream forward + forward and backward of the parts on the gradient path: weighted
sum, attention block, parallel branch, CIF, keyword projection/BatchNorm, quantiser, CLIP text encoder), i.e.
loss, glue code, other backward and the optimiser together cost <= 30% of that.

Writes its tables to bench/RESULTS.md under "## Training step" (on a GPU: "## Training step, GPU: <name>"; other
sections are left alone).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.autograd.profiler import record_function  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _device import add_device_option, choose_device, describe, peak_memory, section, stopwatch  # noqa: E402
from dataload import build_trainer, load_average, make_corpus, train_step  # noqa: E402

BASE_CONFIG = ROOT / "speechclip_plus" / "conf" / "base_hplus.yaml"
CLIP_CONFIG = ROOT / "bench" / "clip_vit_b32_random.json"
TARGET = 1.3
PREFIX = "bench/"

# (label, description); the order of the table. "upstream" and the TRAINABLE parts make the check's denominator.
PARTS = [
    ("upstream", "upstream forward (frozen HuBERT stand-in, no grad)"),
    ("weighted_sum", "weighted sum of the upstream states"),
    ("attention", "attention block (8-head MHA + LayerNorm)"),
    ("parallel", "parallel branch (projection)"),
    ("cif", "CIF (weight predictor + integrate-and-fire)"),
    ("keyword_proj", "keyword projection + BatchNorm"),
    ("quantiser", "quantiser (cosine to 49408 tokens, straight-through)"),
    ("clip_text", "CLIP text encoder (frozen, gradient flows through)"),
    ("loss", "loss (2 contrastive + quantity)"),
    ("forward_other", "other model code (crop, masks, CLS concat, targets, id maps)"),
    ("backward_other", "other backward (gradient accumulation, engine)"),
    ("optimiser", "optimiser step (clip, Adam, schedule, zero_grad)"),
    ("image_tower", "CLIP image tower (ViT-B/32, 224 px, no grad)"),
]
TRAINABLE = ("weighted_sum", "attention", "parallel", "cif", "keyword_proj", "quantiser", "clip_text")
OUTER = ("forward", "fwd_bwd")  # ranges that contain the parts


class Instrument:
    """Wrap modules (forward hooks) and methods (instance attributes) in ``record_function(PREFIX + label)``."""

    def __init__(self) -> None:
        self.handles = []

    def module(self, label: str, module: torch.nn.Module) -> None:
        stack: List[record_function] = []

        def enter(_mod, _args):
            rf = record_function(PREFIX + label)
            rf.__enter__()
            stack.append(rf)

        def leave(_mod, _args, _out):
            stack.pop().__exit__(None, None, None)

        self.handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def method(self, label: str, obj: object, name: str) -> None:
        original: Callable = getattr(obj, name)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            with record_function(PREFIX + label):
                return original(*args, **kwargs)

        object.__setattr__(obj, name, wrapped)  # shadows the class attribute on this instance only


def instrument(trainer) -> Instrument:
    model = trainer.raw_model
    ins = Instrument()
    ins.method("upstream", model.upstream, "hidden_states")
    ins.method("weighted_sum", model.upstream, "weighted_sum")
    ins.module("attention", model.encoder)
    ins.module("parallel", model.parallel)
    ins.module("cif", model.cif)
    ins.module("keyword_proj", model.keywords.proj)
    ins.module("keyword_proj", model.keywords.bn)
    ins.module("quantiser", model.keywords.quantizer)
    ins.method("clip_text", model.clip, "encode_keywords")
    ins.method("loss", model, "loss")
    ins.method("image_tower", model, "encode_image")
    ins.module("forward", model)
    ins.method("fwd_bwd", trainer, "_forward_backward")
    ins.method("optimiser", trainer, "_optimizer_step")
    return ins


def split(events, gpu: bool = False) -> Dict[str, float]:
    """Seconds per part of one profiled step (see the module docstring): wall time of the host events on the CPU,
    time of the kernels they launched with ``gpu``.

    Every op records the autograd sequence number the next node will get, and the op creating node n is the
    last forward op recording n; so node n belongs to the range of the latest-starting forward op with n.
    """
    fwd: Dict[str, float] = defaultdict(float)
    creator: Dict[int, tuple] = {}  # sequence number -> (start, range label)
    backward: List = []

    def seconds(e) -> float:
        return (e.device_time_total if gpu else e.time_range.elapsed_us()) / 1e6

    def ranges(e) -> tuple:
        """(innermost PREFIX range, True if inside a backward node)."""
        label = None
        while e is not None:
            if e.name.startswith("autograd::engine::evaluate_function: "):
                return label, True
            if label is None and e.name.startswith(PREFIX):
                label = e.name[len(PREFIX):]
            e = e.cpu_parent
        return label, False

    def inside_fwd_bwd(e) -> bool:
        while e is not None:
            if e.name == PREFIX + "fwd_bwd":
                return True
            e = e.cpu_parent
        return False

    for e in events:
        if e.device_type != DeviceType.CPU:  # kernels and GPU-side copies of the ranges: counted via their host op
            continue
        if e.name.startswith(PREFIX):
            fwd[e.name[len(PREFIX):]] += seconds(e)
        elif e.name.startswith("autograd::engine::evaluate_function: "):
            backward.append(e)
        elif e.sequence_nr >= 0:
            label, in_backward = ranges(e)
            start = e.time_range.start
            if label is not None and not in_backward and start >= creator.get(e.sequence_nr, (-1.0,))[0]:
                creator[e.sequence_nr] = (start, "forward_other" if label in OUTER else label)
    label_of_seq = {seq: label for seq, (_, label) in creator.items()}
    out = {label: 0.0 for label, _ in PARTS}
    bwd: Dict[str, float] = defaultdict(float)
    for e in backward:
        bwd[label_of_seq.get(e.sequence_nr, "backward_other")] += seconds(e)
    parts_fwd = sum(v for k, v in fwd.items() if k not in OUTER + ("optimiser", "image_tower"))
    # backward nodes in the calling thread are inside the fwd_bwd range; the engine's device threads' are not
    backward_total = fwd["fwd_bwd"] - fwd["forward"] + sum(seconds(e) for e in backward if not inside_fwd_bwd(e))
    for label, _ in PARTS:
        out[label] = fwd.get(label, 0.0)
        out[label + ".bwd"] = bwd.get(label, 0.0)
    out["forward_other"] = fwd["forward"] - parts_fwd
    out["backward_other.bwd"] = backward_total - sum(v for k, v in bwd.items() if k != "backward_other")
    out["forward_other.bwd"] = bwd.get("forward_other", 0.0)
    out["backward"] = backward_total
    out["forward"] = fwd["forward"]
    return out


def tower_step(trainer, batch: Dict, images: Optional[torch.Tensor]) -> None:
    """One optimiser step; with ``images`` their embeddings (CLIP image tower, no grad) replace the cached ones."""
    if images is not None:
        with torch.no_grad(), trainer._autocast():
            embeds = trainer.raw_model.encode_image(images)
        batch = dict(batch, image_embed=embeds.float())
    train_step(trainer, batch)


def run_step(trainer, batch: Dict, images: Optional[torch.Tensor]) -> Dict[str, float]:
    """One profiled optimiser step (``tower_step``), split by part; on a GPU also its peak memory."""
    from torch.profiler import ProfilerActivity, profile

    device = trainer.device
    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        with peak_memory(device) if gpu else contextlib.nullcontext() as mem, stopwatch(device) as t:
            tower_step(trainer, batch, images)
    events = prof.events()
    out = split(events, gpu)
    out["step"] = t.seconds
    out["n_events"] = float(sum(e.device_type == DeviceType.CPU for e in events))
    if gpu:
        out["peak_bytes"] = mem.bytes
    core = out["upstream"] + sum(out[k] + out[k + ".bwd"] for k in TRAINABLE)
    out["core"] = core
    out["ratio"] = t.seconds / core
    return out


def plain_step(trainer, batch: Dict) -> float:
    """Seconds of one cached step without the profiler."""
    with stopwatch(trainer.device) as t:
        tower_step(trainer, batch, None)
    return t.seconds


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="utterances (and images) per step")
    ap.add_argument("--min-sec", type=float, default=3.0)
    ap.add_argument("--max-sec", type=float, default=6.0)
    ap.add_argument("--upstream-layers", type=int, default=2, help="HuBERT stand-in layers (Base: 12)")
    ap.add_argument("--conv-dim", type=int, default=128, help="HuBERT stand-in conv channels (Base: 512)")
    ap.add_argument("--rounds", type=int, default=4, help="at most this many timed rounds (cache + tower)")
    ap.add_argument("--budget", type=float, default=80.0, help="seconds of timed rounds (at least 2 rounds)")
    ap.add_argument("--fp32", action="store_true",
                    help="train.precision fp32 (default: the config's precision; auto = bf16 only where native)")
    ap.add_argument("--quick", action="store_true", help="batch 8, 1 timed round; implies --no-write")
    ap.add_argument("--no-write", action="store_true", help="print only, do not update bench/RESULTS.md")
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    add_device_option(ap)
    args = ap.parse_args(argv)
    device = choose_device(args.device)
    gpu = device.type == "cuda"
    min_rounds = 2
    if args.quick:
        args.batch, args.rounds, args.no_write, min_rounds = 8, 1, True, 1
    torch.set_num_threads(2)
    load_start = load_average()
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="bench_train_step.") as tmp:
        from speechclip_plus.models.tiny import save_tiny_hubert

        ckpt = save_tiny_hubert(os.path.join(tmp, "hubert.pt"), dim=768, layers=args.upstream_layers, heads=12,
                                ffn=3072, conv_dim=args.conv_dim)
        data_dir, scp = make_corpus(tmp, args.batch, args.min_sec, args.max_sec, embed_dim=512,
                                    captions_per_image=1)
        overrides = ["--model.upstream.name", "hubert_local", "--model.upstream.ckpt", ckpt,
                     "--model.clip.name", str(CLIP_CONFIG), "--model.clip.pretrained", "null",
                     "--train.batch_size", str(args.batch), "--train.num_workers", "0"]
        if args.fp32:
            overrides += ["--train.precision", "fp32"]
        trainer = build_trainer(BASE_CONFIG, overrides, data_dir, scp, os.path.join(tmp, "exp"), device)
        model = trainer.raw_model
        batch = next(iter(trainer._loader(trainer.train_set, trainer.sampler, 0)))
        size = int(model.clip.clip.visual.image_size[0] if isinstance(model.clip.clip.visual.image_size, tuple)
                   else model.clip.clip.visual.image_size)
        images = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        instrument(trainer)
        model.train()
        print(f"  built in {time.perf_counter() - t_start:.0f} s", file=sys.stderr, flush=True)

        run_step(trainer, batch, None)  # warm-up: a cached step, then the image tower alone
        with torch.no_grad(), trainer._autocast():
            model.encode_image(images)
        runs: Dict[str, List[Dict[str, float]]] = {"cache": [], "tower": [], "plain": []}
        t_rounds = time.perf_counter()
        while len(runs["cache"]) < args.rounds:
            elapsed = time.perf_counter() - t_rounds
            done = len(runs["cache"])
            if done >= min_rounds and elapsed + elapsed / done > args.budget:
                break
            for kind in ("cache", "tower"):
                runs[kind].append(run_step(trainer, batch, images if kind == "tower" else None))
            if gpu:  # the profiler's cost shows on a GPU as idle time inside the step
                runs["plain"].append({"step": plain_step(trainer, batch)})
            print(f"  round {done + 1}: cache {runs['cache'][-1]['step']:.1f} s, tower "
                  f"{runs['tower'][-1]['step']:.1f} s", file=sys.stderr, flush=True)
        n_train = sum(p.numel() for p in model.trainable_parameters())
        n_all = sum(p.numel() for p in model.parameters())
        seconds = batch["wav_len"].float() / 16000
        from speechclip_plus.train.precision import precision_name
        amp = precision_name(trainer.device, trainer.tc["precision"])
        upstream_desc = (f"random HuBERT, 768-d, {args.upstream_layers} layers, {args.conv_dim} conv channels "
                         f"({model.upstream.num_layers} states)")
        trainer.close()

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    rounds = len(runs["cache"])
    load_end = load_average()
    total_s = time.perf_counter() - t_start
    step_c, step_t = med("cache", "step"), med("tower", "step")
    nd = 3 if gpu else 2  # decimals of the step times
    if gpu:
        where = f"on {describe(device)}, host {torch.get_num_threads()} threads"
        how = ("; a part's time is the time of the kernels launched inside it, a step's time comes from CUDA "
               "events")
    else:
        where = f"{torch.get_num_threads()} threads, {describe(device)}"
        how = ""
    lines = [
        f"`python bench/train_step.py`: h+ at base width (`speechclip_plus/conf/base_hplus.yaml`: d_model 768, "
        f"8-head MHA, CLIP ViT-B-32 shape from `bench/{CLIP_CONFIG.name}`, random, token dim 512, embed 512, "
        f"49408-token vocabulary), upstream: {upstream_desc}; batch {args.batch} utterances of "
        f"{seconds.min():.1f}-{seconds.max():.1f} s ({seconds.sum():.0f} s of audio), one image each; "
        f"{n_train:,} trainable of {n_all:,} parameters; {amp}; torch {torch.__version__}, "
        f"{where}; load average "
        f"{load_start} at start, {load_end} at end (1/5/15 min); {total_s:.0f} s in all.",
        "",
        f"Medians of {rounds} interleaved rounds (a cached step, then an image-tower step) after a warm-up, each "
        f"step profiled "
        f"(~{med('cache', 'n_events'):.0f} recorded events a step){how}.",
        "",
        "| part | forward s | backward s | share of the step (image cache) |",
        "|---|---:|---:|---:|",
    ]
    for label, desc in PARTS:
        if label == "image_tower":
            continue
        f, b = med("cache", label), med("cache", label + ".bwd")
        fs = f"{f:.3f}" if label not in ("backward_other",) else "-"
        bs = f"{b:.3f}" if label not in ("upstream", "optimiser") else "-"
        lines.append(f"| {desc} | {fs} | {bs} | {100 * (f + b) / step_c:.1f}% |")
    lines.append(f"| **step (image cache)** | {med('cache', 'forward'):.3f} | {med('cache', 'backward'):.3f} | "
                 f"{step_c:.3f} s |")
    ratio = med("cache", "ratio")
    core = med("cache", "core")
    pair = statistics.median(t["step"] / c["step"] for c, t in zip(runs["cache"], runs["tower"]))
    inside = statistics.median(t["step"] / (t["step"] - t["image_tower"]) for t in runs["tower"])
    lines += [
        "",
        "| step | median s | image tower s |",
        "|---|---:|---:|",
        f"| image embeddings from the cache (the toolkit) | {step_c:.{nd}f} | - |",
        f"| {args.batch} images through the CLIP image tower every step | {step_t:.{nd}f} | "
        f"{med('tower', 'image_tower'):.{nd}f} |",
    ]
    if gpu:
        lines += [f"| image embeddings from the cache, without the profiler | {med('plain', 'step'):.3f} | - |",
                  "",
                  f"Peak GPU memory of a step above what was allocated before it (model, optimiser state, batch; "
                  f"`torch.cuda.max_memory_allocated`): {med('cache', 'peak_bytes') / 2 ** 30:.2f} GiB with the "
                  f"image cache, {med('tower', 'peak_bytes') / 2 ** 30:.2f} GiB with the image tower."]
    lines += [
        "",
        f"Image cache speed-up: **{pair:.2f}x** per step (median over rounds of uncached / cached step time); "
        f"within the uncached steps themselves, step / (step - image tower) = {inside:.2f}x, a figure that load "
        "changes between steps cannot move. JPEG decoding and resizing, which the cache also saves, are not "
        "counted.",
        "",
        f"Check: step / (upstream forward + gradient-path forward and backward) = {step_c:.{nd}f} / "
        f"{core:.{nd}f} s = **{ratio:.2f}** (median of per-step ratios; target <= {TARGET}: "
        f"**{'met' if ratio <= TARGET else 'NOT met'}**). The HuBERT stand-in is smaller than HuBERT Base, so "
        "with the real upstream the ratio is lower. "
        + ("The parts' kernel times leave out the moments the GPU waits for the host (kernel launches, the one "
           "host read per step, the profiler's recording), which the step's time includes; the unprofiled step "
           "shows how much of that is the profiler's." if gpu else
           "Absolute seconds move with the shared machine's load; shares and ratios come from the same steps."),
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        from speechclip_plus.eval.report import write_md_section

        title = section("Training step", device)
        write_md_section(args.results, title, body, header="# Benchmarks")
        print(f"updated {args.results} ({title})")


if __name__ == "__main__":
    main()
