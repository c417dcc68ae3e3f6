"""speechclip_plus: recipes, models and tools for SpeechCLIP+ (arXiv 2402.06959).

``from speechclip_plus import SpeechCLIPPlus`` loads the Python API on first use, so ``import speechclip_plus``
itself stays light (no torch, open_clip or s3prl import).
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["SpeechCLIPPlus"]


def __getattr__(name: str):
    if name == "SpeechCLIPPlus":
        from .api import SpeechCLIPPlus

        return SpeechCLIPPlus
    raise AttributeError(f"module 'speechclip_plus' has no attribute '{name}'")
