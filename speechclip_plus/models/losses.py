"""Contrastive loss between speech and image embeddings (the reference's ``MaskedContrastiveLoss``), distributed-aware.

With logit scale s = min(exp(t), s_max) (t learnable, initialised to ln(1/T0)) and l_ij = s <a_i, b_j>,
pairs (i, j) with the same image id and i != j are removed from the softmax denominators (other captions of
the same image are not negatives):
  L_a2b = mean_i [ -l_ii + logsumexp_{j: j=i or id_j != id_i} l_ij ],  L_b2a likewise over columns,
  L = (L_a2b + L_b2a) / 2.
Computed in float32 with autocast off (logits in fp16 would lose the margin between near neighbours).
Differences from the reference: the scale is clamped and log-sum-exp is max-subtracted (stable).
Under torch.distributed with several ranks, embeddings and ids are all-gathered (with gradient) first, so
every rank scores its utterances against the whole global batch; the loss then equals the single-process
loss on that batch, and DDP's gradient averaging yields the single-process gradient.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Concatenate each tensor over ranks (rank order); gradients flow back to the local slice."""
    if world_size() == 1:
        return tensors
    from torch.distributed.nn.functional import all_gather

    return tuple(torch.cat(all_gather(t.contiguous()), 0) for t in tensors)


class MaskedContrastiveLoss(nn.Module):
    def __init__(self, temperature: float = 0.07, learnable: bool = True, max_logit_scale: float = 100.0):
        super().__init__()
        init = torch.tensor(math.log(1.0 / temperature))
        if learnable:
            self.log_scale = nn.Parameter(init)
        else:
            self.register_buffer("log_scale", init)
        self.max_logit_scale = max_logit_scale

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_logit_scale)

    def forward(self, a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """a, b: (N, D) L2-normalised; ids: (N,) image ids. Returns the scalar loss (float32)."""
        with torch.autocast(a.device.type, enabled=False):
            a, b, ids = gather_with_grad(a.float(), b.float(), ids)
            logits = self.logit_scale.float() * a @ b.t()
            same = ids[:, None] == ids[None, :]
            eye = torch.eye(len(ids), dtype=torch.bool, device=a.device)
            logits = logits.masked_fill(same & ~eye, float("-inf"))
            pos = logits.diagonal()
            loss_a2b = (torch.logsumexp(logits, 1) - pos).mean()
            loss_b2a = (torch.logsumexp(logits, 0) - pos).mean()
            return (loss_a2b + loss_b2a) / 2
