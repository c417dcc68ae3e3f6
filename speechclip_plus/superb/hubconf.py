"""s3prl / torch.hub entries for SpeechCLIP(+) model files (``python -m speechclip_plus.bin.export`` output).

Every entry returns an ``UpstreamExpert`` and takes s3prl's keywords ``ckpt``, ``model_config``, ``refresh``
plus expert options (``per_utterance=True``). Names follow s3prl's convention: ``*_local`` = a file path,
``*_url`` = a URL downloaded into the torch.hub cache, ``*_hf`` = ``hf://ORG/NAME[@REVISION]`` from the
Hugging Face Hub (huggingface_hub's cache and offline mode); s3prl's "registered checkpoints" listing skips
them. ``speechclip_plus`` takes any of the three.

The published SpeechCLIP / SpeechCLIP+ checkpoints (PyTorch Lightning files of the authors' code) are
converted once with ``python -m speechclip_plus.bin.import_reference``; the resulting model file works
through every entry below.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Optional
from urllib.parse import urlparse

from .expert import UpstreamExpert

CACHE_SUBDIR = "speechclip_plus"


def _is_url(ckpt: str) -> bool:
    return urlparse(str(ckpt)).scheme in ("http", "https")


def cached_download(url: str, refresh: bool = False) -> str:
    """Download ``url`` once into ``<torch.hub dir>/speechclip_plus/`` and return the local path.

    The cache name is sha256(url)[:16] + the URL's file name, so two URLs never share a file. ``refresh``
    downloads again. A file lock serialises concurrent ranks; ``download_url_to_file`` writes to a temporary
    file and renames it, so a partial download is never seen as complete.
    """
    import torch
    from filelock import FileLock

    if not _is_url(url):
        raise ValueError(f"not an http(s) URL: {url}")
    cache = os.path.join(torch.hub.get_dir(), CACHE_SUBDIR)
    os.makedirs(cache, exist_ok=True)
    name = os.path.basename(urlparse(url).path) or "model.pt"
    path = os.path.join(cache, f"{hashlib.sha256(url.encode()).hexdigest()[:16]}_{name}")
    with FileLock(path + ".lock"):
        if refresh or not os.path.isfile(path):
            torch.hub.download_url_to_file(url, path, progress=True)
    return path


def speechclip_plus_local(ckpt: Optional[str] = None, model_config: Optional[str] = None, refresh: bool = False,
                          **kwargs: Any) -> UpstreamExpert:
    """Expert from a local model file. ``refresh`` is accepted for s3prl and ignored."""
    if not ckpt:
        raise ValueError("speechclip_plus_local needs ckpt=<model file> (s3prl: -k /abs/path/model.pt)")
    return UpstreamExpert(os.path.expanduser(str(ckpt)), model_config, **kwargs)


def speechclip_plus_url(ckpt: Optional[str] = None, model_config: Optional[str] = None, refresh: bool = False,
                        **kwargs: Any) -> UpstreamExpert:
    """Expert from a model file at an http(s) URL, cached (``refresh=True`` / s3prl ``-r`` downloads again)."""
    if not ckpt:
        raise ValueError("speechclip_plus_url needs ckpt=<http(s) URL of a model file>")
    return UpstreamExpert(cached_download(str(ckpt), refresh), model_config, **kwargs)


def speechclip_plus_hf(ckpt: Optional[str] = None, model_config: Optional[str] = None, refresh: bool = False,
                       **kwargs: Any) -> UpstreamExpert:
    """Expert from ``hf://ORG/NAME[@REVISION]`` (``refresh=True`` / s3prl ``-r`` downloads again)."""
    from ..hub import download, is_hub_uri

    if not ckpt or not is_hub_uri(str(ckpt)):
        raise ValueError(f"speechclip_plus_hf needs ckpt=hf://ORG/NAME[@REVISION], got {ckpt!r}")
    if refresh:
        download(str(ckpt), force=True)
    return UpstreamExpert(str(ckpt), model_config, **kwargs)


def speechclip_plus(ckpt: Optional[str] = None, model_config: Optional[str] = None, refresh: bool = False,
                    **kwargs: Any) -> UpstreamExpert:
    """Expert from a model file given as a local path, an http(s) URL or an hf:// address."""
    if ckpt and str(ckpt).startswith("hf://"):
        return speechclip_plus_hf(ckpt, model_config, refresh, **kwargs)
    if ckpt and _is_url(str(ckpt)):
        return speechclip_plus_url(ckpt, model_config, refresh, **kwargs)
    return speechclip_plus_local(ckpt, model_config, refresh, **kwargs)


ENTRIES = {
    "speechclip_plus": speechclip_plus,
    "speechclip_plus_local": speechclip_plus_local,
    "speechclip_plus_url": speechclip_plus_url,
    "speechclip_plus_hf": speechclip_plus_hf,
}
