"""Trainable attention block on top of the weighted upstream features (the reference's ``TransformerEncoder`` and
``MultiheadAttentionAndNorm``, ``avssl/module/kw_modules/TransformerModels.py`` of ShampooWang/SpeechCLIP_plus).

- ``mha``: y = LayerNorm(x + MHA(x, x, x)), a single attention layer with no feed-forward part.
- ``transformer``: ``n_layers`` post-LN ``nn.TransformerEncoderLayer`` (GELU) followed by a final LayerNorm.
Both take a key padding mask (True = pad) and keep the input shape (B, S, D). ``attention_dropout`` (default:
``dropout``) acts on the attention weights only; 0 lets PyTorch use its fused attention kernels.

``ConvPositionalEmbedding``: x + GELU(grouped Conv1d_k(x)) over time, with padded frames zeroed first (as in
HuBERT's encoder). Upstreams with positional information of their own (HuBERT, WavLM) need none; filterbank
features carry none, and attention alone would treat them as an unordered set.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class AttentionBlock(nn.Module):
    def __init__(self, d_model: int, type: str = "mha", n_heads: int = 8, n_layers: int = 1,
                 ffn_dim: int = 3072, dropout: float = 0.1, attention_dropout: Optional[float] = None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"model.encoder.n_heads={n_heads} does not divide the feature size {d_model}")
        self.type = type
        attention_dropout = dropout if attention_dropout is None else attention_dropout
        if type == "mha":
            self.attn = nn.MultiheadAttention(d_model, n_heads, dropout=attention_dropout, batch_first=True)
            self.norm = nn.LayerNorm(d_model)
        elif type == "transformer":
            layer = nn.TransformerEncoderLayer(d_model, n_heads, ffn_dim, dropout, activation="gelu",
                                               batch_first=True)
            layer.self_attn.dropout = attention_dropout  # read by MultiheadAttention at every call
            self.layers = nn.TransformerEncoder(layer, n_layers, norm=nn.LayerNorm(d_model),
                                                enable_nested_tensor=False)
        else:
            raise ValueError(f"unknown attention type '{type}' (mha | transformer)")

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        if self.type == "mha":
            out, _ = self.attn(x, x, x, key_padding_mask=pad_mask, need_weights=False)
            return self.norm(x + out)
        return self.layers(x, src_key_padding_mask=pad_mask)


class ConvPositionalEmbedding(nn.Module):
    def __init__(self, d_model: int, width: int, groups: int = 16):
        super().__init__()
        if width < 1 or width % 2 == 0:
            raise ValueError(f"model.encoder.conv_pos={width} must be a positive odd width")
        if d_model % groups:
            raise ValueError(f"model.encoder.conv_pos_groups={groups} does not divide the feature size {d_model}")
        self.conv = nn.Conv1d(d_model, d_model, width, padding=width // 2, groups=groups)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), pad_mask (B, T) True = pad -> (B, T, D), padded frames zero."""
        x = x.masked_fill(pad_mask[..., None], 0.0)
        y = x + nn.functional.gelu(self.conv(x.transpose(1, 2)).transpose(1, 2))
        return y.masked_fill(pad_mask[..., None], 0.0)
