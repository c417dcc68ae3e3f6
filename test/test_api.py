"""Python API and the model file: export -> from_pretrained round trips, safety of loading, input handling."""
from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "speechclip_plus" / "conf"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every test gets its own model-file cache (never ~/.cache)."""
    monkeypatch.setenv("SPEECHCLIP_PLUS_CACHE", str(tmp_path / "cache"))


def _wav_paths(data: Path):
    return [line.split(maxsplit=1)[1] for line in (data / "wav.scp").read_text().splitlines()]


def _all_outputs(api, paths):
    """Every embedding branch and every utterance's keywords."""
    out = {b: api.embed_speech(paths, branch=b, batch_size=2) for b in api.branches}
    out["keywords"] = [api.keywords(p) for p in paths]
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, make_data_dir, train_exp):
    """Trained tiny models exported to model files: cplus (fbank) and hplus on a tiny HuBERT (hubert_local)
    whose checkpoint file is deleted after export."""
    from speechclip_plus import SpeechCLIPPlus
    from speechclip_plus.bin.export import main as export_main
    from speechclip_plus.models.tiny import save_tiny_hubert

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("api")
    data, _ = make_data_dir(root, "test", n_images=2, caps_per_image=2, seed=3)
    paths = _wav_paths(data)
    models = {}
    for variant in ("cplus", "hplus"):
        vroot = root / variant
        overrides = []
        if variant == "hplus":
            ckpt = save_tiny_hubert(vroot / "upstream" / "tiny_hubert.pt")
            overrides = ["--model.upstream.name", "hubert_local", "--model.upstream.ckpt", ckpt]
        exp, trainer = train_exp(vroot, variant, *overrides)
        memory = _all_outputs(SpeechCLIPPlus(trainer.raw_model.eval()), paths)
        model_file = vroot / "model.pt"
        assert export_main(["--exp_dir", str(exp), "--out", str(model_file)]) == 0
        models[variant] = {"exp": exp, "file": model_file, "memory": memory, "upstream": overrides[-1:]}
        if variant == "hplus":
            from_exp = _all_outputs(SpeechCLIPPlus.from_pretrained(exp), paths)
            models[variant]["from_exp"] = from_exp
            os.remove(ckpt)
    return {"root": root, "data": data, "paths": paths, "models": models}


