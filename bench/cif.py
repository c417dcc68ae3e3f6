"""CIF speed: ours vs torch-cif 0.2.0 vs a Python time loop vs the memory-traffic floor.

Run: ``python bench/cif.py`` (float32, S=250, C=768, B=64 and 256).  Runs on CUDA when it is available (timed
with CUDA events around each call, the device synchronised before and after), else on the CPU with 2 threads
(wall clock); ``--device`` and ``--threads`` override.  Prints a table, checks that ours agrees with torch-cif where the
semantics coincide, and writes the table into ``bench/RESULTS.md`` under "## CIF" (on a GPU: "## CIF, GPU: <name>"; other sections are
kept).

Workload: frame counts 150..250 per batch (right padding), weights ``sigmoid(1.5 z - 3.2)``, training targets
``round(frames / 20)`` (8-12 keywords).  The same weights give about twice as many keywords at inference
(their sum, 12-25; the table lists the counts).  Loss = ``feats.sum()``.

Times are the best of interleaved repeats (see ``timeit``): for each batch size and pass, the floor, ours and
torch-cif in both modes run in the same rounds, so their ratios share the machine's load.  ``--baseline FILE``
adds another version of ``speechclip_plus/models/cif.py`` to the same rounds (a before/after record), e.g.
``git show REV:speechclip_plus/models/cif.py > cif_before.py``.

Floors, the memory traffic no CIF can avoid: forward = one read of the (B, S, C) frames (``hidden.sum()``);
forward+backward = two reads of the frames and one write of a fresh (B, S, C) tensor (``hidden.sum()`` and
``hidden.clone()``): the keywords read the frames, the weights' gradient reads them again in backward, and
``grad_hidden`` is written.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _device import add_device_option, choose_device, section, stopwatch  # noqa: E402
from cif_loop import cif_loop  # noqa: E402

from speechclip_plus.eval.report import write_md_section  # noqa: E402
from speechclip_plus.models.cif import cif, duration_targets  # noqa: E402

S, C = 250, 768
LOOP_B = 8  # the time loop is timed on this smaller batch only
MODES = ("train", "infer")
TARGET_VS_TORCH_CIF = 8.0  # training fwd+bwd at B=256: at least this many times faster than torch-cif
TARGET_INFER_VS_TRAIN = 1.2  # inference fwd at B=256: at most this many times the training fwd


def _torch_cif():
    try:
        from torch_cif import cif_function  # lazy: optional dependency (pip install torch-cif==0.2.0)
    except ImportError:
        return None
    return cif_function


def make_inputs(B: int, device: torch.device, seed: int = 0):
    """hidden (B, S, C), alpha (B, S), pad_mask (B, S), duration targets (B,); drawn on the CPU, then moved."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, C, generator=gen)
    alpha = torch.sigmoid(1.5 * torch.randn(B, S, generator=gen) - 3.2)
    frames = torch.randint(150, S + 1, (B,), generator=gen)
    frames[0] = S
    pad_mask = torch.arange(S)[None] >= frames[:, None]
    alpha = alpha.masked_fill(pad_mask, 0.0)
    targets = duration_targets(frames, 320)
    return tuple(x.to(device) for x in (hidden, alpha, pad_mask, targets))


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """ms of one call of ``fn`` (``_device.stopwatch``: CUDA events on a GPU, else the wall clock)."""
    with stopwatch(device) as t:
        fn()
    return t.seconds * 1e3


def timeit(fns: Dict[str, Callable[[], object]], device: torch.device, budget: float, min_reps: int = 3,
           max_reps: int = 30) -> Dict[str, float]:
    """Best time in ms of each function, after one warm-up call each.

    The functions are run in interleaved rounds, so a load change on the shared machine hits all of them;
    the minimum is the least disturbed run.
    """
    for fn in fns.values():
        time_ms(fn, device)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    reps = 0
    while reps < min_reps or (reps < max_reps and time.perf_counter() - start < budget):
        for name, fn in fns.items():
            times[name].append(time_ms(fn, device))
        reps += 1
    return {name: min(ts) for name, ts in times.items()}


