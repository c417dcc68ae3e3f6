"""Branch heads that map encoder outputs into CLIP's embedding space.

- ``ParallelBranch``: utterance CLS vector -> projection -> L2-normalised embedding (SpeechCLIP p).
- ``KeywordHead``: keyword vectors (B, K, D) -> projection to the token width -> ``KeywordBatchNorm`` ->
  ``KeywordQuantizer`` onto CLIP's reduced token table -> CLIP's frozen text encoder with the prompt
  [SOT, kw_1..kw_K, EOT] -> L2-normalised sentence embedding. Used by the fixed-CLS cascaded branch
  (c, h: K = n_keywords, per-slot BatchNorm) and by the CIF branch (cplus, hplus: K = CIF count,
  BatchNorm over the valid slots).
The CLIP module is passed in at call time and never stored here, so its weights appear once in the model.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import KeywordBatchNorm, KeywordQuantizer


def projection(d_in: int, hidden: Sequence[int], d_out: int, dropout: float = 0.1) -> nn.Module:
    """One Linear when ``hidden`` is empty, else Linear-ReLU-Dropout blocks then a final Linear."""
    layers, width = [], d_in
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, d_out))
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


class ParallelBranch(nn.Module):
    def __init__(self, d_model: int, embed_dim: int, hidden: Sequence[int] = ()):
        super().__init__()
        self.proj = projection(d_model, hidden, embed_dim)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        """cls: (B, D) -> (B, E), unit norm."""
        return F.normalize(self.proj(cls).float(), dim=-1)


class KeywordHead(nn.Module):
    def __init__(self, d_model: int, token_table: torch.Tensor, n_slots: Optional[int] = None,
                 hidden: Sequence[int] = (), std_scale: float = 1.0, temperature: float = 0.1):
        super().__init__()
        token_dim = token_table.shape[1]
        self.proj = projection(d_model, hidden, token_dim)
        self.bn = KeywordBatchNorm(token_dim, token_table, n_slots, std_scale)
        self.quantizer = KeywordQuantizer(temperature)

    def forward(self, vectors: torch.Tensor, clip: nn.Module, lengths: torch.Tensor,
                pad_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """vectors: (B, K, D); lengths: (B,) keywords used per sample; pad_mask: (B, K) True = unused.

        Returns ``embedding`` (B, E) unit norm, ``ids`` (B, K) original CLIP token ids (-1 at padding),
        ``neighbours`` (B, K, 5) original ids of the nearest tokens, ``lengths``.
        """
        z = self.bn(self.proj(vectors).float(), pad_mask)
        q = self.quantizer(z, clip.token_table, clip.special_mask)
        embedding = clip.encode_keywords(q["embeddings"], lengths)
        ids = clip.to_original(q["ids"])
        neighbours = clip.to_original(q["neighbours"])
        if pad_mask is not None:
            ids = ids.masked_fill(pad_mask, -1)
        return {"embedding": embedding, "ids": ids, "neighbours": neighbours, "lengths": lengths}
