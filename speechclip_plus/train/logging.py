"""Run records: environment info, per-rank log files, and the TensorBoard writer.

- ``env_info()``: git sha (and whether the tree is dirty), python/torch/torchaudio/open_clip/s3prl versions,
  host, CUDA devices: logged at the start of every run.
- ``setup_logger(exp_dir, rank, world_size)``: rank 0 writes ``train.log`` and the console; when
  distributed every rank also writes ``train.rank<k>.log``. Every line carries the time and ``[rank k]``.
- ``ScalarWriter``: TensorBoard scalars under ``<exp_dir>/tensorboard`` on rank 0, a no-op elsewhere.
"""
from __future__ import annotations

import logging
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from typing import Dict, Mapping, Optional

LOGGER_NAME = "speechclip_plus.train"
_PACKAGES = ("torch", "torchaudio", "open_clip_torch", "s3prl", "numpy")


def _git(args, cwd: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def env_info() -> Dict[str, str]:
    """Facts needed to reproduce a run (icefall ``get_env_info`` style)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    info: Dict[str, str] = {
        "git_sha": _git(["rev-parse", "HEAD"], repo) or "unknown",
        "git_dirty": str(bool(_git(["status", "--porcelain", "--untracked-files=no"], repo))),
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "argv": " ".join(sys.argv),
    }
    for pkg in _PACKAGES:
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = "not installed"
    try:
        import torch

        info["cuda"] = (
            f"{torch.version.cuda} ({torch.cuda.device_count()} x {torch.cuda.get_device_name(0)})"
            if torch.cuda.is_available() else "not available"
        )
    except Exception:  # noqa: BLE001 - info only
        info["cuda"] = "unknown"
    return info


def setup_logger(exp_dir: Optional[str], rank: int = 0, world_size: int = 1,
                 console: bool = True) -> logging.Logger:
    """The training logger, (re)configured for this process; see the module docstring for the files."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers = []
    if exp_dir is not None:
        os.makedirs(exp_dir, exist_ok=True)
        if rank == 0:
            handlers.append(logging.FileHandler(os.path.join(exp_dir, "train.log"), encoding="utf-8"))
        if world_size > 1:
            handlers.append(logging.FileHandler(os.path.join(exp_dir, f"train.rank{rank}.log"), encoding="utf-8"))
    if console and rank == 0:
        handlers.append(logging.StreamHandler(sys.stderr))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    return logger


def close_logger() -> None:
    """Detach and close every handler of the training logger (its log files are complete and released)."""
    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


class ScalarWriter:
    """TensorBoard scalars (``SummaryWriter``) on the main process; every method is a no-op elsewhere."""

    def __init__(self, log_dir: Optional[str], enabled: bool = True, purge_step: Optional[int] = None):
        """``purge_step``: on resume, hide events at or after this step left by the interrupted run."""
        self._writer = None
        if enabled and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def scalars(self, values: Mapping[str, float], step: int, prefix: str = "") -> None:
        if self._writer is None:
            return
        for key, value in values.items():
            if value is not None:
                self._writer.add_scalar(f"{prefix}{key}", float(value), step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