def _assert_same(a, b):
    assert set(a) == set(b)
    for key in a:
        if key == "keywords":
            assert a[key] == b[key]
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("variant", ["cplus", "hplus"])
def test_export_round_trip_is_exact(exported, variant, tmp_path):
    from speechclip_plus import SpeechCLIPPlus
    from speechclip_plus.api import FORMAT

    m = exported["models"][variant]
    if variant == "hplus":
        assert not os.path.exists(m["upstream"][0])  # the original tiny HuBERT file is gone
        _assert_same(m["memory"], m["from_exp"])
    api = SpeechCLIPPlus.from_pretrained(m["file"])
    _assert_same(m["memory"], _all_outputs(api, exported["paths"]))
    assert api.meta["step"] == 2 and api.config["model"]["variant"] == variant

    payload = torch.load(m["file"], weights_only=True)
    assert payload["format"] == FORMAT
    assert set(payload) >= {"config", "vocab_ids", "state_dict", "upstream_ckpt"}
    assert payload["vocab_ids"] == api.model.clip.vocab_ids.tolist()
    state = api.model.state_dict()
    assert set(payload["state_dict"]) == set(state)
    assert any(k.startswith("clip.") for k in state) and all(isinstance(v, torch.Tensor) for v in state.values())
    if variant == "cplus":
        assert payload["upstream_ckpt"] is None
        return
    # the upstream checkpoint travels inside the file, its weights shared with the state dict (stored once)
    assert set(payload["upstream_ckpt"]) >= {"model_cfg", "task_cfg", "model_weight"}
    alone = io.BytesIO()
    torch.save({k: v for k, v in payload.items() if k != "upstream_ckpt"}, alone)
    weights = sum(v.numel() * v.element_size() for v in payload["upstream_ckpt"]["model_weight"].values())
    assert os.path.getsize(m["file"]) < len(alone.getvalue()) + weights / 2
    cached = list((tmp_path / "cache" / "upstream").glob("*/upstream.pt"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    SpeechCLIPPlus.from_pretrained(m["file"])  # a second load reuses the verified cache entry
    assert cached[0].stat().st_mtime_ns == stamp


def test_clip_settings_without_weights_survive_export(tmp_path, write_vocab):
    """quick_gelu and the image preprocessing come from CLIP's pretrained tag, not its weights: the file keeps
    them, so a model built with OpenAI-style settings reloads identically."""
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    from speechclip_plus import SpeechCLIPPlus
    from speechclip_plus.api import export_model
    from speechclip_plus.config import load_config
    from speechclip_plus.models.clip import FrozenCLIP
    from speechclip_plus.models.speechclip import build_model

    cfg = load_config(str(CONF / "tiny_p.yaml"), ["--model.clip.vocab", write_vocab(tmp_path / "v.txt")])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    old = model.clip
    model.clip = FrozenCLIP(old.name, None, old.vocab_ids.tolist(), quick_gelu=True)
    pp = dict(model.clip.clip.visual.preprocess_cfg, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    model.clip.clip.visual.preprocess_cfg = pp
    model.clip._preprocess = image_transform_v2(PreprocessCfg(**pp), is_train=False)
    export_model(model, cfg, tmp_path / "m.pt")
    loaded = SpeechCLIPPlus.from_pretrained(tmp_path / "m.pt")
    assert loaded.model.clip.quick_gelu is True
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    wav = torch.randn(12000, generator=torch.Generator().manual_seed(0)) * 0.1
    original = SpeechCLIPPlus(model)
    assert torch.equal(loaded.embed_image(image), original.embed_image(image))
    assert torch.equal(loaded.embed_text(["a dog"]), original.embed_text(["a dog"]))
    assert torch.equal(loaded.embed_speech(wav, 16000), original.embed_speech(wav, 16000))


def test_malicious_truncated_and_foreign_files_are_refused(exported, tmp_path, crafted):
    from speechclip_plus import SpeechCLIPPlus
    from speechclip_plus.api import FORMAT, ModelFileError, content_digest

    marker = tmp_path / "pwned"
    torch_file, pickle_file = tmp_path / "evil.pt", tmp_path / "evil.pkl"
    torch.save({"format": FORMAT, "config": {}, "payload": crafted(os.mkdir, str(marker))}, torch_file)
    with open(pickle_file, "wb") as f:
        pickle.dump(crafted(os.mkdir, str(marker)), f)
    for path in (torch_file, pickle_file):
        with pytest.raises(ModelFileError, match=f"{path}: cannot be read.*never loaded"):
            SpeechCLIPPlus.from_pretrained(path)
    assert not marker.exists()

    data = exported["models"]["cplus"]["file"].read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=f"{cut}: cannot be read"):
        SpeechCLIPPlus.from_pretrained(cut)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ModelFileError, match=f"{foreign}: not a speechclip_plus model file"):
        SpeechCLIPPlus.from_pretrained(foreign)
    with pytest.raises(ModelFileError, match="not found"):
        SpeechCLIPPlus.from_pretrained(tmp_path / "nothing.pt")
    payload = torch.load(exported["models"]["cplus"]["file"], weights_only=True)
    key = next(k for k in payload["state_dict"] if k.startswith("encoder."))
    bent = tmp_path / "bent.pt"
    payload["state_dict"][key] = payload["state_dict"][key].clone()
    payload["state_dict"][key].view(-1)[0] += 1.0  # one changed value, digest left as exported
    torch.save(payload, bent)
    with pytest.raises(ModelFileError, match=f"{bent}: content digest mismatch"):
        SpeechCLIPPlus.from_pretrained(bent)
    del payload["digest"]
    torch.save(payload, bent)
    with pytest.raises(ModelFileError, match=f"{bent}: content digest missing"):
        SpeechCLIPPlus.from_pretrained(bent)
    # files crafted with a matching digest still meet the structural checks
    payload["state_dict"][key] = torch.zeros(3)
    torch.save({**payload, "digest": content_digest(payload)}, bent)
    with pytest.raises(ModelFileError, match=f"{bent}: weights do not fit .*{key}"):
        SpeechCLIPPlus.from_pretrained(bent)
    del payload["state_dict"][key]
    torch.save({**payload, "digest": content_digest(payload)}, bent)
    with pytest.raises(ModelFileError, match=f"{bent}: weights do not match .*missing.*{key}"):
        SpeechCLIPPlus.from_pretrained(bent)
    exp = tmp_path / "exp"  # an exp dir whose training has not validated yet
    exp.mkdir()
    (exp / "config.yaml").write_bytes((exported["models"]["cplus"]["exp"] / "config.yaml").read_bytes())
    with pytest.raises(ModelFileError, match=f"{exp}: no best checkpoint"):
        SpeechCLIPPlus.from_pretrained(exp)


@pytest.fixture(scope="module")
def api(exported):
    from speechclip_plus import SpeechCLIPPlus

    return SpeechCLIPPlus.from_pretrained(exported["models"]["cplus"]["file"])


def test_embed_speech_input_forms_agree(api, tmp_path):
    """A file, a 16 kHz tensor and a 22.05 kHz numpy array of the same signal give the same result."""
    import torchaudio.functional as AF

    def signal(seconds=1.0, seed=0):
        t = torch.arange(int(16000 * seconds)) / 16000
        noise = torch.randn(len(t), generator=torch.Generator().manual_seed(seed))
        return 0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.1 * torch.sin(2 * torch.pi * 1330 * t) + 0.05 * noise

    x16 = signal(1.5)
    x22 = AF.resample(x16, 16000, 22050).numpy()  # the same band-limited signal at 22.05 kHz
    path = tmp_path / "x.wav"
    sf.write(path, x16.numpy(), 16000, subtype="FLOAT")
    from_path = api.embed_speech(str(path))
    assert from_path.shape == (1, api.embed_dim)
    assert torch.equal(from_path, api.embed_speech(x16, sample_rate=16000))
    assert torch.equal(api.embed_speech(x22, sample_rate=22050),
                       api.embed_speech(AF.resample(torch.from_numpy(x22), 22050, 16000), sample_rate=16000))
    # after resampling back, the frame-level states match the 16 kHz original closely (a reversed signal not)
    h16, h22 = api.hidden_states(str(path))[-1], api.hidden_states(x22, sample_rate=22050)[-1]
    assert h16.shape == h22.shape
    cos = torch.nn.functional.cosine_similarity(h16, h22, dim=-1)
    assert float(cos.min()) > 0.99, cos
    h_rev = api.hidden_states(x16.flip(0), sample_rate=16000)[-1]
    assert float(torch.nn.functional.cosine_similarity(h16, h_rev, dim=-1).min()) < 0.9

    # batching by length keeps the input order
    waves = [signal(s, seed=i) for i, s in enumerate((0.5, 1.2, 0.8))]
    batched = api.embed_speech(waves, sample_rate=16000, batch_size=2)
    single = torch.cat([api.embed_speech(w, sample_rate=16000) for w in waves])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(3))

    with pytest.raises(ValueError, match="need sample_rate"):
        api.embed_speech(x16.numpy())
    with pytest.raises(ValueError, match="1-D"):
        api.embed_speech(np.zeros((2, 16000), dtype=np.float32), sample_rate=16000)
    with pytest.raises(ValueError, match="branch 'parallel' not available"):
        api.embed_speech(str(path), branch="parallel")
    with pytest.raises(ValueError, match="file is 16000 Hz"):
        api.embed_speech(str(path), sample_rate=8000)


