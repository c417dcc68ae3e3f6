"""SUPERB through s3prl: the upstream expert, its s3prl / torch.hub entries, and the launcher end to end.

The model file is a tiny hplus model (tiny s3prl HuBERT trunk, so 320 samples per frame) trained for two
optimiser steps on random data and written by the exporter's ``export_model``. The end-to-end test runs
s3prl's emotion (ER) downstream in a subprocess on an espeak-ng corpus laid out like IEMOCAP.
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.error import URLError

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ER_CONFIG = REPO / "test" / "data" / "superb_emotion.yaml"
RATE = 320


@pytest.fixture(scope="module")
def model_file(tiny_hubert_ckpt, tmp_path_factory) -> str:
    """A tiny hplus model on the tiny HuBERT, two Adam steps on random audio/images, exported."""
    from speechclip_plus.api import export_model
    from speechclip_plus.config import load_config
    from speechclip_plus.models.speechclip import build_model

    cfg = load_config(str(REPO / "speechclip_plus" / "conf" / "tiny_hplus.yaml"),
                      ["--model.upstream.name", "hubert_local", "--model.upstream.ckpt", tiny_hubert_ckpt])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(cfg).train()
        opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
        lens = torch.tensor([16000, 12000, 9000, 8000])
        for step in range(2):
            wav = 0.1 * torch.randn(4, 16000) * (torch.arange(16000)[None] < lens[:, None])
            out = model(wav, lens, image_embed=torch.randn(4, model.clip.embed_dim), image_index=torch.arange(4),
                        step=step)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
    return export_model(model, cfg, tmp_path_factory.mktemp("superb_model") / "model.pt")


@pytest.fixture(scope="module")
def expert(model_file):
    from speechclip_plus.superb import speechclip_plus_local

    return speechclip_plus_local(model_file)


def _wave(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(n, generator=g)


# ------------------------------------------------------------------------------------------ the expert
def test_expert_states_equal_api_hidden_states(expert, model_file):
    from speechclip_plus.api import SpeechCLIPPlus

    api = SpeechCLIPPlus.from_pretrained(model_file)
    wav = _wave(20000, 1)
    out = expert([wav])
    reference = api.hidden_states(wav, 16000)
    states = out["hidden_states"]
    assert len(states) == len(reference) == api.model.upstream.num_layers + 1  # trunk states + attention block
    assert out["last_hidden_state"] is states[-1]
    for got, want in zip(states, reference):
        assert got.shape[0] == 1 and got.shape[2] == want.shape[1]
        torch.testing.assert_close(got[0, : want.shape[0]], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_samples", [800, 16000, 23456])
def test_frame_count_follows_downsample_rate(expert, n_samples):
    states = expert([_wave(n_samples, 2)])["hidden_states"]
    assert expert.get_downsample_rates("hidden_states") == RATE == expert.model.upstream.downsample_rate
    assert expert.get_downsample_rates("last_hidden_state") == RATE
    assert len({tuple(h.shape) for h in states}) == 1, "every hidden state must have the same shape"
    assert abs(states[0].shape[1] - round(n_samples / RATE)) <= 1


def test_unknown_feature_key_is_an_error(expert):
    with pytest.raises(KeyError, match="no feature 'nope'"):
        expert.get_downsample_rates("nope")


def test_layer_count_stable_in_train_and_eval_mode(expert):
    wavs = [_wave(16000, 3), _wave(9000, 4)]
    try:
        expert.train()
        n_train = len(expert(wavs)["hidden_states"])
        expert.eval()
        with torch.no_grad():
            n_eval = len(expert(wavs)["hidden_states"])
    finally:
        expert.eval()
    assert n_train == n_eval == expert.model.upstream.num_layers + 1


def test_batch_pads_to_longest_and_per_utterance_option(expert, model_file, tmp_path):
    from speechclip_plus.superb import speechclip_plus_local

    short, long = _wave(7000, 5), _wave(21000, 6)
    batched = expert([short, long])["hidden_states"]
    alone_long = expert([long])["hidden_states"]
    assert batched[0].shape[0] == 2 and batched[0].shape[1:] == alone_long[0].shape[1:]

    options = tmp_path / "expert.yaml"
    options.write_text("per_utterance: true\n")
    independent = speechclip_plus_local(model_file, model_config=str(options))
    assert independent.model.upstream.per_utterance and not expert.model.upstream.per_utterance
    with torch.no_grad():
        in_batch = independent([short, long])["hidden_states"]
        alone = independent([short])["hidden_states"]
    n = alone[0].shape[1]
    for a, b in zip(in_batch, alone):
        torch.testing.assert_close(a[0, :n], b[0], rtol=1e-4, atol=1e-5)


def test_bad_entry_arguments_are_clear_errors(expert, model_file, tmp_path):
    from speechclip_plus.superb import speechclip_plus_local

    with pytest.raises(ValueError, match="needs ckpt"):
        speechclip_plus_local()
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        speechclip_plus_local(str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("per_utterance: true\nlayer: 3\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown speechclip_plus upstream option 'layer'"):
        speechclip_plus_local(model_file, model_config=str(bad))
    with pytest.raises(ValueError, match="option 'per_utterance' must be true | false | auto"):
        speechclip_plus_local(model_file, per_utterance="yes")
    with pytest.raises(ValueError, match="waveform 0 must be a non-empty 1-D"):
        expert([torch.zeros(2, 100)])
    with pytest.raises(ValueError, match="empty batch"):
        expert([])


# ------------------------------------------------------------------------------------------ s3prl wrappers
def test_legacy_featurizer_accepts_expert(expert, registered):
    from s3prl.upstream.interfaces import Featurizer

    featurizer = Featurizer(expert, upstream_device="cpu")
    assert featurizer.layer_num == expert.model.upstream.num_layers + 1
    assert featurizer.downsample_rate == RATE
    wavs = [_wave(16000, 7), _wave(12345, 8)]
    with torch.no_grad():
        out = expert(wavs)
        feats = featurizer(wavs, out)
    t_max = out["hidden_states"][0].shape[1]  # s3prl keeps round(L / rate) frames, at most the padded length
    assert [f.shape[0] for f in feats] == [min(round(len(w) / RATE), t_max) for w in wavs]
    assert all(f.shape[1] == featurizer.output_dim for f in feats)


def test_s3prl_upstream_finds_registered_entry(expert, model_file, registered):
    from s3prl.nn import Featurizer, S3PRLUpstream

    assert "speechclip_plus_local" in S3PRLUpstream.available_names()
    with torch.random.fork_rng(devices=[]):  # S3PRLUpstream's probe reseeds the global RNG
        upstream = S3PRLUpstream("speechclip_plus_local", path_or_url=model_file).eval()
    n_layers = expert.model.upstream.num_layers + 1
    assert upstream.num_layers == n_layers
    assert upstream.hidden_sizes == [expert.model.upstream.hidden_dim] * n_layers
    assert upstream.downsample_rates == [RATE] * n_layers
    wav_lens = torch.tensor([32000, 16000])
    wavs = torch.stack([_wave(32000, 9), torch.cat([_wave(16000, 10), torch.zeros(16000)])])
    with torch.no_grad():
        all_hs, all_lens = upstream(wavs, wav_lens)
        hs, hs_len = Featurizer(upstream)(all_hs, all_lens)
    assert len(all_hs) == n_layers
    assert all_lens[0].tolist() == [(32000 - 1) // RATE + 1, (16000 - 1) // RATE + 1]
    assert hs.shape == (2, all_hs[0].shape[1], expert.model.upstream.hidden_dim)


def test_fine_tuning_reaches_only_the_trainable_frame_encoder(expert):
    """What s3prl's ``-f`` (upstream trainable) trains: the runner puts the expert in train mode and hands all
    its parameters to the optimiser; gradients reach the layer weights, the CLS tokens and the attention block
    (the last hidden state), never the frozen trunk or CLIP (requires_grad False), nor the branch heads."""
    expert.train()
    try:
        states = expert([_wave(16000, 12), _wave(9000, 13)])["hidden_states"]
        sum(h.float().pow(2).mean() for h in states).backward()
    finally:
        expert.eval()
    with_grad = {n for n, p in expert.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    frozen = {n for n, p in expert.model.named_parameters() if not p.requires_grad}
    try:
        assert {n.split(".")[0] for n in with_grad} == {"upstream", "cls", "encoder"}
        assert {n for n in with_grad if n.startswith("upstream.")} == {"upstream.layer_weights"}
        assert all(n.startswith(("upstream.upstream.", "clip.")) for n in frozen) and frozen
        assert not any(n.startswith(("upstream.upstream.", "clip.")) for n in with_grad)
    finally:
        expert.model.zero_grad(set_to_none=True)


def test_s3prl_upstream_is_left_in_train_mode(model_file, registered):
    """``S3PRLUpstream(...)`` calls ``.train()`` on the upstream after probing it: call ``.eval()`` before
    extracting features (the attention block's dropout would otherwise be on)."""
    from s3prl.nn import S3PRLUpstream

    with torch.random.fork_rng(devices=[]):
        upstream = S3PRLUpstream("speechclip_plus_local", path_or_url=model_file)
    assert upstream.upstream.model.encoder.training
    assert not upstream.eval().upstream.model.encoder.training


# ------------------------------------------------------------------------------------------ torch.hub entries
def test_torch_hub_load_from_repo_dir(expert, model_file):
    loaded = torch.hub.load(str(REPO), "speechclip_plus", source="local", ckpt=model_file)
    wav = _wave(12000, 11)
    with torch.no_grad():
        got = loaded([wav])["hidden_states"]
        want = expert([wav])["hidden_states"]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_url_entry_downloads_once_into_hub_cache(model_file, tmp_path):
    from speechclip_plus.superb import speechclip_plus
    from speechclip_plus.superb.hubconf import cached_download

    served = tmp_path / "www"
    served.mkdir()
    shutil.copy(model_file, served / "model.pt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/model.pt"
    old_hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        loaded = speechclip_plus(url)
        assert loaded.get_downsample_rates("hidden_states") == RATE
        server.shutdown()  # from now on only the cache can answer
        server.server_close()
        cached = list((tmp_path / "hub" / "speechclip_plus").glob("*_model.pt"))
        assert len(cached) == 1 and cached[0].read_bytes() == Path(model_file).read_bytes()
        assert cached_download(url) == str(cached[0])
        with pytest.raises(URLError, match="Connection refused"):
            cached_download(url, refresh=True)  # refresh really goes to the (stopped) server
        assert cached[0].read_bytes() == Path(model_file).read_bytes()  # a failed refresh keeps the cached file
    finally:
        torch.hub.set_dir(old_hub)
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ------------------------------------------------------------------------------------------ launcher
def test_launcher_rewrites_local_rank():
    from speechclip_plus.superb.__main__ import rewrite_args

    assert rewrite_args(["-m", "train", "--local-rank=1"], {}) == ["-m", "train", "--local_rank=1"]
    assert rewrite_args(["--local-rank", "2", "-u", "x"], {}) == ["--local_rank", "2", "-u", "x"]
    torchrun = {"LOCAL_RANK": "3", "WORLD_SIZE": "4"}
    assert rewrite_args(["-m", "train"], torchrun) == ["-m", "train", "--local_rank", "3"]
    assert rewrite_args(["-m", "train"], {"LOCAL_RANK": "0", "WORLD_SIZE": "1"}) == ["-m", "train"]
    assert rewrite_args(["--local_rank", "1"], {"LOCAL_RANK": "1", "WORLD_SIZE": "2"}) == ["--local_rank", "1"]


EMOTIONS = {"neu": ["-p", "50", "-s", "160"], "hap": ["-p", "85", "-s", "200"],
            "ang": ["-p", "35", "-s", "230", "-a", "180"], "sad": ["-p", "20", "-s", "110", "-a", "60"]}
VOICES = {"Ses01F": "en-us", "Ses01M": "en-gb", "Ses01X": "en-gb-scotland"}
SENTENCES = ["the dog runs across the grass", "a child holds a red balloon",
             "two people sit on a bench", "the boat sails past the bridge"]


def make_emotion_corpus(root: Path) -> Path:
    """IEMOCAP-shaped ER data: espeak-ng voices as speakers, prosody settings as emotions.

    root/Session1/sentences/wav/<speaker>/<speaker>_<emo>_<k>.wav (espeak-ng's 22.05 kHz; s3prl resamples)
    root/meta_data/Session1/{train,test}_meta_data.json = {"labels": {emo: id}, "meta_data": [{path, label,
    speaker}]}; test = the last sentence of the last speaker, once per emotion (4 clips), train = the other 44.
    """
    labels = {emo: i for i, emo in enumerate(EMOTIONS)}
    train, test = [], []
    for speaker, voice in VOICES.items():
        wav_dir = root / "Session1" / "sentences" / "wav" / speaker
        wav_dir.mkdir(parents=True, exist_ok=True)
        for emo, prosody in EMOTIONS.items():
            for k, sentence in enumerate(SENTENCES):
                rel = f"Session1/sentences/wav/{speaker}/{speaker}_{emo}_{k}.wav"
                subprocess.run(["espeak-ng", "-v", voice, *prosody, "-w", str(root / rel), sentence], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
                held_out = speaker == list(VOICES)[-1] and k == len(SENTENCES) - 1
                (test if held_out else train).append({"path": rel, "label": emo, "speaker": speaker})
    meta = root / "meta_data" / "Session1"
    meta.mkdir(parents=True)
    for name, items in (("train", train), ("test", test)):
        (meta / f"{name}_meta_data.json").write_text(json.dumps({"labels": labels, "meta_data": items}))
    return root


def _run_launcher(args, cwd: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "speechclip_plus.superb", *args], cwd=str(cwd), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, f"launcher {' '.join(args)} failed:\n{proc.stdout[-4000:]}"
    return proc


def test_superb_emotion_train_then_evaluate(model_file, tmp_path, require):
    require("espeak-ng")
    data = make_emotion_corpus(tmp_path / "er")
    expdir = tmp_path / "exp"
    datarc = "config.downstream_expert.datarc"
    _run_launcher(["-m", "train", "-u", "speechclip_plus_local", "-k", model_file, "-d", "emotion",
                   "-c", str(ER_CONFIG), "-p", str(expdir), "--device", "cpu",
                   "-o", f"{datarc}.root={data},,{datarc}.meta_data={data / 'meta_data'}"], cwd=tmp_path)
    ckpt = expdir / "states-20.ckpt"
    assert ckpt.is_file()
    assert (expdir / "log.log").read_text().count("test at step") == 0  # training evaluates dev only

    proc = _run_launcher(["-m", "evaluate", "-e", str(ckpt), "--device", "cpu"], cwd=tmp_path)
    printed = re.findall(r"^test acc: ([0-9.]+)$", proc.stdout, flags=re.M)
    assert len(printed) == 1 and 0.0 <= float(printed[0]) <= 1.0
    logged = re.findall(r"^test at step \d+: ([0-9.]+)$", (expdir / "log.log").read_text(), flags=re.M)
    assert logged == printed
    predictions = (expdir / "test_fold1_predict.txt").read_text().split("\n")
    predictions = [line.split() for line in predictions if line]
    assert len(predictions) == 4 and all(p[1] in EMOTIONS for p in predictions)
