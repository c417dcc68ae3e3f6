"""Model files: the one file format of a trained model (export, validation, loading) and the loaders of exp dirs
and Hub models; the Python API (``speechclip_plus.api``) and the command-line tools read models through here.

Model file (``export_model`` / ``read_model_file``), format ``speechclip_plus.model/1``: one
``torch.save``'d dict of plain containers and tensors only, readable by ``torch.load(weights_only=True)``:
``format``, ``config`` (resolved config), ``vocab_ids`` (the reduced keyword vocabulary, original CLIP ids),
``state_dict`` (the whole model, frozen CLIP and upstream included), ``upstream_model_config`` (the text of
``model.upstream.model_config``, e.g. s3prl feature settings, or None), ``upstream_ckpt`` (the content of the
s3prl upstream checkpoint named by ``model.upstream.ckpt``, or None), ``clip_model_config`` (the open_clip
model-config json when ``model.clip.name`` is a file, else None), ``clip_build`` (``quick_gelu`` and the
image ``preprocess_cfg``: settings CLIP takes from its pretrained tag that hold no weights), ``meta`` and
``digest`` (``content_digest`` of all the rest, checked on reading: a changed tensor byte is an error).
Loading never unpickles code (``weights_only=True``); files the model needs at build time (the upstream
checkpoint, the CLIP json) are written to the cache (``cache_dir()``) under their content hash, so the model
file alone rebuilds the model anywhere. The frozen upstream tensors are shared with ``state_dict`` in the
file, so it is stored once.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .io import atomic_path, cache_dir, torch_save_atomic

FORMAT = "speechclip_plus.model/1"
PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["FORMAT", "ModelFileError", "build_untrained", "cache_dir", "content_digest", "exp_config", "export_model",
           "load_any", "load_exp_dir", "load_model_file", "model_from_payload", "read_model_file", "resolve_checkpoint"]


class ModelFileError(ValueError):
    """A model file, checkpoint or exp dir that cannot be used (message names the file)."""


# ---------------------------------------------------------------------------------------------- digest, cache
def content_digest(obj: Any) -> str:
    """sha256 over a canonical walk of plain data (dict keys sorted; tensors by dtype, shape and bytes)."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(x.shape)}:".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(f"D{len(x)}:".encode())
            for k in sorted(x, key=repr):
                walk(k)
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"{'L' if isinstance(x, list) else 'U'}{len(x)}:".encode())
            for v in x:
                walk(v)
        else:
            h.update(f"S{type(x).__name__}:{x!r};".encode())

    walk(obj)
    return h.hexdigest()


def _torch_load_plain(path: str, what: str) -> Any:
    """``torch.load(weights_only=True)``; any failure (pickled code, truncation) -> ``ModelFileError``."""
    if not os.path.isfile(path):
        raise ModelFileError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every reader error becomes one clear message naming the file
        from .train.checkpoint import _load_error_detail

        raise ModelFileError(
            f"{path}: cannot be read as a {what} (corrupted, truncated, or it contains pickled objects other "
            f"than plain containers and tensors, which are never loaded): {_load_error_detail(e)}"
        ) from None


def _materialise(content: Any, kind: str, name: str, write) -> str:
    """Write ``content`` once to ``cache_dir()/kind/<digest>/name`` (atomic); reuse a verified copy."""
    digest = content_digest(content)
    path = os.path.join(cache_dir(), kind, digest[:32], name)
    if os.path.isfile(path):
        try:
            if name.endswith(".json"):
                with open(path, encoding="utf-8") as f:
                    existing = json.load(f)
            elif isinstance(content, str):
                with open(path, encoding="utf-8") as f:
                    existing = f.read()
            else:
                existing = torch.load(path, map_location="cpu", weights_only=True)
            if content_digest(existing) == digest:
                return path
        except Exception:  # noqa: BLE001 - an unreadable cache entry is rewritten
            pass
    with atomic_path(path) as tmp:
        write(content, tmp)
    return path


def _write_torch(obj: Any, path: str) -> None:
    torch.save(obj, path)


