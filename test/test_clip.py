"""FrozenCLIP: open_clip loading, freezing, reduced vocabulary, keyword prompts, vocabulary files."""

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from speechclip_plus.models.clip import FrozenCLIP, load_vocab_usage, save_vocab_usage

SENTENCES = [
    "A dog runs through the grass.",
    "two kids",
    "A man in a red shirt is climbing a rock wall while his friend holds the rope below him.",
    "Three people sit on a bench near 4 bikes",
]


@pytest.fixture(scope="module")
def clip(tiny_clip_config):
    torch.manual_seed(0)
    return FrozenCLIP(tiny_clip_config, pretrained=None)


def embed_tokens(clip, texts, k_extra=0, fill=0.0):
    """Keyword tensor holding the embeddings of each text's BPE tokens; slots past a text are ``fill``."""
    ids = clip.tokenize_ids(texts)
    lengths = torch.tensor([len(i) for i in ids])
    kw = torch.full((len(texts), int(lengths.max()) + k_extra, clip.token_dim), fill)
    for b, i in enumerate(ids):
        kw[b, : len(i)] = clip.clip.token_embedding.weight[torch.tensor(i)]
    return kw, lengths


def test_pretrained_path_reloads_identical_weights(clip, tiny_clip_config, tmp_path):
    path = tmp_path / "tiny_clip.pt"
    torch.save(clip.clip.state_dict(), path)
    reloaded = FrozenCLIP(tiny_clip_config, pretrained=str(path))
    other = FrozenCLIP(tiny_clip_config, pretrained=None)
    ref = clip.clip.state_dict()
    assert reloaded.clip.state_dict().keys() == ref.keys()
    assert all(torch.equal(v, reloaded.clip.state_dict()[k]) for k, v in ref.items())
    assert not all(torch.equal(v, other.clip.state_dict()[k]) for k, v in ref.items())
    assert torch.allclose(reloaded.encode_text(SENTENCES), clip.encode_text(SENTENCES))


def test_bad_pretrained_and_name(
    clip, tiny_clip_config, tmp_path
):  # clip: registers the real tiny-clip first
    with pytest.raises(FileNotFoundError, match="no-such.pt"):
        FrozenCLIP(tiny_clip_config, pretrained=str(tmp_path / "no-such.pt"))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        FrozenCLIP("ViT-Nope-1", pretrained=None)
    bad = tmp_path / "broken.json"
    bad.write_text('{\n  "embed_dim": 8,\n  "vision_cfg": {,\n}')
    with pytest.raises(ValueError, match=f"{bad}:3"):
        FrozenCLIP(str(bad), pretrained=None)
    clash = tmp_path / "tiny-clip.json"  # same stem as the packaged config, other contents
    cfg = json.loads(open(tiny_clip_config).read())
    cfg["embed_dim"] = 16
    clash.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="different model config"):
        FrozenCLIP(str(clash), pretrained=None)


