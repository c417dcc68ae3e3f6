"""Read an official SpeechCLIP / SpeechCLIP+ checkpoint without executing anything it contains.

The released files are PyTorch Lightning checkpoints: a pickle holding ``state_dict`` (tensors),
``hyper_parameters`` (``{"config": <avssl OrderedNamespace>}``, whose ``trainer.logger`` is the pickled
Lightning logger) and training state (optimizer, callbacks, loops). Unpickling them normally would import
``avssl`` and ``pytorch_lightning`` and run whatever the pickle names.

Here they are read with ``torch.load(weights_only=True)``, whose unpickler only builds tensors and plain
containers, plus one *inert stand-in* per global in ``REFERENCE_GLOBALS``: a class of this module that
records the arguments and the state the pickle hands it and never imports or calls the original. Any other
global (``os.system``, ``builtins.exec``, ...) stops the load with ``ReferenceCheckpointError`` naming it;
nothing of the file has run at that point. ``allow`` adds names to accept as inert records (only for a
file you have inspected: a record keeps data, it never behaves like the original).

``to_plain`` turns the result into plain data: an ``OrderedNamespace`` record becomes the dict it held,
any other record a ``"<inert module.name>"`` string.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Iterable, List, Tuple

import torch

REFERENCE_GLOBALS: Dict[str, str] = {
    "avssl.base.ordered_namespace.OrderedNamespace": "the reference's config namespace (its state is a mapping)",
    "pytorch_lightning.loggers.wandb.WandbLogger": "the training logger stored in trainer.logger",
    "pytorch_lightning.loggers.tensorboard.TensorBoardLogger": "the training logger stored in trainer.logger",
    "numpy.mean": "a Lightning logger's default aggregation function (referenced, never called)",
}
NAMESPACE = "avssl.base.ordered_namespace.OrderedNamespace"
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
_REDUCE_RE = re.compile(r"unrecognized function (.+)$")


class ReferenceCheckpointError(ValueError):
    """An official checkpoint that cannot be read (message names the file and the cause)."""


class InertRecord:
    """Stand-in for a reference global: stores what the unpickler passes, runs nothing.

    ``args``: positional arguments (NEWOBJ / REDUCE); ``state``: the BUILD state (``None`` if none).
    """

    qualified_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "InertRecord":
        obj = super().__new__(cls)
        obj.args, obj.state = tuple(args), None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: D107 - arguments kept by __new__
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.qualified_name}>"


def _stand_in(name: str) -> type:
    """A fresh ``InertRecord`` subclass standing for the global ``name`` (module.qualname)."""
    return type(name.rsplit(".", 1)[-1], (InertRecord,), {"qualified_name": name, "__module__": __name__})


def _refusal(path: str, e: Exception, allowed: Iterable[str]) -> ReferenceCheckpointError:
    from ..train.checkpoint import _load_error_detail

    text = str(e)
    found = _GLOBAL_RE.search(text) or _REDUCE_RE.search(text.splitlines()[0] if text else "")
    if found:
        return ReferenceCheckpointError(
            f"{path}: refused: the pickle references '{found.group(1)}', which is not one of the globals an "
            f"official SpeechCLIP checkpoint holds ({', '.join(sorted(allowed))}); nothing in the file was "
            "executed. If you have inspected the file and that global is plain data, pass "
            f"--allow_global {found.group(1)} to read it as an inert record.")
    return ReferenceCheckpointError(
        f"{path}: cannot be read as a PyTorch checkpoint (corrupted or truncated?): {_load_error_detail(e)}")


def load_reference_checkpoint(path: str, allow: Iterable[str] = ()) -> Dict[str, Any]:
    """The checkpoint's top-level dict, read with ``weights_only`` and inert stand-ins (module docstring).

    Raises ``ReferenceCheckpointError`` when the file is missing, unreadable, names a global that is not
    allowed, or lacks a ``state_dict`` of tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ReferenceCheckpointError(f"reference checkpoint not found: {path}")
    names = dict(REFERENCE_GLOBALS)
    for name in allow:
        if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", name):
            raise ReferenceCheckpointError(f"--allow_global {name!r}: expected a dotted module.name")
        names.setdefault(name, "allowed on the command line")
    stand_ins: List[Tuple[type, str]] = [(_stand_in(n), n) for n in names]
    try:
        with torch.serialization.safe_globals(stand_ins):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every reader error becomes one message naming the file
        raise _refusal(path, e, names) from None
    if not isinstance(ckpt, dict):
        raise ReferenceCheckpointError(f"{path}: expected a Lightning checkpoint (a dict), got {type(ckpt).__name__}")
    state = ckpt.get("state_dict")
    if not isinstance(state, dict) or not state:
        raise ReferenceCheckpointError(f"{path}: no 'state_dict' (top-level keys: {', '.join(map(str, ckpt))})")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ReferenceCheckpointError(f"{path}: state_dict entry {bad[0]!r} is not a named tensor")
    return ckpt


def to_plain(obj: Any) -> Any:
    """Records and containers -> plain data: namespaces become dicts, other records ``"<inert name>"``."""
    if isinstance(obj, InertRecord):
        if obj.qualified_name == NAMESPACE and isinstance(obj.state, dict):
            return {str(k): to_plain(v) for k, v in obj.state.items()}
        return repr(obj)
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def reference_config(ckpt: Dict[str, Any], path: str) -> Dict[str, Any]:
    """The reference config stored in the checkpoint's ``hyper_parameters["config"]``, as plain dicts."""
    hp = ckpt.get("hyper_parameters")
    config = hp.get("config") if isinstance(hp, dict) else None
    plain = to_plain(config)
    if not isinstance(plain, dict):
        raise ReferenceCheckpointError(
            f"{path}: no reference config in hyper_parameters['config']; pass the run's YAML with --config")
    return plain
