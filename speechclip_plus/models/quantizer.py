"""Keyword normalisation and vector quantisation onto CLIP's (reduced) token-embedding table.

``KeywordBatchNorm``: BatchNorm over keyword vectors whose affine part starts at the token table's
per-dimension statistics (weight = std * scale, bias = mean), so normalised keywords land in the token
embedding space (as the reference's ``Kw_BatchNorm``). Two modes:
- ``n_slots`` given (fixed CLS keywords): separate statistics per (slot, dim). The reference initialises
  this case with a scrambled (k-major vs d-major) affine vector; here slot k, dim d gets (std_d, mean_d).
- ``n_slots`` None (CIF keywords): one set of statistics per dim, computed over the *valid* keyword slots
  only (the reference also pools padded slots into the statistics). In training, with m the valid-slot mask
  and n = sum m: mean = sum m x / n, var = sum m (x - mean)^2 / n normalise; the running estimates move by
  ``momentum`` towards (mean, var * n / (n - 1)), as ``nn.BatchNorm1d`` does. No boolean indexing, so no host
  synchronisation.

``KeywordQuantizer``: s_kv = cos(x_k, E_v), always in float32 (also under autocast, as the reference's
``cosine_similarity``); special tokens (pad/SOT/EOT) are masked by id; hard code c_k = argmax_v s_kv.
The keyword embedding is E[c_k] (a real CLIP token embedding). In training it is the straight-through estimate
  e_k = E[c_k] + p_k E - stop_grad(p_k E),   p_k = softmax(s_k / tau),
whose value is exactly E[c_k] and whose gradient is that of the reference's (onehot(c_k) + p_k - stop_grad(p_k)) E;
no (B, K, V) one-hot is built.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn


class KeywordBatchNorm(nn.Module):
    def __init__(self, dim: int, token_table: torch.Tensor, n_slots: Optional[int] = None, std_scale: float = 1.0):
        super().__init__()
        self.n_slots = n_slots
        width = dim * (n_slots or 1)
        self.bn = nn.BatchNorm1d(width)
        std = token_table.float().std(0) * std_scale
        mean = token_table.float().mean(0)
        with torch.no_grad():
            self.bn.weight.copy_(std.repeat(n_slots or 1))  # layout (slot, dim): index k*D + d
            self.bn.bias.copy_(mean.repeat(n_slots or 1))

    def forward(self, x: torch.Tensor, pad_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, K, D); pad_mask: (B, K) True = padding slot (CIF mode only). Padding slots come back as 0."""
        B, K, D = x.shape
        if self.n_slots is not None:
            if K != self.n_slots:
                raise ValueError(f"expected {self.n_slots} keyword slots, got {K}")
            return self.bn(x.reshape(B, K * D)).reshape(B, K, D)
        if pad_mask is None:
            return self.bn(x.reshape(B * K, D)).reshape(B, K, D)
        bn = self.bn
        m = (~pad_mask).unsqueeze(-1).to(x.dtype)  # (B, K, 1)
        if bn.training:
            n = m.sum()
            mean = (x * m).sum((0, 1)) / n.clamp(min=1)
            var = ((x - mean) ** 2 * m).sum((0, 1)) / n.clamp(min=1)
            with torch.no_grad():
                bn.num_batches_tracked += 1
                unbiased = var * n / (n - 1).clamp(min=1)
                bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), bn.momentum)
                bn.running_var.lerp_(unbiased.detach().to(bn.running_var.dtype), bn.momentum)
        else:
            mean, var = bn.running_mean, bn.running_var
        y = (x - mean) * torch.rsqrt(var + bn.eps) * bn.weight + bn.bias
        return y * m


class KeywordQuantizer(nn.Module):
    def __init__(self, temperature: float = 0.1, n_neighbours: int = 5):
        super().__init__()
        self.temperature = temperature
        self.n_neighbours = n_neighbours

    def forward(self, x: torch.Tensor, token_table: torch.Tensor, special_mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        """x: (B, K, D); token_table: (V, D); special_mask: (V,) True = never pick.

        Returns ``embeddings`` (B, K, D), ``ids`` (B, K) reduced-vocab indices, ``neighbours`` (B, K, n)
        nearest reduced ids, ``cos`` (B, K, V).
        """
        with torch.autocast(x.device.type, enabled=False):
            table = token_table.float()
            cos = F.normalize(x.float(), dim=-1) @ F.normalize(table, dim=-1).t()
            cos = cos.masked_fill(special_mask, float("-inf"))
            ids = cos.argmax(-1)
            embeddings = table[ids]
            if self.training and torch.is_grad_enabled():
                soft = torch.softmax(cos / self.temperature, dim=-1) @ table
                embeddings = embeddings + soft - soft.detach()
            n = min(self.n_neighbours, cos.shape[-1])
            neighbours = cos.detach().topk(n, dim=-1).indices
        return {"embeddings": embeddings, "ids": ids, "neighbours": neighbours, "cos": cos}
