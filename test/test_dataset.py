"""Audio loading and stage-1 formatting, the speech-image dataset, collation and the bucket sampler."""
from __future__ import annotations

import hashlib
import logging
import math
import os

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from torch.utils.data import DataLoader

from speechclip_plus.data.audio import format_audio, load_audio
from speechclip_plus.data.datadir import DataDir, DataError, read_kv, validate_data_dir, write_data_dir
from speechclip_plus.data.dataset import SpeechImageDataset, collate
from speechclip_plus.data.sampler import LengthBucketSampler


def tone(n: int, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(n) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return x if channels == 1 else np.stack([x * (c + 1) / channels for c in range(channels)], axis=1)


def make_dir(root, specs):
    """specs: list of (utt, samples, rate, channels); image of utt k is img{k % 2}; paths absolute."""
    root = str(root)
    os.makedirs(os.path.join(root, "wavs"), exist_ok=True)
    wav, text, utt2spk, utt2img = {}, {}, {}, {}
    img = {"img0": os.path.join(root, "img0.png"), "img1": os.path.join(root, "img1.png")}
    for k, path in enumerate(img.values()):
        Image.new("RGB", (4, 4), (k * 100, 0, 0)).save(path)
    for k, (utt, n, rate, ch) in enumerate(specs):
        path = os.path.join(root, "wavs", f"{utt}.wav")
        sf.write(path, tone(n, rate, channels=ch), rate, subtype="FLOAT")
        wav[utt], text[utt], utt2spk[utt], utt2img[utt] = path, f"caption {k}", "spk", f"img{k % 2}"
    write_data_dir(os.path.join(root, "data"), wav, text, utt2spk, utt2img, img)
    return os.path.join(root, "data")


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---------------------------------------------------------------------------------------------- audio
def test_load_audio_mono_stereo_and_resampling(tmp_path, caplog):
    x = tone(8000, 16000)
    sf.write(tmp_path / "m.wav", x, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "m.wav"), x)

    st = tone(8000, 16000, channels=2)
    sf.write(tmp_path / "s.wav", st, 16000, subtype="FLOAT")
    with caplog.at_level(logging.WARNING):
        y = load_audio(tmp_path / "s.wav")
        load_audio(tmp_path / "s.wav")
    np.testing.assert_allclose(y, st.mean(axis=1), atol=1e-7)
    assert y.dtype == np.float32 and y.ndim == 1
    assert sum("channels" in r.getMessage() for r in caplog.records) == 1  # once per file

    n = 22050
    sf.write(tmp_path / "r.wav", tone(n, 22050), 22050, subtype="FLOAT")
    z = load_audio(tmp_path / "r.wav", 16000)
    assert len(z) == math.ceil(n * 16000 / 22050)
    spectrum = np.abs(np.fft.rfft(z))
    assert abs(np.argmax(spectrum) * 16000 / len(z) - 440.0) < 2.0  # the tone keeps its pitch


def test_load_audio_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path / 'none.wav'}: audio file not found"):
        load_audio(tmp_path / "none.wav")
    (tmp_path / "junk.wav").write_bytes(b"not audio at all" * 10)
    with pytest.raises(DataError, match=rf"{tmp_path / 'junk.wav'}: cannot read audio"):
        load_audio(tmp_path / "junk.wav")
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(DataError, match=rf"{tmp_path / 'empty.wav'}: audio file has no samples"):
        load_audio(tmp_path / "empty.wav")


