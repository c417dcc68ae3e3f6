"""Sharing models on the Hugging Face Hub: ``hf://ORG/NAME[@REVISION]`` through huggingface_hub's cache in
offline mode (revision pinning, the model file's own safety checks), every tool that takes a model, and
``bin.export --push_to_hub`` against a stubbed ``HfApi``.

The cache is populated in the layout huggingface_hub reads offline: ``models--ORG--NAME/blobs/<sha256>``,
``snapshots/<commit>/model.pt`` (a relative symlink to the blob) and ``refs/<branch or tag>`` (a commit hash).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "speechclip_plus" / "conf"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture(autouse=True)
def _caches(tmp_path, monkeypatch):
    """Each test gets its own model-file cache and an empty Hugging Face cache (offline, from conftest)."""
    import huggingface_hub

    monkeypatch.setenv("SPEECHCLIP_PLUS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    return tmp_path / "hf"


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """Two tiny cplus model files (fbank trunk) that differ in their weights (seeds 0 and 1)."""
    from speechclip_plus.api import export_model
    from speechclip_plus.config import load_config
    from speechclip_plus.models.speechclip import build_model

    root = tmp_path_factory.mktemp("hub_models")
    cfg = load_config(str(CONF / "tiny_cplus.yaml"))
    files = []
    for seed in (0, 1):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(cfg).eval()
        files.append(export_model(model, cfg, root / f"model{seed}.pt", meta={"seed": seed}))
    return files


def populate(cache: Path, repo_id: str, snapshots: dict, refs: dict) -> None:
    """Put files in huggingface_hub's cache layout: ``snapshots`` {commit: {name: path}}, ``refs`` {ref: commit}."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    for commit, files in snapshots.items():
        for name, src in files.items():
            data = Path(src).read_bytes()
            blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = storage / "snapshots" / commit / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    for ref, commit in refs.items():
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)


def _weights(model):
    return model.state_dict()


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- loading
def test_hf_address_loads_from_the_offline_cache_with_revision_pinning(model_files, _caches):
    from speechclip_plus import SpeechCLIPPlus

    populate(_caches, "org/tiny", {COMMIT_A: {"model.pt": model_files[0]}, COMMIT_B: {"model.pt": model_files[1]}},
             {"main": COMMIT_A, "v2": COMMIT_B})
    local = [_weights(SpeechCLIPPlus.from_pretrained(f).model) for f in model_files]
    assert not _same(local[0], local[1])
    for address, want, commit in (("hf://org/tiny", 0, COMMIT_A), ("hf://org/tiny@main", 0, COMMIT_A),
                                  ("hf://org/tiny@v2", 1, COMMIT_B), (f"hf://org/tiny@{COMMIT_B}", 1, COMMIT_B)):
        api = SpeechCLIPPlus.from_pretrained(address)
        assert _same(_weights(api.model), local[want]), address
        assert api.meta["seed"] == want
        assert api.meta["hub"] == {"uri": address, "repo_id": "org/tiny", "revision": address.partition("@")[2] or None,
                                   "commit": commit}


@pytest.mark.parametrize("address,message", [
    ("hf://org/absent", "is not in the Hugging Face cache"),
    ("hf://org/tiny@v9", "of revision v9 is not in the Hugging Face cache"),
    ("hf://org/tiny/other.pt", "other.pt of revision main is not in the Hugging Face cache"),
    ("hf://justaname", "not a valid hf://ORG/NAME[@REVISION] address"),
    ("hf://datasets/org/tiny", "a dataset repository"),
])
def test_unavailable_or_malformed_addresses_are_clear_errors(model_files, _caches, address, message):
    from speechclip_plus import SpeechCLIPPlus
    from speechclip_plus.api import ModelFileError

    populate(_caches, "org/tiny", {COMMIT_A: {"model.pt": model_files[0]}}, {"main": COMMIT_A})
    with pytest.raises(ModelFileError, match=re.escape(message)) as err:
        SpeechCLIPPlus.from_pretrained(address)
    assert address in str(err.value)
    if "cache" in message:
        assert "HF_HUB_OFFLINE=1" in str(err.value)


