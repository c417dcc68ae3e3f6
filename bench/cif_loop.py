"""Readable CIF baseline for the benchmark: a Python loop over time, vectorised over the batch.

Same semantics as ``speechclip_plus.models.cif.cif`` (lengths, multi-fire, cap, tail rule, zeroed rows):
at each frame the weight is added to the current keyword of every sample; samples whose keyword
completes fire (possibly several times for a heavy frame) and the remainder starts the next keyword.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def cif_loop(
    hidden: torch.Tensor,
    alpha: torch.Tensor,
    pad_mask: Optional[torch.Tensor] = None,
    target_lengths: Optional[torch.Tensor] = None,
    threshold: float = 1.0,
    max_length: int = 75,
    tail_threshold: float = 0.5,
    scale: bool = True,
    eps: float = 1e-5,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return (feats (B, K, C), lengths (B,))."""
    beta = threshold
    B, S, C = hidden.shape
    a = alpha.double()
    if pad_mask is not None:
        a = a.masked_fill(pad_mask, 0.0)
    if target_lengths is not None and scale:
        total = a.sum(1)
        safe = torch.where(total > 0, total, torch.ones_like(total))
        a = a * torch.where(total > 0, (beta * target_lengths.double() + eps) / safe, 1.0).unsqueeze(1)
    lengths = torch.floor(a.detach().sum(1) / beta).clamp(1, max_length).long()
    T = int(lengths.max())

    device = hidden.device
    batch = torch.arange(B, device=device)
    out = hidden.new_zeros(B, T + 1, C)
    row_weight = torch.zeros(B, T + 1, dtype=torch.float64, device=device)  # for the tail rule
    row = torch.zeros(B, dtype=torch.long, device=device)  # current keyword of each sample
    acc = torch.zeros(B, dtype=torch.float64, device=device)  # weight already in the current keyword
    for s in range(S):
        h = hidden[:, s]
        remaining = a[:, s]
        while True:
            need = beta - acc
            fire = (remaining >= need) & (row < lengths)
            if not bool(fire.any()):
                break
            part = torch.where(fire, need, torch.zeros_like(need))
            out.index_put_((batch, row), part.to(h.dtype).unsqueeze(1) * h, accumulate=True)
            row_weight[batch, row] += part.detach()
            remaining = remaining - part
            acc = torch.where(fire, torch.zeros_like(acc), acc)
            row = row + fire.long()
        out.index_put_((batch, row), remaining.to(h.dtype).unsqueeze(1) * h, accumulate=True)
        row_weight[batch, row] += remaining.detach()
        acc = acc + remaining

    factor = torch.ones(B, T + 1, dtype=hidden.dtype, device=device)
    if target_lengths is None:
        tail = row_weight[batch, lengths]
        extend = (tail >= tail_threshold) & (lengths < max_length)
        factor[batch, lengths] = torch.where(extend, beta / tail, 1.0).to(hidden.dtype)
        lengths = lengths + extend.long()
    K = int(lengths.max())
    keep = (torch.arange(K, device=device)[None] < lengths[:, None]).to(hidden.dtype)
    return out[:, :K] * (factor[:, :K] * keep).unsqueeze(2), lengths
