"""An utterance's embeddings, keywords and hidden states are the same batched or alone, for every upstream the
toolkit ships, through the API, scoring, extraction and the SUPERB expert.

Upstreams: s3prl's fbank (the test configs), s3prl's baseline filterbanks with egs/mini's 40 ms config, and a
tiny HuBERT in the Base layout (GroupNorm extractor, post-LN) and in the Large layout (LayerNorm extractor, pre-LN,
the reference's raw last layer). Filterbanks are batch-invariant, so they run on padded batches; HuBERT is not
(its extractor and positional convolution see the padding), so the default ``per_utterance="auto"`` runs it one
utterance at a time.
"""
import os

import numpy as np
import pytest
import torch

from speechclip_plus.config import load_config

REPO = os.path.join(os.path.dirname(__file__), "..")
CONF = os.path.join(REPO, "speechclip_plus", "conf")
SECONDS = (0.61, 1.37, 0.93)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A data dir of three utterances of different lengths."""
    import soundfile as sf

    from speechclip_plus.data.datadir import write_data_dir

    root = tmp_path_factory.mktemp("invariance")
    rng = np.random.default_rng(0)
    wav, text, spk, img = {}, {}, {}, {}
    for i, sec in enumerate(SECONDS):
        n = int(16000 * sec)
        t = np.arange(n) / 16000
        x = 0.3 * np.sin(2 * np.pi * (180 + 70 * i) * t * (1 + 0.3 * t)) + 0.02 * rng.standard_normal(n)
        path = root / f"u{i}.wav"
        sf.write(path, x.astype(np.float32), 16000)
        utt = f"s{i}-u{i}"
        wav[utt], text[utt], spk[utt], img[utt] = str(path), f"a red circle number {i}", f"s{i}", f"img{i}"
    write_data_dir(root / "data", wav, text, spk, img, {f"img{i}": str(root / f"img{i}.png") for i in range(3)})
    return str(root / "data")


def _config(kind, tmp_path):
    if kind == "fbank":
        return load_config(os.path.join(CONF, "tiny_hplus.yaml"))
    if kind == "fbank_40ms":
        return load_config(os.path.join(CONF, "tiny_hplus.yaml"),
                           ["--model.upstream.name", "baseline_local", "--model.upstream.model_config",
                            os.path.join(REPO, "egs", "mini", "conf", "fbank_40ms.yaml"),
                            "--model.encoder.conv_pos", "3", "--model.encoder.conv_pos_groups", "8"])
    from speechclip_plus.models.tiny import save_tiny_hubert

    large = kind == "hubert_large"
    ckpt = save_tiny_hubert(tmp_path / f"{kind}.pt", extractor_mode="layer_norm" if large else "default")
    return load_config(os.path.join(CONF, "tiny_hplus.yaml"),
                       ["--model.upstream.name", "hubert_local", "--model.upstream.ckpt", str(ckpt),
                        "--model.upstream.raw_last_layer", str(large).lower()])


KINDS = ["fbank", "fbank_40ms", "hubert_base", "hubert_large"]


@pytest.fixture(scope="module", params=KINDS)
def model_file(request, tmp_path_factory):
    from speechclip_plus.api import export_model
    from speechclip_plus.models.speechclip import build_model

    tmp = tmp_path_factory.mktemp(request.param)
    cfg = _config(request.param, tmp)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # a trained-looking BatchNorm, so eval-mode keywords are not all one token
        model.keywords.bn.bn.running_var.fill_(0.05)
    return request.param, export_model(model, cfg, tmp / "model.pt")


def _waves(corpus):
    from speechclip_plus.data.datadir import DataDir

    d = DataDir(corpus)
    return [d.wav[u] for u in d.utts]


def test_the_upstream_probe_says_which_upstreams_are_batch_invariant(model_file):
    from speechclip_plus.api import SpeechCLIPPlus

    kind, path = model_file
    up = SpeechCLIPPlus.from_pretrained(path).model.upstream
    assert up.batch_invariant is kind.startswith("fbank")
    assert up.runs_per_utterance() is not kind.startswith("fbank")


def test_api_embeddings_keywords_and_states(model_file, corpus):
    from speechclip_plus.api import SpeechCLIPPlus, eval_forward, pad_batch, to_16k

    _, path = model_file
    api = SpeechCLIPPlus.from_pretrained(path)
    waves = _waves(corpus)
    for branch in api.branches:
        together = api.embed_speech(waves, branch=branch, batch_size=3)
        alone = torch.cat([api.embed_speech([w], branch=branch) for w in waves])
        torch.testing.assert_close(together, alone, rtol=0, atol=2e-5)
    audio = [to_16k(w) for w in waves]
    wav, lens = pad_batch(audio)
    out = eval_forward(api.model, wav, lens)
    states, feat_lens = api.model.hidden_states(wav, lens)
    for b, w in enumerate(waves):
        kws = api.keywords(w)
        k = int(out["keyword_lengths"][b])
        assert [kw["token_id"] for kw in kws] == out["keyword_ids"][b, :k].tolist()
        own = api.hidden_states(w)
        assert int(feat_lens[b]) == own[0].shape[0]
        for h, o in zip(states, own):
            torch.testing.assert_close(h[b, : o.shape[0]], o, rtol=0, atol=2e-5)
            assert h[b, o.shape[0]:].abs().sum() == 0


def test_scoring_and_extraction(model_file, corpus):
    from speechclip_plus.api import load_model_file
    from speechclip_plus.bin.extract import extract
    from speechclip_plus.eval.scoring import embed_data_dir

    _, path = model_file
    model, _, _ = load_model_file(path)
    model.upstream.per_utterance = "auto"  # what bin.score and bin.extract set by default
    together = embed_data_dir(model, corpus, batch_size=3, progress=False)
    alone = embed_data_dir(model, corpus, batch_size=1, progress=False)
    for branch, emb in together.embeddings.items():
        torch.testing.assert_close(emb, alone.embeddings[branch], rtol=0, atol=2e-5)
    for a, b in zip(together.keywords, alone.keywords):
        assert a["ids"] == b["ids"] and a["spans"] == b["spans"]
    for branch in ("parallel", "hidden"):
        x = dict(extract(model, corpus, branch, batch_size=3, progress=False))
        y = dict(extract(model, corpus, branch, batch_size=1, progress=False))
        assert x.keys() == y.keys()
        for utt in x:
            assert x[utt].shape == y[utt].shape
            np.testing.assert_allclose(x[utt], y[utt], rtol=0, atol=2e-5)


def test_superb_expert(model_file, corpus):
    from speechclip_plus.api import to_16k
    from speechclip_plus.superb import speechclip_plus_local

    kind, path = model_file
    # filterbanks: the default (batched) is exact; HuBERT: per_utterance auto (or true) makes it exact
    expert = speechclip_plus_local(path) if kind.startswith("fbank") else \
        speechclip_plus_local(path, per_utterance="auto")
    audio = [to_16k(w) for w in _waves(corpus)]
    with torch.no_grad():
        together = expert(audio)["hidden_states"]
        for b, w in enumerate(audio):
            alone = expert([w])["hidden_states"]
            n = alone[0].shape[1]
            for h, a in zip(together, alone):
                torch.testing.assert_close(h[b, :n], a[0], rtol=0, atol=2e-5)
