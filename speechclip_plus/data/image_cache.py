"""Stage 2: the frozen image-encoder embeddings of every image, computed once and stored with kaldiio.

``out_dir/img_embed.ark`` holds one float32 vector per image id (Kaldi binary vector format) and
``out_dir/img_embed.scp`` maps ``<image id> <absolute ark path>:<byte offset>``, written by
``data.kaldi_ark.write_ark_scp`` (also the writer of ``bin.extract``): temporary names renamed when complete, so an
existing scp always points at the complete ark it was written for; temporary files of a killed earlier run are
removed. The encoder is any callable (B, 3, H, W) -> (B, D); nothing here knows which model it is.

Reading (``EmbeddingScp``, ``load_image_embeddings``) goes through ``data.kaldi_ark``'s reader, which neither runs
an scp's shell commands nor unpickles anything (kaldiio's reader does both): only Kaldi binary float/double
vectors and matrices are accepted; anything else is a ``DataError`` naming ``scp:line: id``.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from speechclip_plus.data.datadir import MAX_SHOWN, DataError, image_problem, sort_key
from speechclip_plus.data.kaldi_ark import EmbeddingScp, read_kaldi_array, write_ark_scp

__all__ = ["ARK_NAME", "SCP_NAME", "EmbeddingScp", "compute_image_embeddings", "load_image", "load_image_embeddings",
           "read_kaldi_array"]

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


def _bad_images_error(problems: List[str], total: int) -> DataError:
    shown = "\n  ".join(problems[:MAX_SHOWN])
    more = f"\n  ... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
    return DataError(f"{len(problems)} of {total} image(s) cannot be used:\n  {shown}{more}\n(nothing was "
                     "written; validate_data --check_images --fix_dir excludes their utterances)")


def compute_image_embeddings(
    img_scp: Mapping[str, str],
    encode: Callable[[torch.Tensor], torch.Tensor],
    preprocess: Callable[..., torch.Tensor],
    out_dir: Union[str, os.PathLike],
    batch_size: int = 64,
    progress: bool = True,
    labels: Optional[Mapping[str, str]] = None,
) -> str:
    """Embed every image of ``img_scp`` (id -> path) and write ``img_embed.{ark,scp}``; returns the scp path.

    Images are decoded with PIL (RGB), ``preprocess``-ed, stacked in batches of ``batch_size`` (ids in
    ``LC_ALL=C`` order) and encoded under ``torch.no_grad``. Missing or undecodable images are collected
    (after the first one the rest are only decoded, not encoded) and raised together as one ``DataError``
    (the first ten and the count; ``labels[id]``, e.g. ``img.scp:line``, prefixes each); a non-finite or
    ill-shaped embedding raises at once. Either way no output is left.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not img_scp:
        raise DataError("compute_image_embeddings: no images")
    ids = sorted(img_scp, key=sort_key)
    dims: List[int] = []

    def embeddings() -> Iterator[Tuple[str, np.ndarray]]:
        from tqdm import tqdm

        bar = tqdm(total=len(ids), desc="embed images", unit="img", disable=not progress)
        bad: List[str] = []
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            images = []
            for i in chunk:
                try:
                    images.append(load_image(i, img_scp[i]))
                except DataError:
                    problem = image_problem(img_scp[i]) or f"cannot decode {img_scp[i]}"
                    bad.append(f"{labels[i]}: {i}: {problem}" if labels and i in labels else f"image {i}: {problem}")
            if bad:  # no output will be written: only look for more bad images
                bar.update(len(chunk))
                continue
            pixels = torch.stack([preprocess(im) for im in images])
            with torch.no_grad():
                emb = encode(pixels)
            emb = emb.detach().float().cpu().numpy()
            if emb.ndim != 2 or emb.shape[0] != len(chunk):
                raise DataError(f"image encoder returned shape {tuple(emb.shape)} for a batch of {len(chunk)}")
            dims.append(emb.shape[1])
            if emb.shape[1] != dims[0]:
                raise DataError(f"image encoder returned dim {emb.shape[1]} after {dims[0]}")
            for image_id, vec in zip(chunk, emb):
                if not np.all(np.isfinite(vec)):
                    raise DataError(f"image {image_id}: non-finite embedding ({img_scp[image_id]})")
                yield image_id, vec
            bar.update(len(chunk))
        bar.close()
        if bad:
            raise _bad_images_error(bad, len(ids))

    scp, _ = write_ark_scp(out_dir, os.path.splitext(SCP_NAME)[0], embeddings())
    log.info("%d image embedding(s) of dim %d -> %s", len(ids), dims[0], scp)
    return scp


def load_image_embeddings(scp: Union[str, os.PathLike]) -> Dict[str, np.ndarray]:
    """``{image id: float32 vector}`` of an ``img_embed.scp`` (all read into memory; see ``EmbeddingScp``)."""
    table = EmbeddingScp(scp)
    return {image_id: table[image_id].reshape(-1) for image_id in table}
