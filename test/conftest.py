"""Shared fixtures. Everything runs offline: open_clip and huggingface_hub must never try the network.

Test modules never import each other: what several of them use lives here, as fixtures (a helper function is
handed out by a session fixture of the same name).
- Tiny models: ``tiny_clip_config``, ``tiny_hubert_ckpt``, ``tiny_config`` (a resolved ``conf/tiny_*.yaml``).
- Tiny corpora, written by the toolkit's own writers: ``make_corpus`` (tones + random image embeddings),
  ``make_train_dev`` (a train and a dev one, as a config's data paths), ``make_data_dir`` (tones, PNG images and
  their embeddings), ``write_vocab`` (a reduced keyword vocabulary), ``train_exp`` (a briefly trained exp dir).
- ``crafted``: a class whose pickle calls ``func(*args)`` when loaded (what a malicious checkpoint holds).
- ``require``: skip a test (or a part) when a system tool (espeak-ng, shellcheck) is missing; fail under ``CI=true``.
- Several processes: ``free_port``, ``step_record`` (loss, gradients and gathered sizes of one micro-batch) and
  ``join_workers`` (a bounded wait: hung workers are killed and the test fails).
- ``template_readme_block``: a code block of egs/TEMPLATE/README.md; ``registered``: s3prl's registration.
"""

import os
import re
import shutil
import socket
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "speechclip_plus" / "conf"
EMBED_DIM = 48  # speechclip_plus/models/clip_configs/tiny-clip.json
WORDS = ["dog", "cat", "red", "ball", "grass", "runs", "water", "man", "girl", "beach"]
INSTALL = {"espeak-ng": "apt-get install espeak-ng", "shellcheck": "apt-get install shellcheck"}


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on a CUDA GPU and skips without one (test/test_cuda.py; "
                                       "SPEECHCLIP_TEST_DEVICE=cpu runs it on the CPU; bench/gpu.sh runs them)")


# ---------------------------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="session")
def tiny_clip_config() -> str:
    """Path of the tiny open_clip model config (random init, created in well under a second)."""
    from speechclip_plus.models.tiny import TINY_CLIP_CONFIG

    return TINY_CLIP_CONFIG


@pytest.fixture(scope="session")
def tiny_hubert_ckpt(tmp_path_factory) -> str:
    """A random tiny HuBERT (2 layers, 32-d, 320x downsampling) in s3prl's format, for ``hubert_local``."""
    from speechclip_plus.models.tiny import save_tiny_hubert

    return save_tiny_hubert(tmp_path_factory.mktemp("tiny_hubert") / "tiny_hubert.pt")


def _tiny_config(variant: str = "p", model=None, **train):
    """Resolved ``conf/tiny_<variant>.yaml``: float32, no workers, a 0.75 s crop (``crop=False``: none), ``train``
    keys and the nested ``model`` dict on top."""
    from speechclip_plus.config import load_config

    crop = train.pop("crop", 12000)
    data = {"train": {"precision": "fp32", "num_workers": 0, **train},
            "model": {"max_audio_len": crop or None, **(model or {})}}
    return load_config(str(CONF / f"tiny_{variant}.yaml"), data=data)


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(variant="p", model=None, crop=12000, **train)`` -> a resolved tiny config (``_tiny_config``)."""
    return _tiny_config


# ---------------------------------------------------------------------------------------------- tiny corpora
def _write_embeddings(out_dir: Path, ids, rng, dim: int = EMBED_DIM) -> Path:
    """A random unit vector per id, written as ``img_embed.{ark,scp}`` by the toolkit's writer; the scp path."""
    from speechclip_plus.data.kaldi_ark import write_ark_scp

    def vectors():
        for i in ids:
            v = rng.standard_normal(dim).astype(np.float32)
            yield i, v / np.linalg.norm(v)

    return Path(write_ark_scp(out_dir, "img_embed", vectors())[0])