@pytest.mark.parametrize("nj", [1, 2])
def test_format_audio_converts_only_what_is_needed(tmp_path, nj):
    d = make_dir(tmp_path, [("u1", 16000, 16000, 1), ("u2", 22050, 22050, 1), ("u3", 8000, 16000, 2)])
    wav_before = read_kv(os.path.join(d, "wav.scp"))
    scp_text = open(os.path.join(d, "wav.scp"), encoding="utf-8").read()
    sources = {u: _digest(p) for u, p in wav_before.items()}
    dump = tmp_path / "dump"
    stats = format_audio(d, dump, 16000, nj=nj, progress=False)
    assert stats == {"utts": 3, "converted": 2}
    wav = read_kv(os.path.join(d, "wav.scp"))
    assert wav["u1"] == wav_before["u1"]
    assert wav["u2"] == str(dump / "u2.wav") and wav["u3"] == str(dump / "u3.wav")
    assert open(os.path.join(d, "wav.scp.orig"), encoding="utf-8").read() == scp_text
    assert {u: _digest(p) for u, p in wav_before.items()} == sources  # inputs untouched
    for u in ("u2", "u3"):
        info = sf.info(wav[u])
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    dur = {u: float(v) for u, v in read_kv(os.path.join(d, "utt2dur")).items()}
    assert dur == pytest.approx({"u1": 1.0, "u2": math.ceil(22050 * 16000 / 22050) / 16000, "u3": 0.5}, abs=1e-4)
    np.testing.assert_allclose(sf.read(wav["u3"])[0], tone(8000, 16000, channels=2).mean(1), atol=1 / 32768)
    assert validate_data_dir(d) == []
    # a second run changes nothing and keeps the original list
    assert format_audio(d, dump, 16000, progress=False) == {"utts": 3, "converted": 0}
    assert read_kv(os.path.join(d, "wav.scp")) == wav
    assert open(os.path.join(d, "wav.scp.orig"), encoding="utf-8").read() == scp_text


def test_format_audio_reports_unreadable_files_and_rewrites_nothing(tmp_path):
    d = make_dir(tmp_path, [("u1", 16000, 22050, 1), ("u2", 1600, 16000, 1)])
    bad = read_kv(os.path.join(d, "wav.scp"))["u2"]
    with open(bad, "wb") as f:
        f.write(b"RIFF broken")
    before = open(os.path.join(d, "wav.scp"), encoding="utf-8").read()
    with pytest.raises(DataError, match=rf"1 unreadable audio file\(s\):\n  {bad}: cannot read audio"):
        format_audio(d, tmp_path / "dump", progress=False)
    assert open(os.path.join(d, "wav.scp"), encoding="utf-8").read() == before
    assert not os.path.exists(os.path.join(d, "utt2dur")) and not os.path.exists(os.path.join(d, "wav.scp.orig"))


# ---------------------------------------------------------------------------------------------- dataset
def test_dataset_items_and_collate(tmp_path):
    d = make_dir(tmp_path, [("b", 800, 16000, 1), ("a", 1200, 16000, 1), ("c", 400, 16000, 1)])
    embeds = {"img0": np.arange(4, dtype=np.float32), "img1": -np.arange(4, dtype=np.float32)}
    ds = SpeechImageDataset(d, image_embeds=embeds)
    assert ds.utts == ["a", "b", "c"] and len(ds) == 3
    it = ds[0]
    assert it["utt"] == "a" and it["text"] == "caption 1" and it["image_id"] == "img1"
    assert it["image_index"] == 1  # sorted img.scp: img0, img1
    assert it["wav"].dtype == torch.float32 and it["wav"].shape == (1200,)
    torch.testing.assert_close(it["image_embed"], torch.from_numpy(embeds["img1"]))
    batch = collate([ds[i] for i in range(3)])
    assert batch["utt"] == ["a", "b", "c"] and batch["image_id"] == ["img1", "img0", "img0"]
    assert batch["wav"].shape == (3, 1200)
    assert batch["wav_len"].tolist() == [1200, 800, 400] and batch["wav_len"].dtype == torch.long
    assert batch["image_index"].tolist() == [1, 0, 0]
    assert torch.all(batch["wav"][1, 800:] == 0) and torch.all(batch["wav"][2, 400:] == 0)
    torch.testing.assert_close(batch["wav"][2, :400], ds[2]["wav"])
    assert batch["image_embed"].shape == (3, 4)
    assert ds.durations() == [1200 / 16000, 800 / 16000, 400 / 16000]  # from the headers (no utt2dur)


def test_dataset_with_kaldiio_scp_and_loader(tmp_path):
    import kaldiio

    d = make_dir(tmp_path, [("a", 800, 16000, 1), ("b", 400, 16000, 1)])
    kaldiio.save_ark(str(tmp_path / "e.ark"), {"img0": np.ones(3, np.float32), "img1": np.zeros(3, np.float32)},
                     scp=str(tmp_path / "e.scp"))
    ds = SpeechImageDataset(d, image_embeds=str(tmp_path / "e.scp"))
    assert ds[0]["image_embed"].tolist() == [1.0, 1.0, 1.0] and ds[1]["image_embed"].tolist() == [0.0] * 3
    kaldiio.save_ark(str(tmp_path / "f.ark"), {"img0": np.ones(3, np.float32)}, scp=str(tmp_path / "f.scp"))
    with pytest.raises(DataError, match="no embedding for 1 image.*img1"):
        SpeechImageDataset(d, image_embeds=str(tmp_path / "f.scp"))
    with pytest.raises(ValueError, match="not both"):
        SpeechImageDataset(d, image_embeds=str(tmp_path / "e.scp"), image_loader=lambda p: torch.zeros(1))
    ds = SpeechImageDataset(d, image_loader=lambda p: torch.full((2,), float(p.endswith("img1.png"))))
    assert ds[0]["image_embed"] is None and ds[1]["image"].tolist() == [1.0, 1.0]
    batch = collate([ds[0], ds[1]])
    assert "image_embed" not in batch and batch["image"].tolist() == [[0.0, 0.0], [1.0, 1.0]]


