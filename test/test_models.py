"""The model family: every variant builds from its YAML, trains, keeps frozen parts frozen."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

from speechclip_plus.config import load_config
from speechclip_plus.models.losses import MaskedContrastiveLoss
from speechclip_plus.models.quantizer import KeywordBatchNorm, KeywordQuantizer
from speechclip_plus.models.speechclip import build_model, random_crop

CONF = os.path.join(os.path.dirname(__file__), "..", "speechclip_plus", "conf")
VARIANTS = ["p", "c", "cplus", "h", "hplus"]


def tiny_model(variant, *overrides):
    torch.manual_seed(0)
    cfg = load_config(os.path.join(CONF, f"tiny_{variant}.yaml"), list(overrides))
    return build_model(cfg)


def batch(model, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([16000, 12000, 20000, 9000, 16000, 14000][:n])
    wav = torch.randn(n, int(lens.max()), generator=g) * 0.1
    wav = wav * (torch.arange(wav.shape[1])[None] < lens[:, None])
    image_index = torch.tensor([0, 0, 1, 2, 3, 3][:n])
    images = F.normalize(torch.randn(4, model.clip.embed_dim, generator=g), dim=-1)
    return wav, lens, images[image_index], image_index


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward_and_training_reduces_loss(variant):
    torch.set_num_threads(2)
    model = tiny_model(variant)
    model.train()
    wav, lens, img, idx = batch(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen, "upstream and CLIP weights must be frozen"
    assert not any(n.startswith(("clip.", "upstream.model")) for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        out = model(wav, lens, img, idx, step=step)
        assert torch.isfinite(out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        for n, p in model.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, n
        opt.step()
        losses.append(out["loss"].item())
    assert min(losses[-3:]) < losses[0] * 0.9, losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"
    expected = {"p": {"cl_parallel"}, "c": {"cl_cascaded"}, "cplus": {"cl_cascaded", "quantity"},
                "h": {"cl_parallel", "cl_cascaded"}, "hplus": {"cl_parallel", "cl_cascaded", "quantity"}}[variant]
    assert expected <= set(out["terms"]) and not ({"cl_parallel", "cl_cascaded", "quantity"} - expected) & set(out["terms"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_total_loss_is_the_configured_weighted_sum_of_its_terms(variant):
    """L = w_p L_p + w_c L_c + w_q L_QUA with large h+'s weights 0.5 / 1.5 / 0.25 set for every variant; only the
    variant's own terms count (read from the public output, so whether terms are floats or tensors is free)."""
    weights = {"cl_parallel": 0.5, "cl_cascaded": 1.5, "quantity": 0.25}
    model = tiny_model(variant, "--model.parallel.weight", "0.5", "--model.cascaded.weight", "1.5",
                       "--model.cif.quantity_weight", "0.25")
    own = {"p": ["cl_parallel"], "c": ["cl_cascaded"], "cplus": ["cl_cascaded", "quantity"],
           "h": ["cl_parallel", "cl_cascaded"], "hplus": ["cl_parallel", "cl_cascaded", "quantity"]}[variant]
    wav, lens, img, idx = batch(model, n=4)
    for training in (True, False):  # the training step and validation (duration targets: L_QUA in both)
        model.train(training)
        with torch.set_grad_enabled(training):
            out = model(wav, lens, img, idx, step=0)
        assert sorted(set(out["terms"]) & set(weights)) == sorted(own), training
        terms = {name: float(out["terms"][name]) for name in own}
        assert all(v > 0 for v in terms.values()), terms  # every weight changes the total
        assert float(out["loss"]) == pytest.approx(sum(weights[n] * terms[n] for n in own), rel=1e-5), terms


@pytest.mark.parametrize("variant", VARIANTS)
def test_eval_outputs(variant):
    model = tiny_model(variant).eval()
    wav, lens, _, _ = batch(model, n=3)
    with torch.no_grad():
        out = model(wav, lens)
    for branch in model.branches:
        assert out[branch].shape == (3, model.clip.embed_dim)
        torch.testing.assert_close(out[branch].norm(dim=-1), torch.ones(3))
    if "cascaded" in model.branches:
        ids, k = out["keyword_ids"], out["keyword_lengths"]
        special = {0, model.clip.sot_id, model.clip.eot_id}
        for b in range(3):
            used = ids[b, : k[b]].tolist()
            assert all(i >= 0 and i not in special for i in used)
            assert (ids[b, k[b]:] == -1).all()
    states, feat_lens = model.hidden_states(wav, lens)
    assert len(states) == model.upstream.num_layers + 1
    assert len({s.shape for s in states}) == 1 and states[0].shape[:2] == (3, int(feat_lens.max()))