def load_baseline(path: str) -> Callable:
    """The ``cif`` function of another version of ``speechclip_plus/models/cif.py`` (a standalone file)."""
    spec = importlib.util.spec_from_file_location("cif_baseline", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "cif"):
        raise SystemExit(f"--baseline {path}: defines no cif()")
    return module.cif


def runner(impl: str, hidden, alpha, pad_mask, targets, backward: bool,
           baseline: Optional[Callable] = None) -> Callable[[], None]:
    """A closure running one forward (and backward) of an implementation."""
    tc = _torch_cif()
    h = hidden.clone().requires_grad_(backward)
    a = alpha.clone().requires_grad_(backward)

    def feats() -> torch.Tensor:
        if impl == "ours":
            return cif(h, a, pad_mask, targets).feats
        if impl == "baseline":
            return baseline(h, a, pad_mask, targets).feats
        if impl == "torch-cif":
            return tc(h, a, padding_mask=pad_mask, target_lengths=targets, eps=1e-5)["cif_out"][0]
        if impl == "loop":
            return cif_loop(h, a, pad_mask, targets)[0]
        raise ValueError(impl)

    def run() -> None:
        if backward:
            feats().sum().backward()
            h.grad = None
            a.grad = None
        else:
            with torch.no_grad():
                feats()

    return run


def floor(hidden: torch.Tensor, backward: bool) -> Callable[[], None]:
    """The floor's memory traffic: one read of the frames; with backward two reads and one fresh write."""
    if not backward:
        return lambda: hidden.sum()

    def traffic() -> None:
        hidden.sum()
        hidden.clone()

    return traffic


def agreement(hidden, alpha, pad_mask, targets) -> Dict[str, float]:
    """Max differences ours vs torch-cif on valid rows: feats (abs), grads (abs, and relative to max |grad|)."""
    tc = _torch_cif()
    res = {}
    outs = []
    for impl in ("ours", "torch-cif"):
        h = hidden.clone().requires_grad_(True)
        a = alpha.clone().requires_grad_(True)
        if impl == "ours":
            o = cif(h, a, pad_mask, targets)
            feats, lengths = o.feats, o.lengths
        else:
            o = tc(h, a, padding_mask=pad_mask, target_lengths=targets, eps=1e-5)
            feats, lengths = o["cif_out"][0], o["cif_lengths"][0]
        valid = (torch.arange(feats.size(1), device=feats.device)[None] < lengths[:, None]).unsqueeze(2)
        g = torch.randn(feats.shape, generator=torch.Generator().manual_seed(3)).to(feats.device)
        (feats * g * valid).sum().backward()
        outs.append((feats.detach() * valid, lengths, h.grad, a.grad))
    (f1, l1, gh1, ga1), (f2, l2, gh2, ga2) = outs
    res["lengths_equal"] = float(torch.equal(l1, l2))
    res["feats"] = (f1 - f2).abs().max().item() if f1.shape == f2.shape else float("inf")
    res["grad_h"] = (gh1 - gh2).abs().max().item()
    res["grad_a"] = (ga1 - ga2).abs().max().item()
    res["grad_a_rel"] = res["grad_a"] / ga2.abs().max().item()
    return res


def keyword_counts(hidden, alpha, pad_mask, targets) -> str:
    """'mean / max' keywords per sample of our output for this workload."""
    with torch.no_grad():
        lengths = cif(hidden, alpha, pad_mask, targets).lengths.float()
    return f"{lengths.mean().item():.1f} / {int(lengths.max().item())}"


def command_options(argv: Optional[List[str]]) -> str:
    """The options of this run for the table header (file paths by their base name only)."""
    args = [os.path.basename(a) if os.sep in a else a for a in (sys.argv[1:] if argv is None else argv)]
    return "".join(" " + a for a in args)


