"""Restore the three APIs s3prl 0.4.18 calls that current torchaudio / huggingface_hub removed.

Import this module (``speechclip_plus.compat.apply()``) before importing s3prl:
- ``torchaudio.set_audio_backend(name)``: a no-op (audio I/O here goes through soundfile).
- ``torchaudio.sox_effects.apply_effects_tensor / apply_effects_file``: run the effect chain with the
  ``sox`` command-line tool (Debian package ``sox``), exchanging 32-bit float WAV through pipes.
- ``huggingface_hub.HfFolder``: token get/save/delete on the current token file.
Two more that s3prl's downstream runner needs (``python -m speechclip_plus.superb``):
- ``torchaudio.load`` when torchcodec (its only backend in torchaudio >= 2.9) is absent: read with soundfile
  (s3prl's ER, IC, SID, ASR and PR datasets call it).
- ``huggingface_hub.Repository`` (imported by ``s3prl.downstream.runner``, used only to push to the Hub):
  a stand-in that raises when used.
One for a downstream's extra package: s3prl's keyword spotting (``-d speech_commands``) imports
``catalyst.data.sampler.DistributedSamplerWrapper``, and catalyst's releases no longer install with current
pip (its metadata is refused). When catalyst is not installed, ``catalyst.data.sampler`` is provided with
``DistributedSamplerWrapper`` (below), the only name s3prl uses from it.
Nothing in site-packages is modified; attributes are added to the imported modules only when missing.
"""
from __future__ import annotations

import io
import shutil
import subprocess
import sys
import types
from typing import Iterator, List, Optional, Sequence, Tuple

from torch.utils.data import DistributedSampler, Sampler

_applied = False


def _run_sox(input_args: List[str], stdin: bytes, effects: Sequence[Sequence[str]]) -> Tuple["torch.Tensor", int]:
    import soundfile as sf
    import torch

    if shutil.which("sox") is None:
        raise RuntimeError("torchaudio.sox_effects needs the 'sox' program: apt-get install -y sox")
    flat = [str(x) for effect in effects for x in effect]
    cmd = ["sox", *input_args, "-t", "wav", "-e", "floating-point", "-b", "32", "-", *flat]
    proc = subprocess.run(cmd, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"sox failed ({' '.join(cmd)}): {proc.stderr.decode(errors='replace').strip()}")
    data, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32", always_2d=True)
    return torch.from_numpy(data.T.copy()), sr


def apply_effects_tensor(tensor, sample_rate: int, effects, channels_first: bool = True):
    """(channels, time) float tensor -> (channels, time) tensor and rate after the sox ``effects``."""
    import soundfile as sf

    wav = tensor if channels_first else tensor.t()
    buf = io.BytesIO()
    sf.write(buf, wav.detach().cpu().numpy().T, int(sample_rate), format="WAV", subtype="FLOAT")
    out, sr = _run_sox(["-t", "wav", "-"], buf.getvalue(), effects)
    return (out if channels_first else out.t()), sr


def apply_effects_file(path, effects, normalize: bool = True, channels_first: bool = True, format=None):
    """Read ``path`` and apply the sox ``effects``; returns (tensor, rate)."""
    args = ([] if format is None else ["-t", format]) + [str(path)]
    out, sr = _run_sox(args, b"", effects)
    return (out if channels_first else out.t()), sr


def load_with_soundfile(uri, frame_offset: int = 0, num_frames: int = -1, normalize: bool = True,
                        channels_first: bool = True, format=None, buffer_size: int = 4096, backend=None):
    """``torchaudio.load`` through soundfile: (channels, frames) float32 in [-1, 1] and the sample rate."""
    import soundfile as sf
    import torch

    if not normalize:
        raise ValueError(f"torchaudio.load({uri!r}, normalize=False): integer output is not supported by the "
                         "soundfile fallback (install torchcodec for it)")
    data, rate = sf.read(uri, start=int(frame_offset), frames=int(num_frames), dtype="float32", always_2d=True)
    wav = torch.from_numpy(data.T.copy())
    return (wav if channels_first else wav.t()), rate


class RepositoryUnavailable:
    """Stand-in for ``huggingface_hub.Repository`` (removed upstream); s3prl uses it only to push to the Hub."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("huggingface_hub.Repository no longer exists: s3prl's push-to-Hub "
                           "(--hub huggingface / push_to_huggingface_hub) is not available")


class DistributedSamplerWrapper(DistributedSampler):
    """This process's share of another sampler's indices (stand-in for catalyst's class of that name).

    Each epoch the wrapped ``sampler`` is drawn once (e.g. s3prl's class-balanced ``WeightedRandomSampler``);
    ``DistributedSampler`` then splits the positions of that draw over the ``num_replicas`` processes as it
    splits a dataset (shuffled by ``seed`` + epoch when ``shuffle``; padded by repeating positions unless
    ``drop_last``), and this process yields the drawn indices at its positions. ``set_epoch`` as usual.
    """

    def __init__(self, sampler: Sampler, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        super().__init__(range(len(sampler)), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.sampler = sampler

    def __iter__(self) -> Iterator[int]:
        drawn = list(self.sampler)
        return iter([drawn[p] for p in super().__iter__()])


class HfFolder:
    """Minimal stand-in for the removed ``huggingface_hub.HfFolder`` (token file helpers)."""

    @staticmethod
    def _path():
        from huggingface_hub import constants

        return constants.HF_TOKEN_PATH

    @classmethod
    def get_token(cls):
        from huggingface_hub import get_token

        return get_token()

    @classmethod
    def save_token(cls, token: str) -> None:
        import os

        os.makedirs(os.path.dirname(cls._path()), exist_ok=True)
        with open(cls._path(), "w") as f:
            f.write(token)

    @classmethod
    def delete_token(cls) -> None:
        import os

        try:
            os.remove(cls._path())
        except FileNotFoundError:
            pass


def apply() -> None:
    """Install the missing attributes (idempotent)."""
    global _applied
    if _applied:
        return
    import huggingface_hub
    import torchaudio

    if not hasattr(torchaudio, "set_audio_backend"):
        torchaudio.set_audio_backend = lambda backend=None: None
    if not hasattr(torchaudio, "sox_effects"):
        mod = types.ModuleType("torchaudio.sox_effects")
        mod.apply_effects_tensor = apply_effects_tensor
        mod.apply_effects_file = apply_effects_file
        torchaudio.sox_effects = mod
        sys.modules["torchaudio.sox_effects"] = mod
    if not hasattr(huggingface_hub, "HfFolder"):
        huggingface_hub.HfFolder = HfFolder
    if not hasattr(huggingface_hub, "Repository"):
        huggingface_hub.Repository = RepositoryUnavailable
    import importlib.util

    if importlib.util.find_spec("catalyst") is None and "catalyst.data.sampler" not in sys.modules:
        names = ("catalyst", "catalyst.data", "catalyst.data.sampler")
        mods = [types.ModuleType(n) for n in names]
        mods[0].data, mods[1].sampler = mods[1], mods[2]
        mods[2].DistributedSamplerWrapper = DistributedSamplerWrapper
        for m in mods:
            m.__doc__ = "speechclip_plus.compat stand-in: only data.sampler.DistributedSamplerWrapper"
            sys.modules[m.__name__] = m
    if importlib.util.find_spec("torchcodec") is None and getattr(torchaudio.load, "__module__", "").startswith(
            "torchaudio"):
        torchaudio.load = load_with_soundfile
    _applied = True


def import_s3prl_hub():
    """``s3prl.hub`` with the compat shims applied first."""
    apply()
    import s3prl.hub

    return s3prl.hub