def test_dataset_rejects_inconsistent_dir(tmp_path):
    d = make_dir(tmp_path, [("a", 800, 16000, 1), ("b", 400, 16000, 1)])
    with open(os.path.join(d, "utt2img"), "w") as f:
        f.write("a img0\nb img7\n")
    with pytest.raises(DataError, match="image img7 not in img.scp"):
        SpeechImageDataset(d)


def test_collate_rejects_mixed_items():
    a = {"utt": "a", "wav": torch.zeros(3), "image_index": 0, "text": "", "image_id": "i", "image_embed": None}
    b = dict(a, image_embed=torch.zeros(2))
    with pytest.raises(ValueError, match="some items have an image_embed"):
        collate([a, b])


# ---------------------------------------------------------------------------------------------- sampler
def durations(n=103, seed=1):
    return np.random.default_rng(seed).uniform(0.5, 8.0, size=n).round(3).tolist()


def _padded_seconds(batch, d):
    return len(batch) * max(d[i] for i in batch)


@pytest.mark.parametrize("max_sec", [None, 30.0])
def test_sampler_each_utt_at_most_once_and_caps(max_sec):
    d = durations()
    s = LengthBucketSampler(d, batch_size=8, max_batch_seconds=max_sec, seed=3, bucket_batches=2)
    for epoch in (0, 1):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s) > 0
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat))
        for b in batches:
            assert 1 <= len(b) <= 8
            if max_sec is not None and len(b) > 1:
                assert _padded_seconds(b, d) <= max_sec
        if max_sec is None:
            assert len(batches) == len(d) // 8 and all(len(b) == 8 for b in batches)
    assert LengthBucketSampler(d, 8, seed=3).batches(0) != LengthBucketSampler(d, 8, seed=3).batches(1)
    assert LengthBucketSampler(d, 8, seed=3).batches(1) == LengthBucketSampler(d, 8, seed=3).batches(1)


def test_sampler_batches_group_similar_lengths():
    d = durations(400)
    s = LengthBucketSampler(d, batch_size=10, seed=0, bucket_batches=4)
    spread = np.mean([max(d[i] for i in b) - min(d[i] for i in b) for b in s.batches(0)])
    rng = np.random.default_rng(0)
    random_spread = np.mean([np.ptp(rng.choice(d, 10)) for _ in range(40)])
    assert spread < 0.3 * random_spread


def test_sampler_without_bucketing_is_a_uniform_shuffle():
    """bucketing=False: batches are consecutive chunks of a fresh random permutation each epoch (the reference's
    DataLoader(shuffle=True, drop_last=True)), so lengths are mixed within a batch."""
    d = durations(400)
    s = LengthBucketSampler(d, batch_size=10, seed=0, bucket_batches=4, bucketing=False)
    batches = s.batches(0)
    assert len(batches) == 40 and all(len(b) == 10 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(400))
    spread = np.mean([max(d[i] for i in b) - min(d[i] for i in b) for b in batches])
    rng = np.random.default_rng(0)
    random_spread = np.mean([np.ptp(rng.choice(d, 10)) for _ in range(200)])
    assert spread > 0.8 * random_spread
    bucketed = LengthBucketSampler(d, batch_size=10, seed=0, bucket_batches=4).batches(0)
    assert np.mean([max(d[i] for i in b) - min(d[i] for i in b) for b in bucketed]) < 0.3 * spread
    assert s.batches(1) != batches
    assert LengthBucketSampler(d, 10, seed=0, bucketing=False).batches(0) == batches
    ordered = LengthBucketSampler(d, 10, shuffle=False, bucketing=False).batches(0)
    assert [i for b in ordered for i in b] == list(range(400))  # no shuffle: index order, not sorted by length
    state = s.state_dict(position=3)
    with pytest.raises(ValueError, match="bucketing"):
        LengthBucketSampler(d, 10, seed=0).load_state_dict(state)