def _make_corpus(root: Path, n_utts: int = 8, n_images: int = 4, seed: int = 0, name: str = "train",
                 embed_dim: int = EMBED_DIM, seconds=None):
    """A Kaldi data dir of ``n_utts`` noisy tones (16 kHz; 0.5-1 s, or all ``seconds`` long) over ``n_images``
    images (empty files) plus an image-embedding scp of random unit vectors. Returns (data_dir, img_embed.scp)."""
    import soundfile as sf

    from speechclip_plus.data.datadir import write_data_dir

    rng = np.random.default_rng(seed)
    wavs, img_dir = root / "wav" / name, root / "img"
    for p in (wavs, img_dir):
        p.mkdir(parents=True, exist_ok=True)
    words = WORDS[:8]
    images = [f"img{j:02d}" for j in range(n_images)]
    wav, text, utt2spk, utt2img, utt2dur = {}, {}, {}, {}, {}
    for i in range(n_utts):
        spk, utt = f"spk{i % 2}", f"spk{i % 2}-{name}{i:03d}"
        n = int(16000 * (seconds or 0.5 + 0.5 * rng.random()))
        t = np.arange(n) / 16000
        signal = 0.3 * np.sin(2 * np.pi * (200 + 60 * i) * t) + 0.01 * rng.standard_normal(n)
        sf.write(wavs / f"{utt}.wav", signal.astype(np.float32), 16000)
        wav[utt], text[utt] = str(wavs / f"{utt}.wav"), f"a {words[i % 8]} and a {words[(3 * i + 1) % 8]}"
        utt2spk[utt], utt2img[utt], utt2dur[utt] = spk, images[i % n_images], n / 16000
    for img in images:
        (img_dir / f"{img}.jpg").write_bytes(b"")
    d = root / "data" / name
    write_data_dir(d, wav, text, utt2spk, utt2img, {img: str(img_dir / f"{img}.jpg") for img in images}, utt2dur)
    return d, _write_embeddings(root / "dump" / name, images, rng, embed_dim)


def _make_train_dev(root: Path, train=(8, 4), dev=(6, 3), seconds=None):
    """The train (seed 0) and dev (seed 1) corpora of ``_make_corpus`` (``(utterances, images)`` each) as the
    ``train_data``, ``image_embeds``, ``valid_data``, ``valid_image_embeds`` of a config's train section."""
    train_dir, emb = _make_corpus(root, *train, seed=0, name="train", seconds=seconds)
    dev_dir, dev_emb = _make_corpus(root, *dev, seed=1, name="dev", seconds=seconds)
    return {"train_data": str(train_dir), "image_embeds": str(emb), "valid_data": str(dev_dir),
            "valid_image_embeds": str(dev_emb)}


def _make_data_dir(root: Path, name: str = "test", n_images: int = 3, caps_per_image: int = 2, seed: int = 0):
    """A Kaldi data dir: ``n_images`` small PNGs with ``caps_per_image`` spoken captions each (tone + noise,
    0.6-1.2 s, 16 kHz float WAV), and an image-embedding scp of random unit vectors.
    Returns (data_dir, img_embed.scp)."""
    import soundfile as sf
    from PIL import Image

    from speechclip_plus.data.datadir import write_data_dir

    rng = np.random.default_rng(seed)
    wavs, imgs = root / "wav" / name, root / "img" / name
    for p in (wavs, imgs):
        p.mkdir(parents=True, exist_ok=True)
    wav, text, utt2spk, utt2img, img_scp = {}, {}, {}, {}, {}
    for j in range(n_images):
        img = f"img{j:02d}"
        img_scp[img] = str(imgs / f"{img}.png")
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(img_scp[img])
        for c in range(caps_per_image):
            i = j * caps_per_image + c
            utt = f"spk{c}-{name}{i:03d}"
            n = int(16000 * (0.6 + 0.6 * rng.random()))
            t = np.arange(n) / 16000
            signal = 0.3 * np.sin(2 * np.pi * (180 + 70 * i) * t) + 0.02 * rng.standard_normal(n)
            sf.write(wavs / f"{utt}.wav", signal.astype(np.float32), 16000, subtype="FLOAT")
            wav[utt], text[utt] = str(wavs / f"{utt}.wav"), f"A {WORDS[i % 10]} and the {WORDS[(3 * i + 1) % 10]}."
            utt2spk[utt], utt2img[utt] = f"spk{c}", img
    d = root / "data" / name
    write_data_dir(d, wav, text, utt2spk, utt2img, img_scp)
    return d, _write_embeddings(root / "dump" / name, list(img_scp), rng)


