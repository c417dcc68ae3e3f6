"""Trainable attention block on top of the weighted upstream features (reference.md §1.3).

- ``mha``: y = LayerNorm(x + MHA(x, x, x)), a single attention layer with no feed-forward part.
- ``transformer``: ``n_layers`` post-LN ``nn.TransformerEncoderLayer`` (GELU) followed by a final LayerNorm.
Both take a key padding mask (True = pad) and keep the input shape (B, S, D).
"""
from __future__ import annotations

import torch
from torch import nn


class AttentionBlock(nn.Module):
    def __init__(self, d_model: int, type: str = "mha", n_heads: int = 8, n_layers: int = 1,
                 ffn_dim: int = 3072, dropout: float = 0.1):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"model.encoder.n_heads={n_heads} does not divide the feature size {d_model}")
        self.type = type
        if type == "mha":
            self.attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
            self.norm = nn.LayerNorm(d_model)
        elif type == "transformer":
            layer = nn.TransformerEncoderLayer(d_model, n_heads, ffn_dim, dropout, activation="gelu",
                                               batch_first=True)
            self.layers = nn.TransformerEncoder(layer, n_layers, norm=nn.LayerNorm(d_model),
                                                enable_nested_tensor=False)
        else:
            raise ValueError(f"unknown attention type '{type}' (mha | transformer)")

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        if self.type == "mha":
            out, _ = self.attn(x, x, x, key_padding_mask=pad_mask, need_weights=False)
            return self.norm(x + out)
        return self.layers(x, src_key_padding_mask=pad_mask)
