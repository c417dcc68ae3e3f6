"""Stage-2 image-embedding cache: round trip with a fake encoder, atomic output, errors, the CLI."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from speechclip_plus.data.datadir import DataError, read_kv, write_data_dir
from speechclip_plus.data.image_cache import compute_image_embeddings, load_image_embeddings

COLOURS = {"red": (255, 0, 0), "teal": (0, 128, 128), "grey": (100, 100, 100), "dot": (10, 20, 30)}


def make_images(root):
    os.makedirs(root, exist_ok=True)
    scp = {}
    for name, rgb in COLOURS.items():
        path = os.path.join(str(root), f"{name}.png")
        Image.new("RGB" if name != "grey" else "L", (6, 5), rgb if name != "grey" else 100).save(path)
        scp[name] = path
    return scp


def preprocess(img):  # PIL RGB -> (3, H, W) in [0, 1]
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


def encode(x):  # mean colour and the batch size seen, as a "feature"
    return torch.cat([x.mean(dim=(2, 3)), torch.full((x.shape[0], 1), float(x.shape[0]))], dim=1)


def test_round_trip_with_fake_encoder(tmp_path):
    scp = make_images(tmp_path / "img")
    out = tmp_path / "cache"
    path = compute_image_embeddings(scp, encode, preprocess, out, batch_size=3, progress=False)
    assert path == str(out / "img_embed.scp")
    assert sorted(os.listdir(out)) == ["img_embed.ark", "img_embed.scp"]  # no temporary files left
    lines = read_kv(path)
    assert list(lines) == sorted(COLOURS)
    assert all(v.startswith(f"{out / 'img_embed.ark'}:") for v in lines.values())  # the final ark path
    emb = load_image_embeddings(path)
    assert set(emb) == set(COLOURS)
    for name, rgb in COLOURS.items():
        assert emb[name].dtype == np.float32 and emb[name].shape == (4,)
        np.testing.assert_allclose(emb[name][:3], np.array(rgb) / 255.0, atol=1e-6)  # grey "L" became RGB
    # batches of 3 in sorted id order: dot, grey, red | teal
    assert [emb[k][3] for k in sorted(COLOURS)] == [3.0, 3.0, 3.0, 1.0]


def test_recompute_replaces_consistently(tmp_path):
    scp = make_images(tmp_path)
    out = tmp_path / "cache"
    compute_image_embeddings(scp, encode, preprocess, out, progress=False)
    compute_image_embeddings({k: scp[k] for k in ("red", "dot")}, lambda x: -encode(x), preprocess, out,
                             progress=False)
    emb = load_image_embeddings(out / "img_embed.scp")
    assert set(emb) == {"red", "dot"}
    np.testing.assert_allclose(emb["red"][:3], [-1.0, 0.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("kind", ["corrupt", "missing"])
def test_bad_image_names_id_and_path_and_writes_nothing(tmp_path, kind):
    scp = make_images(tmp_path)
    bad = str(tmp_path / "bad.png")
    if kind == "corrupt":
        with open(bad, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    scp["zz_bad"] = bad
    out = tmp_path / "cache"
    what = "cannot decode" if kind == "corrupt" else "file not found:"
    with pytest.raises(DataError, match=rf"image zz_bad: {what} {bad}"):
        compute_image_embeddings(scp, encode, preprocess, out, batch_size=2, progress=False)
    assert os.listdir(out) == []


def test_bad_encoder_output_is_an_error(tmp_path):
    scp = make_images(tmp_path)
    with pytest.raises(DataError, match="shape"):
        compute_image_embeddings(scp, lambda x: x.mean(dim=(2, 3))[:1], preprocess, tmp_path / "c", progress=False)
    with pytest.raises(DataError, match="non-finite"):
        compute_image_embeddings(scp, lambda x: encode(x) / 0.0, preprocess, tmp_path / "c", progress=False)
    with pytest.raises(DataError, match="not found"):
        load_image_embeddings(tmp_path / "c" / "img_embed.scp")


def test_embed_images_cli_with_tiny_clip(tmp_path, tiny_clip_config):
    from speechclip_plus.bin.embed_images import main

    scp = make_images(tmp_path / "img")
    dirs = []
    for name, ids in (("train", ["red", "teal", "grey"]), ("dev", ["teal", "dot"])):
        wav = {f"{name}-{k}": "/x.wav" for k in range(len(ids))}
        write_data_dir(tmp_path / name, wav, {u: "a caption" for u in wav}, {u: "s" for u in wav},
                       {u: i for u, i in zip(sorted(wav), ids)}, {i: scp[i] for i in ids})
        dirs += ["--data_dir", str(tmp_path / name)]
    out = tmp_path / "cache"
    args = dirs + ["--out_dir", str(out), "--clip_name", tiny_clip_config, "--clip_pretrained", "none",
                   "--batch_size", "2", "--no_progress"]
    assert main(args) == 0
    emb = load_image_embeddings(out / "img_embed.scp")
    assert set(emb) == set(COLOURS)  # union of both dirs' images
    norms = [np.linalg.norm(v) for v in emb.values()]
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    mtime = os.path.getmtime(out / "img_embed.ark")
    assert main(args) == 0  # complete: skipped
    assert os.path.getmtime(out / "img_embed.ark") == mtime
