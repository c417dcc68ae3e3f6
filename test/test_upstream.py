"""Upstream: s3prl loading (fbank, tiny HuBERT via hubert_local), lengths, padding, freezing, weighted sum."""

import pytest
import torch
import torch.nn.functional as F

from speechclip_plus.models.upstream import Upstream


def waves(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths)
    wav = torch.randn(len(lengths), max(lengths), generator=g) * 0.1
    return wav * (torch.arange(wav.shape[1])[None] < lens[:, None]), lens


@pytest.fixture(scope="module")
def hubert(tiny_hubert_ckpt):
    return Upstream("hubert_local", ckpt=tiny_hubert_ckpt)


@pytest.fixture(scope="module")
def fbank():
    return Upstream("fbank")


def test_fbank(fbank):
    assert (fbank.num_layers, fbank.hidden_dim, fbank.downsample_rate) == (1, 240, 160)
    wav, lens = waves([16000, 9000, 12345])
    states, feat_lens = fbank.hidden_states(wav, lens)
    assert len(states) == 1 and states[0].shape[0] == 3 and states[0].shape[2] == 240
    # exactly the frames of each utterance alone: a 25 ms window every 10 ms, (n - 400) // 160 + 1
    assert feat_lens.tolist() == [(n - 400) // 160 + 1 for n in lens.tolist()]
    assert feat_lens.max() == states[0].shape[1]
    feats, feat_lens2 = fbank(wav, lens)
    assert feats.shape == states[0].shape and torch.equal(feat_lens, feat_lens2)


def test_tiny_hubert_layers_and_rate(hubert):
    # hidden states = conv/pos-conv output + one per transformer layer; HuBERT's 320x conv stack
    assert (hubert.num_layers, hubert.hidden_dim, hubert.downsample_rate) == (3, 32, 320)
    lengths = [16000, 8000, 12345, 700]
    wav, lens = waves(lengths)
    states, feat_lens = hubert.hidden_states(wav, lens)
    assert len(states) == 3 and all(h.shape == (4, 49, 32) for h in states)  # floor((16000-400)/320)+1
    # a 400-sample receptive field every 320 samples; the 700-sample utterance makes 1 frame
    assert feat_lens.tolist() == [49, 24, 38, 1]
    assert feat_lens.min() >= 1
    for h in states:  # frames at and past feat_lens are zero
        pad = torch.arange(h.shape[1])[None] >= feat_lens[:, None]
        assert h[pad].abs().sum() == 0 and h[~pad].abs().sum() > 0


@pytest.mark.parametrize("which", ["hubert", "fbank"])
def test_padding_invariance_per_utterance(which, request):
    up = request.getfixturevalue(which)
    up.per_utterance = True
    try:
        wav, lens = waves([8000, 16000, 11111], seed=3)
        batch, blens = up.hidden_states(wav, lens)
        for b in range(3):
            alone, alens = up.hidden_states(wav[b : b + 1, : lens[b]], lens[b : b + 1])
            assert blens[b] == alens[0]
            n = int(alens[0])
            for hb, ha in zip(batch, alone):
                assert torch.allclose(hb[b, :n], ha[0, :n], atol=1e-5)
                assert hb[b, n:].abs().sum() == 0
        # the frames of each utterance run alone: floor((L - 400) / hop) + 1 (400-sample window)
        assert blens.tolist() == [(n - 400) // up.downsample_rate + 1 for n in lens.tolist()]
    finally:
        up.per_utterance = False


@pytest.mark.parametrize("which", ["hubert", "fbank"])
def test_frame_counts_are_what_the_upstream_makes_alone(which, request):
    up = request.getfixturevalue(which)
    lengths = [401, 719, 720, 721, 3333, 9000, 16001, 24000]
    alone = [up._run([torch.randn(n) * 0.1])[0].shape[1] for n in lengths]
    assert up.frame_counts(lengths) == alone
    assert up._receptive == 400  # fitted, not measured per length


def test_frame_counts_of_an_upstream_outside_the_formula_are_measured(fbank):
    fbank._receptive, fbank._formula_checked = None, True  # as if the formula had failed its check
    try:
        assert fbank.frame_counts([5000, 7777]) == [(5000 - 400) // 160 + 1, (7777 - 400) // 160 + 1]
        assert {5000, 7777} <= set(fbank._frames_cache)
    finally:
        fbank._formula_checked = False


def test_batched_filterbanks_equal_each_utterance_alone(fbank):
    """fbank is batch-invariant: with exact frame counts nothing of the padding counts as a frame."""
    assert fbank.batch_invariant and fbank.per_utterance is False
    wav, lens = waves([6000, 16000, 11111], seed=9)
    batch, blens = fbank(wav, lens)
    for b in range(3):
        alone, alens = fbank(wav[b : b + 1, : lens[b]], lens[b : b + 1])
        assert blens[b] == alens[0] == alone.shape[1]
        assert torch.allclose(batch[b, : alens[0]], alone[0], atol=1e-5)
        assert batch[b, alens[0]:].abs().sum() == 0


def test_hubert_is_not_batch_invariant_so_auto_runs_it_alone(hubert):
    assert hubert.batch_invariant is False  # GroupNorm and positional conv see the padding
    hubert.per_utterance = "auto"
    try:
        assert hubert.runs_per_utterance()
        wav, lens = waves([7000, 16000], seed=10)
        batch, _ = hubert.hidden_states(wav, lens)
        alone, alens = hubert.hidden_states(wav[:1, :7000], lens[:1])
        assert all(torch.allclose(b[0, : alens[0]], a[0], atol=1e-5) for b, a in zip(batch, alone))
    finally:
        hubert.per_utterance = False


@pytest.mark.parametrize("pre_ln", [True, False])
def test_raw_last_layer(tmp_path, pre_ln):
    """The reference's last state is the last layer's raw output; s3prl's passes a pre-LN encoder's final LN."""
    from speechclip_plus.models.tiny import save_tiny_hubert

    ckpt = save_tiny_hubert(tmp_path / "h.pt", extractor_mode="layer_norm" if pre_ln else "default")
    s3prl_states = Upstream("hubert_local", ckpt=ckpt)
    raw = Upstream("hubert_local", ckpt=ckpt, raw_last_layer=True)
    wav, lens = waves([9000, 16000], seed=11)
    a, la = s3prl_states.hidden_states(wav, lens)
    b, lb = raw.hidden_states(wav, lens)
    assert torch.equal(la, lb) and len(a) == len(b)
    assert all(torch.equal(x, y) for x, y in zip(a[:-1], b[:-1]))
    encoder = raw.upstream.model.encoder
    if pre_ln:
        assert not torch.allclose(a[-1], b[-1], atol=1e-3)
        pad = torch.arange(a[-1].shape[1])[None] >= la[:, None]
        ln = encoder.layer_norm(b[-1]).masked_fill(pad[..., None], 0.0)
        assert torch.allclose(ln, a[-1], atol=1e-5)  # s3prl's state = final LayerNorm of the raw output
    else:
        assert torch.allclose(a[-1], b[-1], atol=1e-6)  # post-LN: no final LayerNorm, the same state
    with pytest.raises(ValueError, match="raw_last_layer"):
        Upstream("fbank", raw_last_layer=True)


def test_padded_batch_keeps_utterances_apart(hubert, fbank):
    # one padded call: equal-length utterances do not mix; fbank (per-frame features) is padding-invariant
    wav, lens = waves([9600, 9600], seed=4)
    both, _ = hubert.hidden_states(wav, lens)
    first, _ = hubert.hidden_states(wav[:1], lens[:1])
    assert all(torch.allclose(a[0], b[0], atol=1e-5) for a, b in zip(both, first))
    wav, lens = waves([8000, 16000], seed=5)
    batch, _ = fbank.hidden_states(wav, lens)
    alone, alens = fbank.hidden_states(wav[:1, :8000], lens[:1])
    assert torch.allclose(batch[0][0, : alens[0]], alone[0][0, : alens[0]], atol=1e-5)


def test_frozen_upstream_only_layer_weights_train(hubert):
    assert [n for n, p in hubert.named_parameters() if p.requires_grad] == ["layer_weights"]
    assert torch.equal(hubert.layer_weights.detach(), torch.zeros(3))
    before = {n: p.detach().clone() for n, p in hubert.upstream.named_parameters()}
    weights_before = hubert.layer_weights.detach().clone()
    hubert.train()
    assert hubert.training and not any(m.training for m in hubert.upstream.modules())
    wav, lens = waves([12000, 16000], seed=6)
    opt = torch.optim.SGD(hubert.parameters(), lr=1.0)
    feats, _ = hubert(wav, lens)
    again, _ = hubert(wav, lens)
    assert torch.equal(feats, again)  # no dropout although the module is in train mode
    (feats * torch.randn_like(feats)).sum().backward()
    assert hubert.layer_weights.grad is not None and hubert.layer_weights.grad.abs().sum() > 0
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in hubert.upstream.named_parameters())
    assert not torch.equal(hubert.layer_weights.detach(), weights_before)
    with torch.no_grad():
        hubert.layer_weights.zero_()
    hubert.eval()


def test_weighted_sum_formula(hubert):
    wav, lens = waves([10000, 7000], seed=7)
    states, _ = hubert.hidden_states(wav, lens)
    try:
        with torch.no_grad():
            hubert.layer_weights.copy_(torch.tensor([0.5, -1.0, 2.0]))
        w = torch.softmax(torch.tensor([0.5, -1.0, 2.0]), 0)
        assert torch.allclose(hubert.weighted_sum(states), sum(wi * h for wi, h in zip(w, states)), atol=1e-6)
        hubert.normalize_hiddenstates = True
        normed = [F.layer_norm(h, (h.shape[-1],)) for h in states]
        assert torch.allclose(hubert.weighted_sum(states), sum(wi * h for wi, h in zip(w, normed)), atol=1e-5)
        with pytest.raises(ValueError, match="expected 3 hidden states"):
            hubert.weighted_sum(states[:2])
    finally:
        hubert.normalize_hiddenstates = False
        with torch.no_grad():
            hubert.layer_weights.zero_()


def test_normalize_waveform_scale_invariance(hubert):
    wav, lens = waves([9000, 14000], seed=8)
    wav = wav + 0.05 * (torch.arange(wav.shape[1])[None] < lens[:, None])  # a DC offset, removed by the norm
    plain, _ = hubert(wav, lens)
    assert not torch.allclose(plain, hubert(wav * 7.0, lens)[0], atol=1e-3)
    hubert.normalize_waveform = True
    try:
        a, _ = hubert(wav, lens)
        b, _ = hubert(wav * 7.0, lens)
        assert torch.allclose(a, b, atol=1e-4)
        assert not torch.allclose(a, plain, atol=1e-3)
    finally:
        hubert.normalize_waveform = False


def test_bad_inputs(hubert):
    with pytest.raises(ValueError, match="unknown s3prl upstream"):
        Upstream("no_such_upstream_xyz")
    wav, lens = waves([4000, 3000])
    with pytest.raises(ValueError, match="wav_lens"):
        hubert.hidden_states(wav, torch.tensor([4000, 5000]))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        hubert.hidden_states(wav[0], lens[:1])


def test_save_tiny_hubert_checkpoint(tmp_path):
    from speechclip_plus.models.tiny import save_tiny_hubert

    rng = torch.random.get_rng_state()
    a = save_tiny_hubert(tmp_path / "a.pt", layers=3, extractor_mode="layer_norm", normalize=True, seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global RNG is left alone
    b = save_tiny_hubert(tmp_path / "b.pt", layers=3, extractor_mode="layer_norm", normalize=True, seed=1)
    c = save_tiny_hubert(tmp_path / "c.pt", layers=3, extractor_mode="layer_norm", normalize=True, seed=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt", "c.pt"]  # no temp files left
    sa, sb, sc = (torch.load(p, weights_only=True) for p in (a, b, c))  # plain containers only
    assert set(sa) == {"task_cfg", "model_cfg", "model_weight", "dictionaries_symbols"}
    assert all(torch.equal(v, sb["model_weight"][k]) for k, v in sa["model_weight"].items())
    assert not all(torch.equal(v, sc["model_weight"][k]) for k, v in sa["model_weight"].items())
    up = Upstream("hubert_local", ckpt=a)
    assert (up.num_layers, up.hidden_dim, up.downsample_rate) == (4, 32, 320)
    assert up.upstream.task_cfg.normalize
