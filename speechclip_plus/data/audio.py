"""Audio input: ``load_audio`` (any soundfile-readable file -> mono float32 at the model rate) and
``format_audio`` (stage 1: check every file, convert the non-conforming ones into a dump dir, ``utt2dur``).

Conversion: channels are averaged, x = mean_c x_c; other sample rates go through
``torchaudio.functional.resample`` (windowed-sinc, output length ceil(n * new / old) after reducing the
ratio). Dumped files are 16-bit PCM WAV, samples clipped to [-1, 32767/32768].
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Set, Tuple, Union

import numpy as np
import soundfile as sf

from speechclip_plus.data.datadir import DataDir, DataError, format_duration, write_kv
from speechclip_plus.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

_warned: Set[Tuple[str, str]] = set()


def _warn_once(path: str, kind: str, message: str) -> None:
    if (path, kind) not in _warned:
        _warned.add((path, kind))
        log.warning("%s: %s", path, message)


def _read(path: str) -> Tuple[np.ndarray, int]:
    """(frames, channels) float32 and the sample rate; ``DataError`` naming the file on failure."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: audio file not found")
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError by version
        raise DataError(f"{path}: cannot read audio ({e})") from e
    if data.shape[0] == 0:
        raise DataError(f"{path}: audio file has no samples")
    return data, int(sr)


def resample(x: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """1-D float32 signal resampled with ``torchaudio.functional.resample``."""
    if orig_rate == new_rate:
        return x
    import torch
    import torchaudio.functional as AF

    y = AF.resample(torch.from_numpy(np.ascontiguousarray(x)), orig_rate, new_rate)
    return y.numpy().astype(np.float32, copy=False)


def load_audio(path: Union[str, os.PathLike], sample_rate: int = 16000, warn: bool = True) -> np.ndarray:
    """Mono float32 waveform at ``sample_rate``.

    Multi-channel audio is averaged over channels and other rates are resampled; each is logged once per
    file when ``warn`` (stage 1 converts such files so training never has to).
    """
    path = os.fspath(path)
    data, sr = _read(path)
    if data.shape[1] > 1:
        if warn:
            _warn_once(path, "channels", f"{data.shape[1]} channels, averaged to mono")
        x = data.mean(axis=1, dtype=np.float32)
    else:
        x = data[:, 0]
    if sr != sample_rate:
        if warn:
            _warn_once(path, "rate", f"sample rate {sr} Hz, resampled to {sample_rate} Hz")
        x = resample(x, sr, sample_rate)
    return np.ascontiguousarray(x, dtype=np.float32)


def audio_duration(path: Union[str, os.PathLike]) -> float:
    """Duration in seconds from the file header."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: audio file not found")
    try:
        info = sf.info(path)
    except Exception as e:
        raise DataError(f"{path}: cannot read audio ({e})") from e
    return info.frames / info.samplerate


# ---------------------------------------------------------------------------------------------- stage 1
def _init_worker() -> None:
    """One intra-op thread per worker (``nj`` processes already use the cores)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch = sys.modules.get("torch")
    if torch is not None:  # inherited through fork: no parallel region is entered in the child
        torch.set_num_threads(1)


def _format_one(job: Tuple[str, str, str, int]) -> Tuple[str, Optional[str], float, Optional[str]]:
    """(utt, converted path or None, duration s, error or None) for one ``wav.scp`` entry."""
    utt, path, out, rate = job
    try:
        data, sr = _read(path)  # a full read: a truncated file fails here, not in training
        if sr == rate and data.shape[1] == 1:
            return utt, None, data.shape[0] / sr, None
        if os.path.isfile(out):  # converted by an earlier (interrupted) run; writes are atomic
            try:
                info = sf.info(out)
                if info.samplerate == rate and info.channels == 1 and info.frames > 0:
                    return utt, out, info.frames / rate, None
            except Exception:
                pass
        x = load_audio(path, rate, warn=False)
        x = np.clip(x, -1.0, 32767.0 / 32768.0)
        with atomic_path(out) as tmp:
            sf.write(tmp, x, rate, subtype="PCM_16", format="WAV")
        return utt, out, len(x) / rate, None
    except DataError as e:
        return utt, None, 0.0, str(e)
    except Exception as e:  # anything else still names the file
        return utt, None, 0.0, f"{path}: {type(e).__name__}: {e}"


def format_audio(
    data_dir: Union[str, os.PathLike],
    dump_dir: Union[str, os.PathLike],
    sample_rate: int = 16000,
    nj: int = 1,
    progress: bool = True,
) -> Dict[str, int]:
    """Stage 1 on one data dir: every audio file is read in full; files that are not mono at
    ``sample_rate`` are converted to ``<dump_dir>/<utt>.wav``; ``wav.scp`` is rewritten to point at them
    (the previous one kept as ``wav.scp.orig``); ``utt2dur`` is written for every utterance.

    Source audio files are never modified. Any unreadable/empty file aborts with a ``DataError`` listing
    the first ones (nothing is rewritten then). Returns ``{"utts": n, "converted": m}``.
    """
    from tqdm import tqdm

    data_dir = os.fspath(data_dir)
    dump_dir = os.path.abspath(os.fspath(dump_dir))
    d = DataDir(data_dir)
    wav = d.wav
    bad = [u for u in wav if "/" in u or u.startswith(".")]
    if bad:
        raise DataError(f"{d.file('wav.scp')}: utterance id {bad[0]!r} cannot name a file (no '/' or leading '.')")
    jobs = [(u, wav[u], os.path.join(dump_dir, f"{u}.wav"), sample_rate) for u in d.utts]
    results: List[Tuple[str, Optional[str], float, Optional[str]]] = []
    bar = tqdm(total=len(jobs), desc=f"format {data_dir}", unit="utt", disable=not progress)
    if nj <= 1:
        for job in jobs:
            results.append(_format_one(job))
            bar.update()
    else:
        # fork: workers start at once with the parent's imports (spawn re-imports torch in each worker)
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=nj, mp_context=ctx, initializer=_init_worker) as ex:
            for r in ex.map(_format_one, jobs, chunksize=max(1, min(64, len(jobs) // (4 * nj) or 1))):
                results.append(r)
                bar.update()
    bar.close()

    errors = [err for _, _, _, err in results if err]
    if errors:
        shown = "\n  ".join(errors[:10])
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise DataError(f"{data_dir}: {len(errors)} unreadable audio file(s):\n  {shown}{more}")

    converted = {u: new for u, new, _, _ in results if new is not None}
    if converted:
        scp = d.file("wav.scp")
        orig = scp + ".orig"
        already = any(os.path.dirname(p) == dump_dir for p in wav.values())
        if not (already and os.path.isfile(orig)):
            with open(scp, encoding="utf-8") as f:
                atomic_write_text(orig, f.read())
        write_kv(scp, {u: converted.get(u, p) for u, p in wav.items()})
        log.info("%s: %d of %d file(s) converted into %s; original list in %s", data_dir, len(converted),
                 len(wav), dump_dir, orig)
    write_kv(d.file("utt2dur"), {u: format_duration(dur) for u, _, dur, _ in results})
    return {"utts": len(results), "converted": len(converted)}


__all__ = ["load_audio", "resample", "audio_duration", "format_audio"]
