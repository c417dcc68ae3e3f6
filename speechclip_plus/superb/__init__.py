"""SUPERB through s3prl: an upstream expert for exported SpeechCLIP(+) model files and its registration.

s3prl finds upstreams only as attributes of the ``s3prl.hub`` module (no plugin mechanism), so ``register()``
sets our entries there in the current process; ``python -m speechclip_plus.superb`` does that and then runs
s3prl's own ``run_downstream``. Importing this package does not import s3prl.
"""
from __future__ import annotations

from types import ModuleType

from .hubconf import ENTRIES, speechclip_plus, speechclip_plus_hf, speechclip_plus_local, speechclip_plus_url

__all__ = ["register", "ENTRIES", "speechclip_plus", "speechclip_plus_local", "speechclip_plus_url",
           "speechclip_plus_hf"]


def register() -> ModuleType:
    """Prepare this process for s3prl and put our entries on ``s3prl.hub``; returns that module.

    Applies the compat shims, lets ``torch.load(weights_only=True)`` read the ``argparse.Namespace`` that
    s3prl stores in its downstream checkpoints (``-e``), and sets ``s3prl.hub.<name>`` for every entry in
    ``ENTRIES`` (so ``-u speechclip_plus_local`` and ``s3prl.nn.S3PRLUpstream("speechclip_plus_local")`` work).
    """
    import argparse

    import torch

    from ..compat import apply, import_s3prl_hub

    apply()
    torch.serialization.add_safe_globals([argparse.Namespace])
    hub = import_s3prl_hub()
    for name, entry in ENTRIES.items():
        setattr(hub, name, entry)
    return hub
