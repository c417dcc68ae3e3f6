"""Data layer: Kaldi-style data dirs, the stage-0 corpus writer, audio loading/formatting, the speech-image
dataset and its batch sampler, the CLIP image-embedding cache and the vocabulary tools. Knows nothing of the
models.

Names are imported lazily (PEP 562) so that ``import speechclip_plus.data`` stays cheap and
``python -m speechclip_plus.data.datadir`` runs without a double import.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "datadir",
    "DataDir": "datadir",
    "read_kv": "datadir",
    "write_kv": "datadir",
    "write_data_dir": "datadir",
    "validate_data_dir": "datadir",
    "check_data_dir": "datadir",
    "subset_data_dir": "datadir",
    "combine_data_dirs": "datadir",
    "fix_data_dir": "datadir",
    "spk2utt_from_utt2spk": "datadir",
    "CorpusWriter": "corpus",
    "CorpusFaults": "corpus",
    "load_audio": "audio",
    "format_audio": "audio",
    "SpeechImageDataset": "dataset",
    "collate": "dataset",
    "LengthBucketSampler": "sampler",
    "compute_image_embeddings": "image_cache",
    "load_image_embeddings": "image_cache",
    "clip_vocab_usage": "vocab",
    "write_vocab_usage": "vocab",
    "read_vocab_usage": "vocab",
    "normalize_caption": "vocab",
    "train_spm": "vocab",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
