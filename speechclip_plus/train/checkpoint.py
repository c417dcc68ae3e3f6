"""Training checkpoints: plain, ``torch.load(weights_only=True)``-loadable dicts, written atomically.

Layout under ``<exp_dir>/checkpoints/``:
- ``step-N.pt``: the state after optimiser step N; only the newest ``keep`` are kept.
- ``last.pt``: the newest checkpoint (a hard link to its ``step-N.pt``, replaced atomically).
- ``best.pt``: the checkpoint with the best validation ``select_metric`` (hard link, replaced atomically);
  hard links keep it alive when its ``step-N.pt`` is rotated away.
- ``metrics.jsonl``: one JSON object per validation (step, epoch, metrics), rewritten atomically.

A checkpoint holds: ``model`` (state dict), ``model_excluded`` (names of frozen parameters left out),
``optimizer``, ``scheduler``, ``scaler``, ``step``, ``epoch``, ``batches_done`` (batches of ``epoch``
consumed), ``sampler``, ``rng`` (one entry per rank: torch / CUDA / numpy / python states as tensors and
lists), ``best``, ``config``, ``world_size``.

Frozen weights: parameters that do not require gradients (CLIP, the SSL upstream's network) are left out
when the model rebuilds them from its config (pretrained weights), which keeps training checkpoints small;
buffers are always kept. ``load_model_state`` loads with ``strict=False`` and checks that only the excluded
names are missing. The trainer keeps randomly initialised frozen parts (``clip.pretrained: null``).

Failures: a checkpoint that cannot be read (missing, truncated, or pickling anything but plain containers
and tensors, which ``weights_only`` never executes) raises ``CheckpointError``; a checkpoint that cannot be
written (disk full, read-only file system) raises ``CheckpointWriteError`` (an ``OSError``) naming the
previous checkpoint, which stays intact (the new one is written under a temporary name and renamed).
Temporary files of a killed earlier run are removed when the directory is opened.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..io import atomic_path, atomic_write_text, remove_stale_temps, torch_save_atomic

STEP_RE = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded (missing, truncated, not plain data)."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written; the previous one is intact (see the message)."""


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> Dict[str, Any]:
    """This process's torch, CUDA, numpy and python RNG states as tensors and plain lists."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of ``rng_state``."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- model state
def frozen_parameter_names(model: nn.Module, keep_prefixes: Sequence[str] = ()) -> List[str]:
    """Names of the parameters that do not require gradients, except those under ``keep_prefixes``."""
    return [n for n, p in model.named_parameters()
            if not p.requires_grad and not any(n.startswith(k) for k in keep_prefixes)]


def model_state(model: nn.Module, exclude: Iterable[str] = ()) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` without the keys in ``exclude`` (tensors detached, on CPU)."""
    exclude = set(exclude)
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in exclude}


def load_model_state(model: nn.Module, state: Dict[str, torch.Tensor], excluded: Iterable[str] = ()) -> None:
    """Load ``state``; only the keys in ``excluded`` may be missing (the model's own loaders set them)."""
    result = model.load_state_dict(state, strict=False)
    excluded = set(excluded)
    missing = [k for k in result.missing_keys if k not in excluded]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            "checkpoint does not match the model: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}"
        )


def _load_error_detail(e: Exception) -> str:
    """The informative line of a ``torch.load`` error (torch's advice to retry with ``weights_only=False``
    and its documentation links are left out)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    useful = [x for x in lines if not x.startswith(("Weights only load failed", "Check the documentation",
                                                    "Please file an issue"))]
    return f"{type(e).__name__}: {(useful or lines or [''])[0][:300]}"


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """``torch.load(path, weights_only=True)``; ``CheckpointError`` naming the file if it is missing,
    unreadable, or not a dict of plain data (pickled code is refused, never run)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(
            f"cannot load checkpoint {path}: corrupted, truncated, or it contains pickled objects other than "
            f"plain containers and tensors, which are never loaded ({_load_error_detail(e)})") from None
    if not isinstance(ck, dict):
        raise CheckpointError(f"cannot load checkpoint {path}: expected a dict, got {type(ck).__name__}")
    return ck


