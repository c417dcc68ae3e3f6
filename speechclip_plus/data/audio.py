"""Audio input: ``load_audio`` (any soundfile-readable file -> mono float32 at the model rate) and
``format_audio`` (stage 1: check every file, convert the non-conforming ones into a dump dir, ``utt2dur``).

Conversion: channels are averaged, x = mean_c x_c; other sample rates go through
``torchaudio.functional.resample`` (windowed-sinc, output length ceil(n * new / old) after reducing the
ratio). Dumped files are 16-bit PCM WAV, samples clipped to [-1, 32767/32768].

Bad audio (``DataError`` naming the file): missing, unreadable by libsndfile, no samples, or a non-finite
sample (NaN/inf in a float file) -- at every load; all-silent (peak |x| <= ``SILENCE_PEAK`` = 2^-14, about
-84 dBFS, i.e. at most 2 LSB of 16-bit PCM) -- checked by ``format_audio``, which reads every file in full, and
by the Python API (``read_audio(silence=True)``, ``samples_problem`` for arrays).
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

from speechclip_plus.data.datadir import (
    MAX_SHOWN,
    DataDir,
    DataError,
    format_duration,
    parse_entries,
    remove_utterances,
    write_kv,
)
from speechclip_plus.io import atomic_path, atomic_write_text, remove_stale_temps

log = logging.getLogger(__name__)

SILENCE_PEAK = 2.0 ** -14  # peak amplitude at or below which a whole file counts as silent

_warned: Set[Tuple[str, str]] = set()


def _warn_once(path: str, kind: str, message: str) -> None:
    if (path, kind) not in _warned:
        _warned.add((path, kind))
        log.warning("%s: %s", path, message)


def samples_problem(data: np.ndarray, where: str, silence: bool = False) -> Optional[str]:
    """Why the samples ``data`` (any shape) cannot be used, prefixed with ``where``, or None: no samples, a
    non-finite value (NaN/inf), or with ``silence`` a peak at or below ``SILENCE_PEAK``."""
    if data.size == 0:
        return f"{where}: no samples"
    finite = np.isfinite(data)
    if not finite.all():
        return f"{where}: {int(data.size - finite.sum())} non-finite sample value(s) (NaN/inf)"
    peak = float(np.max(np.abs(data)))
    if silence and peak <= SILENCE_PEAK:
        return f"{where}: audio is silent (peak amplitude {peak:.3g} <= {SILENCE_PEAK:.3g}, about -84 dBFS)"
    return None


def read_audio(path: Union[str, os.PathLike], silence: bool = False) -> Tuple[np.ndarray, int]:
    """(frames, channels) float32 and the sample rate; ``DataError`` naming the file when it is missing,
    unreadable, has no samples or a non-finite one, or (``silence``) is silent (``samples_problem``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: audio file not found")
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError by version
        raise DataError(f"{path}: cannot read audio ({e})") from e
    if data.shape[0] == 0:
        raise DataError(f"{path}: audio file has no samples")
    problem = samples_problem(data, path, silence)
    if problem:
        raise DataError(problem)
    return data, int(sr)


def to_mono(data: np.ndarray) -> np.ndarray:
    """(frames, channels) -> (frames,) float32: x = mean_c x_c."""
    x = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    return np.ascontiguousarray(x, dtype=np.float32)


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
    data, sr = read_audio(path)
    if data.shape[1] > 1 and warn:
        _warn_once(path, "channels", f"{data.shape[1]} channels, averaged to mono")
    x = to_mono(data)
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


Result = Tuple[str, Optional[str], float, Optional[str], Tuple[int, int]]


def _format_one(job: Tuple[str, str, str, int]) -> Result:
    """(utt, converted path or None, duration s, error or None, (source rate, channels)) for one entry."""
    utt, path, out, rate = job
    try:
        data, sr = read_audio(path, silence=True)  # a full read: a broken or silent file fails here
        source = (sr, data.shape[1])
        if sr == rate and data.shape[1] == 1:
            return utt, None, data.shape[0] / sr, None, source
        if os.path.isfile(out):  # converted by an earlier (interrupted) run; writes are atomic
            try:
                info = sf.info(out)
                if info.samplerate == rate and info.channels == 1 and info.frames > 0:
                    return utt, out, info.frames / rate, None, source
            except Exception:
                pass
        x = load_audio(path, rate, warn=False)
        x = np.clip(x, -1.0, 32767.0 / 32768.0)
        with atomic_path(out) as tmp:
            sf.write(tmp, x, rate, subtype="PCM_16", format="WAV")
        return utt, out, len(x) / rate, None, source
    except DataError as e:
        return utt, None, 0.0, str(e), (0, 0)
    except Exception as e:  # anything else still names the file
        return utt, None, 0.0, f"{path}: {type(e).__name__}: {e}", (0, 0)


def _conversion_summary(results: List[Result], rate: int) -> str:
    """``"2 file(s) not mono (channels averaged); 3 file(s) not at 16000 Hz (8000 Hz: 1, 44100 Hz: 2;
    resampled)"`` over the converted files, or ``""``."""
    multi = sum(1 for r in results if r[1] is not None and r[4][1] > 1)
    rates: Dict[int, int] = {}
    for r in results:
        if r[1] is not None and r[4][0] != rate:
            rates[r[4][0]] = rates.get(r[4][0], 0) + 1
    parts = [f"{multi} file(s) not mono (channels averaged)"] if multi else []
    if rates:
        detail = ", ".join(f"{sr} Hz: {n}" for sr, n in sorted(rates.items()))
        parts.append(f"{sum(rates.values())} file(s) not at {rate} Hz ({detail}; resampled)")
    return "; ".join(parts)


def format_audio(
    data_dir: Union[str, os.PathLike],
    dump_dir: Union[str, os.PathLike],
    sample_rate: int = 16000,
    nj: int = 1,
    progress: bool = True,
    skip_bad: bool = False,
) -> Dict[str, int]:
    """Stage 1 on one data dir: every audio file is read in full; files that are not mono at
    ``sample_rate`` are converted to ``<dump_dir>/<utt>.wav`` (a warning counts them by kind); ``wav.scp``
    is rewritten to point at them (the previous one kept as ``wav.scp.orig``); ``utt2dur`` is written for
    every utterance.

    Source audio files are never modified. A bad file (missing, unreadable, empty, non-finite, silent)
    aborts with a ``DataError`` listing the first ten (``<audio>: what (<wav.scp>:<line>: <utt>)``) and
    their count, and nothing is rewritten; with ``skip_bad`` their utterances are removed from the data dir
    instead (``remove_utterances``: a backup first, reasons in ``<data_dir>/excluded.txt``).
    Returns ``{"utts": n, "converted": m}`` (n: utterances kept).
    """
    from tqdm import tqdm

    data_dir = os.fspath(data_dir)
    dump_dir = os.path.abspath(os.fspath(dump_dir))
    d = DataDir(data_dir)
    wav = d.wav
    bad = [u for u in wav if "/" in u or u.startswith(".")]
    if bad:
        raise DataError(f"{d.file('wav.scp')}: utterance id {bad[0]!r} cannot name a file (no '/' or leading '.')")
    remove_stale_temps(dump_dir)  # temporary files of a killed earlier run
    jobs = [(u, wav[u], os.path.join(dump_dir, f"{u}.wav"), sample_rate) for u in d.utts]
    results: List[Result] = []
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

    scp = d.file("wav.scp")
    lines = {key: lineno for lineno, key, _ in parse_entries(scp)[0]}
    bad = {u: f"{err} ({scp}:{lines[u]}: {u})" for u, _, _, err, _ in results if err}
    if bad and not skip_bad:
        errors = list(bad.values())
        kind = "unreadable" if all("cannot read" in e or "not found" in e for e in errors) else "bad"
        shown = "\n  ".join(errors[:MAX_SHOWN])
        more = f"\n  ... and {len(errors) - MAX_SHOWN} more" if len(errors) > MAX_SHOWN else ""
        raise DataError(f"{data_dir}: {len(errors)} {kind} audio file(s):\n  {shown}{more}\n"
                        f"(format_audio --skip_bad excludes them, listed in {data_dir}/excluded.txt)")
    results = [r for r in results if r[0] not in bad]

    converted = {u: new for u, new, _, _, _ in results if new is not None}
    orig = scp + ".orig"
    if converted or bad:
        already = any(os.path.dirname(p) == dump_dir for p in wav.values())
        if not (already and os.path.isfile(orig)):
            with open(scp, encoding="utf-8") as f:
                atomic_write_text(orig, f.read())
    if bad:  # skip_bad: the data dir loses these utterances (backup + excluded.txt first)
        done = remove_utterances(data_dir, bad)
        for reason in list(bad.values())[:MAX_SHOWN]:
            log.warning("excluded: %s", reason)
        log.warning("%s: %d bad audio file(s) excluded (listed in %s; original files in %s)", data_dir, len(bad),
                    done["excluded"], done["backup"])
        d = DataDir(data_dir)
        wav = d.wav
    if converted:
        write_kv(scp, {u: converted.get(u, p) for u, p in wav.items()})
        summary = _conversion_summary(results, sample_rate)
        if summary:
            log.warning("%s: %s: converted copies (16-bit PCM, %d Hz mono) in %s", data_dir, summary,
                        sample_rate, dump_dir)
        log.info("%s: %d of %d file(s) converted into %s; original list in %s", data_dir, len(converted),
                 len(wav), dump_dir, orig)
    write_kv(d.file("utt2dur"), {u: format_duration(dur) for u, _, dur, _, _ in results})
    return {"utts": len(results), "converted": len(converted)}


__all__ = ["load_audio", "read_audio", "samples_problem", "to_mono", "resample", "audio_duration", "format_audio"]
