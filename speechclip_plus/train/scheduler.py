"""Learning-rate schedule: linear warm-up, then linear decay, step for step as the SpeechCLIP(+) reference
(``linear_warmup_decay`` in ``avssl/optim/scheduler.py`` of atosystem/SpeechCLIP, used by every config).

With base rate lr, W = warmup_steps, S = max_steps, f = final_lr and s the number of optimiser steps taken
(``LambdaLR`` is stepped once per optimiser step, so optimiser step s, counted from 0, uses lr(s)):
  lr(s) = lr * (s + 1) / W                                            for s < W  (warm-up; lr at step W - 1)
  lr(s) = lr + (f - lr) * min(1, (s + 1 - W) / max(1, S - W))        for s >= W (the last step, S - 1, uses f)
With W = 0 the warm-up is skipped. Every parameter group is scaled by the same factor lr(s) / lr.
"""
from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_decay_factor(step: int, warmup_steps: int, max_steps: int, lr: float, final_lr: float) -> float:
    """lr(step) / lr for the schedule in the module docstring."""
    if lr <= 0:
        raise ValueError(f"train.lr must be > 0, got {lr}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step + 1 - warmup_steps) / span)
    return (lr + (final_lr - lr) * progress) / lr


def build_scheduler(optimizer: Optimizer, warmup_steps: int, max_steps: int, final_lr: float) -> LambdaLR:
    """``LambdaLR`` over ``optimizer`` (its groups' current ``lr`` is the base rate)."""
    if warmup_steps < 0 or max_steps <= 0:
        raise ValueError(f"bad schedule: warmup_steps={warmup_steps}, max_steps={max_steps}")
    if final_lr < 0:
        raise ValueError(f"train.final_lr must be >= 0, got {final_lr}")
    lambdas = [
        (lambda s, lr=g["lr"]: warmup_decay_factor(s, warmup_steps, max_steps, lr, final_lr))
        for g in optimizer.param_groups
    ]
    return LambdaLR(optimizer, lambdas)