def test_hub_files_get_the_same_safety_checks_as_local_files(model_files, _caches, tmp_path, crafted):
    """A tampered tensor (digest mismatch) and a pickle that would run code are refused from the cache too."""
    from speechclip_plus import SpeechCLIPPlus
    from speechclip_plus.api import ModelFileError

    payload = torch.load(model_files[0], weights_only=True)
    key = next(k for k in payload["state_dict"] if k.startswith("cif."))
    payload["state_dict"][key] = payload["state_dict"][key] + 1.0
    torch.save(payload, tmp_path / "tampered.pt")

    evil = crafted(exec, f"open({str(tmp_path / 'ran')!r}, 'w')")
    torch.save({"format": "speechclip_plus.model/1", "x": evil}, tmp_path / "evil.pt")
    populate(_caches, "org/bad", {COMMIT_A: {"model.pt": tmp_path / "tampered.pt"},
                                  COMMIT_B: {"model.pt": tmp_path / "evil.pt"}}, {"main": COMMIT_A})
    with pytest.raises(ModelFileError, match="content digest mismatch"):
        SpeechCLIPPlus.from_pretrained("hf://org/bad")
    with pytest.raises(ModelFileError, match="pickled objects"):
        SpeechCLIPPlus.from_pretrained(f"hf://org/bad@{COMMIT_B}")
    assert not (tmp_path / "ran").exists()


