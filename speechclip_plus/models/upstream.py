"""Frozen s3prl upstream (HuBERT, WavLM, fbank, ...) + a learnable softmax-weighted sum of its hidden states.

feats = sum_l softmax(w)_l * LN?(h_l), with one logit w_l per hidden state, initialised to 0 (reference.md
§1.2). The upstream is built by s3prl's own hub entry, runs under ``no_grad`` and always in eval mode, with
layerdrop off so the number of states never changes.

Batching: s3prl experts pad the list they are given and run it as one batch. Some upstreams are then not
padding-invariant: HuBERT Base's GroupNorm normalises over the padded length, and HuBERT's frame padding mask
rounds, so a short utterance's frames depend on the longest one in its batch (the reference behaves the same
way). ``per_utterance=True`` runs the upstream one utterance at a time instead: outputs independent of batch
composition (recommended for evaluation and feature extraction) at the cost of B calls per batch.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

PROBE_SAMPLES = 16000  # 1 s at 16 kHz, used once to read the number and width of the hidden states


def _probe_wave(n: int = PROBE_SAMPLES) -> torch.Tensor:
    """A deterministic test signal (two tones + fixed noise) that leaves the global RNG untouched."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(n) / 16000.0
    return (
        0.3 * torch.sin(2 * torch.pi * 220 * t)
        + 0.2 * torch.sin(2 * torch.pi * 1250 * t)
        + 0.05 * torch.randn(n, generator=g)
    )


class Upstream(nn.Module):
    """Frozen s3prl upstream + learnable softmax-weighted sum of its hidden states.

    name: an s3prl hub entry; built as ``getattr(hub, name)(ckpt=ckpt, model_config=model_config)`` (each
      argument passed only when set).
    normalize_waveform: layer-norm each waveform over its valid samples first.
    normalize_hiddenstates: layer-norm (no affine) each state over its last dim before the weighted sum.
    per_utterance: run the upstream one utterance at a time (see the module docstring); a plain attribute,
        it can be changed after construction.
    Attributes: ``num_layers`` (number of hidden states), ``hidden_dim``, ``downsample_rate`` (samples per
    frame), ``layer_weights`` (num_layers,) logits, the only trainable parameter.
    """

    def __init__(
        self,
        name: str = "hubert_base",
        ckpt: Optional[str] = None,
        normalize_waveform: bool = False,
        normalize_hiddenstates: bool = False,
        per_utterance: bool = False,
        model_config: Optional[str] = None,
    ):
        super().__init__()
        from ..compat import import_s3prl_hub

        hub = import_s3prl_hub()
        entry = getattr(hub, name, None)
        if not callable(entry):
            raise ValueError(f"unknown s3prl upstream '{name}' (not an entry of s3prl.hub)")
        self.name = name
        kwargs = {"ckpt": ckpt} if ckpt else {}
        if model_config:  # s3prl's -g option, e.g. a feature config for baseline_local
            kwargs["model_config"] = model_config
        self.upstream = entry(**kwargs)
        for module in self.upstream.modules():
            if isinstance(getattr(module, "layerdrop", None), float):
                module.layerdrop = 0.0
        for p in self.upstream.parameters():
            p.requires_grad_(False)
        self.upstream.eval()
        self.normalize_waveform = bool(normalize_waveform)
        self.normalize_hiddenstates = bool(normalize_hiddenstates)
        self.per_utterance = bool(per_utterance)
        self.downsample_rate = int(self.upstream.get_downsample_rates("hidden_states"))

        with torch.no_grad():
            states = self._run([_probe_wave()])
        shapes = {tuple(h.shape[2:]) for h in states}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(
                f"s3prl upstream '{name}': hidden states must all be (B, T, D); got {sorted(shapes)}"
            )
        self.num_layers = len(states)
        self.hidden_dim = int(states[0].shape[-1])
        self.layer_weights = nn.Parameter(torch.zeros(self.num_layers))

    def train(self, mode: bool = True) -> "Upstream":
        """The frozen upstream stays in eval mode (no dropout) whatever the parent's mode."""
        super().train(mode)
        self.upstream.eval()
        return self

    def _run(self, wavs: List[torch.Tensor]) -> List[torch.Tensor]:
        states = self.upstream(wavs)["hidden_states"]
        if isinstance(states, dict):
            states = list(states.values())
        return list(states)

    @torch.no_grad()
    def hidden_states(
        self, wav: torch.Tensor, wav_lens: torch.Tensor
    ) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Padded (B, L) waveforms, (B,) lengths -> (list of num_layers (B, T, D) states, feat_lens (B,)).

        feat_lens = clamp(round(wav_lens / downsample_rate), 1, T_b) with T_b the utterance's own frame count
        (per_utterance) or the batch's T; frames at or past feat_lens are zero.
        """
        if wav.dim() != 2 or wav_lens.shape != (wav.shape[0],):
            raise ValueError(
                f"Upstream: expected wav (B, L) and wav_lens (B,), got {tuple(wav.shape)}, "
                f"{tuple(wav_lens.shape)}"
            )
        lens = wav_lens.to(wav.device).long()
        if len(lens) and (lens.min() < 1 or lens.max() > wav.shape[1]):
            raise ValueError(f"Upstream: wav_lens must be in [1, {wav.shape[1]}], got {lens.tolist()}")
        wavs = [w[:n].float() for w, n in zip(wav, lens.tolist())]
        if self.normalize_waveform:
            wavs = [F.layer_norm(w, w.shape) for w in wavs]
        if self.per_utterance:
            per_utt = [self._run([w]) for w in wavs]
            own = torch.tensor([s[0].shape[1] for s in per_utt], device=wav.device)
            states = [
                nn.utils.rnn.pad_sequence([s[i][0] for s in per_utt], batch_first=True)
                for i in range(len(per_utt[0]))
            ]
        else:
            states = self._run(wavs)
            own = torch.full_like(lens, states[0].shape[1])
        t_max = states[0].shape[1]
        feat_lens = torch.minimum(torch.round(lens.double() / self.downsample_rate).long().clamp(min=1), own)
        feat_lens = feat_lens.clamp(1, t_max)
        valid = (torch.arange(t_max, device=wav.device)[None, :] < feat_lens[:, None])[..., None]
        return [h * valid.to(h.dtype) for h in states], feat_lens

    def weighted_sum(self, states: List[torch.Tensor]) -> torch.Tensor:
        """sum_l softmax(layer_weights)_l * h_l -> (B, T, D); h_l layer-normed if normalize_hiddenstates."""
        if len(states) != self.num_layers:
            raise ValueError(f"Upstream: expected {self.num_layers} hidden states, got {len(states)}")
        stacked = torch.stack(states, 0)
        if self.normalize_hiddenstates:
            stacked = F.layer_norm(stacked, stacked.shape[-1:])
        weights = torch.softmax(self.layer_weights, 0).to(stacked.dtype)
        return (weights.view(-1, 1, 1, 1) * stacked).sum(0)

    def forward(self, wav: torch.Tensor, wav_lens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Padded waveforms (B, L), lengths (B,) -> (weighted sum (B, T, D), feat_lens (B,))."""
        states, feat_lens = self.hidden_states(wav, wav_lens)
        return self.weighted_sum(states), feat_lens

    def extra_repr(self) -> str:
        return (
            f"name={self.name}, num_layers={self.num_layers}, hidden_dim={self.hidden_dim}, "
            f"downsample_rate={self.downsample_rate}, per_utterance={self.per_utterance}"
        )
