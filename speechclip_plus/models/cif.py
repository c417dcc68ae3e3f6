"""Continuous Integrate-and-Fire (CIF): frame sequence -> a variable number of keyword vectors.

Per sample, frame weights ``alpha_s >= 0`` are integrated over time; every time the running sum crosses a
multiple of the threshold ``beta`` a keyword "fires".  Keyword ``k`` is the weighted sum of the frames whose
weight falls into the interval ``[k beta, (k + 1) beta)`` of the cumulative sum (a frame straddling a boundary
is split between its two keywords; a frame whose weight spans several intervals fires several times).

The implementation never runs a Python loop over time or batch.  The keywords are ``feats = W @ hidden`` for an
integration matrix ``W`` (B, K, S) that has at most two nonzeros per frame (plus one per extra fire of a frame
heavier than the threshold); all bookkeeping happens on (B, S) tensors, and the contraction is a weighted
segment sum over those nonzeros (``embedding_bag``) that reads ``hidden`` once, whatever K is.  Everything is
computed on the input's device with a single host synchronisation (the output size K).
The semantics follow the SpeechCLIP+ reference (``CIF`` in ``avssl/module/cif.py`` of
ShampooWang/SpeechCLIP_plus: length rule, 75-keyword cap, inference tail rule, scaling to the target count)
except for its defects, which are listed in :func:`cif`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["CIF", "CIFOutput", "cif", "duration_targets", "quantity_loss"]


@dataclass
class CIFOutput:
    """Result of :func:`cif`. K = ``feats.size(1)`` = max keyword count in the batch."""

    feats: torch.Tensor  # (B, K, C) integrated keyword vectors; rows >= lengths[b] are exactly zero
    lengths: torch.Tensor  # (B,) long, keyword count K_b in [1, max_length]
    pad_mask: torch.Tensor  # (B, K) bool, True = padding (row >= lengths[b])
    alpha: torch.Tensor  # (B, S) float32, weights actually integrated (pads zeroed, scaled if scaling applied)
    quantity: torch.Tensor  # (B,) float32, sum of the *unscaled* alpha over valid frames (for the quantity loss)
    fire_mask: torch.Tensor  # (B, S) bool, True where source frame s crosses a threshold multiple (for plots)
    num_fires: torch.Tensor  # (B, S) long, threshold multiples frame s crosses (none past max_length)
    tail_weight: torch.Tensor  # (B,) float32, detached: weight past the integer length (before extension),
    #                            dropped unless ``extended``; for a sample capped at max_length all the excess
    extended: torch.Tensor  # (B,) bool, True where the tail became an extra keyword (inference only)
    entries: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(repr=False)  # (frame, row, value)

    @property
    def weights(self) -> torch.Tensor:
        """(B, K, S) integration matrix actually used, ``feats = weights @ hidden``; built on request.

        ``entries`` holds its nonzeros as flat indices: ``frame = b * S + s``, ``row = b * K + k``.
        """
        B, K, _ = self.feats.shape
        S = self.fire_mask.size(1)
        frame, row, value = (torch.cat(x) for x in zip(*self.entries))
        dense = torch.zeros(B * K * S, dtype=value.dtype, device=value.device)
        dense.index_add_(0, row * S + frame % S, value.detach())
        return dense.view(B, K, S).float()


class _Integrate(torch.autograd.Function):
    """``feats[b, k] = sum_e value_e * hidden[b, s_e]`` over the entries e of row (b, k) of ``W``.

    The entries are given as flat indices ``frame_e = b * S + s_e`` and ``row_e = b * K + k``, both
    nondecreasing in e.  All three products are fused kernels over the entries that read each table once,
    whatever K is (a dense ``W @ hidden`` costs 2 K multiply-adds per input element): the forward and
    ``grad_hidden`` are weighted segment sums (``embedding_bag``), ``grad_value_e = grad[row_e] .
    hidden[frame_e]`` is the kernel ``embedding_bag`` itself uses for the gradient of its per-sample weights.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, value: torch.Tensor, frame: torch.Tensor, row: torch.Tensor,
                K: int) -> torch.Tensor:  # noqa: D102
        B, S, C = hidden.shape
        table = hidden.reshape(B * S, C)
        by_row = torch.searchsorted(row, torch.arange(B * K, device=row.device))
        # detached: inside forward autograd is off anyway, and so embedding_bag skips its backward bookkeeping
        feats = F.embedding_bag(frame, table.detach(), by_row, mode="sum", per_sample_weights=value.detach())
        ctx.save_for_backward(table, value, frame, row, by_row)
        ctx.shape = (B, S, C, K)
        return feats.view(B, K, C)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        table, value, frame, row, by_row = ctx.saved_tensors
        B, S, C, K = ctx.shape
        grad = grad.reshape(B * K, C).contiguous()
        grad_hidden = grad_value = None
        if ctx.needs_input_grad[0]:
            by_frame = torch.searchsorted(frame, torch.arange(B * S, device=frame.device))
            grad_hidden = F.embedding_bag(row, grad, by_frame, mode="sum", per_sample_weights=value.detach())
            grad_hidden = grad_hidden.view(B, S, C)
        if ctx.needs_input_grad[1]:  # mode 0 = sum; padding index -1 = none; an entry's bag is its row
            grad_value = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad, table, frame, by_row, row, 0, -1
            )
        return grad_hidden, grad_value, None, None, None


