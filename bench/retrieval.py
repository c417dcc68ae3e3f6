"""Benchmark: chunked recall@k (speechclip_plus.eval.retrieval) against a full score matrix.

SpokenCOCO-test size by default: 25,000 utterances x 5,000 images (5 captions each), D = 512, unit vectors
with enough signal that R@1..10 fall between 0 and 1. Each method runs in its own subprocess, on the GPU when
CUDA is available (``--device``), the embeddings made on the CPU and moved there:

- time: ``--repeats`` calls after one warm-up call; the table shows the best and the median. CPU: wall clock;
  GPU: CUDA events around the call (``bench/_device.py``).
- peak extra memory, of the first call. CPU: the process's resident-set high-water mark during the call minus
  its resident set just before it. The high-water mark (VmHWM) is reset right before the call by writing 5 to
  /proc/self/clear_refs, so earlier peaks (data generation) cannot hide in it; where that reset is not
  allowed, ru_maxrss is used instead and the figure is an upper bound (marked "<="). RSS counts every byte
  torch's CPU allocator and MKL actually touch, which tracemalloc would not see. The warm-up call runs on a
  2000 x 400 slice, so memory it freed but kept resident can hide at most a few MiB of the peak.
  GPU: ``torch.cuda.max_memory_allocated`` (reset just before the call) minus the memory allocated before it.
- recalls: the two methods must agree exactly on the CPU; on a GPU the two methods' matrix products (different
  shapes, hence different cuBLAS kernels) may round a near-tie differently, so there they must agree within
  0.1 point.

Writes its table to bench/RESULTS.md under "## Retrieval" (on a GPU: "## Retrieval, GPU: <name>"; other
sections are left alone).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

KS = (1, 5, 10)
TARGET_SECONDS = 2.0
TARGET_BYTES = 1 << 30
GPU_RECALL_TOLERANCE = 1e-3  # 0.1 point


def make_data(n_speech: int, n_images: int, dim: int, noise: float, seed: int):
    """Unit image vectors; each utterance = its image + Gaussian noise of norm ~``noise``, re-normalised.
    Built in place and in slices so generation leaves no large freed temporaries behind."""
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, dim, generator=g)
    images.div_(images.norm(dim=1, keepdim=True))
    s2i = torch.arange(n_speech) % n_images
    speech = torch.empty(n_speech, dim)
    for start in range(0, n_speech, 4096):
        block = speech[start:start + 4096]
        block.normal_(0.0, noise / dim ** 0.5, generator=g).add_(images[s2i[start:start + 4096]])
        block.div_(block.norm(dim=1, keepdim=True))
    return speech, images, s2i


def full_matrix_recall(speech, images, s2i, ks=KS):
    """Reference method: the whole (N, M) score matrix at once, pessimistic ties as in the library."""
    import torch

    with torch.no_grad():
        scores = speech @ images.T
        rows = torch.arange(scores.shape[0], device=scores.device)
        pos = scores[rows, s2i]
        speech_rank = (scores >= pos[:, None]).sum(1, dtype=torch.int32) - 1
        best = torch.full((images.shape[0],), float("-inf"), device=scores.device).scatter_reduce(
            0, s2i, pos, reduce="amax")
        scores[rows, s2i] = float("-inf")
        image_rank = (scores >= best[None, :]).sum(0, dtype=torch.int32)
        del scores
    out = {}
    for k in ks:
        a = (speech_rank < k).double().mean().item()
        b = (image_rank < k).double().mean().item()
        out.update({f"speech_to_image_r{k}": a, f"image_to_speech_r{k}": b, f"recall_mean_{k}": (a + b) / 2})
    return out


def worker(args) -> None:
    import torch

    from _device import choose_device, describe, peak_memory, section, stopwatch
    from speechclip_plus.eval.retrieval import _chunk, recall_at_k

    device = choose_device(args.device)
    speech, images, s2i = (x.to(device) for x in make_data(args.n_speech, args.n_images, args.dim, args.noise,
                                                            args.seed))
    chunk = min(_chunk(args.chunk_size, args.n_images), args.n_speech)
    if args.worker == "chunked":
        def run():
            return recall_at_k(speech, images, s2i, ks=KS, chunk_size=args.chunk_size)
    else:
        def run():
            return full_matrix_recall(speech, images, s2i)
    # Warm-up on a slice: loads MKL/OpenMP (CUDA: cuBLAS) and their buffers before the measurement.
    recall_at_k(speech[:2000], images[:400], s2i[:2000] % 400, ks=KS)
    with peak_memory(device) as mem, stopwatch(device) as first:
        result = run()
    times = [first.seconds]
    for _ in range(args.repeats - 1):
        with stopwatch(device) as t:
            again = run()
        times.append(t.seconds)
        assert again == result, "non-deterministic result"
    floor = []
    if args.worker == "chunked":  # the matrix product alone, in the same chunks: the cost floor
        for _ in range(args.repeats):
            with torch.no_grad(), stopwatch(device) as t:
                for start in range(0, speech.shape[0], chunk):
                    images @ speech[start:start + chunk].T
            floor.append(t.seconds)
    print(json.dumps({"method": args.worker, "chunk_size": chunk, "times": times, "floor": floor,
                      "extra_bytes": mem.bytes, "exact_peak": mem.exact, "device_type": device.type,
                      "device": describe(device), "section": section("Retrieval", device),
                      "threads": torch.get_num_threads(), "recalls": result}))


def human(n_bytes: float) -> str:
    return f"{n_bytes / 2 ** 20:.0f} MiB"


def main() -> None:
    from _device import add_device_option, choose_device

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-speech", type=int, default=25000)
    ap.add_argument("--n-images", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--noise", type=float, default=6.0, help="noise norm relative to the unit image vector")
    ap.add_argument("--chunk-size", type=int, default=None, help="utterances per block (default: the library's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"), help="Markdown file to update")
    ap.add_argument("--no-write", action="store_true", help="print only, do not update --results")
    add_device_option(ap)
    ap.add_argument("--worker", choices=["chunked", "full"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.n_speech % args.n_images:
        ap.error("--n-speech must be a multiple of --n-images (equal captions per image)")
    if args.worker:
        worker(args)
        return
    choose_device(args.device)  # --device cuda without a GPU stops here, before the workers start

    common = [f"--n-speech={args.n_speech}", f"--n-images={args.n_images}", f"--dim={args.dim}",
              f"--noise={args.noise}", f"--repeats={args.repeats}", f"--seed={args.seed}", f"--device={args.device}"]
    if args.chunk_size is not None:
        common.append(f"--chunk-size={args.chunk_size}")
    load_before = os.getloadavg()[0]
    runs = {}
    for method in ("chunked", "full"):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", method] + common,
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{method} worker failed:\n{proc.stderr}")
        runs[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    ch = runs["chunked"]
    gpu = ch["device_type"] == "cuda"
    rec, rec_full = ch["recalls"], runs["full"]["recalls"]
    same = rec == rec_full
    diff = max(abs(rec[k] - rec_full[k]) for k in rec) if rec.keys() == rec_full.keys() else float("inf")
    agree = same or (gpu and diff <= GPU_RECALL_TOLERANCE)

    names = {"chunked": f"chunked ({ch['chunk_size']} utterances a block)", "full": "full matrix"}
    lines = ["| method | best s | median s | peak extra memory |", "|---|---:|---:|---:|"]
    for method, r in runs.items():
        mem = ("" if r["exact_peak"] else "<= ") + human(r["extra_bytes"])
        lines.append(f"| {names[method]} | {min(r['times']):.2f} | {statistics.median(r['times']):.2f} | {mem} |")
    fl = ch["floor"]
    lines.append(f"| matrix product alone (floor) | {min(fl):.2f} | {statistics.median(fl):.2f} | - |")
    rec_line = ", ".join(f"R@{k} S>I {100 * rec[f'speech_to_image_r{k}']:.2f} / "
                         f"I>S {100 * rec[f'image_to_speech_r{k}']:.2f}" for k in KS)
    if not same:
        rec_line += (f"; largest difference {100 * diff:.3f} points, tolerance on a GPU "
                     f"{100 * GPU_RECALL_TOLERANCE:.1f} points")
    verdict = (f"chunked: {min(ch['times']):.2f} s (target <= {TARGET_SECONDS:.0f} s: "
               f"{'met' if min(ch['times']) <= TARGET_SECONDS else 'NOT met'}), "
               f"{human(ch['extra_bytes'])} extra (target <= 1 GiB: "
               f"{'met' if ch['extra_bytes'] <= TARGET_BYTES else 'NOT met'})")
    table = "\n".join(lines)
    print(table)
    print(f"recalls identical: {same}  ({rec_line})")
    ratio = min(ch["times"]) / min(fl)
    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    print(verdict)
    print(f"chunked / matrix product alone: {ratio:.2f}x; {load}")

    if gpu:
        where = f"on {ch['device']}"
        timing = ", timed with CUDA events"
        peak_how = ("torch.cuda.max_memory_allocated during the call (reset just before it) minus the memory "
                    "allocated before the call")
        stable = "The product dominates the time, and the ratio to it is the figure to compare across GPUs."
    else:
        where = f"{ch['threads']} torch threads, {ch['device']}"
        timing = ""
        peak_how = (("resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs just before the "
                     "call)" if ch["exact_peak"] else
                     "peak resident set (ru_maxrss, not resettable here: an upper bound)")
                    + " minus the resident set before the call")
        stable = ("The product dominates the time, so on a shared machine the seconds move with the other "
                  "processes' load; the ratio to the product is the stable figure.")
    body = "\n".join([
        f"`python bench/retrieval.py`: recall@1/5/10 both ways, {args.n_speech} utterances x {args.n_images} "
        f"images ({args.n_speech // args.n_images} captions each), D={args.dim}, float32, {where}. "
        f"Time: best and median of {args.repeats} calls after a warm-up{timing}, each method in its own process. "
        f"Peak extra memory: {peak_how}.",
        "",
        table,
        "",
        f"Recalls identical: **{same}** ({rec_line}).",
        "",
        f"{verdict}. The chunked method takes {ratio:.2f}x the time of its matrix product alone (same chunks, "
        f"same process); {load} (1-minute averages). Both methods do the same single (N x M x D) matrix "
        "product; the chunked one holds one (M x chunk) block of scores at a time, the full one the whole "
        f"N x M matrix and an N x M comparison. {stable}",
    ])
    if not args.no_write:
        from speechclip_plus.eval.report import write_md_section

        write_md_section(args.results, ch["section"], body, header="# Benchmarks")
        print(f"updated {args.results} ({ch['section']})")
    if not agree:
        sys.exit("recalls differ between the chunked and the full-matrix method")


if __name__ == "__main__":
    main()