def test_audio_the_recipes_refuse_is_refused_with_their_message(api, tmp_path):
    """The API reads files through the data layer's reader: NaN/inf, silent, empty and unreadable audio get the
    error stage 1 gives (never a NaN embedding), and arrays get the same checks."""
    from speechclip_plus.data.audio import read_audio
    from speechclip_plus.data.datadir import DataError

    t = np.arange(8000) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    cases = {"nan.wav": np.where(t < 0.1, np.nan, tone).astype(np.float32), "silent.wav": np.zeros(8000, np.float32),
             "inf.wav": np.where(t > 0.4, np.inf, tone).astype(np.float32)}
    for name, x in cases.items():
        sf.write(tmp_path / name, x, 16000, subtype="FLOAT")
    (tmp_path / "junk.wav").write_bytes(b"not audio")
    for name, what in [("nan.wav", r"1600 non-finite sample value\(s\) \(NaN/inf\)"), ("silent.wav", "audio is silent"),
                       ("inf.wav", r"non-finite sample value\(s\)"), ("junk.wav", "cannot read audio")]:
        path = str(tmp_path / name)
        with pytest.raises(DataError, match=what) as api_error:
            api.embed_speech(path)
        with pytest.raises(DataError, match=what) as recipe_error:
            read_audio(path, silence=True)
        assert str(api_error.value) == str(recipe_error.value) and str(api_error.value).startswith(path)
        with pytest.raises(DataError, match=what.replace("audio is silent", "is silent")):
            api.keywords(path)
    with pytest.raises(DataError, match=r"wavs\[1\]: 1 non-finite sample"):
        api.embed_speech([tone, np.where(t == 0, np.nan, tone)], sample_rate=16000)
    with pytest.raises(DataError, match=r"wav: audio is silent"):
        api.hidden_states(torch.zeros(4000), sample_rate=16000)
    with pytest.raises(DataError, match=r"wavs\[0\]: no samples"):
        api.embed_speech(np.zeros(0, np.float32), sample_rate=16000)
    with pytest.raises(FileNotFoundError, match="missing.wav: audio file not found"):
        api.embed_speech(str(tmp_path / "missing.wav"))