def test_cif_count_follows_targets_in_training_and_weights_at_inference():
    model = tiny_model("cplus")
    wav, lens, img, idx = batch(model)
    model.train()
    out = model(wav, lens, img, idx, step=0)
    assert torch.equal(out["keyword_lengths"], out["cif_targets"])
    targets = torch.tensor([3, 1, 5, 2, 4, 7])
    out = model(wav, lens, img, idx, step=0, target_lengths=targets)
    assert torch.equal(out["keyword_lengths"], targets)
    model.eval()
    with torch.no_grad():
        out = model(wav, lens)
    alpha_sum = out["cif_alpha"].sum(1)
    assert ((out["keyword_lengths"] - alpha_sum.floor()).abs() <= 1).all()


def test_duration_target_is_one_keyword_per_0p4_seconds():
    model = tiny_model("cplus")
    feat_lens = torch.tensor([250, 40, 10])  # fbank: 100 frames/s
    targets = model.cif_targets(feat_lens * 1)  # rate 160 -> 2.5 s, 0.4 s, 0.1 s
    assert targets.tolist() == [6, 1, 1]


def test_clip_bpe_target_counts_caption_tokens():
    model = tiny_model("cplus", "--model.cif.target", "clip_bpe")
    t = model.cif_targets(torch.tensor([100, 100]), texts=["a red circle", "two big blue squares on the left"])
    assert t.tolist() == [3, 7]


def test_random_crop_keeps_short_and_crops_long():
    torch.manual_seed(0)
    wav = torch.arange(30.0).repeat(2, 1)
    lens = torch.tensor([30, 5])
    out, new = random_crop(wav, lens, 10)
    assert new.tolist() == [10, 5]
    start = int(out[0, 0])
    assert torch.equal(out[0], torch.arange(start, start + 10.0))
    assert torch.equal(out[1, :5], torch.arange(5.0)) and (out[1, 5:] == 0).all()


def test_contrastive_loss_matches_definition_and_masks_same_image():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    ids = torch.tensor([0, 0, 1, 2, 2])
    loss = MaskedContrastiveLoss(temperature=0.1, learnable=False)(a, b, ids)
    logits = (a @ b.t()) / 0.1
    total = 0.0
    for i in range(5):  # a -> b: row i, negatives are other images
        keep = [j for j in range(5) if j == i or ids[j] != ids[i]]
        total += -logits[i, i] + torch.log(torch.exp(logits[i, keep]).sum())
        total += -logits[i, i] + torch.log(torch.exp(logits[keep, i]).sum())
    torch.testing.assert_close(loss, total / 10)
    big = MaskedContrastiveLoss(temperature=1e-4, learnable=True, max_logit_scale=100.0)
    assert big.logit_scale.item() == pytest.approx(100.0)
    assert torch.isfinite(big(a, b, ids))


def test_quantizer_straight_through():
    torch.manual_seed(0)
    table = torch.randn(10, 6)
    special = torch.zeros(10, dtype=torch.bool)
    special[[0, 2]] = True
    table[0] = table[2] = 0
    x = table[[0, 2, 5]].clone() + 0.01
    x[0], x[1] = table[3] * 2, table[7]
    x.requires_grad_(True)
    vq = KeywordQuantizer(0.1).train()
    q = vq(x[None], table, special)
    assert q["ids"][0].tolist() == [3, 7, 5]
    torch.testing.assert_close(q["embeddings"][0], table[[3, 7, 5]])
    q["embeddings"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    xs = torch.randn(1, 50, 6)
    assert not set(vq(xs, table, special)["ids"].flatten().tolist()) & {0, 2}


def test_keyword_batchnorm_ignores_padded_slots_and_inits_per_slot():
    torch.manual_seed(0)
    table = torch.randn(20, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0]) + 5
    bn = KeywordBatchNorm(4, table, n_slots=None).train()
    x = torch.randn(3, 5, 4)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:] = True
    y1 = bn(x, pad)
    x2 = x.clone()
    x2[pad] = 1e6  # garbage in padded slots changes nothing
    bn2 = KeywordBatchNorm(4, table, n_slots=None).train()
    y2 = bn2(x2, pad)
    torch.testing.assert_close(y1, y2)
    assert (y2[pad] == 0).all()
    fixed = KeywordBatchNorm(4, table, n_slots=3)
    w = fixed.bn.weight.view(3, 4)
    for k in range(3):
        torch.testing.assert_close(w[k], table.std(0))


