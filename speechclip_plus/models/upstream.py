"""Frozen s3prl upstream (HuBERT, WavLM, fbank, ...) + a learnable softmax-weighted sum of its hidden states.

feats = sum_l softmax(w)_l * LN?(h_l), with one logit w_l per hidden state, initialised to 0 (as the SpeechCLIP(+)
``WeightedSumLayer``). The upstream is built by s3prl's own hub entry, runs under ``no_grad`` and always in eval
mode, with layerdrop off so the number of states never changes.

Hidden states are s3prl's: the input of every transformer layer, then the encoder's output. For a pre-LN model
(HuBERT Large) that last state has passed the encoder's final LayerNorm; the SpeechCLIP(+) reference uses the raw
output of the last layer instead (``raw_last_layer=True`` restores that; for post-LN models such as HuBERT Base
the two are the same).

Frame counts: an utterance of n samples has ``frames(n)`` valid frames, the number the upstream makes for it
alone. For the s3prl upstreams (convolution stacks, Kaldi-style filterbanks) frames(n) = (n - R) // S + 1 with
S the downsample rate; R is found once by probing the upstream and the formula checked at other lengths
(an upstream that does not follow it gets each new length measured by running it alone). Frames at or past an
utterance's count are padding: they are zero in the returned states and masked by the model.

Batching: s3prl experts pad the list they are given and run it as one batch. Some upstreams are then not
padding-invariant: HuBERT's conv feature extractor, GroupNorm (Base) and positional convolution see the padding,
so a short utterance's frames depend on the longest one in its batch (the reference behaves the same way).
``per_utterance=True`` runs the upstream one utterance at a time instead (outputs independent of the batch, B
calls per batch); ``"auto"`` does so only when the upstream is not batch-invariant (``batch_invariant`` probes
it once: two probe signals batched vs alone). Filterbank upstreams are batch-invariant, HuBERT is not.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

PROBE_SAMPLES = 16000  # 1 s at 16 kHz, used once to read the number and width of the hidden states


def _probe_wave(n: int = PROBE_SAMPLES, seed: int = 0) -> torch.Tensor:
    """A deterministic test signal (two tones + fixed noise) that leaves the global RNG untouched."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 16000.0
    return (
        0.3 * torch.sin(2 * torch.pi * (220 + 40 * seed) * t)
        + 0.2 * torch.sin(2 * torch.pi * 1250 * t)
        + 0.05 * torch.randn(n, generator=g)
    )


def _encoder_layers(model: nn.Module) -> Optional[nn.ModuleList]:
    """The transformer layer list of an s3prl SSL upstream (``...encoder.layers``), or None."""
    for name, module in model.named_modules():
        if name.endswith("encoder.layers") and isinstance(module, nn.ModuleList) and len(module):
            return module
    return None