def test_frozen_and_always_eval(clip):
    assert all(not p.requires_grad for p in clip.parameters())
    parent = nn.ModuleDict({"clip": clip, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not any(m.training for m in clip.modules())


def test_dimensions_and_outputs(clip):
    # the tiny config deliberately has embed_dim (48) != token width (64), as for ViT-L/14 vs B/32 mixups
    assert (clip.embed_dim, clip.token_dim, clip.vocab_size) == (48, 64, 49408)
    text = clip.encode_text(SENTENCES)
    assert text.shape == (4, 48)
    assert torch.allclose(text.norm(dim=-1), torch.ones(4), atol=1e-5)
    from PIL import Image

    img = Image.fromarray((np.random.RandomState(0).rand(50, 70, 3) * 255).astype("uint8"))
    x = clip.preprocess(img)
    assert x.shape == (3, 32, 32)
    emb = clip.encode_image(torch.stack([x, x.flip(-1)]))
    assert emb.shape == (2, 48)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_encode_keywords_equals_encode_text(clip):
    # slots past each sentence hold junk: they must be ignored (causal mask + EOT pooling)
    kw, lengths = embed_tokens(clip, SENTENCES, k_extra=3, fill=5.0)
    assert len(set(lengths.tolist())) == len(SENTENCES)
    out = clip.encode_keywords(kw, lengths)
    ref = clip.encode_text(SENTENCES)
    assert out.shape == ref.shape == (len(SENTENCES), clip.embed_dim)
    assert torch.allclose(out, ref, atol=1e-5)
    # one keyword fewer changes the prompt, so the result must change too
    assert not torch.allclose(clip.encode_keywords(kw, lengths - 1), ref, atol=1e-3)


def test_encode_keywords_full_length_default(clip):
    kw, lengths = embed_tokens(clip, ["a small brown dog"])
    assert torch.allclose(clip.encode_keywords(kw), clip.encode_text(["a small brown dog"]), atol=1e-5)
    with pytest.raises(ValueError, match="exceed"):
        clip.encode_keywords(torch.zeros(1, clip.context_length - 1, clip.token_dim))
    with pytest.raises(ValueError, match="lengths"):
        clip.encode_keywords(kw, torch.tensor([kw.shape[1] + 1]))


def test_gradients_reach_keywords_only(clip):
    kw, lengths = embed_tokens(clip, SENTENCES[:2], k_extra=2)
    kw.requires_grad_(True)
    target = torch.randn(2, clip.embed_dim)
    (clip.encode_keywords(kw, lengths) * target).sum().backward()
    for b, n in enumerate(lengths.tolist()):
        assert kw.grad[b, :n].abs().sum(-1).gt(0).all()  # every used slot gets a gradient
        assert kw.grad[b, n:].abs().sum() == 0  # unused slots do not
    assert all(p.grad is None for p in clip.parameters())


def test_reduced_vocabulary(tiny_clip_config, clip, tmp_path):
    ids = [0, 320, 49406, 49407, 530, 518, 1929]
    save_vocab_usage(tmp_path / "vocab.txt", ids, range(len(ids), 0, -1))
    for vocab in (ids, str(tmp_path / "vocab.txt")):
        sub = FrozenCLIP(tiny_clip_config, pretrained=None, vocab=vocab)
        assert sub.vocab_size == len(ids) and sub.vocab_ids.tolist() == ids
        assert torch.equal(sub.token_table, sub.clip.token_embedding.weight[torch.tensor(ids)])
        assert sub.special_mask.tolist() == [True, False, True, True, False, False, False]
        assert (sub.sot_id, sub.eot_id) == (49406, 49407)
    assert sub.to_reduced(torch.tensor([[530, 1929], [5, 0]])).tolist() == [[4, 6], [-1, 0]]
    assert sub.to_original(torch.tensor([6, 1])).tolist() == [1929, 320]
    with pytest.raises(ValueError, match="reduced ids"):
        sub.to_original(torch.tensor([7]))
    with pytest.raises(ValueError, match="outside CLIP's vocabulary"):
        FrozenCLIP(tiny_clip_config, pretrained=None, vocab=[1, 49408])
    with pytest.raises(ValueError, match="repeated"):
        FrozenCLIP(tiny_clip_config, pretrained=None, vocab=[1, 2, 1])
    # the full vocabulary masks exactly the pad, SOT and EOT rows
    assert clip.special_mask.nonzero().flatten().tolist() == [0, 49406, 49407]


def test_load_state_dict_refreshes_vocab_maps(tiny_clip_config):
    a = FrozenCLIP(tiny_clip_config, pretrained=None, vocab=[49407, 5, 6])
    b = FrozenCLIP(tiny_clip_config, pretrained=None, vocab=[7, 8, 0])
    b.load_state_dict(a.state_dict())
    assert b.vocab_ids.tolist() == [49407, 5, 6]
    assert b.special_mask.tolist() == [True, False, False]
    assert b.to_reduced(torch.tensor([6, 7])).tolist() == [2, -1]
    assert torch.equal(b.token_table, a.token_table)


def test_vocab_usage_files(tmp_path):
    arr = np.array([[0, 900], [320, 500], [49406, 40], [49407, 40], [530, 3]], dtype=np.int64)
    np.save(tmp_path / "usage.npy", arr)
    assert load_vocab_usage(tmp_path / "usage.npy") == [0, 320, 49406, 49407, 530]
    (tmp_path / "usage.txt").write_text("# id count\n0 900\n320 500\n\n49406 40\n")
    assert load_vocab_usage(tmp_path / "usage.txt") == [0, 320, 49406]
    save_vocab_usage(tmp_path / "out" / "v.txt", [7, 3], [10, 2])
    assert (tmp_path / "out" / "v.txt").read_text() == "7 10\n3 2\n"
    assert os.listdir(tmp_path / "out") == ["v.txt"]  # no temp file left behind
    with pytest.raises(ValueError, match="2 ids but 1 counts"):
        save_vocab_usage(tmp_path / "w.txt", [1, 2], [1])


@pytest.mark.parametrize(
    "content, line, what",
    [
        ("0 5\n320 4\n7 x\n", 3, "expected '<token id> <count>'"),
        ("0 5\n320 4 1\n", 2, "expected"),
        ("0 5\n\n320 4\n0 1\n", 4, "repeated"),
        ("0 5\n-3 2\n", 2, "negative"),
    ],
)
def test_bad_vocab_text_names_file_and_line(tmp_path, content, line, what):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"{path}:{line}: .*{what}|{path}:{line}: {what}"):
        load_vocab_usage(path)


def test_bad_vocab_npy_and_missing(tmp_path):
    np.save(tmp_path / "flat.npy", np.arange(4))
    with pytest.raises(ValueError, match=r"flat.npy: expected an integer array of shape \(N, 2\)"):
        load_vocab_usage(tmp_path / "flat.npy")
    np.save(tmp_path / "dup.npy", np.array([[1, 2], [3, 1], [1, 1]]))
    with pytest.raises(ValueError, match="dup.npy:row 2: token id 1 repeated"):
        load_vocab_usage(tmp_path / "dup.npy")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no token ids"):
        load_vocab_usage(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="vocabulary usage file not found: .*nope.txt"):
        load_vocab_usage(tmp_path / "nope.txt")


def test_tokenize_and_decode(clip):
    ids = clip.tokenize_ids(["A Dog's  ball.", "café"])
    assert clip.decode_ids(ids[0]) == ["a</w>", "dog</w>", "'s</w>", "ball</w>", ".</w>"]
    assert "".join(clip.decode_ids(ids[1])) == "café</w>"
    # the same ids open_clip feeds the text encoder, between SOT and EOT
    full = clip.tokenizer(["A Dog's  ball."])[0].tolist()
    assert full[: len(ids[0]) + 2] == [clip.sot_id] + ids[0] + [clip.eot_id]
    assert clip.decode_ids([clip.sot_id, clip.eot_id]) == ["<start_of_text>", "<end_of_text>"]


def test_rebuild_from_state_dict_needs_same_activation(clip, tiny_clip_config):
    """The export path: pretrained=None + load_state_dict; quick_gelu has no weights, so it must be passed."""
    assert clip.quick_gelu is False
    quick = FrozenCLIP(tiny_clip_config, pretrained=None, vocab=[3, 320, 49407], quick_gelu=True)
    assert quick.quick_gelu is True
    assert any(type(m).__name__ == "QuickGELU" for m in quick.modules())
    same = FrozenCLIP(tiny_clip_config, pretrained=None, vocab=[1, 2, 3], quick_gelu=quick.quick_gelu)
    same.load_state_dict(quick.state_dict())
    assert same.vocab_ids.tolist() == [3, 320, 49407]
    assert torch.equal(same.encode_text(SENTENCES), quick.encode_text(SENTENCES))
    plain = FrozenCLIP(tiny_clip_config, pretrained=None, vocab=[1, 2, 3])
    plain.load_state_dict(quick.state_dict())
    assert not torch.allclose(plain.encode_text(SENTENCES), quick.encode_text(SENTENCES), atol=1e-4)