def test_score_extract_and_superb_entries_accept_hf(model_files, _caches, tmp_path, make_data_dir):
    import kaldiio

    from speechclip_plus import SpeechCLIPPlus
    from speechclip_plus.bin.extract import main as extract_main
    from speechclip_plus.bin.score import main as score_main
    from speechclip_plus.superb import speechclip_plus, speechclip_plus_hf, speechclip_plus_local

    populate(_caches, "org/tiny", {COMMIT_A: {"model.pt": model_files[0]}}, {"main": COMMIT_A})
    data, emb = make_data_dir(tmp_path, "test", n_images=2, caps_per_image=2, seed=6)
    assert extract_main(["--model", "hf://org/tiny", "--data_dir", str(data), "--out_dir", str(tmp_path / "e"),
                         "--no_progress"]) == 0
    got = dict(kaldiio.load_scp(str(tmp_path / "e" / "embed.scp")))
    local = SpeechCLIPPlus.from_pretrained(model_files[0])
    wavs = {line.split()[0]: line.split()[1] for line in (data / "wav.scp").read_text().splitlines()}
    for utt, path in wavs.items():
        torch.testing.assert_close(torch.from_numpy(got[utt]), local.embed_speech(path)[0], atol=1e-5, rtol=1e-4)
    out = tmp_path / "scored"
    assert score_main(["--model", "hf://org/tiny", "--data_dir", str(data), "--image_embeds", str(emb),
                       "--out_dir", str(out), "--num_plots", "0", "--no_progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["model"]["hub"]["commit"] == COMMIT_A and "hf://org/tiny" in (out / "RESULTS.md").read_text()
    wav = 0.1 * torch.randn(9000, generator=torch.Generator().manual_seed(3))
    want = speechclip_plus_local(model_files[0])([wav])["hidden_states"]
    for entry in (speechclip_plus, speechclip_plus_hf, speechclip_plus_local):
        got_states = entry("hf://org/tiny")([wav])["hidden_states"]
        assert len(got_states) == len(want) and all(torch.equal(a, b) for a, b in zip(got_states, want))
    loaded = torch.hub.load(str(REPO), "speechclip_plus_hf", source="local", ckpt="hf://org/tiny")
    assert loaded.get_downsample_rates("hidden_states") == local.model.upstream.downsample_rate
    with pytest.raises(ValueError, match="speechclip_plus_hf needs ckpt=hf://"):
        speechclip_plus_hf(model_files[0])


# ---------------------------------------------------------------------------------------------- pushing
class StubApi:
    """Records what ``push_model`` sends instead of talking to the Hub."""

    def __init__(self, fail: bool = False):
        self.repos, self.commits, self.fail = [], [], fail

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None, **kwargs):
        self.repos.append({"repo_id": repo_id, "private": private, "exist_ok": exist_ok, "repo_type": repo_type})

    def create_commit(self, repo_id, operations, commit_message, repo_type=None, **kwargs):
        if self.fail:
            raise ConnectionError("the Hub is unreachable")
        files = {}
        for op in operations:
            src = op.path_or_fileobj
            files[op.path_in_repo] = Path(src).read_bytes() if isinstance(src, (str, Path)) else bytes(src)
        self.commits.append({"repo_id": repo_id, "files": files, "message": commit_message})
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/{COMMIT_B}"})()


@pytest.fixture(scope="module")
def exp_dir(tmp_path_factory, train_exp):
    exp, _ = train_exp(tmp_path_factory.mktemp("push"), "cplus")
    table = "| branch | S->I R@1 |\n|---|---|\n| cascaded | 50.00 |\n"
    (exp / "RESULTS.md").write_text(f"## test: best.pt (step 2)\n\n{table}")  # what bin.score writes
    return exp


def test_export_push_to_hub_uploads_model_and_card_in_one_commit(exp_dir, tmp_path, monkeypatch, _caches):
    import huggingface_hub
    from huggingface_hub import ModelCard

    from speechclip_plus import SpeechCLIPPlus
    from speechclip_plus.api import read_model_file
    from speechclip_plus.bin.export import main

    stub = StubApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: stub)
    out = tmp_path / "model.pt"
    assert main(["--exp_dir", str(exp_dir), "--out", str(out), "--push_to_hub", "org/speechclip-tiny",
                 "--hub_private"]) == 0
    assert stub.repos == [{"repo_id": "org/speechclip-tiny", "private": True, "exist_ok": True, "repo_type": "model"}]
    assert len(stub.commits) == 1 and set(stub.commits[0]["files"]) == {"model.pt", "README.md"}
    uploaded = stub.commits[0]["files"]["model.pt"]
    assert uploaded == out.read_bytes()
    (tmp_path / "uploaded.pt").write_bytes(uploaded)
    payload = read_model_file(tmp_path / "uploaded.pt")
    card_text = stub.commits[0]["files"]["README.md"].decode()
    card = ModelCard(card_text)
    assert card.data.library_name == "speechclip_plus" and "variant-cplus" in card.data.tags
    assert 'from_pretrained("hf://org/speechclip-tiny")' in card_text
    assert "| cascaded | 50.00 |" in card_text and "checkpoint `best.pt` (step 2)" in card_text
    config = yaml.safe_load(re.search(r"```yaml\n(.*?)```", card_text, re.S).group(1))
    assert config == payload["config"]
    # what was pushed loads back through hf:// (the cache filled as a download would)
    (tmp_path / "README.md").write_text(card_text)
    populate(_caches, "org/speechclip-tiny", {COMMIT_B: {"model.pt": tmp_path / "uploaded.pt",
                                                         "README.md": tmp_path / "README.md"}}, {"main": COMMIT_B})
    api = SpeechCLIPPlus.from_pretrained("hf://org/speechclip-tiny")
    assert api.meta["step"] == 2 and api.meta["hub"]["commit"] == COMMIT_B


def test_push_is_checked_before_export_and_a_failed_upload_keeps_the_export(exp_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from speechclip_plus.bin.export import main

    out = tmp_path / "model.pt"
    assert main(["--exp_dir", str(exp_dir), "--out", str(out), "--push_to_hub", "not a repo id"]) == 1
    assert "--push_to_hub 'not a repo id': not a valid repository id" in capsys.readouterr().err
    assert not out.exists()
    stub = StubApi(fail=True)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: stub)
    assert main(["--exp_dir", str(exp_dir), "--out", str(out), "--push_to_hub", "org/tiny"]) == 1
    err = capsys.readouterr().err
    assert "push to org/tiny failed: ConnectionError: the Hub is unreachable" in err and "is intact" in err
    assert out.is_file() and stub.repos and not stub.commits
