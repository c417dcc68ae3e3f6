"""s3prl upstream expert for an exported SpeechCLIP / SpeechCLIP+ model file.

Contract (s3prl 0.4.18, ``upstream/example/expert.py``): ``forward(wavs)`` takes a list of unpadded 1-D float
16 kHz waveforms and returns a dict whose ``hidden_states`` is a list of (B, T, D) tensors, all the same shape:
every state of the frozen speech trunk followed by the trainable attention block's frame outputs (the CLS
positions removed), T = the trunk's frame count for the longest utterance (about round(L_max / 320) for a
HuBERT trunk). ``last_hidden_state`` is the last of them. Frames past an utterance's own length are what the
model gives (zeros here); s3prl's featurizers trim them by ``round(L_i / rate)``.
``get_downsample_rates(key)`` = the trunk's samples per frame.

Options (keyword arguments, or a YAML mapping passed as ``model_config`` / s3prl's ``-g``):
  per_utterance: true | false (default) | auto: run the trunk one utterance at a time (always, never, or only
      when it is not batch-invariant), so features do not depend on what else is in the batch (HuBERT's
      GroupNorm, positional convolution and frame mask see the padding otherwise; filterbanks do not).
The model is read by ``SpeechCLIPPlus.from_pretrained`` (a model file, an exp dir: its best checkpoint, or
``hf://ORG/NAME[@REVISION]`` from the Hugging Face Hub); this class adds no loading code of its own.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import torch
from torch import nn

HIDDEN_KEYS = ("hidden_states", "last_hidden_state")
OPTIONS: Dict[str, tuple] = {"per_utterance": (True, False, "auto")}


def read_options(model_config: Optional[str], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """Expert options = the YAML mapping in ``model_config`` (if given) updated by ``overrides``.

    Unknown keys and wrong types raise ValueError naming the file (or "keyword arguments") and the key.
    """
    import yaml

    merged: Dict[str, Any] = {}
    sources = []
    if model_config:
        if not os.path.isfile(model_config):
            raise FileNotFoundError(f"speechclip_plus upstream: model_config file not found: {model_config}")
        with open(model_config, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{model_config}: expected a mapping of expert options, got {type(data).__name__}")
        sources.append((model_config, data))
    sources.append(("keyword arguments", dict(overrides)))
    for source, data in sources:
        for key, value in data.items():
            if key not in OPTIONS:
                raise ValueError(f"{source}: unknown speechclip_plus upstream option '{key}'; "
                                 f"valid: {', '.join(sorted(OPTIONS))}")
            if not any(value is allowed or (isinstance(allowed, str) and value == allowed)
                       for allowed in OPTIONS[key]):
                choices = " | ".join(str(a).lower() for a in OPTIONS[key])
                raise ValueError(f"{source}: option '{key}' must be {choices}, got {value!r}")
            merged[key] = value
    return merged


class UpstreamExpert(nn.Module):
    """SpeechCLIP(+) frame-level states for s3prl (see the module docstring for the contract)."""

    def __init__(self, ckpt: str, model_config: Optional[str] = None, **kwargs: Any):
        super().__init__()
        if not ckpt:
            raise ValueError("speechclip_plus upstream: a model file is required (s3prl: -k /path/model.pt)")
        if not str(ckpt).startswith("hf://") and not os.path.exists(ckpt):
            raise FileNotFoundError(f"speechclip_plus upstream: model file not found: {ckpt}")
        options = read_options(model_config, kwargs)
        from ..api import SpeechCLIPPlus

        per_utterance = options.get("per_utterance", False)
        self.model = SpeechCLIPPlus.from_pretrained(ckpt, per_utterance=per_utterance).model
        self.downsample_rate = int(self.model.upstream.downsample_rate)

    def get_downsample_rates(self, key: str) -> int:
        """Samples of 16 kHz audio per output frame for ``key`` (every key here is frame-level)."""
        if key not in HIDDEN_KEYS:
            raise KeyError(f"speechclip_plus upstream has no feature '{key}'; available: {', '.join(HIDDEN_KEYS)}")
        return self.downsample_rate

    def forward(self, wavs: List[torch.Tensor]) -> Dict[str, Any]:
        """List of B 1-D waveforms -> {"hidden_states": [(B, T, D)] * n_layers, "last_hidden_state": (B, T, D)}."""
        if len(wavs) == 0:
            raise ValueError("speechclip_plus upstream: empty batch")
        for i, w in enumerate(wavs):
            if w.dim() != 1 or w.numel() == 0:
                raise ValueError(f"speechclip_plus upstream: waveform {i} must be a non-empty 1-D tensor, "
                                 f"got shape {tuple(w.shape)}")
        device = wavs[0].device
        lengths = torch.tensor([len(w) for w in wavs], device=device)
        padded = nn.utils.rnn.pad_sequence([w.float() for w in wavs], batch_first=True)
        states, _ = self.model.hidden_states(padded, lengths)
        return {"hidden_states": list(states), "last_hidden_state": states[-1]}