def _check_inputs(
    hidden: torch.Tensor,
    alpha: torch.Tensor,
    pad_mask: Optional[torch.Tensor],
    target_lengths: Optional[torch.Tensor],
    threshold: float,
    max_length: int,
    tail_threshold: float,
) -> None:
    """Shape, dtype, device and option checks: they read no tensor values, so they never synchronise."""
    where = "speechclip_plus/models/cif.py: cif()"
    if hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(f"{where}: hidden must be a float (B, S, C) tensor, got {hidden.dtype} {tuple(hidden.shape)}")
    B, S, _ = hidden.shape
    if B < 1 or S < 1:
        raise ValueError(f"{where}: hidden needs B >= 1 and S >= 1, got shape {tuple(hidden.shape)}")
    if tuple(alpha.shape) != (B, S) or not alpha.is_floating_point():
        raise ValueError(
            f"{where}: alpha must be a float (B, S) = {(B, S)} tensor, got {alpha.dtype} {tuple(alpha.shape)}"
        )
    if pad_mask is not None and (tuple(pad_mask.shape) != (B, S) or pad_mask.dtype != torch.bool):
        raise ValueError(
            f"{where}: pad_mask must be a bool (B, S) = {(B, S)} tensor, "
            f"got {pad_mask.dtype} {tuple(pad_mask.shape)}"
        )
    if target_lengths is not None and tuple(target_lengths.shape) != (B,):
        raise ValueError(f"{where}: target_lengths must be (B,) = ({B},), got {tuple(target_lengths.shape)}")
    for name, t in (("alpha", alpha), ("pad_mask", pad_mask), ("target_lengths", target_lengths)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{where}: {name} is on {t.device}, hidden on {hidden.device}")
    if not threshold > 0:
        raise ValueError(f"{where}: threshold must be > 0, got {threshold}")
    if max_length < 1:
        raise ValueError(f"{where}: max_length must be >= 1, got {max_length}")
    if not tail_threshold > 0:
        raise ValueError(f"{where}: tail_threshold must be > 0, got {tail_threshold}")


def cif(
    hidden: torch.Tensor,
    alpha: torch.Tensor,
    pad_mask: Optional[torch.Tensor] = None,
    target_lengths: Optional[torch.Tensor] = None,
    *,
    threshold: float = 1.0,
    max_length: int = 75,
    tail_threshold: float = 0.5,
    scale: bool = True,
    eps: float = 1e-5,
) -> CIFOutput:
    r"""Integrate ``hidden`` (B, S, C) with weights ``alpha`` (B, S) into (B, K, C) keyword vectors.

    ``pad_mask`` (B, S) is True on padded frames; ``target_lengths`` (B,) given = training branch,
    None = inference branch.  With beta = ``threshold``:

    1. ``a = alpha`` with pads set to 0; ``quantity = sum_s a_s`` (unscaled, differentiable).
       Training with ``scale``: ``a *= (beta * target + eps) / quantity`` (gradient flows through quantity).
    2. ``L = clamp(floor(sum_s a_s / beta), 1, max_length)``.
    3. ``c = cumsum(a)``; ``r_s = clamp(floor(c_s / beta), 0, max_length)`` (row where frame s ends),
       ``l_s = r_{s-1}`` (``l_0 = 0``, row where it starts), ``n_s = r_s - l_s`` fires, ``e_s = max(n_s - 1, 0)``.
    4. Right part ``rho_s = c_s - r_s beta`` if ``n_s > 0`` else 0; left part ``lam_s = a_s - rho_s - e_s beta``.
       ``W[r_s, s] += rho_s``, ``W[l_s, s] += lam_s``, ``W[k, s] += beta`` for ``l_s < k < r_s`` (constant,
       no gradient to alpha).  Equivalently ``W[k, s] = |[c_{s-1}, c_s) \cap [k beta, (k+1) beta)|``, except
       that row ``max_length`` collects all weight past ``max_length * beta``.  A frame ending exactly on a
       boundary ``k beta`` belongs wholly to row k - 1 and counts as a fire.
    5. Training: keep rows ``< L_b``.  Inference: tail ``tau = sum_s rho_s [r_s = L] + lam_s [l_s = L]``; if
       ``tau >= tail_threshold`` and ``L < max_length``, row L is multiplied by ``beta / tau`` (factor detached)
       and ``L += 1``; then keep rows ``< L_b``.  Rows past a sample's length are zeroed in both branches.
       Both are detached factors on the nonzeros of ``W``.
    6. ``feats = W @ hidden``, computed from the nonzeros of ``W`` only; ``pad_mask = arange(K) >= L``.

    Cost and synchronisation: all bookkeeping is on (B, S) tensors and ``W`` is never built (``weights`` builds
    it on request).  The forward reads ``hidden`` once; the backward reads it once more (the gradient of each
    nonzero ``W[k, s]`` is ``grad[k] . hidden[s]``) and writes ``grad_hidden`` once: the memory traffic any CIF
    needs.  Every tensor is created on
    ``hidden``'s device and the host reads device values exactly once, a small vector holding K (the output
    size), the number of extra fires, and the two value checks below.

    Bad input: wrong shapes, dtypes or devices raise ``ValueError`` before any work.  A negative ``alpha`` on a
    valid frame or a negative ``target_lengths`` raises ``ValueError`` too (read in the one synchronisation,
    so the check costs nothing extra; neither can come from :class:`CIF`, whose weights are a sigmoid).
    A non-finite ``alpha`` (NaN or +inf on a valid frame, e.g. from a NaN encoder output) does not raise: that
    sample's ``quantity`` is non-finite, it gets one keyword (``lengths = 1``, no tail extension) whose vector
    is non-finite, as is the gradient reaching ``hidden`` through it; a loss built on it is non-finite, so
    the trainer skips the step (on every rank).  The other samples of the batch are unaffected.  Pads may
    hold anything.

    Deviations from the reference, all intended behaviour:

    - Rows >= L_b are zero in training too (the reference leaves the eps leak, or after the scaling stage
      the real leftover, in them); downstream code must still use ``pad_mask``/``lengths``.
    - An all-zero sample is not scaled (the reference produces NaN): L = 1 and a zero row, no NaN gradient.
    - The (B, S) bookkeeping (quantity, scaling, sums, cumsum, rho, lam) is done in float64, so the scaled sum
      is ``beta * target + eps`` to ~1e-13 and ``floor`` gives exactly ``target`` for every target (the
      reference's float32 cumsum loses the 1e-5 eps for targets >= 64), and ``rho = c - r beta`` keeps full
      float32 precision however long the sequence.  ``W`` has ``hidden``'s dtype.
    - Backward works after a tail extension (the reference's ``fired_marks`` update breaks autograd);
      ``fire_mask`` is simply ``n_s > 0``.
    - Weight past ``max_length * beta`` cannot become a keyword (the text encoder has 77 positions: SOT +
      75 + EOT).  It is dropped, and a sample at ``max_length`` is never extended; ``tail_weight`` reports it.
    - Indices are clipped at ``max_length``, not at the batch's longest length, so a sample's result never
      depends on the other samples of its batch.
    """
    _check_inputs(hidden, alpha, pad_mask, target_lengths, threshold, max_length, tail_threshold)
    B, S, _ = hidden.shape
    beta = float(threshold)
    device = hidden.device
    training = target_lengths is not None

    # Alpha preparation (float64 bookkeeping on (B, S) only).
    a = alpha.to(torch.float64)
    if pad_mask is not None:
        a = a.masked_fill(pad_mask, 0.0)
    quantity = a.sum(1)
    negative_alpha = (a < 0).any()  # read with the one synchronisation below
    if training and scale:
        desired = beta * target_lengths.to(torch.float64) + eps
        nonzero = quantity > 0
        factor = torch.where(nonzero, desired / torch.where(nonzero, quantity, torch.ones_like(quantity)), 1.0)
        a = a * factor.unsqueeze(1)
    c = a.cumsum(1)

    # Lengths and piecewise-constant indices; a non-finite sample is booked as all-zero weights.  Masks below
    # multiply (a full-size torch.where is several times slower); a non-finite operand only occurs in a sample
    # that is non-finite anyway.
    with torch.no_grad():
        total = a.sum(1)
        finite = torch.isfinite(total)
        lengths = torch.floor(torch.where(finite, total, 0.0) / beta).clamp(1, max_length).long()
        r_f = torch.floor(torch.where(finite.unsqueeze(1), c, 0.0) / beta).clamp(0, max_length)
        l_f = F.pad(r_f[:, :-1], (1, 0))
        e_f = (r_f - l_f - 1).clamp_min(0)
        r, l = r_f.long(), l_f.long()
        n = r - l

    # Split weights (differentiable).
    rho = (c - r_f * beta) * (n > 0)
    lam = a - rho - e_f * beta

    # Tail rule and output lengths, still on (B, S); then the one host read.
    with torch.no_grad():
        tail = (rho * (r == lengths.unsqueeze(1))).sum(1) + (lam * (l == lengths.unsqueeze(1))).sum(1)
        if training:
            extended = torch.zeros_like(finite)
        else:
            extended = (tail >= tail_threshold) & (lengths < max_length)
        out_lengths = lengths + extended.long()
        checks = [out_lengths.max(), e_f.sum(), negative_alpha]
        if training:
            checks.append((target_lengths < 0).any())
        K, n_extras, bad_alpha, *bad_target = torch.stack([x.long() for x in checks]).tolist()
    if any(bad_target):
        raise ValueError("speechclip_plus/models/cif.py: cif(): target_lengths must be >= 0")
    if bad_alpha:
        raise ValueError("speechclip_plus/models/cif.py: cif(): alpha must be >= 0 on valid frames")

    # Detached factor of each row k <= max_length: 0 past the sample's length, beta / tau on an extended
    # sample's row L, else 1.
    with torch.no_grad():
        k = torch.arange(max_length + 1, device=device)
        tail_scale = torch.where(extended, beta / torch.where(extended, tail, 1.0), 1.0).unsqueeze(1)
        row_factor = torch.where(k == lengths.unsqueeze(1), tail_scale, 1.0) * (k < out_lengths.unsqueeze(1))

    # The nonzeros of W, in frame order (which is also row order): each frame's left part at row l and right
    # part at row r; rows past K - 1 are clipped to it, their factor is 0.
    sample = torch.arange(B, device=device).unsqueeze(1)
    frame = torch.arange(B * S, device=device).repeat_interleave(2)
    with torch.no_grad():
        rows = torch.stack([l, r], 2).view(B, 2 * S)
        factor = row_factor.gather(1, rows)
        row = (rows.clamp(max=K - 1) + sample * K).flatten()
    value = (torch.stack([lam, rho], 2).view(B, 2 * S) * factor).to(hidden.dtype).flatten()
    entries = [(frame, row, value)]
    if n_extras:  # frames heavier than beta: a constant beta on every row they cover entirely
        with torch.no_grad():
            per_frame = e_f.long().flatten()
            x_frame = torch.repeat_interleave(torch.arange(B * S, device=device), per_frame, output_size=n_extras)
            first = (per_frame.cumsum(0) - per_frame)[x_frame]
            x_rows = l.flatten()[x_frame] + 1 + torch.arange(n_extras, device=device) - first
            x_sample = torch.div(x_frame, S, rounding_mode="floor")
            x_value = (beta * row_factor[x_sample, x_rows]).to(hidden.dtype)
            entries.append((x_frame, x_rows.clamp(max=K - 1) + x_sample * K, x_value))

    # Contract: one weighted segment sum per list of entries (the extras, if any, are a second one).
    parts = [_Integrate.apply(hidden, v, f, rw, K) for f, rw, v in entries]
    feats = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    pad_out = torch.arange(K, device=device).unsqueeze(0) >= out_lengths.unsqueeze(1)
    return CIFOutput(
        feats=feats,
        lengths=out_lengths,
        pad_mask=pad_out,
        alpha=a.float(),
        quantity=quantity.float(),
        fire_mask=n > 0,
        num_fires=n,
        tail_weight=tail.float(),
        extended=extended,
        entries=entries,
    )


class CIF(nn.Module):
    """Weight predictor + :func:`cif`.

    ``alpha = Sigmoid(Linear(Dropout(Conv block x conv_layers)(hidden)))`` with Conv block =
    Conv1d(dim, dim, conv_width, padding=conv_width // 2) -> Dropout(dropout) -> ReLU; alpha is 0 on pads.
    Padded frames are zeroed before each convolution so a sample's weights do not depend on how much
    padding the batch adds (the reference convolves over whatever the padded positions hold).
    In training (``target_lengths`` given) alpha is scaled to the targets iff ``step`` is None or
    ``step < scaling_steps``; the reference's default dropout is 0.5.
    """

    def __init__(
        self,
        dim: int,
        threshold: float = 1.0,
        max_length: int = 75,
        conv_width: int = 3,
        conv_layers: int = 1,
        dropout: float = 0.5,
        scaling_steps: int = 5000,
        tail_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        if conv_width < 1 or conv_width % 2 == 0:
            raise ValueError(f"speechclip_plus/models/cif.py: CIF conv_width must be odd, got {conv_width}")
        if conv_layers < 0:
            raise ValueError(f"speechclip_plus/models/cif.py: CIF conv_layers must be >= 0, got {conv_layers}")
        self.threshold = threshold
        self.max_length = max_length
        self.scaling_steps = scaling_steps
        self.tail_threshold = tail_threshold
        self.convs = nn.ModuleList(
            nn.Conv1d(dim, dim, conv_width, padding=conv_width // 2) for _ in range(conv_layers)
        )
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, 1)

    def weights(self, hidden: torch.Tensor, pad_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """alpha (B, S) in [0, 1], float32, 0 on padded frames."""
        keep = None if pad_mask is None else (~pad_mask).unsqueeze(1).to(hidden.dtype)  # (B, 1, S)
        x = hidden.transpose(1, 2)
        for conv in self.convs:
            if keep is not None:
                x = x * keep
            x = torch.relu(self.dropout(conv(x)))
        alpha = torch.sigmoid(self.proj(self.dropout(x.transpose(1, 2))).squeeze(-1)).float()
        if pad_mask is not None:
            alpha = alpha.masked_fill(pad_mask, 0.0)
        return alpha

    def forward(
        self,
        hidden: torch.Tensor,
        pad_mask: Optional[torch.Tensor] = None,
        target_lengths: Optional[torch.Tensor] = None,
        step: Optional[int] = None,
    ) -> CIFOutput:
        """hidden (B, S, C), pad_mask (B, S) True = pad, target_lengths (B,) or None (inference)."""
        alpha = self.weights(hidden, pad_mask)
        scale = target_lengths is not None and (step is None or step < self.scaling_steps)
        return cif(
            hidden,
            alpha,
            pad_mask,
            target_lengths,
            threshold=self.threshold,
            max_length=self.max_length,
            tail_threshold=self.tail_threshold,
            scale=scale,
        )


def quantity_loss(quantity: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """L_QUA = mean_b |quantity_b - target_b|, in float32."""
    if quantity.shape != target_lengths.shape:
        raise ValueError(
            "speechclip_plus/models/cif.py: quantity_loss: quantity and target_lengths shapes differ: "
            f"{tuple(quantity.shape)} vs {tuple(target_lengths.shape)}"
        )
    return (quantity.float() - target_lengths.float()).abs().mean()


def duration_targets(
    feat_lens: torch.Tensor,
    downsample_rate: int,
    sample_rate: int = 16000,
    seconds_per_keyword: float = 0.4,
    max_length: int = 75,
) -> torch.Tensor:
    """Keyword targets from duration: ``clamp(round(frames * rate / (sr * sec_per_kw)), 1, max_length)``.

    ``torch.round`` rounds half to even, so with HuBERT's rate 320 this is the reference's
    ``round(frames / 20)`` (250 frames -> 12).  Returns long (B,).
    """
    if downsample_rate <= 0 or sample_rate <= 0 or seconds_per_keyword <= 0:
        raise ValueError(
            "speechclip_plus/models/cif.py: duration_targets: downsample_rate, sample_rate and "
            f"seconds_per_keyword must be > 0, got {downsample_rate}, {sample_rate}, {seconds_per_keyword}"
        )
    # a tensor stays on its device (torch.as_tensor would move it to the default device)
    frames = feat_lens.to(torch.float64) if torch.is_tensor(feat_lens) else torch.tensor(feat_lens, dtype=torch.float64)
    samples_per_keyword = float(sample_rate) * float(seconds_per_keyword)
    return torch.round(frames * float(downsample_rate) / samples_per_keyword).clamp(1, max_length).long()