def test_sampler_no_shuffle_keeps_every_utt_once():
    d = durations(21)
    s = LengthBucketSampler(d, batch_size=4, shuffle=False, drop_last=False)
    flat = [i for b in s for i in b]
    assert sorted(flat) == list(range(21))
    assert [d[i] for i in flat] == sorted(d)  # ascending duration


@pytest.mark.parametrize("max_sec", [None, 12.0])
def test_sampler_ranks_partition_the_global_batch(max_sec):
    d, R, B = durations(), 3, 4
    ranks = [LengthBucketSampler(d, B, max_batch_seconds=max_sec, seed=5, num_replicas=R, rank=r, bucket_batches=2)
             for r in range(R)]
    for epoch in (0, 1):
        for s in ranks:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in ranks]
        assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) > 0
        glob = ranks[0].global_batches()
        for step, g in enumerate(glob):
            slices = [p[step] for p in per_rank]
            assert len({len(x) for x in slices}) == 1  # same local size on every rank
            assert sorted(i for x in slices for i in x) == sorted(g)  # disjoint, union = global batch
            assert len(set(i for x in slices for i in x)) == len(g)
            if max_sec is not None and len(slices[0]) > 1:
                assert all(len(x) * max(d[i] for i in g) <= max_sec for x in slices)
        if max_sec is None:  # identical to one process with the global batch size
            single = LengthBucketSampler(d, B * R, seed=5, bucket_batches=2)
            single.set_epoch(epoch)
            assert [sorted(b) for b in single] == [sorted(g) for g in glob]


def test_sampler_distributed_no_drop_pads_to_equal_shares():
    d = durations(10)
    ranks = [LengthBucketSampler(d, 2, drop_last=False, num_replicas=4, rank=r, seed=0) for r in range(4)]
    per_rank = [list(s) for s in ranks]
    assert all(len(p) == len(per_rank[0]) for p in per_rank)
    seen = {i for p in per_rank for b in p for i in b}
    assert seen == set(range(10))
    assert all(len(b) >= 1 for p in per_rank for b in p)


def test_sampler_resume_continues_identically():
    d = durations()
    ref = LengthBucketSampler(d, 6, max_batch_seconds=25.0, seed=9)
    ref.set_epoch(2)
    full = list(ref)
    s = LengthBucketSampler(d, 6, max_batch_seconds=25.0, seed=9)
    s.set_epoch(2)
    it = iter(s)
    head = [next(it) for _ in range(4)]
    state = s.state_dict()
    assert state["epoch"] == 2 and state["position"] == 4
    t = LengthBucketSampler(d, 6, max_batch_seconds=25.0, seed=9)
    t.load_state_dict(state)
    t.set_epoch(2)  # same epoch: keeps the position
    assert head + list(t) == full
    assert list(t) == full  # the next pass of the same epoch starts over
    # an explicit position (a prefetching DataLoader ran ahead) and the end-of-epoch case
    assert s.state_dict(position=1)["position"] == 1
    end = s.state_dict(position=len(full))
    assert (end["epoch"], end["position"]) == (3, 0)
    with pytest.raises(ValueError, match="batch_size=6"):
        LengthBucketSampler(d, 5, max_batch_seconds=25.0, seed=9).load_state_dict(state)
    u = LengthBucketSampler(d, 6, max_batch_seconds=25.0, seed=9)
    u.load_state_dict(state)
    u.set_epoch(3)
    assert list(u) == ref.batches(3)


def test_sampler_with_dataloader(tmp_path):
    d = make_dir(tmp_path, [(f"u{k}", 400 * (k + 1), 16000, 1) for k in range(6)])
    ds = SpeechImageDataset(d, image_embeds={"img0": np.zeros(2, np.float32), "img1": np.ones(2, np.float32)})
    s = LengthBucketSampler(ds.durations(), batch_size=2, seed=0)
    batches = list(DataLoader(ds, batch_sampler=s, collate_fn=collate))
    assert len(batches) == 3
    assert sorted(u for b in batches for u in b["utt"]) == ds.utts
    for b in batches:
        assert b["wav"].shape[1] == int(b["wav_len"].max())
    assert DataDir(d).utts == ds.utts
