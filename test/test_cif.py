"""CIF: the vectorised function against a per-frame loop, the reference's worked examples and edge cases."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cif_loop_reference import cif_loop_reference  # noqa: E402

from speechclip_plus.models.cif import CIF, cif, duration_targets, quantity_loss  # noqa: E402

TOL = 1e-5
aten = torch.ops.aten


def _max_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    assert x.shape == y.shape, (x.shape, y.shape)
    return (x.double() - y.double()).abs().max().item() if x.numel() else 0.0


def _compare(hidden, alpha, pad_mask=None, targets=None, **kw):
    """Run both implementations with gradients and assert values and gradients agree."""
    h1 = hidden.clone().requires_grad_(True)
    a1 = alpha.clone().requires_grad_(True)
    h2 = hidden.clone().requires_grad_(True)
    a2 = alpha.clone().requires_grad_(True)
    out = cif(h1, a1, pad_mask, targets, **kw)
    ref_feats, ref_lengths, ref_fires, ref_quantity = cif_loop_reference(h2, a2, pad_mask, targets, **kw)
    assert out.lengths.tolist() == ref_lengths
    assert _max_diff(out.feats, ref_feats) <= TOL
    assert torch.equal(out.num_fires, ref_fires)
    assert torch.equal(out.fire_mask, ref_fires > 0)
    assert _max_diff(out.quantity, ref_quantity) <= TOL
    K = out.feats.size(1)
    assert torch.equal(out.pad_mask, torch.arange(K)[None] >= out.lengths[:, None])
    assert (out.feats[out.pad_mask] == 0).all()
    g = torch.randn(out.feats.shape, generator=torch.Generator().manual_seed(1))
    (out.feats * g).sum().backward()
    (ref_feats * g).sum().backward()
    for ours, theirs, x in ((h1.grad, h2.grad, hidden), (a1.grad, a2.grad, alpha)):
        # no path from the output to an input leaves .grad unset: that is a zero gradient
        assert _max_diff(torch.zeros_like(x) if ours is None else ours,
                         torch.zeros_like(x) if theirs is None else theirs) <= TOL
    return out


def _random_batch(B, S, C, seed, alpha_scale=0.6):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, C, generator=gen)
    alpha = torch.rand(B, S, generator=gen) * alpha_scale
    valid = torch.randint(1, S + 1, (B,), generator=gen)
    valid[0] = S
    pad_mask = torch.arange(S)[None] >= valid[:, None]
    return hidden, alpha, pad_mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_inference_matches_loop(seed):
    hidden, alpha, pad_mask = _random_batch(5, 40, 6, seed)
    out = _compare(hidden, alpha, pad_mask)
    # inference length follows the weights: floor(sum), +1 where the tail was kept
    base = torch.floor(alpha.masked_fill(pad_mask, 0).double().sum(1)).clamp(1, 75).long()
    assert torch.equal(out.lengths, base + out.extended.long())
    assert torch.equal(out.extended, (out.tail_weight >= 0.5) & (base < 75))


@pytest.mark.parametrize("seed", [0, 1])
def test_random_inference_unbounded_alpha_matches_loop(seed):
    # raw alpha above the threshold: frames firing several times at inference
    hidden, alpha, pad_mask = _random_batch(4, 25, 5, seed, alpha_scale=2.5)
    out = _compare(hidden, alpha, pad_mask)
    assert (out.num_fires > 1).any()


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_training_matches_loop(seed, scale):
    hidden, alpha, pad_mask = _random_batch(5, 40, 6, seed)
    targets = torch.randint(0, 20, (5,), generator=torch.Generator().manual_seed(seed + 10))
    pad_mask[-1] = torch.arange(40) >= 3  # 3 frames for 15 keywords: frames must fire several times
    targets[-1] = 15
    out = _compare(hidden, alpha, pad_mask, targets, scale=scale)
    assert not out.extended.any()
    if scale:  # the number of keywords follows the targets
        assert torch.equal(out.lengths, targets.clamp(1, 75))
        assert (out.num_fires[-1] > 1).any()


def test_weights_match_interval_overlap_and_feats():
    hidden, alpha, pad_mask = _random_batch(3, 30, 4, 7, alpha_scale=1.7)
    out = cif(hidden, alpha, pad_mask, torch.tensor([9, 4, 2]), scale=False)
    a = alpha.masked_fill(pad_mask, 0).double()
    c = a.cumsum(1)
    c_prev = torch.cat([torch.zeros(3, 1, dtype=c.dtype), c[:, :-1]], 1)
    k = torch.arange(out.feats.size(1), dtype=c.dtype)[None, :, None]
    overlap = (torch.minimum(c[:, None], k + 1) - torch.maximum(c_prev[:, None], k)).clamp_min(0)
    overlap = overlap * (~out.pad_mask)[:, :, None]
    assert _max_diff(out.weights, overlap) <= 1e-6
    assert _max_diff(out.feats, out.weights @ hidden) <= 1e-5
    # a non-contiguous hidden (e.g. a transposed encoder output) gives the same keywords
    strided = hidden.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    assert torch.equal(cif(strided, alpha, pad_mask, torch.tensor([9, 4, 2]), scale=False).feats, out.feats)


def test_exact_boundary():
    # cumsum = [.25, 1, 1.5, 2]: frames 1 and 3 end exactly on a boundary -> wholly in the earlier keyword
    h = torch.randn(1, 4, 3)
    alpha = torch.tensor([[0.25, 0.75, 0.5, 0.5]])
    out = _compare(h, alpha)
    assert out.lengths.tolist() == [2]
    assert out.fire_mask.tolist() == [[False, True, False, True]]
    assert torch.allclose(out.feats[0, 0], 0.25 * h[0, 0] + 0.75 * h[0, 1])
    assert torch.allclose(out.feats[0, 1], 0.5 * h[0, 2] + 0.5 * h[0, 3])
    assert out.tail_weight.item() == 0.0


def test_frame_above_threshold_fires_several_times():
    h = torch.randn(1, 3, 4)
    alpha = torch.tensor([[0.3, 2.7, 0.2]])
    for targets, kw in [(None, {}), (torch.tensor([3]), {"scale": False})]:
        out = _compare(h, alpha, None, targets, **kw)
        assert out.lengths.tolist() == [3]
        assert out.num_fires.tolist() == [[0, 3, 0]]
        expected = torch.stack([0.3 * h[0, 0] + 0.7 * h[0, 1], h[0, 1], h[0, 1]])
        assert torch.allclose(out.feats[0], expected, atol=1e-6)
    # the fully covered keywords are beta * h_1: a constant w.r.t. alpha
    a = alpha.clone().requires_grad_(True)
    cif(h, a).feats[0, 1:].sum().backward()
    assert torch.equal(a.grad, torch.zeros_like(a))


def test_worked_example_four_point_four():
    h = torch.randn(1, 4, 5, dtype=torch.float64)
    alpha = torch.tensor([[0.4, 0.4, 0.4, 0.4]], dtype=torch.float64)
    inf = _compare(h, alpha)
    assert inf.lengths.tolist() == [2] and inf.extended.tolist() == [True]
    row0 = 0.4 * h[0, 0] + 0.4 * h[0, 1] + 0.2 * h[0, 2]
    assert torch.allclose(inf.feats[0, 0], row0)
    assert torch.allclose(inf.feats[0, 1], (0.2 * h[0, 2] + 0.4 * h[0, 3]) / 0.6)
    # after the scaling stage: target 3 but only 1.6 of weight -> one keyword, the leftover is not kept
    unscaled = _compare(h, alpha, None, torch.tensor([3]), scale=False)
    assert unscaled.lengths.tolist() == [1] and unscaled.feats.shape == (1, 1, 5)
    assert torch.allclose(unscaled.feats[0, 0], row0)
    # scaled to the target: every frame weighs (3 + eps) / 4
    scaled = _compare(h, alpha, None, torch.tensor([3]))
    assert scaled.lengths.tolist() == [3]
    assert torch.allclose(scaled.alpha, torch.full((1, 4), (3 + 1e-5) / 4))


def test_tail_factor_is_detached():
    h = torch.randn(1, 4, 3)
    a = torch.tensor([[0.4, 0.4, 0.4, 0.4]], requires_grad=True)
    out = cif(h, a)
    out.feats[0, 1].sum().backward()
    # row 1 = (rho_2 h2 + a3 h3) / 0.6 with the 1/0.6 constant: d/da3 = sum(h3) / 0.6
    assert torch.allclose(a.grad[0, 3], h[0, 3].sum() / 0.6, atol=1e-5)
    assert torch.allclose(a.grad[0, 2], h[0, 2].sum() / 0.6, atol=1e-5)  # rho_2 = c_2 - 1


def test_all_zero_weights_give_no_nan():
    h = torch.randn(3, 6, 4)
    alpha = torch.rand(3, 6)
    alpha[1] = 0
    for targets in (torch.tensor([2, 3, 1]), None):
        a = alpha.clone().requires_grad_(True)
        hh = h.clone().requires_grad_(True)
        out = _compare(h, alpha, None, targets)
        out = cif(hh, a, None, targets)
        assert out.lengths[1].item() == 1 and not out.pad_mask[1, 0]
        assert torch.equal(out.feats[1], torch.zeros_like(out.feats[1]))
        out.feats.sum().backward()
        assert torch.isfinite(a.grad).all() and torch.isfinite(hh.grad).all()
    # a whole batch of zeros is no error either
    out = cif(h, torch.zeros(3, 6), None, torch.tensor([2, 3, 1]))
    assert out.lengths.tolist() == [1, 1, 1] and torch.equal(out.feats, torch.zeros(3, 1, 4))


def test_padding_does_not_change_a_sample():
    hidden, alpha, pad_mask = _random_batch(4, 30, 5, 3)
    for targets in (torch.tensor([3, 5, 2, 7]), None):
        out = cif(hidden, alpha, pad_mask, targets)
        for b in range(4):
            n = int((~pad_mask[b]).sum())
            t = None if targets is None else targets[b : b + 1]
            alone = cif(hidden[b : b + 1, :n], alpha[b : b + 1, :n], None, t)
            L = alone.lengths.item()
            assert out.lengths[b].item() == L
            assert _max_diff(out.feats[b, :L], alone.feats[0]) <= 1e-6
            assert torch.equal(out.num_fires[b, :n], alone.num_fires[0])
            assert not out.num_fires[b, n:].any()


def test_batch_one_and_single_frame():
    h = torch.randn(1, 1, 4)
    below = _compare(h, torch.tensor([[0.7]]))  # sum < threshold: one keyword, not normalised
    assert below.lengths.tolist() == [1] and torch.allclose(below.feats[0, 0], 0.7 * h[0, 0])
    above = _compare(h, torch.tensor([[1.6]]))  # one fire + a 0.6 tail kept and normalised
    assert above.lengths.tolist() == [2]
    assert torch.allclose(above.feats[0], torch.stack([h[0, 0], h[0, 0]]), atol=1e-6)
    trained = _compare(h, torch.tensor([[0.2]]), None, torch.tensor([2]))  # scaled to 2 + eps
    assert trained.lengths.tolist() == [2]
    assert torch.allclose(trained.feats[0], torch.stack([h[0, 0], h[0, 0]]), atol=1e-6)


def test_sum_below_threshold():
    h = torch.randn(2, 5, 3)
    alpha = torch.tensor([[0.1, 0.2, 0.1, 0.05, 0.3], [0.2, 0.2, 0.2, 0.2, 0.1]])
    out = _compare(h, alpha)
    assert out.lengths.tolist() == [1, 1] and not out.fire_mask.any()
    assert torch.allclose(out.feats[:, 0], (alpha[..., None] * h).sum(1), atol=1e-6)


def test_cap_at_max_length():
    h = torch.randn(2, 200, 3)
    alpha = torch.full((2, 200), 0.5)  # sum 100 > 75
    alpha[1, 150:] = 0.0  # sum 75 exactly
    inf = _compare(h, alpha)
    assert inf.lengths.tolist() == [75, 75] and not inf.extended.any()
    assert inf.num_fires[0].sum().item() == 75
    assert inf.tail_weight.tolist() == [25.0, 0.0]  # the weight that cannot become a keyword is reported
    train = _compare(h, alpha, None, torch.tensor([90, 80]))
    assert train.lengths.tolist() == [75, 75]
    small = _compare(h[:, :12], alpha[:, :12] * 1.5, max_length=4)  # sum 9 -> capped to 4
    assert small.lengths.tolist() == [4, 4]


def test_long_targets_give_exactly_target_keywords():
    gen = torch.Generator().manual_seed(0)
    B, S = 512, 250
    alpha = torch.sigmoid(torch.randn(B, S, generator=gen) * 2 - 3)
    targets = torch.randint(64, 76, (B,), generator=gen)
    out = cif(torch.zeros(B, S, 1), alpha, None, targets)
    assert torch.equal(out.lengths, targets)
    assert torch.equal(out.num_fires.sum(1), targets)  # every target boundary is crossed (eps kept)


def test_gradients_match_finite_differences():
    # float64, weights away from any boundary: the analytic gradient is the true derivative, including the
    # path through the scaling factor (training) and through the cumsum (both branches)
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(2, 7, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    a = (0.2 + 0.5 * torch.rand(2, 7, dtype=torch.float64, generator=gen)).requires_grad_(True)
    targets = torch.tensor([3, 5])
    assert torch.autograd.gradcheck(lambda x, w: cif(x, w, None, targets).feats, (h, a))
    # no tail extension here (tail weights < 0.5), so nothing is detached
    a_inf = torch.tensor([[0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3], [0.6, 0.5, 0.3, 0.2, 0.1, 0.35, 0.2]],
                         dtype=torch.float64, requires_grad=True)
    assert not cif(h, a_inf).extended.any()
    assert torch.autograd.gradcheck(lambda x, w: cif(x, w).feats, (h, a_inf))
    out = cif(h, a, None, targets)
    assert _max_diff(out.alpha.sum(1), targets + 1e-5) <= 1e-6


def test_invalid_inputs_raise():
    h = torch.randn(2, 5, 3)
    a = torch.rand(2, 5)
    with pytest.raises(ValueError, match="alpha must be"):
        cif(h, a[:, :4])
    with pytest.raises(ValueError, match="alpha must be"):
        cif(h, (a > 0.5).long())
    with pytest.raises(ValueError, match="pad_mask"):
        cif(h, a, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="target_lengths"):
        cif(h, a, None, torch.tensor([1, -1]))
    with pytest.raises(ValueError, match="target_lengths"):
        cif(h, a, None, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=">= 0"):
        cif(h, -a)
    with pytest.raises(ValueError, match=">= 0"):
        cif(h, torch.where(torch.arange(5) == 2, float("-inf"), a))
    cif(h, torch.where(torch.arange(5) == 4, -1.0, a), torch.arange(5).expand(2, 5) == 4)  # pads ignored
    with pytest.raises(ValueError, match="alpha is on meta"):
        cif(h, a.to("meta"))
    with pytest.raises(ValueError, match="hidden"):
        cif(h[0], a)
    with pytest.raises(ValueError, match="hidden"):
        cif(h.long(), a)
    with pytest.raises(ValueError, match="conv_width"):
        CIF(4, conv_width=4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("mode", ["scaled", "unscaled", "inference"])
def test_non_finite_alpha_poisons_its_sample_and_does_not_raise(bad, mode):
    # e.g. a NaN encoder output: the step must be skipped (non-finite loss), not crash one rank
    hidden, alpha, pad_mask = _random_batch(3, 20, 4, 11)
    alpha[1, 3] = bad
    alpha[2, -1] = bad  # sample 2 is padded at the end: a pad may hold anything
    pad_mask[2, -1] = True
    targets = None if mode == "inference" else torch.tensor([4, 3, 2])
    kw = {"scale": mode == "scaled"}
    h = hidden.clone().requires_grad_(True)
    a = alpha.clone().requires_grad_(True)
    out = cif(h, a, pad_mask, targets, **kw)
    assert not torch.isfinite(out.quantity[1]) and torch.isfinite(out.quantity[[0, 2]]).all()
    assert out.lengths[1].item() == 1 and not out.extended[1]
    assert not torch.isfinite(out.feats[1, 0]).all()
    (out.feats.sum() + quantity_loss(out.quantity, torch.tensor([4, 3, 2]))).backward()
    assert not torch.isfinite(h.grad[1]).all()
    # the other samples are exactly what they are without the bad one
    keep = torch.tensor([0, 2])
    clean = cif(hidden[keep], alpha[keep], pad_mask[keep], None if targets is None else targets[keep], **kw)
    assert torch.equal(out.lengths[keep], clean.lengths)
    K = clean.feats.size(1)
    assert _max_diff(out.feats[keep, :K], clean.feats) == 0 and (out.feats[keep, K:] == 0).all()
    assert torch.isfinite(h.grad[keep]).all() and torch.isfinite(a.grad[keep]).all()


def test_module_with_nan_frame_gives_nan_loss_not_an_error():
    torch.manual_seed(0)
    module = CIF(6, dropout=0.0).train()
    hidden = torch.randn(2, 12, 6)
    hidden[0, 5] = float("nan")
    targets = torch.tensor([2, 3])
    out = module(hidden, None, targets)
    loss = out.feats.pow(2).sum() + quantity_loss(out.quantity, targets)
    assert not torch.isfinite(loss)
    loss.backward()  # no exception; the trainer skips a step whose loss is not finite
    assert out.lengths[1].item() == 3 and torch.isfinite(out.feats[1]).all()


class _DeviceValueProbe(TorchDispatchMode):
    """Records the ops that make the host read device values (a GPU synchronisation) and every device seen.

    ``Tensor.tolist`` does not dispatch for CPU tensors, so it is counted by :meth:`count_tolist`.
    """

    READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
             aten.equal.default, aten.is_nonzero.default}

    def __init__(self):
        super().__init__()
        self.reads, self.devices = [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        bool_index = func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) and any(
            x is not None and x.dtype in (torch.bool, torch.uint8) for x in args[1])
        sized_by_data = func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None
        if func in self.READS or bool_index or sized_by_data:
            self.reads.append(str(func))
        out = func(*args, **kwargs)
        self.devices |= {x.device for x in leaves + [y for y in tree_leaves(out) if isinstance(y, torch.Tensor)]}
        return out

    def count_tolist(self, monkeypatch):
        original = torch.Tensor.tolist
        inside = []

        def tolist(t):
            if not inside:  # a torch function mode (torch.device) calls it again from within
                self.reads.append("Tensor.tolist")
            inside.append(True)
            try:
                return original(t)
            finally:
                inside.pop()

        monkeypatch.setattr(torch.Tensor, "tolist", tolist)


@pytest.mark.parametrize("mode", ["training", "inference"])
def test_one_host_read_per_call_and_every_tensor_on_the_input_device(mode, monkeypatch):
    # the output size K must reach the host; nothing else may (input checks, "any extension", "any extra
    # fire" are folded into that one read).  Under torch.device("meta") any tensor created without
    # device= would land on "meta" and show up in the probe's devices (or fail on the read).
    torch.manual_seed(0)
    module = CIF(8, dropout=0.1).train(mode == "training")
    hidden = torch.randn(3, 30, 8, requires_grad=True)
    pad_mask = torch.arange(30)[None] >= torch.tensor([30, 22, 9])[:, None]
    targets = torch.tensor([4, 3, 1]) if mode == "training" else None
    probe = _DeviceValueProbe()
    probe.count_tolist(monkeypatch)
    with torch.device("meta"), probe:
        out = module(hidden, pad_mask, targets, step=0)
        loss = out.feats.pow(2).sum()
        if targets is not None:
            loss = loss + quantity_loss(out.quantity, targets)
        loss.backward()
    assert probe.reads == ["Tensor.tolist"]
    assert probe.devices == {torch.device("cpu")}
    # tail extension and multi-fire frames (the extras) cost no further read
    heavy = torch.tensor([[0.4, 0.4, 0.4, 0.4], [0.3, 2.7, 0.2, 0.0]], requires_grad=True)
    probe.reads.clear()
    with torch.device("meta"), probe:
        out = cif(hidden[:2, :4], heavy, None, None if targets is None else targets[:2], scale=False)
        out.feats.sum().backward()
    assert (out.num_fires > 1).any() and (out.extended.any() or mode == "training")
    assert probe.reads == ["Tensor.tolist"]
    assert probe.devices == {torch.device("cpu")}


def test_module_forward_backward_and_scaling_switch():
    torch.manual_seed(0)
    module = CIF(8, conv_layers=2, conv_width=5, dropout=0.1, scaling_steps=10)
    hidden = torch.randn(3, 30, 8, requires_grad=True)
    pad_mask = torch.arange(30)[None] >= torch.tensor([30, 22, 9])[:, None]
    targets = torch.tensor([4, 3, 1])
    module.train()
    out = module(hidden, pad_mask, targets, step=3)
    assert torch.equal(out.lengths, targets)
    assert (out.alpha[pad_mask] == 0).all()
    loss = out.feats.pow(2).sum() + 0.25 * quantity_loss(out.quantity, targets)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
    assert hidden.grad[pad_mask].abs().sum() == 0  # padded frames feed nothing
    # past the scaling stage the lengths come from the predicted weights
    late = module(hidden, pad_mask, targets, step=10)
    expected = torch.floor(late.quantity.double()).clamp(1, 75).long()
    assert torch.equal(late.lengths, expected)
    assert torch.allclose(late.alpha, late.alpha.masked_fill(pad_mask, 0))
    # eval: no target, alpha in [0, 1] and independent of the batch's padding
    module.eval()
    with torch.no_grad():
        inf = module(hidden, pad_mask)
        alone = module.weights(hidden[2:, :9])
    assert ((inf.alpha >= 0) & (inf.alpha <= 1)).all()
    assert _max_diff(inf.alpha[2, :9], alone[0]) <= 1e-6


def test_duration_targets():
    frames = torch.arange(0, 3000)
    expected = torch.round(frames.double() / 20).clamp(1, 75).long()
    assert torch.equal(duration_targets(frames, 320), expected)
    assert duration_targets(torch.tensor([250, 230, 10, 1]), 320).tolist() == [12, 12, 1, 1]
    assert duration_targets(torch.tensor([100]), 160).tolist() == [2]  # 1 s at 100 Hz, 0.4 s per keyword
    assert duration_targets(torch.tensor([5000]), 320, max_length=30).tolist() == [30]


def test_quantity_loss_gradient():
    q = torch.tensor([3.5, 1.0, 7.0], requires_grad=True)
    t = torch.tensor([3, 2, 7])
    loss = quantity_loss(q, t)
    assert loss.dtype == torch.float32 and abs(loss.item() - 1.5 / 3) < 1e-7
    loss.backward()
    assert torch.allclose(q.grad, torch.tensor([1.0, -1.0, 0.0]) / 3)