def machine(device: torch.device) -> str:
    """The device the times come from, for the table header."""
    if device.type == "cuda":
        return f"CUDA {torch.cuda.get_device_name(device)}"
    threads = torch.get_num_threads()
    return f"CPU {platform.processor() or platform.machine()}, {threads} thread{'s' if threads > 1 else ''}"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of repeats per implementation")
    add_device_option(parser)
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    parser.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"), help="Markdown file to update")
    parser.add_argument("--baseline", help="another version of speechclip_plus/models/cif.py, timed alongside")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the project machine has 2)")
    args = parser.parse_args(argv)
    device = choose_device(args.device)
    baseline = load_baseline(args.baseline) if args.baseline else None
    torch.set_num_threads(args.threads)
    tc = _torch_cif()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t_start = time.perf_counter()

    rows = []  # (mode, B, pass, keywords, ours, torch-cif or None, floor, baseline or None)
    checks = []
    for B in (64, 256):
        hidden, alpha, pad_mask, targets = make_inputs(B, device)
        tgt = {"train": targets, "infer": None}
        if tc is not None and B == 64:
            checks = [(mode, agreement(hidden, alpha, pad_mask, tgt[mode])) for mode in MODES]
        counts = {mode: keyword_counts(hidden, alpha, pad_mask, tgt[mode]) for mode in MODES}
        for backward in (False, True):
            fns = {"floor": floor(hidden, backward)}
            for mode in MODES:
                fns[f"ours {mode}"] = runner("ours", hidden, alpha, pad_mask, tgt[mode], backward)
                if tc is not None:
                    fns[f"torch-cif {mode}"] = runner("torch-cif", hidden, alpha, pad_mask, tgt[mode], backward)
                if baseline is not None:
                    fns[f"baseline {mode}"] = runner("baseline", hidden, alpha, pad_mask, tgt[mode], backward,
                                                     baseline)
            ms = timeit(fns, device, args.budget * len(fns))
            p = "fwd+bwd" if backward else "fwd"
            for mode in MODES:
                rows.append((mode, B, p, counts[mode], ms[f"ours {mode}"], ms.get(f"torch-cif {mode}"), ms["floor"],
                             ms.get(f"baseline {mode}")))
            print(f"  measured B={B} {p}", file=sys.stderr, flush=True)

    loop_rows = []
    small = make_inputs(LOOP_B, device)
    hidden, alpha, pad_mask, targets = small
    for mode in MODES:
        tgt = targets if mode == "train" else None
        for backward in (False, True):
            ms = timeit(
                {
                    "loop": runner("loop", hidden, alpha, pad_mask, tgt, backward),
                    "ours": runner("ours", hidden, alpha, pad_mask, tgt, backward),
                },
                device,
                0.0,
                min_reps=3,
            )
            loop_rows.append((mode, LOOP_B, "fwd+bwd" if backward else "fwd", ms["loop"], ms["ours"]))
    ref_f, ref_l = cif_loop(hidden, alpha, pad_mask, targets)
    loop_diff = (cif(hidden, alpha, pad_mask, targets).feats - ref_f).abs().max().item()

    lines = [
        f"`python bench/cif.py{command_options(argv)}`: torch {torch.__version__}, {machine(device)}, float32, S={S}, C={C}; "
        f"load average at start {load:.2f}; torch-cif {'0.2.0' if tc is not None else 'absent (skipped)'}",
        "",
        "Best of interleaved repeats (ms). Floor: forward = one read of the (B, S, C) frames; forward+backward = "
        "two reads of the frames and one write of a (B, S, C) tensor."
        + (f" Baseline: `{os.path.basename(args.baseline)}`, another cif.py timed in the same rounds (e.g. the "
           "version before a change: `git show REV:speechclip_plus/models/cif.py`)." if baseline else ""),
        "",
        "| mode | B | pass | keywords mean / max | ours ms | torch-cif ms | floor ms | torch-cif / ours "
        "| ours / floor |" + (" baseline ms | baseline / ours |" if baseline else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if baseline else ""),
    ]
    for mode, B, p, kw, ours, theirs, fl, base in rows:
        tc_ms = f"{theirs:.1f}" if theirs is not None else "skipped"
        ratio = f"{theirs / ours:.1f}x" if theirs is not None else "skipped"
        line = f"| {mode} | {B} | {p} | {kw} | {ours:.1f} | {tc_ms} | {fl:.1f} | {ratio} | {ours / fl:.2f} |"
        if base is not None:
            line += f" {base:.1f} | {base / ours:.2f}x |"
        lines.append(line)
    by_key = {(mode, B, p): (ours, theirs, base) for mode, B, p, _, ours, theirs, _, base in rows}
    infer_ratio = by_key[("infer", 256, "fwd")][0] / by_key[("train", 256, "fwd")][0]
    ours_tb, theirs_tb, _ = by_key[("train", 256, "fwd+bwd")]
    speed = "skipped (torch-cif absent)"
    if theirs_tb is not None:
        met = theirs_tb >= TARGET_VS_TORCH_CIF * ours_tb
        speed = f"{theirs_tb / ours_tb:.1f}x ({'met' if met else 'NOT met'})"
    lines += [
        "",
        "Targets:",
        "",
        f"- train, B=256, fwd+bwd: >= {TARGET_VS_TORCH_CIF:g}x faster than torch-cif: {speed}.",
        f"- B=256, fwd: inference / training <= {TARGET_INFER_VS_TRAIN:g}: {infer_ratio:.2f} "
        f"({'met' if infer_ratio <= TARGET_INFER_VS_TRAIN else 'NOT met'}); B=64: "
        f"{by_key[('infer', 64, 'fwd')][0] / by_key[('train', 64, 'fwd')][0]:.2f}.",
    ]
    if baseline is not None:
        base_ratio = by_key[("infer", 256, "fwd")][2] / by_key[("train", 256, "fwd")][2]
        lines.append(f"- The baseline (`{os.path.basename(args.baseline)}`), B=256, fwd: inference / training "
                     f"{base_ratio:.2f}.")
    lines += [
        "",
        f"Python time loop (`bench/cif_loop.py`), timed on the smaller batch B={LOOP_B} only (best of 3):",
        "",
        "| mode | B | pass | loop ms | ours ms | loop / ours |",
        "|---|---|---|---|---|---|",
    ]
    for mode, B, p, loop_ms, ours_ms in loop_rows:
        lines.append(f"| {mode} | {B} | {p} | {loop_ms:.0f} | {ours_ms:.2f} | {loop_ms / ours_ms:.0f}x |")
    lines += ["", f"Loop vs ours, training feats, B={LOOP_B}: max abs diff {loop_diff:.1e}."]
    if checks:
        lines += [
            "",
            "Agreement with torch-cif (B=64, eps=1e-5 for both, rows < length; torch-cif keeps leftovers "
            "in rows past the length in training, ours zeroes them):",
            "",
            "| mode | lengths equal | feats max abs diff | grad hidden max abs diff | grad alpha max abs diff "
            "| grad alpha rel. diff | ok (<= 1e-5) |",
            "|---|---|---|---|---|---|---|",
        ]
        for mode, r in checks:
            ok = r["lengths_equal"] == 1 and max(r["feats"], r["grad_h"], r["grad_a_rel"]) <= 1e-5
            lines.append(
                f"| {mode} | {bool(r['lengths_equal'])} | {r['feats']:.1e} | {r['grad_h']:.1e} | "
                f"{r['grad_a']:.1e} | {r['grad_a_rel']:.1e} | {'yes' if ok else 'NO'} |"
            )
    end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    elapsed = time.perf_counter() - t_start
    lines += ["", f"Load average at end {end_load:.2f}; total benchmark time {elapsed:.0f} s."]
    if device.type == "cpu" and max(load, end_load) > 1.0:
        lines.append(
            "Note: other jobs were loading the cores during this run (load average above 1): the times are "
            "inflated, and even the ratios of interleaved runs move between runs"
            + (" (each op waits for all its threads)" if torch.get_num_threads() > 1 else "")
            + ". Rerun on a quiet machine for firm figures."
        )
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_md_section(args.results, section("CIF", device), table, header="# Benchmarks")


if __name__ == "__main__":
    main()