class Upstream(nn.Module):
    """Frozen s3prl upstream + learnable softmax-weighted sum of its hidden states.

    name: an s3prl hub entry; built as ``getattr(hub, name)(ckpt=ckpt, model_config=model_config)`` (each
      argument passed only when set).
    normalize_waveform: layer-norm each waveform over its valid samples first.
    normalize_hiddenstates: layer-norm (no affine) each state over its last dim before the weighted sum.
    per_utterance: True, False or "auto" (see the module docstring); a plain attribute, it can be changed after
        construction.
    raw_last_layer: the last state is the raw output of the last transformer layer (see the module docstring).
    Attributes: ``num_layers`` (number of hidden states), ``hidden_dim``, ``downsample_rate`` (samples per
    frame), ``layer_weights`` (num_layers,) logits, the only trainable parameter.
    """

    def __init__(
        self,
        name: str = "hubert_base",
        ckpt: Optional[str] = None,
        normalize_waveform: bool = False,
        normalize_hiddenstates: bool = False,
        per_utterance: Union[bool, str] = False,
        model_config: Optional[str] = None,
        raw_last_layer: bool = False,
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
        self.per_utterance = per_utterance
        self.downsample_rate = int(self.upstream.get_downsample_rates("hidden_states"))
        self.raw_last_layer = bool(raw_last_layer)
        self._raw_last: Optional[torch.Tensor] = None
        if self.raw_last_layer:
            layers = _encoder_layers(self.upstream)
            if layers is None:
                raise ValueError(f"model.upstream.raw_last_layer: s3prl upstream '{name}' has no transformer "
                                 "layers (encoder.layers) to take the last output from")
            layers[-1].register_forward_hook(self._keep_last_layer_output)

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
        self._frames_cache: Dict[int, int] = {PROBE_SAMPLES: int(states[0].shape[1])}
        self._receptive: Optional[int] = None  # R of frames(n) = (n - R) // S + 1, once fitted
        self._formula_checked = False
        self._batch_invariant: Optional[bool] = None

    def train(self, mode: bool = True) -> "Upstream":
        """The frozen upstream stays in eval mode (no dropout) whatever the parent's mode."""
        super().train(mode)
        self.upstream.eval()
        return self

    def _keep_last_layer_output(self, module, inputs, output) -> None:
        self._raw_last = output[0] if isinstance(output, (tuple, list)) else output

    def _run(self, wavs: List[torch.Tensor]) -> List[torch.Tensor]:
        self._raw_last = None
        states = self.upstream(wavs)["hidden_states"]
        if isinstance(states, dict):
            states = list(states.values())
        states = list(states)
        if self.raw_last_layer:
            raw = self._raw_last  # fairseq-style layers are time-first: (T, B, D)
            self._raw_last = None
            if raw is None or raw.dim() != 3 or raw.shape[1] != states[-1].shape[0]:
                raise ValueError(f"model.upstream.raw_last_layer: could not read the last layer output of "
                                 f"'{self.name}' (got {None if raw is None else tuple(raw.shape)})")
            states[-1] = raw.transpose(0, 1)[:, : states[-1].shape[1]]
        return states

    # ------------------------------------------------------------------ frame counts
    def _measure_frames(self, n: int) -> int:
        """Frames the upstream makes for one utterance of ``n`` samples (run alone on a probe signal)."""
        if n not in self._frames_cache:
            with torch.no_grad():
                device = next(iter(self.upstream.parameters()), torch.empty(0)).device
                self._frames_cache[n] = int(self._run([_probe_wave(n).to(device)])[0].shape[1])
        return self._frames_cache[n]

    def _fit_frame_formula(self) -> None:
        """Find R in frames(n) = (n - R) // S + 1 by bisection, then check the formula at other lengths."""
        self._formula_checked = True
        S = self.downsample_rate
        n0 = 2000 + 4 * S  # longer than the analysis window of the s3prl upstreams (400-800 samples)
        f0 = self._measure_frames(n0)
        lo, hi = n0, n0 + S  # frames(lo) = f0; if the formula holds, frames(hi) = f0 + 1
        if S < 1 or self._measure_frames(hi) != f0 + 1:
            return
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self._measure_frames(mid) > f0 else (mid, hi)
        receptive = hi - f0 * S
        checks = (n0 // 2 + 7, n0 + 3 * S + S // 3, 3 * n0 + 1, receptive + 2 * S - 1)
        if all(self._measure_frames(n) == (n - receptive) // S + 1 for n in checks if n >= max(receptive, 1)):
            self._receptive = receptive

    def frame_counts(self, lengths: Sequence[int]) -> List[int]:
        """``frames(n)`` for each utterance length n (samples): what the upstream makes for it alone."""
        if not self._formula_checked:
            self._fit_frame_formula()
        if self._receptive is not None:
            return [max(0, (int(n) - self._receptive) // self.downsample_rate + 1) for n in lengths]
        return [self._measure_frames(int(n)) for n in lengths]

    @property
    def batch_invariant(self) -> bool:
        """Whether an utterance's states are the same in a padded batch as alone (probed once)."""
        if self._batch_invariant is None:
            long, short = _probe_wave(PROBE_SAMPLES + 7001, seed=1), _probe_wave(PROBE_SAMPLES // 2 + 333, seed=2)
            device = next(iter(self.upstream.parameters()), torch.empty(0)).device
            with torch.no_grad():
                batched = self._run([long.to(device), short.to(device)])
                alone = self._run([short.to(device)])
            n = min(self.frame_counts([len(short)])[0], alone[0].shape[1])
            self._batch_invariant = all(
                torch.allclose(b[1, :n].float(), a[0, :n].float(), rtol=1e-4, atol=1e-4 * (1 + float(a.abs().max())))
                for b, a in zip(batched, alone)
            )
        return self._batch_invariant

    def runs_per_utterance(self) -> bool:
        if self.per_utterance == "auto":
            return not self.batch_invariant
        if not isinstance(self.per_utterance, bool):
            raise ValueError(f"per_utterance must be True, False or 'auto', got {self.per_utterance!r}")
        return self.per_utterance

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def hidden_states(
        self, wav: torch.Tensor, wav_lens: torch.Tensor
    ) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Padded (B, L) waveforms, (B,) lengths -> (list of num_layers (B, T, D) states, feat_lens (B,)).

        feat_lens = clamp(frames(wav_lens), 1, T); frames at or past feat_lens are zero (set in place, no copy).
        """
        if wav.dim() != 2 or wav_lens.shape != (wav.shape[0],):
            raise ValueError(
                f"Upstream: expected wav (B, L) and wav_lens (B,), got {tuple(wav.shape)}, "
                f"{tuple(wav_lens.shape)}"
            )
        lens = [int(n) for n in wav_lens.tolist()]  # the one host read: s3prl takes a list of unpadded waves
        if lens and (min(lens) < 1 or max(lens) > wav.shape[1]):
            raise ValueError(f"Upstream: wav_lens must be in [1, {wav.shape[1]}], got {lens}")
        wavs = [w[:n].float() for w, n in zip(wav, lens)]
        if self.normalize_waveform:
            wavs = [F.layer_norm(w, w.shape) for w in wavs]
        if self.runs_per_utterance():
            per_utt = [self._run([w]) for w in wavs]
            own = [s[0].shape[1] for s in per_utt]
            states = [
                nn.utils.rnn.pad_sequence([s[i][0] for s in per_utt], batch_first=True)
                for i in range(len(per_utt[0]))
            ]
        else:
            states = self._run(wavs)
            own = self.frame_counts(lens)
        t_max = states[0].shape[1]
        feat_lens = torch.tensor([min(max(f, 1), t_max) for f in own], dtype=torch.long, device=wav.device)
        pad = torch.arange(t_max, device=wav.device)[None, :] >= feat_lens[:, None]
        for h in states:
            h.masked_fill_(pad[..., None], 0.0)
        return states, feat_lens

    def weighted_sum(self, states: List[torch.Tensor]) -> torch.Tensor:
        """sum_l softmax(layer_weights)_l * h_l -> (B, T, D); h_l layer-normed if normalize_hiddenstates.

        Accumulated layer by layer (no (L, B, T, D) stack)."""
        if len(states) != self.num_layers:
            raise ValueError(f"Upstream: expected {self.num_layers} hidden states, got {len(states)}")
        weights = torch.softmax(self.layer_weights, 0)
        out = None
        for w, h in zip(weights, states):
            if self.normalize_hiddenstates:
                h = F.layer_norm(h, h.shape[-1:])
            term = w.to(h.dtype) * h
            out = term if out is None else out + term
        return out

    def forward(self, wav: torch.Tensor, wav_lens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Padded waveforms (B, L), lengths (B,) -> (weighted sum (B, T, D), feat_lens (B,))."""
        states, feat_lens = self.hidden_states(wav, wav_lens)
        return self.weighted_sum(states), feat_lens

    def extra_repr(self) -> str:
        return (
            f"name={self.name}, num_layers={self.num_layers}, hidden_dim={self.hidden_dim}, "
            f"downsample_rate={self.downsample_rate}, per_utterance={self.per_utterance}, "
            f"raw_last_layer={self.raw_last_layer}"
        )