def _write_vocab(path: Path) -> str:
    """A reduced keyword vocabulary (as stage 3 writes it): the CLIP ids of the corpus words plus 200 others,
    so the tiny models quantise onto a few hundred tokens instead of all 49408."""
    from open_clip.tokenizer import SimpleTokenizer

    from speechclip_plus.models.clip import save_vocab_usage

    tok = SimpleTokenizer()
    ids = [tok.sot_token_id, tok.eot_token_id]
    for w in WORDS + ["a", "and", "the", "."]:
        ids += [i for i in tok.encode(w) if i not in ids]
    ids += [i for i in range(1000, 1200) if i not in ids]
    save_vocab_usage(path, ids, list(range(len(ids), 0, -1)))
    return str(path)


def _train_exp(root: Path, variant: str, *overrides: str, steps: int = 2):
    """A real exp dir: the trainer run for ``steps`` optimiser steps on a generated corpus (validation and
    checkpoints at the end), with a reduced keyword vocabulary. Returns (exp_dir, trainer)."""
    from speechclip_plus.config import load_config
    from speechclip_plus.train.trainer import Trainer

    overrides = ("--model.clip.vocab", _write_vocab(root / "vocab.txt")) + overrides
    train, emb = _make_data_dir(root, "train", n_images=3, caps_per_image=2, seed=1)
    data = {"train": {"train_data": str(train), "image_embeds": str(emb), "valid_data": str(train),
                      "precision": "fp32", "num_workers": 0, "batch_size": 3, "max_steps": steps, "valid_every": steps,
                      "warmup_steps": 1, "log_every": 1, "lr": 1e-3}}
    cfg = load_config(str(CONF / f"tiny_{variant}.yaml"), list(overrides), data=data)
    exp = root / "exp" / f"tiny_{variant}"
    tr = Trainer(cfg, str(exp), progress=False, console=False)
    tr.fit()
    tr.close()
    return exp, tr


@pytest.fixture(scope="session")
def make_corpus():
    """``make_corpus(root, n_utts=8, n_images=4, seed=0, name="train", embed_dim=48, seconds=None)`` ->
    (data_dir, img_embed.scp): noisy tones over empty image files (``_make_corpus``)."""
    return _make_corpus


@pytest.fixture(scope="session")
def make_train_dev():
    """``make_train_dev(root, train=(8, 4), dev=(6, 3), seconds=None)`` -> the train/dev data paths of a config
    (``_make_train_dev``)."""
    return _make_train_dev


@pytest.fixture(scope="session")
def make_data_dir():
    """``make_data_dir(root, name="test", n_images=3, caps_per_image=2, seed=0)`` -> (data_dir, img_embed.scp):
    spoken captions of real PNG images (``_make_data_dir``)."""
    return _make_data_dir


@pytest.fixture(scope="session")
def write_vocab():
    """``write_vocab(path)`` -> path of a reduced keyword vocabulary (``_write_vocab``)."""
    return _write_vocab


@pytest.fixture(scope="session")
def train_exp():
    """``train_exp(root, variant, *overrides, steps=2)`` -> (exp_dir, trainer) (``_train_exp``)."""
    return _train_exp