def test_spm_target_model_embeds_without_targets_at_inference_but_needs_them_in_training():
    model = tiny_model("cplus", "--model.cif.target", "spm")
    wav, lens, img, idx = batch(model, n=2)
    model.eval()
    with torch.no_grad():
        out = model(wav, lens, img, idx)
    assert "cif_targets" not in out and "quantity" not in out["terms"] and "cascaded" in out
    model.train()
    with pytest.raises(ValueError, match="needs target_lengths"):
        model(wav, lens, img, idx)
    out = model(wav, lens, img, idx, target_lengths=torch.tensor([2, 3]))
    assert out["keyword_lengths"].tolist() == [2, 3] and "quantity" in out["terms"]


def test_conv_positional_embedding_ignores_padding_and_sees_order():
    from speechclip_plus.models.attention import ConvPositionalEmbedding

    torch.manual_seed(0)
    pe = ConvPositionalEmbedding(32, width=5, groups=8)
    x = torch.randn(2, 12, 32)
    pad = torch.arange(12)[None] >= torch.tensor([12, 7])[:, None]
    noisy = x.clone()
    noisy[1, 7:] = 1e3  # whatever sits in padded frames must not leak into valid ones
    out = pe(noisy, pad)
    alone = pe(x[1:, :7], torch.zeros(1, 7, dtype=torch.bool))
    torch.testing.assert_close(out[1, :7], alone[0], rtol=1e-5, atol=1e-5)
    assert out[1, 7:].abs().max() == 0
    # unlike attention alone, the output of a frame depends on its neighbours' order
    perm = torch.randperm(12)
    assert not torch.allclose(pe(x[:1, perm], pad[:1])[0], pe(x[:1], pad[:1])[0, perm], atol=1e-4)
    with pytest.raises(ValueError, match="odd"):
        ConvPositionalEmbedding(32, width=4)


