"""Tiny randomly initialised stand-ins for the pretrained parts, for tests and the offline demo.

They are built from the same classes as the real models and stored in the formats the real loaders read, so
every loading path is exercised:
- ``TINY_CLIP_CONFIG``: an open_clip model-config json (``FrozenCLIP(TINY_CLIP_CONFIG, pretrained=None)``).
- ``save_tiny_hubert``: a checkpoint in s3prl's converted HuBERT format, read by ``hubert_local(ckpt=path)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch

from ..io import torch_save_atomic

TINY_CLIP_CONFIG = str(Path(__file__).resolve().parent / "clip_configs" / "tiny-clip.json")

# HuBERT's convolutional feature encoder: strides 5*2*2*2*2*2*2 = 320 samples, receptive field 400 samples.
_HUBERT_CONV = "[({c}, 10, 5)] + [({c}, 3, 2)] * 4 + [({c}, 2, 2)] * 2"


def tiny_hubert_state(
    dim: int = 32,
    layers: int = 2,
    heads: int = 2,
    ffn: int = 64,
    conv_dim: int = 32,
    seed: int = 0,
    extractor_mode: str = "default",
    normalize: bool = False,
    n_clusters: int = 10,
) -> dict:
    """The checkpoint dict (s3prl's converted format) of a random tiny HuBERT.

    Keys: ``task_cfg`` and ``model_cfg`` (plain dicts merged into s3prl's ``HubertPretrainingConfig`` /
    ``HubertConfig``), ``model_weight`` (state_dict of s3prl's ``HubertModel``) and ``dictionaries_symbols``
    (one label dictionary: fairseq's 4 specials + ``n_clusters`` cluster names). Only plain containers,
    strings, numbers and tensors, so ``torch.load(weights_only=True)`` reads it.
    ``extractor_mode``: "default" (GroupNorm in the first conv, as HuBERT Base) or "layer_norm" (as Large).
    """
    if dim % heads:
        raise ValueError(f"tiny HuBERT: dim={dim} is not divisible by heads={heads}")
    from ..compat import apply

    apply()  # s3prl may only be imported after the compat shims
    from s3prl.upstream.hubert.hubert_model import HubertConfig, HubertModel, HubertPretrainingConfig
    from s3prl.upstream.utils import merge_with_parent

    task_cfg = {"label_rate": 50.0, "sample_rate": 16000, "normalize": bool(normalize)}
    model_cfg = {
        "label_rate": 50.0,
        "extractor_mode": extractor_mode,
        "encoder_layers": int(layers),
        "encoder_embed_dim": int(dim),
        "encoder_ffn_embed_dim": int(ffn),
        "encoder_attention_heads": int(heads),
        "conv_feature_layers": _HUBERT_CONV.format(c=int(conv_dim)),
        "conv_pos": 16,
        "conv_pos_groups": 4 if dim % 4 == 0 else 1,
        "final_dim": int(dim),
        "layer_norm_first": extractor_mode == "layer_norm",
        "encoder_layerdrop": 0.0,
    }
    symbols = [["<s>", "<pad>", "</s>", "<unk>"] + [str(i) for i in range(n_clusters)]]
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = HubertModel(
            merge_with_parent(HubertConfig, model_cfg),
            merge_with_parent(HubertPretrainingConfig, task_cfg),
            symbols,
        )
    finally:
        torch.random.set_rng_state(rng_state)
    return {
        "task_cfg": task_cfg,
        "model_cfg": model_cfg,
        "model_weight": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "dictionaries_symbols": symbols,
    }


def save_tiny_hubert(path: Union[str, os.PathLike], **kwargs) -> str:
    """Write ``tiny_hubert_state(**kwargs)`` (defaults: 2 layers of width 32) as a checkpoint readable by s3prl's
    ``hubert_local(ckpt=path)``, atomically (``speechclip_plus.io``); returns ``path``. s3prl yields ``layers + 1``
    hidden states of width ``dim`` at HuBERT's 320x downsampling."""
    torch_save_atomic(tiny_hubert_state(**kwargs), path)
    return str(path)
