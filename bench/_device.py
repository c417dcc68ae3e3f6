"""Device choice, timing and peak memory for the benchmarks: one code path on the CPU and on a CUDA GPU.

- ``--device auto|cpu|cuda`` (``add_device_option``, ``choose_device``): auto takes the GPU when
  ``torch.cuda.is_available()``; ``cuda`` without a GPU is an error.
- ``stopwatch(device)``: seconds of the ``with`` block. On a GPU: two ``torch.cuda.Event(enable_timing=True)``
  recorded on the current stream around the block, then a synchronize on the end event, so the time covers the
  kernels the block queued (``time.perf_counter`` would only see their launches). On the CPU:
  ``time.perf_counter``.
- ``peak_memory(device)``: extra memory the ``with`` block needed at its peak. On a GPU:
  ``torch.cuda.max_memory_allocated`` (reset just before the block) minus the memory allocated before it. On
  the CPU: the process's resident-set high-water mark (VmHWM, reset by writing 5 to /proc/self/clear_refs) minus
  its resident set before; where that reset is refused, ``ru_maxrss`` (an upper bound, ``exact`` False).
- ``describe(device)`` names the hardware for the result tables; ``section(title, device)`` is the RESULTS.md
  section a benchmark writes: its CPU section as before, ``<title>, GPU: <torch.cuda.get_device_name>`` on a
  GPU, so GPU figures never replace the CPU ones.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import time
from dataclasses import dataclass
from typing import Iterator

import torch


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the measured code runs (auto: the GPU when CUDA is available)")


def choose_device(name: str = "auto") -> torch.device:
    """``cpu`` or ``cuda`` (the current GPU; no CUDA context is created here)."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {name}: expected auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is false)")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def describe(device: torch.device) -> str:
    """``NVIDIA A100-SXM4-40GB (compute capability 8.0, 40 GiB), CUDA 12.8`` or ``x86_64, 2 CPUs``."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return (f"{p.name} (compute capability {p.major}.{p.minor}, {p.total_memory / 2 ** 30:.0f} GiB), "
                f"CUDA {torch.version.cuda}")
    return f"{platform.machine()}, {os.cpu_count()} CPUs"


def section(title: str, device: torch.device) -> str:
    return title if device.type != "cuda" else f"{title}, GPU: {torch.cuda.get_device_name(device)}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Measured:
    seconds: float = float("nan")
    bytes: float = float("nan")
    exact: bool = True  # False: the memory figure is an upper bound (CPU without a resettable high-water mark)


@contextlib.contextmanager
def stopwatch(device: torch.device) -> Iterator[Measured]:
    """``with stopwatch(device) as t: ...``, then ``t.seconds`` (see the module docstring)."""
    out = Measured()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield out
        end.record()
        end.synchronize()
        out.seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        yield out
        out.seconds = time.perf_counter() - t0


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[Measured]:
    """``with peak_memory(device) as m: ...``, then ``m.bytes`` and ``m.exact`` (see the module docstring)."""
    out = Measured()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out.bytes = float(torch.cuda.max_memory_allocated(device) - before)
    else:
        out.exact = _reset_cpu_peak()
        before_kb = _status_kb("VmRSS")
        yield out
        peak_kb = _status_kb("VmHWM") if out.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out.bytes = float((peak_kb - before_kb) * 1024)
