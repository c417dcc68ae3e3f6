"""The key of a stage-2 image-embedding cache: the content it was computed from, never a file name.

- ``clip_key(name, pretrained, quick_gelu)``: the CLIP side, as plain data:
  ``arch`` (open_clip architecture, or the stem of a model-config ``.json``), ``model_config`` (sha256 of
  the ``.json``'s canonical content, None for a built-in architecture), ``weights`` (an open_clip pretrained
  tag such as ``openai``, which names fixed published weights; ``sha256:<hex>`` of a weights file's bytes;
  ``random`` for none), ``quick_gelu`` (the config value; None = what the tag implies) and ``open_clip`` (its
  version: the model code and the image preprocessing come from it).
- ``clip_tag(...)``: the cache folder name ``clip_<arch>_<weights label>-<first 12 hex of sha256(key)>``; the
  label (tag, or ``<folder>-<file stem>`` of a weights file) is only for people, the digest is the key.
- ``image_list_key(images)``: the image side, sha256 over the sorted ``(id, absolute path, size, mtime)``
  of every image, and the count.

A weights file is hashed by streaming it (it can hold gigabytes); the digest is memoised per absolute path
under ``$SPEECHCLIP_PLUS_CACHE`` (else ``$XDG_CACHE_HOME/speechclip_plus``, else ``~/.cache/speechclip_plus``,
the model cache of ``speechclip_plus.api``) together with the file's size and mtime, and recomputed when
either changes. "Random" weights are a new initialisation in every process: such caches are for tests only.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Dict, Mapping, Optional

from speechclip_plus.data.datadir import DataError
from speechclip_plus.io import atomic_write_text, cache_dir

CHUNK = 1 << 20


def file_sha256(path: str) -> str:
    """sha256 (hex) of the bytes of ``path``, memoised by (absolute path, size, mtime in ns)."""
    path = os.path.abspath(path)
    st = os.stat(path)
    stamp = f"{st.st_size} {st.st_mtime_ns}"
    memo = os.path.join(cache_dir(), "file_digests", hashlib.sha256(path.encode()).hexdigest()[:32])
    try:
        with open(memo, encoding="utf-8") as f:
            saved_stamp, _, digest = f.read().strip().rpartition(" ")
        if saved_stamp == stamp and re.fullmatch(r"[0-9a-f]{64}", digest):
            return digest
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    digest = h.hexdigest()
    try:
        atomic_write_text(memo, f"{stamp} {digest}\n")
    except OSError:  # a read-only cache only costs the next run another pass over the file
        pass
    return digest


def _is_file_ref(value: str) -> bool:
    """A weights file rather than an open_clip tag (the rule of ``config.PATH_KEYS`` resolution)."""
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


def clip_key(name: str, pretrained: Optional[str], quick_gelu: Optional[bool] = None) -> Dict[str, Any]:
    """The content key of a frozen CLIP (see the module docstring); ``DataError`` names a missing file."""
    from importlib.metadata import PackageNotFoundError, version

    name = str(name)
    model_config = None
    if name.endswith(".json") or os.path.isfile(name):
        if not os.path.isfile(name):
            raise DataError(f"model.clip.name: open_clip model config not found: {name}")
        try:
            with open(name, encoding="utf-8") as f:
                content = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"model.clip.name: cannot read the open_clip model config {name}: {e}") from None
        model_config = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
        arch = os.path.splitext(os.path.basename(name))[0]
    else:
        arch = name
    if pretrained is None or str(pretrained).lower() in ("", "none", "null"):
        weights = "random"
    elif _is_file_ref(str(pretrained)):
        if not os.path.isfile(pretrained):
            raise DataError(f"model.clip.pretrained: CLIP weights file not found: {pretrained}")
        weights = "sha256:" + file_sha256(pretrained)
    else:
        weights = str(pretrained)
    try:
        open_clip_version = version("open_clip_torch")
    except PackageNotFoundError:
        open_clip_version = None
    return {"arch": arch, "model_config": model_config, "weights": weights, "quick_gelu": quick_gelu,
            "open_clip": open_clip_version}


def key_digest(key: Mapping[str, Any]) -> str:
    """sha256 (hex) of a key's canonical JSON."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def clip_tag(name: str, pretrained: Optional[str], quick_gelu: Optional[bool] = None) -> str:
    """Cache folder name ``clip_<arch>_<weights label>-<12 hex>`` (see the module docstring)."""
    key = clip_key(name, pretrained, quick_gelu)
    if key["weights"].startswith("sha256:"):
        path = os.path.abspath(str(pretrained))
        label = f"{os.path.basename(os.path.dirname(path))}-{os.path.splitext(os.path.basename(path))[0]}"
    else:
        label = key["weights"]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", f"clip_{key['arch']}_{label}") + "-" + key_digest(key)[:12]


def image_list_key(images: Mapping[str, str]) -> Dict[str, Any]:
    """``{"n_images", "sha256"}`` over the sorted (id, absolute path, size, mtime in ns) of ``images``."""
    h = hashlib.sha256()
    for image_id in sorted(images):
        path = os.path.abspath(images[image_id])
        try:
            st = os.stat(path)
            stamp = f"{st.st_size} {st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{image_id}\t{path}\t{stamp}\n".encode("utf-8", "surrogateescape"))
    return {"n_images": len(images), "sha256": h.hexdigest()}
