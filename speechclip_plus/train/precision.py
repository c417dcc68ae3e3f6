"""Mixed precision where the hardware runs it natively, full precision elsewhere.

``autocast(device, amp)``: fp16 on CUDA (with a GradScaler, see the trainer); on a CPU, bf16 only when the CPU
has native bf16 arithmetic (x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``). Without it PyTorch emulates
bf16 and autocast makes a step slower, not faster: measured on an AVX2-only AMD EPYC, a (12800 x 80) @ (80 x 320)
matmul took 15x and a 3x3 conv 48x the fp32 time.
"""
from __future__ import annotations

import contextlib
import functools
from typing import ContextManager, Optional

import torch

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set:
    """The CPU feature flags of /proc/cpuinfo (x86 ``flags``, Arm ``Features``); empty when unreadable."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    return any(flag in cpu_flags(cpuinfo) for flag in NATIVE_BF16_FLAGS)


def amp_dtype(device: torch.device, amp: bool, cpuinfo: str = "/proc/cpuinfo") -> Optional[torch.dtype]:
    """The autocast dtype for ``device`` (None = run in float32)."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bf16(cpuinfo):
        return torch.bfloat16
    return None


def precision_name(device: torch.device, amp: bool) -> str:
    """What ``autocast`` runs in, for logs: ``"bfloat16 autocast"``, ``"float16 autocast"`` or ``"float32"``."""
    dtype = amp_dtype(device, amp)
    return f"{str(dtype).replace('torch.', '')} autocast" if dtype else "float32"


def autocast(device: torch.device, amp: bool) -> ContextManager:
    dtype = amp_dtype(device, amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
