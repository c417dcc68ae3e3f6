"""Kaldi ark/scp pairs of float32 arrays: the one writer (image-embedding cache, ``bin.extract``) and a reader that
runs and unpickles nothing.

Writing (``write_ark_scp``): ``<name>.ark`` holds the arrays in Kaldi binary format (kaldiio's ``save_ark``) and
``<name>.scp`` maps ``<key> <absolute ark path>:<byte offset>``, one line a key in ``LC_ALL=C`` order. Both are
written under temporary names (``speechclip_plus.io``) and renamed when complete: the old scp is removed, the ark
renamed, then the scp, so an existing scp always points into the complete ark it was written for. Temporary files
of a killed earlier run are removed first; on any error (including one raised by the iterator of items) nothing
is left but the previous pair, or no scp.

Reading (``EmbeddingScp``, ``read_kaldi_array``) does not go through kaldiio's reader, which runs the shell
command of an scp entry ending in ``|`` and unpickles ``PKL`` records: an embedding file must not be able to run
code. Only Kaldi binary float/double vectors and matrices (``\\0B`` + ``FV``/``DV``/``FM``/``DM``) are accepted;
anything else is a ``DataError`` naming ``scp:line: key``.
"""
from __future__ import annotations

import os
import re
import struct
from typing import Dict, Iterable, Iterator, List, Mapping, Tuple, Union

import numpy as np

from speechclip_plus.data.tables import DataError, parse_entries, sort_key
from speechclip_plus.io import remove_stale_temps, temp_path_for


def write_ark_scp(out_dir: Union[str, os.PathLike], name: str,
                  items: Iterable[Tuple[str, np.ndarray]]) -> Tuple[str, int]:
    """Write ``(key, array)`` pairs (arrays stored as float32) to ``out_dir/<name>.{ark,scp}``; returns
    (absolute scp path, number of entries). A key that is empty, holds whitespace or comes twice is a
    ``DataError`` naming it (nothing written)."""
    import kaldiio

    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_temps(out_dir)  # a killed earlier run's partial ark
    ark_final, scp_final = os.path.join(out_dir, f"{name}.ark"), os.path.join(out_dir, f"{name}.scp")
    ark_tmp, scp_tmp = temp_path_for(ark_final), temp_path_for(scp_final)
    lines: Dict[str, str] = {}
    try:
        with open(ark_tmp, "wb") as ark:
            for key, arr in items:
                if not key or re.search(r"\s", key):
                    raise DataError(f"{ark_final}: bad key {key!r} (must be non-empty, without whitespace)")
                if key in lines:
                    raise DataError(f"{ark_final}: key {key} written twice")
                offset = ark.tell() + len(key.encode("utf-8")) + 1  # the data follows "<key> "
                kaldiio.save_ark(ark, {key: np.ascontiguousarray(arr, dtype=np.float32)})
                lines[key] = f"{key} {ark_final}:{offset}\n"
            ark.flush()
            os.fsync(ark.fileno())
        with open(scp_tmp, "w", encoding="utf-8") as f:
            f.writelines(lines[k] for k in sorted(lines, key=sort_key))
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(scp_final):
            os.remove(scp_final)
        os.replace(ark_tmp, ark_final)
        os.replace(scp_tmp, scp_final)
    finally:
        for tmp in (ark_tmp, scp_tmp):
            if os.path.exists(tmp):
                os.remove(tmp)
    return scp_final, len(lines)


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
            shape: List[int] = []
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
    """Read-only mapping key -> float32 array over an scp of ``write_ark_scp``, each array read on access.

    Entries are ``<key> <ark path>:<offset>`` (paths may contain spaces). Entries that are shell commands
    (``... |``) or have no offset are refused when the scp is opened; errors name ``scp:line: key``.
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