def test_encoder_options_reach_the_model():
    from speechclip_plus.config import ConfigError

    model = tiny_model("hplus", "--model.encoder.conv_pos", "3", "--model.encoder.conv_pos_groups", "4",
                       "--model.encoder.attention_dropout", "0.0")
    assert model.pos_conv.conv.kernel_size == (3,) and model.pos_conv.conv.groups == 4
    assert any(p is model.pos_conv.conv.weight for p in model.trainable_parameters())
    attn = [m for m in model.encoder.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert attn and all(m.dropout == 0.0 for m in attn)
    assert tiny_model("hplus").pos_conv is None
    wav, wav_len, images, image_index = batch(model)
    out = model(wav, wav_len, images, image_index, step=0)
    out["loss"].backward()
    assert model.pos_conv.conv.weight.grad.abs().sum() > 0
    for bad, message in ((["--model.encoder.conv_pos", "4"], r"conv_pos: 4 is not 0 \(none\) or an odd width"),
                         (["--model.encoder.attention_dropout", "1.5"], r"attention_dropout: 1\.5 is not null or a")):
        with pytest.raises(ConfigError, match=message):
            load_config(os.path.join(CONF, "tiny_hplus.yaml"), bad)


@pytest.mark.parametrize("variant,target", [(v, "clip_bpe") for v in VARIANTS] + [("cplus", "duration")])
def test_every_tensor_is_made_on_the_inputs_device(variant, target):
    """A GPU run crashes where code makes a tensor on the default (CPU) device and mixes it with the inputs'.
    With the default device set to "meta", any such tensor is a meta tensor and mixing it with the CPU inputs
    fails here the same way. The frozen s3prl upstream is third-party code and runs with the CPU default."""
    model = tiny_model(variant, "--model.max_audio_len", "8000", "--model.cif.target", target)
    wav, lens, img, idx = batch(model, n=2)
    run = model.upstream._run

    def upstream_on_cpu(wavs):
        with torch.device("cpu"):
            return run(wavs)

    model.upstream._run = upstream_on_cpu
    model.upstream.frame_counts([16000])  # fit the frame formula outside the check
    texts = ["a red circle", "two big blue squares"]
    for mode in ("train", "eval"):
        getattr(model, mode)()
        torch.set_default_device("meta")
        try:
            out = model(wav, lens, img, idx, step=0, texts=texts)
            if mode == "train":
                out["loss"].backward()
        finally:
            torch.set_default_device("cpu")
        assert out["loss"].device.type == "cpu" and torch.isfinite(out["loss"])


def test_random_crop_draws_on_cpu_and_stays_on_the_waveforms_device():
    torch.manual_seed(0)
    wav = torch.arange(40.0).repeat(3, 1)
    lens = torch.tensor([40, 25, 7])
    torch.manual_seed(5)
    a, la = random_crop(wav, lens, 10)
    torch.manual_seed(5)
    torch.set_default_device("meta")
    try:
        b, lb = random_crop(wav, lens, 10)
    finally:
        torch.set_default_device("cpu")
    assert torch.equal(a, b) and torch.equal(la, lb) and la.tolist() == [10, 10, 7]
    assert 0 <= int(a[1, 0]) <= 15 and torch.equal(a[1], torch.arange(a[1, 0], a[1, 0] + 10))


def test_keyword_cosine_and_contrastive_logits_stay_float32_under_autocast():
    """Under bf16 autocast a cosine that rounds to 8 bits ties near neighbours; the reference computes it in
    fp32. Two tokens 1e-3 apart in angle must still be told apart, and the loss must match float32."""
    torch.manual_seed(0)
    table = F.normalize(torch.randn(50, 16), dim=-1)
    table[7] = F.normalize(table[3] + 2e-3 * torch.randn(16), dim=-1)
    special = torch.zeros(50, dtype=torch.bool)
    x = (table[[3, 7]] + 1e-4 * torch.randn(2, 16))[None]
    vq = KeywordQuantizer(0.1).eval()
    want = vq(x, table, special)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = vq(x, table, special)
    assert got["cos"].dtype == torch.float32
    assert torch.equal(got["ids"], want["ids"]) and got["ids"][0].tolist() == [3, 7]
    a, b = F.normalize(torch.randn(6, 16), dim=-1), F.normalize(torch.randn(6, 16), dim=-1)
    ids = torch.arange(6)
    loss = MaskedContrastiveLoss(0.07, learnable=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss(a, b, ids)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, loss(a, b, ids), rtol=1e-6, atol=1e-6)


def test_quantizer_gradient_equals_the_one_hot_straight_through():
    """e = E[c] + pE - sg(pE) has the value and gradient of the reference's (onehot + p - sg(p)) @ E."""
    torch.manual_seed(1)
    table = torch.randn(30, 8)
    special = torch.zeros(30, dtype=torch.bool)
    special[0] = True
    x = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(2, 3, 8)
    q = KeywordQuantizer(0.1).train()(x, table, special)
    (q["embeddings"] * w).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    cos = F.normalize(x, dim=-1) @ F.normalize(table, dim=-1).t()
    cos = cos.masked_fill(special, float("-inf"))
    soft = torch.softmax(cos / 0.1, -1)
    ref = (F.one_hot(cos.argmax(-1), 30).float() + soft - soft.detach()) @ table
    torch.testing.assert_close(q["embeddings"], ref.detach())
    (ref * w).sum().backward()
    torch.testing.assert_close(ours, x.grad)


def test_masked_keyword_batchnorm_is_batchnorm_over_the_valid_slots():
    torch.manual_seed(2)
    table = torch.randn(20, 4) * 3 + 1
    bn = KeywordBatchNorm(4, table, n_slots=None).train()
    ref = torch.nn.BatchNorm1d(4)
    ref.load_state_dict(bn.bn.state_dict())
    ref_for_grad = copy.deepcopy(ref)
    x = torch.randn(3, 5, 4, requires_grad=True)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 2:] = pad[2, 4:] = True
    y = bn(x, pad)
    y_ref = ref(x[~pad])
    torch.testing.assert_close(y[~pad], y_ref)
    assert (y[pad] == 0).all()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn.bn, name), getattr(ref, name))
    g = torch.randn_like(y_ref)
    (y[~pad] * g).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    (ref_for_grad(x[~pad]) * g).sum().backward()
    torch.testing.assert_close(ours, x.grad)
    bn.eval(), ref.eval()
    torch.testing.assert_close(bn(x, pad)[~pad], ref(x[~pad]))


