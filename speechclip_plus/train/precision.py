"""Training precision (``train.precision``): mixed precision where the hardware runs it natively.

``auto`` (default) picks, per device:
- CUDA, compute capability >= 8.0 (Ampere and later): bf16 autocast (no loss scaling needed);
- older CUDA GPUs: fp16 autocast with a ``GradScaler``;
- a CPU with native bf16 arithmetic (x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``): bf16 autocast;
- any other CPU: float32. Without native bf16 PyTorch emulates it and autocast makes a step slower, not faster:
  measured on an AVX2-only AMD EPYC, a (12800 x 80) @ (80 x 320) matmul took 15x and a 3x3 conv 48x the fp32 time.
``bf16`` / ``fp16`` / ``fp32`` force a choice: ``bf16`` on a GPU older than Ampere and ``fp16`` on a CPU are
refused (``ConfigError``); ``bf16`` on a CPU without native bf16 runs (emulated, slow) with a warning in the log.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager, Optional, Tuple

import torch

from ..config import PRECISIONS, ConfigError

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


def cuda_capability(device: torch.device) -> Tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))


def amp_dtype(device: torch.device, precision: str = "auto", cpuinfo: str = "/proc/cpuinfo",
              capability: Callable[[torch.device], Tuple[int, int]] = cuda_capability) -> Optional[torch.dtype]:
    """The autocast dtype for ``device`` under ``train.precision`` (None = float32); see the module docstring.

    ``cpuinfo`` and ``capability`` are where the CPU flags and the GPU's compute capability are read (tests pass
    stand-ins).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision: '{precision}' is not one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if precision == "fp32" or device.type not in ("cpu", "cuda"):
        return None
    if device.type == "cuda":
        ampere = tuple(capability(device)) >= (8, 0)
        if precision == "bf16" and not ampere:
            raise ConfigError(f"train.precision: bf16 needs an Ampere or later GPU (compute capability >= 8.0); "
                              f"{device} has {tuple(capability(device))}: use fp16 or auto")
        if precision == "fp16" or (precision == "auto" and not ampere):
            return torch.float16
        return torch.bfloat16
    if precision == "fp16":
        raise ConfigError("train.precision: fp16 needs a GPU; on a CPU use auto, bf16 or fp32")
    if precision == "bf16" or cpu_has_native_bf16(cpuinfo):
        return torch.bfloat16
    return None


def needs_grad_scaler(dtype: Optional[torch.dtype]) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 and float32 need none."""
    return dtype == torch.float16


def precision_name(device: torch.device, precision: str = "auto", **kwargs) -> str:
    """What ``autocast`` runs in, for logs: ``"bfloat16 autocast"``, ``"float16 autocast + GradScaler"``, ``"float32"``."""
    dtype = amp_dtype(device, precision, **kwargs)
    if dtype is None:
        return "float32"
    return f"{str(dtype).replace('torch.', '')} autocast" + (" + GradScaler" if needs_grad_scaler(dtype) else "")


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager:
    """Autocast to ``dtype`` on ``device`` (a no-op for None = float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
