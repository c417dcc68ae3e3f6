"""Shared fixtures. Everything runs offline: open_clip and huggingface_hub must never try the network.

Test modules never import each other: what several of them use lives here, as fixtures (a helper function is
handed out by a session fixture of the same name).
- Tiny models: ``tiny_clip_config``, ``tiny_hubert_ckpt``, ``tiny_config`` (a resolved ``conf/tiny_*.yaml``).
- Tiny corpora: ``make_corpus`` (tones + random image embeddings), ``make_data_dir`` (tones, PNG images and
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
def _make_corpus(root: Path, n_utts: int = 8, n_images: int = 4, seed: int = 0, name: str = "train",
                 embed_dim: int = EMBED_DIM, seconds=None):
    """A Kaldi data dir of ``n_utts`` noisy tones (16 kHz; 0.5-1 s, or all ``seconds`` long) over ``n_images``
    images (empty files) plus an image-embedding scp of random unit vectors. Returns (data_dir, img_embed.scp)."""
    import kaldiio
    import soundfile as sf

    rng = np.random.default_rng(seed)
    d = root / "data" / name
    wavs = root / "wav" / name
    for p in (d, wavs, root / "img"):
        p.mkdir(parents=True, exist_ok=True)
    words = WORDS[:8]
    lines = {k: [] for k in ("wav.scp", "text", "utt2spk", "utt2img", "utt2dur")}
    images = [f"img{j:02d}" for j in range(n_images)]
    for i in range(n_utts):
        spk, utt = f"spk{i % 2}", f"spk{i % 2}-{name}{i:03d}"
        n = int(16000 * (seconds or 0.5 + 0.5 * rng.random()))
        t = np.arange(n) / 16000
        wav = 0.3 * np.sin(2 * np.pi * (200 + 60 * i) * t) + 0.01 * rng.standard_normal(n)
        path = wavs / f"{utt}.wav"
        sf.write(path, wav.astype(np.float32), 16000)
        lines["wav.scp"].append(f"{utt} {path}")
        lines["text"].append(f"{utt} a {words[i % 8]} and a {words[(3 * i + 1) % 8]}")
        lines["utt2spk"].append(f"{utt} {spk}")
        lines["utt2img"].append(f"{utt} {images[i % n_images]}")
        lines["utt2dur"].append(f"{utt} {n / 16000:.4f}")
    for fname, rows in lines.items():
        (d / fname).write_text("".join(r + "\n" for r in sorted(rows)))
    spk2utt = {}
    for row in sorted(lines["utt2spk"]):
        utt, spk = row.split()
        spk2utt.setdefault(spk, []).append(utt)
    (d / "spk2utt").write_text("".join(f"{s} {' '.join(u)}\n" for s, u in sorted(spk2utt.items())))
    img_lines = []
    for img in images:
        (root / "img" / f"{img}.jpg").write_bytes(b"")
        img_lines.append(f"{img} {root / 'img' / f'{img}.jpg'}")
    (d / "img.scp").write_text("".join(r + "\n" for r in sorted(img_lines)))
    emb_dir = root / "dump" / name
    emb_dir.mkdir(parents=True, exist_ok=True)
    with kaldiio.WriteHelper(f"ark,scp:{emb_dir / 'img_embed.ark'},{emb_dir / 'img_embed.scp'}") as w:
        for img in images:
            v = rng.standard_normal(embed_dim).astype(np.float32)
            w(img, v / np.linalg.norm(v))
    return d, emb_dir / "img_embed.scp"


def _make_data_dir(root: Path, name: str = "test", n_images: int = 3, caps_per_image: int = 2, seed: int = 0):
    """A Kaldi data dir: ``n_images`` small PNGs with ``caps_per_image`` spoken captions each (tone + noise,
    0.6-1.2 s, 16 kHz float WAV), and an image-embedding scp of random unit vectors (kaldiio).
    Returns (data_dir, img_embed.scp)."""
    import kaldiio
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(seed)
    d, wavs, imgs, dump = root / "data" / name, root / "wav" / name, root / "img" / name, root / "dump" / name
    for p in (d, wavs, imgs, dump):
        p.mkdir(parents=True, exist_ok=True)
    rows = {k: [] for k in ("wav.scp", "text", "utt2spk", "utt2img", "img.scp")}
    spk2utt = {}
    for j in range(n_images):
        img = f"img{j:02d}"
        path = imgs / f"{img}.png"
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(path)
        rows["img.scp"].append(f"{img} {path}")
        for c in range(caps_per_image):
            i = j * caps_per_image + c
            spk, utt = f"spk{c}", f"spk{c}-{name}{i:03d}"
            n = int(16000 * (0.6 + 0.6 * rng.random()))
            t = np.arange(n) / 16000
            wav = 0.3 * np.sin(2 * np.pi * (180 + 70 * i) * t) + 0.02 * rng.standard_normal(n)
            sf.write(wavs / f"{utt}.wav", wav.astype(np.float32), 16000, subtype="FLOAT")
            rows["wav.scp"].append(f"{utt} {wavs / f'{utt}.wav'}")
            rows["text"].append(f"{utt} A {WORDS[i % 10]} and the {WORDS[(3 * i + 1) % 10]}.")
            rows["utt2spk"].append(f"{utt} {spk}")
            rows["utt2img"].append(f"{utt} {img}")
            spk2utt.setdefault(spk, []).append(utt)
    for fname, lines in rows.items():
        (d / fname).write_text("".join(r + "\n" for r in sorted(lines)))
    (d / "spk2utt").write_text("".join(f"{s} {' '.join(sorted(u))}\n" for s, u in sorted(spk2utt.items())))
    with kaldiio.WriteHelper(f"ark,scp:{dump / 'img_embed.ark'},{dump / 'img_embed.scp'}") as w:
        for j in range(n_images):
            v = rng.standard_normal(EMBED_DIM).astype(np.float32)
            w(f"img{j:02d}", v / np.linalg.norm(v))
    return d, dump / "img_embed.scp"


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