def test_per_branch_temperature():
    shared = tiny_model("hplus")
    assert shared.contrastive_cascaded is None
    model = tiny_model("hplus", "--model.loss.per_branch_temperature", "true")
    assert {"contrastive.log_scale", "contrastive_cascaded.log_scale"} <= set(dict(model.named_parameters()))
    model.train()
    wav, lens, img, idx = batch(model)
    out = model(wav, lens, img, idx, step=0, texts=["a"] * 6)
    assert {"logit_scale", "logit_scale_cascaded"} <= set(out["terms"])
    out["loss"].backward()
    assert model.contrastive.log_scale.grad.abs() > 0 and model.contrastive_cascaded.log_scale.grad.abs() > 0
    with torch.no_grad():
        model.contrastive_cascaded.log_scale.fill_(0.0)  # cascaded temperature 1: only its loss changes
    out2 = model(wav, lens, img, idx, step=0, texts=["a"] * 6)
    assert out2["terms"]["logit_scale_cascaded"] == pytest.approx(1.0)
    assert tiny_model("p", "--model.loss.per_branch_temperature", "true").contrastive_cascaded is None


def _large_projection_settings():
    """(config, variant, parallel MLP, keyword MLP) of every shipped large config with a hidden projection layer."""
    repo = os.path.join(os.path.dirname(__file__), "..")
    out = []
    for conf_dir in (CONF, *(os.path.join(repo, "egs", r, "conf") for r in ("flickr8k", "spokencoco"))):
        for v in VARIANTS:
            m = load_config(os.path.join(conf_dir, f"large_{v}.yaml"))["model"]
            setting = (v, m["parallel"]["projection"], m["cascaded"]["projection"])
            if (setting[1] or setting[2]) and setting not in [s[1:] for s in out]:
                out.append((os.path.relpath(os.path.join(conf_dir, f"large_{v}.yaml"), repo), *setting))
    return out


@pytest.mark.parametrize("conf,variant,parallel,cascaded", _large_projection_settings())
def test_large_configs_projection_mlps_run_forward_and_backward(conf, variant, parallel, cascaded):
    """The large configs' hidden projection layers ([1024] before CLIP's embedding / token width), on the tiny
    model: the MLP is what the config says and every layer of it gets a finite, non-zero gradient."""
    assert parallel or cascaded
    model = tiny_model(variant, "--model.parallel.projection", str(parallel), "--model.cascaded.projection",
                       str(cascaded))
    model.train()
    heads = {"parallel": (getattr(model, "parallel", None), parallel, model.clip.embed_dim),
             "cascaded": (getattr(model, "keywords", None), cascaded, model.clip.token_table.shape[1])}
    linears = {}
    for name, (head, hidden, width) in heads.items():
        if head is None:
            continue
        layers = [m for m in head.proj.modules() if isinstance(m, torch.nn.Linear)]
        assert [layer.out_features for layer in layers] == list(hidden) + [width], name
        assert layers[0].in_features == model.upstream.hidden_dim
        linears[name] = layers
    assert any(len(layers) > 1 for layers in linears.values())
    wav, lens, img, idx = batch(model, n=4)
    out = model(wav, lens, img, idx, step=0)
    out["loss"].backward()
    for name, layers in linears.items():
        for k, layer in enumerate(layers):
            g = layer.weight.grad
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, (conf, name, k)
