"""Untrusted files: nothing we read can run code. Every ``torch.load`` is ``weights_only=True``; a pickle with a
``__reduce__`` side effect is refused with a clear error as a model file, as a training checkpoint under
--resume, as an exp dir's checkpoint, and inside an image-embedding ark (whose kaldiio reader would unpickle
it, so ours does not use it); truncated or restructured files are clear errors; YAML is ``safe_load``-ed
(``!!python`` tags refused); relative config paths resolve against the config file's own directory."""
from __future__ import annotations

import ast
import io
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "speechclip_plus" / "conf"


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a crafted file ran code"


# ---------------------------------------------------------------------------------------------- the code base
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name):
            yield node, f"{node.func.value.id}.{node.func.attr}"


def test_every_deserialisation_in_the_package_is_safe():
    """``torch.load`` always with ``weights_only=True``; no pickle, unsafe YAML, pickled numpy, kaldiio reader."""
    forbidden = {"pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load",
                 "kaldiio.load_scp", "kaldiio.load_ark", "kaldiio.load_mat", "kaldiio.load_scp_sequential",
                 "kaldiio.ReadHelper", "torch.jit.load"}
    loads, bad = 0, []
    for path in sorted((REPO / "speechclip_plus").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node, name in _calls(tree):
            where = f"{path.relative_to(REPO)}:{node.lineno}: {name}"
            if name == "torch.load":
                loads += 1
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    bad.append(where + " without weights_only=True")
            elif name in forbidden:
                bad.append(where)
            elif name == "np.load":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False):
                    bad.append(where + " without allow_pickle=False")
    assert loads >= 3 and bad == []  # api (model files, exp dirs), train/checkpoint.py


# ---------------------------------------------------------------------------------------------- model files
@pytest.fixture(scope="module")
def model_file(tmp_path_factory, tiny_config):
    """A real (untrained) tiny cplus model file written by ``export_model``."""
    from speechclip_plus.api import export_model
    from speechclip_plus.models.speechclip import build_model

    cfg = tiny_config("cplus")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    export_model(build_model(cfg), cfg, path)
    return path