def _write_text(text: str, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _write_json(obj: Any, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


# ---------------------------------------------------------------------------------------------- export
def _share_storage(content: Any, state: Dict[str, torch.Tensor]) -> Any:
    """``content`` with every tensor equal to a ``state`` tensor replaced by that tensor (stored once)."""
    index: Dict[Tuple, List[torch.Tensor]] = {}
    for t in state.values():
        index.setdefault((t.dtype, tuple(t.shape)), []).append(t)

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            for cand in index.get((x.dtype, tuple(x.shape)), []):
                if torch.equal(cand, x):
                    return cand
            return x
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, tuple):
            return tuple(walk(v) for v in x)
        return x

    return walk(content)


def _plain_config(obj: Any) -> Any:
    """A deep copy of a config with tuples as lists (YAML/JSON-like plain data)."""
    if isinstance(obj, dict):
        return {str(k): _plain_config(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain_config(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ModelFileError(f"config value {obj!r} of type {type(obj).__name__} is not plain data")


def export_model(model, config: Dict, path: PathLike, meta: Optional[Dict] = None) -> str:
    """Write ``model`` (a ``SpeechCLIP``) and its resolved ``config`` as one self-contained model file.

    Layout in the module docstring. Written to a temporary name and renamed. Returns ``path``.
    """
    path = os.fspath(path)
    cfg = _plain_config(config if "model" in config else {"model": config})
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    up = cfg["model"]["upstream"]
    upstream_ckpt = None
    if up.get("ckpt"):
        upstream_ckpt = _torch_load_plain(up["ckpt"], "s3prl upstream checkpoint (model.upstream.ckpt)")
        upstream_ckpt = _share_storage(upstream_ckpt, state)
    upstream_model_config = None
    if up.get("model_config"):
        try:
            with open(up["model_config"], encoding="utf-8") as f:
                upstream_model_config = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ModelFileError(f"model.upstream.model_config={up['model_config']}: cannot read: {e}") from None
    clip_name = cfg["model"]["clip"]["name"]
    clip_model_config = None
    if str(clip_name).endswith(".json") or os.path.isfile(str(clip_name)):
        try:
            with open(clip_name, encoding="utf-8") as f:
                clip_model_config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ModelFileError(f"model.clip.name={clip_name}: cannot read the open_clip model config: {e}") \
                from None
    visual_pp = getattr(getattr(model.clip.clip, "visual", None), "preprocess_cfg", None)
    payload = {
        "format": FORMAT,
        "config": cfg,
        "vocab_ids": [int(i) for i in model.clip.vocab_ids.tolist()],
        "state_dict": state,
        "upstream_ckpt": upstream_ckpt,
        "upstream_model_config": upstream_model_config,
        "clip_model_config": clip_model_config,
        "clip_build": {
            "quick_gelu": bool(model.clip.quick_gelu),
            "preprocess_cfg": _plain_config(dict(visual_pp)) if visual_pp else None,
        },
        "meta": _plain_config(dict(meta or {})),
    }
    payload["digest"] = content_digest(payload)
    torch_save_atomic(payload, path)
    return path


# ---------------------------------------------------------------------------------------------- loading
_REQUIRED = {"format": str, "config": dict, "vocab_ids": list, "state_dict": dict}


def read_model_file(path: PathLike) -> Dict[str, Any]:
    """Load and validate a model file (``weights_only``; nothing but plain data and tensors is accepted)."""
    path = os.fspath(path)
    payload = _torch_load_plain(path, "speechclip_plus model file")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ModelFileError(f"{path}: not a speechclip_plus model file (format {found!r}, expected {FORMAT!r})")
    for key, typ in _REQUIRED.items():
        if not isinstance(payload.get(key), typ):
            raise ModelFileError(f"{path}: key '{key}' missing or not a {typ.__name__}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["state_dict"].items()):
        raise ModelFileError(f"{path}: 'state_dict' must map names to tensors")
    if not all(isinstance(i, int) for i in payload["vocab_ids"]):
        raise ModelFileError(f"{path}: 'vocab_ids' must be a list of ints")
    if "model" not in payload["config"]:
        raise ModelFileError(f"{path}: 'config' has no 'model' section")
    digest = payload.pop("digest", None)
    if digest != content_digest(payload):
        raise ModelFileError(f"{path}: content digest {'missing' if digest is None else 'mismatch'}: the file was "
                             "modified or damaged after export (re-export it)")
    return payload


def _apply_clip_build(model, build: Optional[Dict]) -> None:
    """Rebuild CLIP with the exported ``quick_gelu`` / image preprocessing where a random init differs."""
    if not build:
        return
    from .models.clip import FrozenCLIP

    clip = model.clip
    if bool(build.get("quick_gelu")) != bool(clip.quick_gelu):
        clip = FrozenCLIP(clip.name, None, clip.vocab_ids.tolist(), quick_gelu=bool(build["quick_gelu"]))
        model.clip = clip
    pp = build.get("preprocess_cfg")
    visual = getattr(clip.clip, "visual", None)
    if pp and visual is not None and _plain_config(dict(getattr(visual, "preprocess_cfg", {}) or {})) != pp:
        from open_clip.transform import PreprocessCfg, image_transform_v2

        clean = {k: tuple(v) if isinstance(v, list) else v for k, v in pp.items()}
        visual.preprocess_cfg = clean
        clip._preprocess = image_transform_v2(PreprocessCfg(**clean), is_train=False)


def model_from_payload(payload: Dict[str, Any], path: str = "<model file>"):
    """Rebuild the ``SpeechCLIP`` of a validated model-file payload (random init + ``load_state_dict``)."""
    from .config import ConfigError, model_config
    from .models.speechclip import SpeechCLIP

    cfg = copy.deepcopy(payload["config"])
    try:
        mcfg = model_config(cfg)
    except ConfigError as e:
        raise ModelFileError(f"{path}: bad config: {e}") from None
    if payload.get("upstream_ckpt") is not None:
        mcfg["upstream"]["ckpt"] = _materialise(payload["upstream_ckpt"], "upstream", "upstream.pt", _write_torch)
    elif mcfg["upstream"]["ckpt"]:
        raise ModelFileError(f"{path}: model.upstream.ckpt is set but the file holds no upstream checkpoint")
    if payload.get("upstream_model_config") is not None:
        name = os.path.basename(str(mcfg["upstream"]["model_config"])) or "upstream.yaml"
        mcfg["upstream"]["model_config"] = _materialise(payload["upstream_model_config"], "upstream_configs", name,
                                                        _write_text)
    if payload.get("clip_model_config") is not None:
        stem = os.path.splitext(os.path.basename(str(mcfg["clip"]["name"])))[0] or "clip"
        mcfg["clip"]["name"] = _materialise(payload["clip_model_config"], "clip_configs", f"{stem}.json",
                                            _write_json)
    model = SpeechCLIP(mcfg, vocab_ids=payload["vocab_ids"], clip_pretrained=None)
    _apply_clip_build(model, payload.get("clip_build"))
    try:
        result = model.load_state_dict(payload["state_dict"], strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = " ".join(str(e).split())
        raise ModelFileError(f"{path}: weights do not fit the model built from its config: {detail}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ModelFileError(
            f"{path}: weights do not match the model built from its config: missing {result.missing_keys[:6]}, "
            f"unexpected {result.unexpected_keys[:6]}"
        )
    return model.eval()


def load_model_file(path: PathLike):
    """Model file -> (``SpeechCLIP`` in eval mode, resolved config dict, meta dict)."""
    path = os.fspath(path)
    payload = read_model_file(path)
    return model_from_payload(payload, path), payload["config"], dict(payload.get("meta") or {})


def resolve_checkpoint(exp_dir: PathLike, checkpoint: str = "best") -> str:
    """``best`` | ``last`` -> ``<exp_dir>/checkpoints/<name>.pt``; anything else is taken as a path."""
    exp_dir = os.fspath(exp_dir)
    if checkpoint in ("best", "last"):
        path = os.path.join(exp_dir, "checkpoints", f"{checkpoint}.pt")
        if not os.path.isfile(path):
            other = os.path.join(exp_dir, "checkpoints", "last.pt" if checkpoint == "best" else "best.pt")
            hint = f" ({os.path.basename(other)} exists: pass --checkpoint {os.path.basename(other)[:-3]})" \
                if os.path.isfile(other) else ""
            raise ModelFileError(f"{exp_dir}: no {checkpoint} checkpoint ({path} not found){hint}")
        return path
    if not os.path.isfile(checkpoint):
        raise ModelFileError(f"checkpoint not found: {checkpoint}")
    return checkpoint


def exp_config(exp_dir: PathLike) -> Dict:
    """The resolved ``<exp_dir>/config.yaml`` (validated)."""
    from .config import ConfigError, load_config

    path = os.path.join(os.fspath(exp_dir), "config.yaml")
    if not os.path.isfile(path):
        raise ModelFileError(f"{exp_dir}: not an experiment dir ({path} not found)")
    try:
        return load_config(path)
    except ConfigError as e:
        raise ModelFileError(str(e)) from None


def build_untrained(cfg: Dict):
    """A freshly initialised model from ``cfg`` (seeded with ``train.seed``, as training starts), eval mode."""
    from .models.speechclip import build_model

    seed = int(cfg.get("train", {}).get("seed", 0))
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = build_model(cfg)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def load_exp_dir(exp_dir: PathLike, checkpoint: str = "best"):
    """Exp dir -> (``SpeechCLIP`` with the checkpoint's weights, config, meta {checkpoint, step}).

    The model is built from ``config.yaml`` (frozen parts the checkpoint left out come from their own
    loaders), then the checkpoint's ``model`` state is loaded.
    """
    from .models.speechclip import build_model
    from .train.checkpoint import load_model_state

    exp_dir = os.fspath(exp_dir)
    cfg = exp_config(exp_dir)
    path = resolve_checkpoint(exp_dir, checkpoint)
    ckpt = _torch_load_plain(path, "training checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ModelFileError(f"{path}: not a training checkpoint (no 'model' state dict)")
    model = build_model(cfg)
    try:
        load_model_state(model, ckpt["model"], ckpt.get("model_excluded", ()))
    except RuntimeError as e:
        raise ModelFileError(f"{path}: {e}") from None
    meta = {"checkpoint": os.path.abspath(path), "step": ckpt.get("step")}
    return model.eval(), cfg, meta


def load_any(path: PathLike, checkpoint: str = "best"):
    """A model file, an exp dir or ``hf://ORG/NAME[@REVISION]`` (``speechclip_plus.hub``) -> (model, config, meta).

    A Hub model file is read like a local one; its meta gains ``hub`` (uri, repo_id, revision, commit).
    """
    path = os.fspath(path)
    if path.startswith("hf://"):
        from .hub import HubError, fetch_model

        try:
            found = fetch_model(path)
        except HubError as e:
            raise ModelFileError(str(e)) from None
        model, cfg, meta = load_model_file(found.pop("path"))
        return model, cfg, {**meta, "hub": found}
    if os.path.isdir(path):
        return load_exp_dir(path, checkpoint)
    return load_model_file(path)