# ---------------------------------------------------------------------------------------------- safety
class Crafted:
    """Pickles as a call of ``func(*args)``: what a crafted checkpoint holds. Loading it must never get that far."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.fixture(scope="session")
def crafted():
    """The ``Crafted`` class: ``torch.save({"x": crafted(os.mkdir, marker)}, path)`` makes a malicious file."""
    return Crafted


# ---------------------------------------------------------------------------------------------- system tools
def _require(tool: str, skip: bool = True) -> bool:
    """True when ``tool`` is on PATH. Missing: a failure under ``CI=true`` (CI installs every tool), else a skip
    of the test, or with ``skip=False`` False (the caller leaves out only the part that needs it)."""
    if shutil.which(tool) is not None:
        return True
    how = INSTALL.get(tool, f"install {tool}")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{tool} is not installed, and CI=true requires it ({how})")
    if skip:
        pytest.skip(f"{tool} is not installed ({how})")
    return False


@pytest.fixture(scope="session")
def require():
    """``require(tool, skip=True)``: the guard for system tools (espeak-ng, shellcheck) of ``_require``."""
    return _require


# ---------------------------------------------------------------------------------------------- several processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step_record(tr, batch_indices):
    """Loss, gradients (after DDP's averaging) and gathered sizes of one training micro-batch of trainer ``tr``."""
    from speechclip_plus.data import collate
    from speechclip_plus.models import losses

    sizes = []
    real_gather = losses.gather_with_grad

    def gather(*tensors):
        out = real_gather(*tensors)
        sizes.append((len(tensors[0]), len(out[0])))
        return out

    losses.gather_with_grad = gather
    try:
        tr.model.train()
        tr.optimizer.zero_grad(set_to_none=True)
        batch = collate([tr.train_set[i] for i in batch_indices])
        rec = tr._forward_backward(batch, sync=True)
    finally:
        losses.gather_with_grad = real_gather
    grads = {n: p.grad.detach().clone() for n, p in tr.raw_model.named_parameters() if p.grad is not None}
    tr.optimizer.zero_grad(set_to_none=True)
    return {"loss": float(rec["loss"]), "terms": {k: float(v) for k, v in rec["terms"].items()}, "grads": grads,
            "sizes": sizes, "utts": batch["utt"]}


def _join_workers(ctx, timeout: float = 600.0) -> None:
    """Wait for the processes of ``torch.multiprocessing.start_processes(..., join=False)``: a worker's exception
    is raised here; after ``timeout`` seconds (far above a normal run) the workers are killed and the test fails,
    so a hung rendezvous or deadlock never hangs the suite."""
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
                proc.join()
            pytest.fail(f"the {len(ctx.processes)} worker processes had not finished after {timeout:.0f} s: killed")


@pytest.fixture(scope="session")
def free_port():
    """``free_port()`` -> a TCP port free on 127.0.0.1 now."""
    return _free_port


@pytest.fixture(scope="session")
def step_record():
    """``step_record(trainer, batch_indices)`` -> {loss, terms, grads, sizes, utts} (``_step_record``)."""
    return _step_record


@pytest.fixture(scope="session")
def join_workers():
    """``join_workers(ctx, timeout=600)``: the bounded wait of ``_join_workers``."""
    return _join_workers


# ---------------------------------------------------------------------------------------------- docs, s3prl
def _template_readme_block(lang: str, first_comment: str) -> str:
    """The one ```<lang> block of egs/TEMPLATE/README.md whose second line starts with ``first_comment``."""
    text = (REPO / "egs" / "TEMPLATE" / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(rf"```{lang}\n(#![^\n]*\n{re.escape(first_comment)}.*?)```", text, flags=re.S)
    assert len(blocks) == 1, f"egs/TEMPLATE/README.md should hold one ```{lang} block starting {first_comment!r}"
    return blocks[0]


@pytest.fixture(scope="session")
def template_readme_block():
    """``template_readme_block(lang, first_comment)`` -> the README's code block (``_template_readme_block``)."""
    return _template_readme_block


@pytest.fixture()
def registered():
    """``register()`` for one test; the process-wide fallbacks it may install are undone afterwards."""
    import huggingface_hub
    import torchaudio

    from speechclip_plus.superb import register

    saved_load, missing = torchaudio.load, object()
    saved_repo = getattr(huggingface_hub, "Repository", missing)
    try:
        yield register()
    finally:
        torchaudio.load = saved_load
        if saved_repo is missing:
            huggingface_hub.__dict__.pop("Repository", None)