# ---------------------------------------------------------------------------------------------- files
def _link_atomic(src: str, dst: str) -> None:
    """Make ``dst`` the same file as ``src`` (hard link, or a copy where links fail), atomically."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


class CheckpointDir:
    """``step-N.pt`` / ``last.pt`` / ``best.pt`` / ``metrics.jsonl`` in one directory (see module doc)."""

    def __init__(self, path: str, keep: int = 3):
        if keep < 0:
            raise ValueError(f"train.keep_checkpoints must be >= 0, got {keep}")
        self.path = path
        self.keep = keep
        os.makedirs(path, exist_ok=True)
        remove_stale_temps(path)  # a partial checkpoint of a killed run is never taken for one

    @property
    def last(self) -> str:
        return os.path.join(self.path, "last.pt")

    @property
    def best(self) -> str:
        return os.path.join(self.path, "best.pt")

    @property
    def metrics(self) -> str:
        return os.path.join(self.path, "metrics.jsonl")

    def step_path(self, step: int) -> str:
        return os.path.join(self.path, f"step-{step}.pt")

    def steps(self) -> List[int]:
        return sorted(int(m.group(1)) for f in os.listdir(self.path) if (m := STEP_RE.match(f)))

    def last_step(self) -> Optional[int]:
        """The step ``last.pt`` holds (the ``step-N.pt`` it is linked to), or None without one."""
        if not os.path.exists(self.last):
            return None
        for step in reversed(self.steps()):
            try:
                if os.path.samefile(self.last, self.step_path(step)):
                    return step
            except OSError:
                continue
        return None

    def save(self, state: Dict[str, Any], step: int, is_best: bool = False) -> str:
        """Write ``step-<step>.pt``, point ``last.pt`` (and ``best.pt``) at it, drop old step files.

        ``CheckpointWriteError`` if writing fails; ``last.pt`` then still holds the previous checkpoint.
        """
        path = self.step_path(step)
        try:
            torch_save_atomic(state, path)
            _link_atomic(path, self.last)
            if is_best:
                _link_atomic(path, self.best)
        except OSError as e:
            prev = self.last_step()
            kept = (f"the previous checkpoint {self.last} (step {prev}) is intact" if prev is not None else
                    f"{self.last} is intact" if os.path.exists(self.last) else "there is no earlier checkpoint")
            err = CheckpointWriteError(f"cannot write checkpoint {path}: {e.strerror or e}; {kept}")
            err.errno = e.errno
            raise err from e
        for old in self.steps()[: max(0, len(self.steps()) - self.keep)]:
            os.remove(self.step_path(old))
        return path

    # ---- metrics side file
    def read_metrics(self) -> List[Dict[str, Any]]:
        if not os.path.isfile(self.metrics):
            return []
        records = []
        with open(self.metrics, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{self.metrics}:{i}: not JSON: {e}") from None
        return records

    def write_metrics(self, records: Iterable[Dict[str, Any]]) -> None:
        atomic_write_text(self.metrics, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))

    def append_metrics(self, record: Dict[str, Any]) -> None:
        self.write_metrics(self.read_metrics() + [record])

    def trim_metrics(self, max_step: int) -> None:
        """Forget validations after ``max_step`` (those of a run interrupted before its next checkpoint)."""
        records = self.read_metrics()
        kept = [r for r in records if r.get("step", 0) <= max_step]
        if len(kept) != len(records):
            self.write_metrics(kept)


def best_is_better(value: float, best: Optional[float], mode: str) -> bool:
    """Whether ``value`` beats ``best`` (``mode`` max | min); any finite value beats ``None``."""
    if value is None or not np.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best
