"""The stage-2 cache is keyed by what it holds: the CLIP's config and weights content, and the image list.

The bug this guards against: the cache folder used to be named from the CLIP name and the weights file's
folder and file name, so two different ``clip_mini/clip.pt`` files shared one cache and stage 2 reused the
embeddings of the wrong model.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from speechclip_plus.data.cache_key import clip_key, clip_tag, file_sha256, image_list_key
from speechclip_plus.data.datadir import DataError, write_data_dir
from speechclip_plus.data.image_cache import load_image_embeddings


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEECHCLIP_PLUS_CACHE", str(tmp_path / "user_cache"))  # the digest memo goes here


def save_weights(path, tiny_clip_config, seed):
    """A randomly initialised tiny open_clip CLIP's state dict (what a trained teacher file holds)."""
    from speechclip_plus.models.clip import FrozenCLIP

    torch.manual_seed(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(FrozenCLIP(tiny_clip_config, None).clip.state_dict(), path)
    return str(path)


def test_tag_follows_the_weights_content_not_the_file_name(tmp_path, tiny_clip_config):
    a = save_weights(tmp_path / "a" / "clip_mini" / "clip.pt", tiny_clip_config, seed=1)
    b = save_weights(tmp_path / "b" / "clip_mini" / "clip.pt", tiny_clip_config, seed=2)
    c = tmp_path / "c" / "clip_mini" / "clip.pt"
    c.parent.mkdir(parents=True)
    shutil.copy(a, c)
    tag_a, tag_b, tag_c = (clip_tag(tiny_clip_config, p) for p in (a, b, str(c)))
    assert tag_a.startswith("clip_tiny-clip_clip_mini-clip-") and tag_b.startswith("clip_tiny-clip_clip_mini-clip-")
    assert tag_a != tag_b  # same folder and file names, other weights: another cache
    assert tag_a == tag_c  # same bytes elsewhere: the same cache
    assert clip_key(tiny_clip_config, a)["weights"] == "sha256:" + file_sha256(a)

    # rewritten in place with other weights (same path, same size): a new key
    save_weights(a, tiny_clip_config, seed=3)
    assert os.path.getsize(a) == os.path.getsize(b) and clip_tag(tiny_clip_config, a) not in (tag_a, tag_b)

    # the CLIP config's content, quick_gelu and the pretrained tag are part of the key too
    other = tmp_path / "cfg" / "tiny-clip.json"
    other.parent.mkdir()
    cfg = json.loads(open(tiny_clip_config).read())
    other.write_text(json.dumps(dict(cfg, embed_dim=cfg["embed_dim"] * 2)))
    assert clip_tag(str(other), b) != tag_b
    assert clip_tag(tiny_clip_config, b, quick_gelu=True) != tag_b
    assert clip_tag("ViT-B-32", "openai").startswith("clip_ViT-B-32_openai-")
    assert clip_tag("ViT-B-32", "openai") != clip_tag("ViT-B-32", "laion2b_s34b_b79k")
    assert clip_tag(tiny_clip_config, None).startswith("clip_tiny-clip_random-")


def test_weights_digest_is_memoised_by_size_and_mtime(tmp_path, tiny_clip_config):
    path = save_weights(tmp_path / "w" / "clip.pt", tiny_clip_config, seed=1)
    digest = file_sha256(path)
    memo_dir = tmp_path / "user_cache" / "file_digests"
    (memo,) = list(memo_dir.iterdir())
    assert memo.read_text().split()[-1] == digest
    memo.write_text(memo.read_text().replace(digest, "0" * 64))  # a memo is trusted while size and mtime hold
    assert file_sha256(path) == "0" * 64
    os.utime(path, ns=(1, 1))  # the file changed (mtime): hashed again
    assert file_sha256(path) == digest


def test_missing_weights_or_config_is_named(tmp_path, tiny_clip_config, capsys):
    from speechclip_plus.bin.show_config import main

    missing = str(tmp_path / "exp" / "clip_teacher" / "clip.pt")
    with pytest.raises(DataError, match=f"CLIP weights file not found: {missing}"):
        clip_key(tiny_clip_config, missing)
    with pytest.raises(DataError, match="open_clip model config not found"):
        clip_key(str(tmp_path / "nope.json"), None)
    conf = tmp_path / "conf.yaml"
    conf.write_text(f"model:\n  clip: {{name: {tiny_clip_config}, pretrained: {missing}}}\n")
    assert main(["--config", str(conf), "--clip_tag"]) == 2
    assert f"{conf}: model.clip.pretrained: CLIP weights file not found: {missing}" in capsys.readouterr().err


def _data_dir(root, images):
    wav = {f"s-u{k}": "/x.wav" for k in range(len(images))}
    ids = sorted(images)
    write_data_dir(root, wav, {u: "a caption" for u in wav}, {u: "s" for u in wav},
                   {u: i for u, i in zip(sorted(wav), ids)}, images)
    return str(root)


def test_embed_images_reuses_only_a_cache_with_the_same_key(tmp_path, tiny_clip_config, caplog):
    from speechclip_plus.bin.embed_images import main

    caplog.set_level(logging.INFO)
    images = {}
    for k, rgb in enumerate([(200, 0, 0), (0, 90, 200), (30, 160, 30)]):
        images[f"im{k}"] = str(tmp_path / f"im{k}.png")
        Image.new("RGB", (12, 10), rgb).save(images[f"im{k}"])
    data = _data_dir(tmp_path / "data", images)
    weights = save_weights(tmp_path / "exp" / "clip_mini" / "clip.pt", tiny_clip_config, seed=1)
    out = tmp_path / "dump" / "cache" / "train"
    args = ["--data_dir", data, "--out_dir", str(out), "--clip_name", tiny_clip_config, "--clip_pretrained",
            weights, "--no_progress"]
    assert main(args) == 0
    first = load_image_embeddings(out / "img_embed.scp")
    key = json.loads((out / "cache_key.json").read_text())
    assert key["clip"]["weights"] == "sha256:" + file_sha256(weights)
    assert key["images"] == image_list_key(images) and key["images"]["n_images"] == 3

    caplog.clear()
    stamp = os.stat(out / "img_embed.ark").st_mtime_ns
    assert main(args) == 0
    assert f"reusing {out} (same CLIP weights sha256:{file_sha256(weights)[:16]}..., same 3 images)" in caplog.text
    assert os.stat(out / "img_embed.ark").st_mtime_ns == stamp

    # other weights under the same file name: recomputed, and the embeddings are the new model's
    caplog.clear()
    save_weights(weights, tiny_clip_config, seed=2)
    assert main(args) == 0
    assert f"recomputing {out}: its CLIP changed" in caplog.text
    second = load_image_embeddings(out / "img_embed.scp")
    assert not np.allclose(first["im0"], second["im0"])

    # an image replaced on disk (same id, same path): the image list's key changes
    caplog.clear()
    Image.new("RGB", (12, 10), (250, 250, 0)).save(images["im1"])
    os.utime(images["im1"], ns=(10**18, 10**18))
    assert main(args) == 0
    assert f"recomputing {out}: its image list changed" in caplog.text
    third = load_image_embeddings(out / "img_embed.scp")
    assert np.allclose(third["im0"], second["im0"], atol=1e-6) and not np.allclose(third["im1"], second["im1"])