def test_keywords_have_cif_times_inside_the_utterance(api, exported):
    path = exported["paths"][0]
    duration = sf.info(path).duration
    kws = api.keywords(path)
    wav, _ = sf.read(path, dtype="float32")
    with torch.no_grad():
        out = api.model(torch.from_numpy(wav)[None], torch.tensor([len(wav)]))
    k = int(out["keyword_lengths"][0])
    assert len(kws) == k >= 1
    assert [kw["token_id"] for kw in kws] == out["keyword_ids"][0, :k].tolist()
    starts = [kw["start"] for kw in kws]
    assert starts == sorted(starts)
    for kw in kws:
        assert 0.0 <= kw["start"] <= kw["end"] <= duration + 1e-6
        assert len(kw["neighbours"]) == 5 and kw["token"] == api.model.clip.decode_ids([kw["token_id"]])[0]
    assert kws[-1]["end"] > duration / 2  # the keywords cover the utterance, not just its start
    # the keyword spans end exactly on the frames where the model's CIF fired
    from speechclip_plus.api import keyword_spans

    t = int(out["feat_lens"][0])
    alpha, beta = out["cif_alpha"][0, :t], api.model.cfg["cif"]["threshold"]
    spans = keyword_spans(alpha, k, t, beta)
    fired = {e for j, (_, e) in enumerate(spans) if (j + 1) * beta <= float(alpha.double().sum())}
    assert sorted(fired) == out["cif_fire_mask"][0, :t].nonzero().flatten().tolist()


def test_keyword_spans_follow_the_integration_intervals():
    from speechclip_plus.api import keyword_spans

    # c = 0.5 1.0 1.5 2.2 2.5 2.7: frame 1 ends on the first boundary (keyword 0 only), frame 3 straddles
    # keywords 1 and 2, the tail keyword 2 runs to the last frame
    alpha = torch.tensor([0.5, 0.5, 0.5, 0.7, 0.3, 0.2])
    assert keyword_spans(alpha, 3, 6, 1.0) == [(0, 1), (2, 3), (3, 5)]
    assert keyword_spans(alpha, 2, 4, 1.0) == [(0, 1), (2, 3)]  # frames past feat_len are ignored
    assert keyword_spans(torch.tensor([0.0, 0.0, 2.5, 0.1]), 2, 4, 1.0) == [(2, 2), (2, 2)]


def test_fixed_keywords_have_no_times(tmp_path, write_vocab):
    from speechclip_plus import SpeechCLIPPlus
    from speechclip_plus.config import load_config
    from speechclip_plus.models.speechclip import build_model

    cfg = load_config(str(CONF / "tiny_c.yaml"), ["--model.clip.vocab", write_vocab(tmp_path / "v.txt")])
    api = SpeechCLIPPlus(build_model(cfg))
    kws = api.keywords(torch.randn(9000) * 0.1, sample_rate=16000)
    assert len(kws) == cfg["model"]["cascaded"]["n_keywords"]
    assert all(kw["start"] is None and kw["end"] is None for kw in kws)
    assert api.branches == ["cascaded"]


