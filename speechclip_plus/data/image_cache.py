"""Stage 2: the frozen image-encoder embeddings of every image, computed once and stored with kaldiio.

``out_dir/img_embed.ark`` holds one float32 vector per image id (Kaldi binary vector format) and
``out_dir/img_embed.scp`` maps ``<image id> <absolute ark path>:<byte offset>``. Both are written under
temporary names and renamed when complete (old scp removed, ark renamed, then scp renamed: an existing
scp always points at the complete ark it was written for); temporary files of a killed earlier run are
removed. The encoder is any callable (B, 3, H, W) -> (B, D); nothing here knows which model it is.

Reading (``EmbeddingScp``, ``load_image_embeddings``) does not go through kaldiio's reader, which runs the
shell command of an ``scp`` entry ending in ``|`` and unpickles ``PKL`` records: an embedding file must not
be able to run code. Only Kaldi binary float/double vectors and matrices (``\\0B`` + ``FV``/``DV``/``FM``/``DM``)
are accepted; anything else is a ``DataError`` naming ``scp:line: id``.
"""
from __future__ import annotations

import logging
import os
import struct
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from speechclip_plus.data.datadir import MAX_SHOWN, DataError, image_problem, parse_entries, sort_key
from speechclip_plus.io import atomic_write_text, remove_stale_temps, temp_path_for

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
    import kaldiio
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not img_scp:
        raise DataError("compute_image_embeddings: no images")
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_temps(out_dir)  # a killed earlier run's partial ark
    ark_final = os.path.join(out_dir, ARK_NAME)
    scp_final = os.path.join(out_dir, SCP_NAME)
    ark_tmp, scp_tmp = temp_path_for(ark_final), temp_path_for(scp_final)
    ids = sorted(img_scp, key=sort_key)
    scp_lines: List[str] = []
    dim = None
    try:
        with open(ark_tmp, "wb") as ark:
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
                        bad.append(f"{labels[i]}: {i}: {problem}" if labels and i in labels else
                                   f"image {i}: {problem}")
                if bad:  # no output will be written: only look for more bad images
                    bar.update(len(chunk))
                    continue
                pixels = torch.stack([preprocess(im) for im in images])
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
            if bad:
                raise _bad_images_error(bad, len(ids))
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


_KALDI_TYPES = {b"FV ": ("<f4", 1), b"DV ": ("<f8", 1), b"FM ": ("<f4", 2), b"DM ": ("<f8", 2)}


def read_kaldi_array(ark: str, offset: int, where: str) -> np.ndarray:
    """The Kaldi binary float/double vector or matrix at byte ``offset`` of the file ``ark`` as float32.

    Format: ``\\0B``, a type token (``FV ``, ``DV ``, ``FM ``, ``DM ``), then per dimension ``\\x04`` and an int32
    little-endian size, then the values. Anything else is a ``DataError`` prefixed with ``where``.
    """
    try:
        with open(ark, "rb") as f:
            f.seek(offset)
            head = f.read(5)
            if len(head) < 5 or head[:2] != b"\0B" or head[2:5] not in _KALDI_TYPES:
                raise DataError(f"{where}: not a Kaldi binary float vector/matrix at {ark}:{offset} "
                                f"(found {head[:5]!r}; pickled, text or piped entries are refused)")
            dtype, ndim = _KALDI_TYPES[head[2:5]]
            shape = []
            for _ in range(ndim):
                size = f.read(5)
                if len(size) < 5 or size[:1] != b"\x04":
                    raise DataError(f"{where}: bad size header at {ark}:{offset} (truncated or corrupt)")
                shape.append(struct.unpack("<i", size[1:])[0])
            if any(n < 0 for n in shape) or int(np.prod(shape)) > (1 << 28):
                raise DataError(f"{where}: implausible shape {tuple(shape)} at {ark}:{offset}")
            count = int(np.prod(shape))
            raw = f.read(count * np.dtype(dtype).itemsize)
    except OSError as e:
        raise DataError(f"{where}: cannot read {ark} ({e.strerror or e})") from None
    if len(raw) != count * np.dtype(dtype).itemsize:
        raise DataError(f"{where}: {ark} is truncated at offset {offset} ({len(raw)} of "
                        f"{count * np.dtype(dtype).itemsize} bytes)")
    return np.frombuffer(raw, dtype=dtype).astype(np.float32).reshape(shape)


class EmbeddingScp(Mapping):
    """Read-only mapping image id -> float32 array over an ``img_embed.scp``, each read on access.

    Entries are ``<id> <ark path>:<offset>`` (paths may contain spaces). Entries that are shell commands
    (``... |``) or have no offset are refused when the scp is opened; errors name ``scp:line: id``.
    """

    def __init__(self, scp: Union[str, os.PathLike]):
        self.path = os.fspath(scp)
        if not os.path.isfile(self.path):
            raise DataError(f"{self.path}: image embedding scp not found (run stage 2)")
        entries, problems = parse_entries(self.path)
        if problems:
            raise DataError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        self._index: Dict[str, Tuple[str, int, str]] = {}
        for lineno, key, value in entries:
            where = f"{self.path}:{lineno}: {key}"
            if key in self._index:
                raise DataError(f"{where}: duplicate image id")
            v = value.strip()
            if v.startswith("|") or v.endswith("|"):
                raise DataError(f"{where}: shell-command entries are not supported (refused): {value}")
            ark, _, off = v.rpartition(":")
            if not ark or not off.isdigit():
                raise DataError(f"{where}: expected <ark path>:<byte offset>, got {value!r}")
            self._index[key] = (ark, int(off), where)

    def __getitem__(self, key: str) -> np.ndarray:
        ark, offset, where = self._index[key]
        return read_kaldi_array(ark, offset, where)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


def load_image_embeddings(scp: Union[str, os.PathLike]) -> Dict[str, np.ndarray]:
    """``{image id: float32 vector}`` of an ``img_embed.scp`` (all read into memory; see ``EmbeddingScp``)."""
    table = EmbeddingScp(scp)
    return {image_id: table[image_id].reshape(-1) for image_id in table}
