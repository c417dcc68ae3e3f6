"""Slow CIF written straight from its definition: one sample at a time, one frame at a time.

Used only by the tests as an independent check of the vectorised ``speechclip_plus.models.cif.cif``.
Definition (CIF paper, with the SpeechCLIP+ length, tail and cap rules):
walk through the frames accumulating their weight into the current keyword; when the accumulated weight
reaches the threshold beta the keyword fires, the firing frame contributes only the part that completes it
and its remainder starts the next keyword; a remainder that still reaches beta fires again (each such full
keyword gets exactly beta * h_s, a constant).  The number of keywords is
L = clamp(floor(sum alpha / beta), 1, max_length); the sample fires at most L times, everything after the L-th
fire is the tail.  Training (target given): alpha is first scaled to sum beta * target + eps (unless it is all
zero), the tail is dropped.  Inference: a tail with weight >= tail_threshold becomes one more keyword, scaled
to beta with a detached factor, unless L is already max_length.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch


def cif_loop_reference(
    hidden: torch.Tensor,
    alpha: torch.Tensor,
    pad_mask: Optional[torch.Tensor] = None,
    target_lengths: Optional[torch.Tensor] = None,
    threshold: float = 1.0,
    max_length: int = 75,
    tail_threshold: float = 0.5,
    scale: bool = True,
    eps: float = 1e-5,
) -> Tuple[torch.Tensor, List[int], torch.Tensor, torch.Tensor]:
    """Return (feats (B, K, C) zero-padded, lengths, fire counts (B, S) long, quantity (B,))."""
    beta = threshold
    B, S, C = hidden.shape
    samples, lengths, quantities = [], [], []
    fires = torch.zeros(B, S, dtype=torch.long)
    for b in range(B):
        valid = S if pad_mask is None else int((~pad_mask[b]).sum())
        w = alpha[b, :valid].double()
        h = hidden[b, :valid].double()
        quantity = w.sum()
        quantities.append(quantity)
        if target_lengths is not None and scale and quantity.item() > 0:
            w = w * ((beta * float(target_lengths[b]) + eps) / quantity)
        n_kw = min(max(math.floor(w.sum().item() / beta), 1), max_length)

        rows: List[torch.Tensor] = [torch.zeros(C, dtype=torch.float64)]
        row_weight = [0.0]  # weight put into each row (for the tail rule)
        acc = torch.zeros((), dtype=torch.float64)  # weight accumulated in the current (last) row
        for s in range(valid):
            remaining = w[s]
            # fire while the current row completes and we have not reached the last keyword yet
            while len(rows) - 1 < n_kw and (acc + remaining).item() >= beta:
                part = beta - acc  # completes the current row; a constant beta when acc is a fresh 0
                rows[-1] = rows[-1] + part * h[s]
                row_weight[-1] += part.item()
                remaining = remaining - part
                fires[b, s] += 1
                rows.append(torch.zeros(C, dtype=torch.float64))
                row_weight.append(0.0)
                acc = torch.zeros((), dtype=torch.float64)
            rows[-1] = rows[-1] + remaining * h[s]
            row_weight[-1] += remaining.item()
            acc = acc + remaining

        length = n_kw
        if target_lengths is None and len(rows) > n_kw and n_kw < max_length:
            tail = row_weight[n_kw]
            if tail >= tail_threshold:
                rows[n_kw] = rows[n_kw] * (beta / tail)  # python float: detached factor
                length += 1
        samples.append(torch.stack(rows[:length]))
        lengths.append(length)

    K = max(lengths)
    feats = torch.zeros(B, K, C, dtype=torch.float64)
    for b, rows_b in enumerate(samples):
        feats = feats.index_put((torch.tensor([b]), torch.arange(len(rows_b))), rows_b)
    return feats.to(hidden.dtype), lengths, fires, torch.stack(quantities).to(alpha.dtype)