def test_hidden_states_images_text_similarity(api, exported, tmp_path):
    from PIL import Image

    path = exported["paths"][1]
    wav, _ = sf.read(path, dtype="float32")
    states = api.hidden_states(path)
    up = api.model.upstream
    assert len(states) == up.num_layers + 1
    with torch.no_grad():
        direct, feat_lens = api.model.hidden_states(torch.from_numpy(wav)[None], torch.tensor([len(wav)]))
    t = int(feat_lens[0])
    assert round(len(wav) / up.downsample_rate) - 3 <= t <= round(len(wav) / up.downsample_rate)
    assert all(h.shape == (t, up.hidden_dim) for h in states)
    for mine, ref in zip(states, direct):
        torch.testing.assert_close(mine, ref[0, :t])

    png = tmp_path / "im.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(png)
    by_path = api.embed_image([str(png), str(png)])
    by_pil = api.embed_image(Image.open(png))
    assert by_path.shape == (2, api.embed_dim)
    torch.testing.assert_close(by_path, by_pil.expand(2, -1))
    with torch.no_grad():
        direct_img = api.model.encode_image(api.model.clip.preprocess(Image.open(png).convert("RGB"))[None])
    torch.testing.assert_close(by_pil, direct_img)
    text = api.embed_text(["a dog", "a red ball"])
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    speech = api.embed_speech(exported["paths"][:3])
    sim = api.similarity(speech, by_pil)
    assert sim.shape == (3, 1)
    torch.testing.assert_close(sim, speech @ by_pil.T)
    # a missing file says "not found" and names the path; an unreadable one says it cannot be read
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match=f"^{missing}: image file not found$"):
        api.embed_image(str(missing))
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path / 'missing.flac'}: audio file not found$"):
        api.embed_speech([exported["paths"][0], str(tmp_path / "missing.flac")])
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=f"{tmp_path / 'junk.png'}: cannot read image"):
        api.embed_image(str(tmp_path / "junk.png"))


def test_import_stays_light():
    code = ("import sys, speechclip_plus; "
            "print(sorted(m for m in ('torch', 'open_clip', 's3prl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    code = "import speechclip_plus; print(speechclip_plus.SpeechCLIPPlus.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "SpeechCLIPPlus"


def test_upstream_feature_config_travels_inside_the_model_file(tmp_path, monkeypatch):
    """A model whose s3prl upstream is configured by a file (baseline_local + model_config) stays loadable
    after that file is gone."""
    import os as _os

    from speechclip_plus.api import SpeechCLIPPlus, export_model
    from speechclip_plus.config import load_config
    from speechclip_plus.models.speechclip import build_model

    monkeypatch.setenv("SPEECHCLIP_PLUS_CACHE", str(tmp_path / "cache"))
    feats = tmp_path / "fbank_20ms.yaml"
    feats.write_text("kaldi:\n  feat_type: fbank\n  fbank: {num_mel_bins: 40, frame_length: 25.0, frame_shift: 20.0}\n"
                     "delta: {order: 0, win_length: 5}\ncmvn: {use_cmvn: true}\n")
    conf = _os.path.join(_os.path.dirname(__file__), "..", "speechclip_plus", "conf", "tiny_cplus.yaml")
    cfg = load_config(conf, ["--model.upstream.name", "baseline_local", "--model.upstream.model_config", str(feats)])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert model.upstream.hidden_dim == 40 and model.upstream.downsample_rate == 320
    wav = torch.randn(1, 12000) * 0.1
    with torch.no_grad():
        want = model(wav, torch.tensor([12000]))["cascaded"]
    export_model(model, cfg, tmp_path / "m.pt")
    feats.unlink()
    got = SpeechCLIPPlus.from_pretrained(str(tmp_path / "m.pt")).embed_speech([wav[0]], sample_rate=16000,
                                                                             branch="cascaded")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_loading_a_model_file_says_what_was_loaded(exported, caplog):
    """open_clip's "No pretrained weights loaded ... initialized randomly" is not shown when a model file is
    read (its weights are loaded right after); the log says that the CLIP weights came from the file."""
    import logging
    import re

    from speechclip_plus import SpeechCLIPPlus

    caplog.set_level(logging.INFO)
    SpeechCLIPPlus.from_pretrained(exported["models"]["hplus"]["file"])
    assert "initialized randomly" not in caplog.text
    loaded = [r.getMessage() for r in caplog.records if r.name == "speechclip_plus.models.clip"]
    counts = [re.search(r": (\d+) of its (\d+) tensors loaded from the model's state dict$", m) for m in loaded]
    counts = [c.groups() for c in counts if c]
    assert len(counts) == 1 and counts[0][0] == counts[0][1], loaded  # every CLIP tensor came from the file
