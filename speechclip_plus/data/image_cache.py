"""Stage 2: the frozen image-encoder embeddings of every image, computed once and stored with kaldiio.

``out_dir/img_embed.ark`` holds one float32 vector per image id (Kaldi binary vector format) and
``out_dir/img_embed.scp`` maps ``<image id> <absolute ark path>:<byte offset>``. Both are written under
temporary names and renamed when complete (old scp removed, ark renamed, then scp renamed: an existing
scp always points at the complete ark it was written for). The encoder is any callable
(B, 3, H, W) -> (B, D); nothing here knows which model it is.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Mapping, Union

import numpy as np
import torch

from speechclip_plus.data.datadir import DataError, sort_key
from speechclip_plus.io import atomic_write_text, temp_path_for

log = logging.getLogger(__name__)

ARK_NAME = "img_embed.ark"
SCP_NAME = "img_embed.scp"


def load_image(image_id: str, path: str):
    """The image as an RGB ``PIL.Image``; ``DataError`` naming the id and path if missing or undecodable."""
    from PIL import Image

    if not os.path.isfile(path):
        raise DataError(f"image {image_id}: file not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # forces a full decode: truncated files fail here
    except Exception as e:
        raise DataError(f"image {image_id}: cannot decode {path} ({type(e).__name__}: {e})") from e


def compute_image_embeddings(
    img_scp: Mapping[str, str],
    encode: Callable[[torch.Tensor], torch.Tensor],
    preprocess: Callable[..., torch.Tensor],
    out_dir: Union[str, os.PathLike],
    batch_size: int = 64,
    progress: bool = True,
) -> str:
    """Embed every image of ``img_scp`` (id -> path) and write ``img_embed.{ark,scp}``; returns the scp path.

    Images are decoded with PIL (RGB), ``preprocess``-ed, stacked in batches of ``batch_size`` (ids in
    ``LC_ALL=C`` order) and encoded under ``torch.no_grad``. A bad image or a non-finite/ill-shaped
    embedding raises ``DataError`` and leaves no output.
    """
    import kaldiio
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not img_scp:
        raise DataError("compute_image_embeddings: no images")
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    ark_final = os.path.join(out_dir, ARK_NAME)
    scp_final = os.path.join(out_dir, SCP_NAME)
    ark_tmp, scp_tmp = temp_path_for(ark_final), temp_path_for(scp_final)
    ids = sorted(img_scp, key=sort_key)
    scp_lines: List[str] = []
    dim = None
    try:
        with open(ark_tmp, "wb") as ark:
            bar = tqdm(total=len(ids), desc="embed images", unit="img", disable=not progress)
            for start in range(0, len(ids), batch_size):
                chunk = ids[start : start + batch_size]
                pixels = torch.stack([preprocess(load_image(i, img_scp[i])) for i in chunk])
                with torch.no_grad():
                    emb = encode(pixels)
                emb = emb.detach().float().cpu().numpy()
                if emb.ndim != 2 or emb.shape[0] != len(chunk):
                    raise DataError(f"image encoder returned shape {tuple(emb.shape)} for a batch of {len(chunk)}")
                if dim is None:
                    dim = emb.shape[1]
                if emb.shape[1] != dim:
                    raise DataError(f"image encoder returned dim {emb.shape[1]} after {dim}")
                for image_id, vec in zip(chunk, emb):
                    if not np.all(np.isfinite(vec)):
                        raise DataError(f"image {image_id}: non-finite embedding ({img_scp[image_id]})")
                    offset = ark.tell() + len(image_id.encode("utf-8")) + 1  # data starts after "<id> "
                    kaldiio.save_ark(ark, {image_id: np.ascontiguousarray(vec, dtype=np.float32)})
                    scp_lines.append(f"{image_id} {ark_final}:{offset}\n")
                bar.update(len(chunk))
            bar.close()
            ark.flush()
            os.fsync(ark.fileno())
        atomic_write_text(scp_tmp, "".join(scp_lines))
        # No moment where an scp points into an ark it was not written for: old scp out, ark in, scp in.
        if os.path.exists(scp_final):
            os.remove(scp_final)
        os.replace(ark_tmp, ark_final)
        os.replace(scp_tmp, scp_final)
    finally:
        for tmp in (ark_tmp, scp_tmp):
            if os.path.exists(tmp):
                os.remove(tmp)
    log.info("%d image embedding(s) of dim %d -> %s", len(ids), dim, scp_final)
    return scp_final


def load_image_embeddings(scp: Union[str, os.PathLike]) -> Dict[str, np.ndarray]:
    """``{image id: float32 vector}`` of an ``img_embed.scp`` (all read into memory)."""
    import kaldiio

    scp = os.fspath(scp)
    if not os.path.isfile(scp):
        raise DataError(f"{scp}: image embedding scp not found (run stage 2)")
    out: Dict[str, np.ndarray] = {}
    try:
        for image_id, vec in kaldiio.load_scp_sequential(scp):
            out[image_id] = np.asarray(vec, dtype=np.float32).reshape(-1)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{scp}: cannot read the embeddings ({type(e).__name__}: {e})") from e
    return out