def _rezip(src: Path, dest: Path, replace) -> None:
    """Copy the zip ``src`` to ``dest`` with member contents passed through ``replace(name, data)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, replace(info.filename, zin.read(info.filename)))


def test_crafted_truncated_and_restructured_model_files_are_refused(model_file, tmp_path, marker, crafted):
    from speechclip_plus import SpeechCLIPPlus
    from speechclip_plus.api import FORMAT, ModelFileError, read_model_file

    assert read_model_file(model_file)["format"] == FORMAT  # the untouched file is fine
    evil_pt, evil_pkl = tmp_path / "evil.pt", tmp_path / "evil.pkl"
    torch.save({"format": FORMAT, "config": {}, "payload": crafted(os.mkdir, str(marker))}, evil_pt)
    evil_pkl.write_bytes(pickle.dumps(crafted(os.mkdir, str(marker))))
    # the same payload inside the real model file: its data.pkl swapped for one that calls os.mkdir
    evil_inside = tmp_path / "evil_inside.pt"
    _rezip(model_file, evil_inside,
           lambda name, data: pickle.dumps({"format": FORMAT, "x": crafted(os.mkdir, str(marker))}, protocol=2)
           if name.endswith("/data.pkl") else data)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    for path in (evil_pt, evil_pkl, evil_inside, cut):
        with pytest.raises(ModelFileError, match=re.escape(f"{path}: cannot be read as a speechclip_plus model "
                                                           "file (corrupted, truncated, or it contains pickled "
                                                           "objects other than plain containers and tensors")):
            SpeechCLIPPlus.from_pretrained(path)
    wrong = tmp_path / "wrong.pt"
    torch.save({"format": FORMAT, "config": {"model": {}}, "vocab_ids": [1], "state_dict": {"w": "not a tensor"}},
               wrong)
    with pytest.raises(ModelFileError, match=re.escape(f"{wrong}: 'state_dict' must map names to tensors")):
        read_model_file(wrong)


def test_crafted_checkpoint_in_an_exp_dir_is_refused(tmp_path, marker, tiny_config, crafted):
    from speechclip_plus import SpeechCLIPPlus
    from speechclip_plus.api import ModelFileError
    from speechclip_plus.config import save_config

    exp = tmp_path / "exp"
    save_config(tiny_config("cplus"), str(exp / "config.yaml"))
    (exp / "checkpoints").mkdir()
    torch.save({"model": {}, "step": crafted(os.mkdir, str(marker))}, exp / "checkpoints" / "best.pt")
    with pytest.raises(ModelFileError, match=re.escape(f"{exp / 'checkpoints' / 'best.pt'}: cannot be read as a "
                                                       "training checkpoint")):
        SpeechCLIPPlus.from_pretrained(exp)


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_corpus):
    root = tmp_path_factory.mktemp("corpus")
    train, emb = make_corpus(root, 4, 2, seed=0, name="train")
    return {"train_data": str(train), "image_embeds": str(emb)}


def _train(corpus, exp, *extra, image_embeds=None):
    from speechclip_plus.bin.train import main

    return main(["--config", str(CONF / "tiny_p.yaml"), "--train_data", corpus["train_data"],
                 "--image_embeds", str(image_embeds or corpus["image_embeds"]), "--exp_dir", str(exp),
                 "--device", "cpu", "--no_progress", "--train.batch_size", "2", "--train.max_steps", "2",
                 "--train.valid_every", "1", "--train.precision", "fp32", "--train.num_workers", "0", *extra])


def test_resume_refuses_a_crafted_or_truncated_checkpoint(corpus, tmp_path, marker, capsys, crafted):
    exp = tmp_path / "exp"
    last = exp / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    torch.save({"format": 1, "step": crafted(os.mkdir, str(marker))}, last)
    assert _train(corpus, exp, "--resume") == 2
    err = capsys.readouterr().err
    assert re.search(re.escape(f"error: cannot load checkpoint {last}: corrupted, truncated, or it contains "
                               "pickled objects other than plain containers and tensors, which are never loaded "
                               "(UnpicklingError: ") + r".*GLOBAL \w+\.mkdir", err), err
    assert "weights_only` set to `False`" not in err  # torch's advice to unpickle anyway is not passed on
    assert not (exp / "config.yaml").exists()  # a refused resume leaves the exp dir's config alone
    good = tmp_path / "good"
    assert _train(corpus, good) == 0
    data = (good / "checkpoints" / "last.pt").read_bytes()
    last.write_bytes(data[: len(data) - 200])
    assert _train(corpus, exp, "--resume") == 2
    assert f"error: cannot load checkpoint {last}: corrupted, truncated" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- image caches
def test_image_embedding_files_never_unpickle_or_run_commands(corpus, tmp_path, marker, capsys, crafted):
    from speechclip_plus.data.datadir import DataError
    from speechclip_plus.data.dataset import SpeechImageDataset
    from speechclip_plus.data.image_cache import EmbeddingScp, load_image_embeddings

    good = load_image_embeddings(corpus["image_embeds"])
    assert set(good) == {"img00", "img01"}
    assert all(v.shape == (48,) and v.dtype == np.float32 for v in good.values())
    # a kaldiio "PKL" record: kaldiio.load_scp would unpickle it
    ark, scp = tmp_path / "evil.ark", tmp_path / "evil.scp"
    ark.write_bytes(b"img00 PKL" + pickle.dumps(crafted(os.mkdir, str(marker))))
    ark2 = tmp_path / "fine.ark"
    ark2.write_bytes((Path(corpus["image_embeds"]).parent / "img_embed.ark").read_bytes())
    offsets = {k: v.rsplit(":", 1)[1] for k, v in
               (line.split() for line in Path(corpus["image_embeds"]).read_text().splitlines())}
    scp.write_text(f"img00 {ark}:6\nimg01 {ark2}:{offsets['img01']}\n")
    expected = (f"{scp}:1: img00: not a Kaldi binary float vector/matrix at {ark}:6 (found b'PKL\\x80\\x04'; "
                "pickled, text or piped entries are refused)")
    with pytest.raises(DataError, match=re.escape(expected)):
        load_image_embeddings(scp)
    ds = SpeechImageDataset(corpus["train_data"], image_embeds=scp)
    items = {ds.utt2img[u]: i for i, u in enumerate(ds.utts)}
    assert ds[items["img01"]]["image_embed"].shape == (48,)
    with pytest.raises(DataError, match=re.escape(expected)):
        ds[items["img00"]]
    assert _train(corpus, tmp_path / "exp", image_embeds=scp) == 2  # training stops with the same message
    assert expected in capsys.readouterr().err
    # a shell-command entry: kaldiio would run it
    scp.write_text(f"img00 mkdir {marker} |\nimg01 {ark2}:{offsets['img01']}\n")
    with pytest.raises(DataError, match=re.escape(f"{scp}:1: img00: shell-command entries are not supported")):
        EmbeddingScp(scp)
    # truncated ark
    cut = tmp_path / "cut.ark"
    cut.write_bytes(ark2.read_bytes()[: int(offsets["img01"]) + 40])
    scp.write_text(f"img01 {cut}:{offsets['img01']}\n")
    truncated = f"{scp}:1: img01: {cut} is truncated at offset {offsets['img01']}"
    with pytest.raises(DataError, match=re.escape(truncated)):
        load_image_embeddings(scp)


# ---------------------------------------------------------------------------------------------- YAML configs
def test_yaml_python_tags_are_refused_by_the_cli(tmp_path, marker, capsys):
    from speechclip_plus.bin.show_config import main as show_config
    from speechclip_plus.bin.train import main as train

    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"model:\n  variant: !!python/object/apply:os.mkdir [{str(marker)!r}]\n")
    assert yaml.safe_load(io.StringIO("a: 1")) == {"a": 1}
    message = (f"error: {cfg}: not valid YAML: could not determine a constructor for the tag "
               "'tag:yaml.org,2002:python/object/apply:os.mkdir'")
    assert show_config(["--config", str(cfg)]) == 2
    assert capsys.readouterr().err.startswith(message)
    assert train(["--config", str(cfg), "--print_config"]) == 2
    assert capsys.readouterr().err.startswith(message)


def test_relative_config_paths_resolve_against_the_config_file(tmp_path, monkeypatch, capsys):
    """Through ``show_config`` and ``train --print_config`` run from an unrelated directory; command-line
    overrides resolve against the current directory."""
    from speechclip_plus.bin.show_config import main as show_config
    from speechclip_plus.bin.train import main as train

    conf = tmp_path / "recipe" / "conf" / "sub"
    conf.mkdir(parents=True)
    cfg = conf / "x.yaml"
    cfg.write_text("model:\n  clip: {name: ../clip/tiny.json, vocab: vocab.txt}\n"
                   "  upstream: {name: hubert_local, ckpt: ../../up.pt}\n"
                   "data: {text_vocab: spm/bpe.model}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    expected = {"model.clip.name": tmp_path / "recipe" / "conf" / "clip" / "tiny.json",
                "model.clip.vocab": conf / "vocab.txt", "model.upstream.ckpt": tmp_path / "recipe" / "up.pt",
                "data.text_vocab": conf / "spm" / "bpe.model"}
    for key, path in expected.items():
        assert show_config(["--config", "../recipe/conf/sub/x.yaml", "--key", key]) == 0
        assert capsys.readouterr().out == f"{path}\n"
    assert show_config(["--config", str(cfg), "--key", "model.clip.vocab", "--model.clip.vocab", "v2.txt"]) == 0
    assert capsys.readouterr().out == f"{elsewhere / 'v2.txt'}\n"
    assert train(["--config", "../recipe/conf/sub/x.yaml", "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["clip"]["vocab"] == str(conf / "vocab.txt")
    assert printed["data"]["text_vocab"] == str(conf / "spm" / "bpe.model")
