"""egs/mini: the generated corpus (local/data.sh, make_corpus.py) and the tiny teacher CLIP (train_clip.py).

A 24-image x 2-caption corpus with 3 voices is generated once per module through local/data.sh; the tests
check the Kaldi data dirs and the audio/images, determinism and idempotence, then train the teacher for a
few steps and reload it through open_clip's own loader. Without espeak-ng the corpus tests are skipped,
except under CI=true where the missing program is a failure.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MINI = Path(__file__).resolve().parents[1] / "egs" / "mini"
LOCAL = MINI / "local"
SPLITS = ("train", "dev", "test")
FILES = ("wav.scp", "text", "utt2spk", "spk2utt", "utt2img", "img.scp")
NUM_IMAGES, CAPTIONS, VOICES, GROUP = 24, 2, 3, 2


def _load(name: str):
    """Import egs/mini/local/<name>.py (registered in sys.modules, as dataclasses need)."""
    key = f"egs_mini_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, LOCAL / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def _data_sh(root: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = ["bash", str(LOCAL / "data.sh"), "--corpus_dir", str(root / "corpus"),
           "--data_dir", str(root / "data"), "--num_images", str(NUM_IMAGES),
           "--captions_per_image", str(CAPTIONS), "--num_voices", str(VOICES), "--eval_group_size", str(GROUP),
           "--python", sys.executable, *extra]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)


def _table(path: Path) -> list:
    return [tuple(line.split(" ", 1)) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, require):
    require("espeak-ng")
    root = tmp_path_factory.mktemp("mini")
    proc = _data_sh(root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def test_data_dirs_are_valid(corpus):
    mc = _load("make_corpus")
    images_per_split = {}
    for split in SPLITS:
        d = corpus / "data" / split
        tables = {name: _table(d / name) for name in FILES}
        for name, rows in tables.items():
            keys = [r[0].encode() for r in rows]
            assert keys == sorted(set(keys)), f"{d / name} not unique and C-sorted"
            assert all(len(r) == 2 and r[1] for r in rows), f"{d / name} has a line without value"
        utts = [k for k, _ in tables["wav.scp"]]
        for name in ("text", "utt2spk", "utt2img"):
            assert [k for k, _ in tables[name]] == utts, name
        utt2spk, utt2img = dict(tables["utt2spk"]), dict(tables["utt2img"])
        spk2utt = {s: us.split() for s, us in tables["spk2utt"]}
        assert {(u, s) for s, us in spk2utt.items() for u in us} == set(utt2spk.items())
        img_scp = dict(tables["img.scp"])
        assert set(utt2img.values()) == set(img_scp)
        for utt in utts:  # <voice>-<image id>-<n>, the voice being the speaker
            spk, img, n = utt.split("-")
            assert (spk, img) == (utt2spk[utt], utt2img[utt]) and 0 <= int(n) < CAPTIONS
        assert len(utts) == CAPTIONS * len(img_scp)
        colours, shapes = set(mc.COLOURS), set(mc.SHAPES)
        for utt, text in tables["text"]:  # captions name a colour and a shape (all attributes, by design)
            words = set(text.replace(":", " ").split())
            assert words & colours and words & shapes, f"{utt}: {text!r}"
        for utt, path in tables["wav.scp"]:
            assert os.path.isabs(path)
            info = sf.info(path)
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16"), path
            wav, _ = sf.read(path, dtype="float32")
            assert len(wav) > 0.5 * 16000 and np.sqrt(np.mean(wav ** 2)) > 0.01, f"{path} silent or short"
        for img, path in img_scp.items():
            assert os.path.isabs(path)
            with Image.open(path) as im:
                assert im.mode == "RGB" and im.size == (64, 64)
                assert np.asarray(im).std() > 5, f"{path} is flat"
        images_per_split[split] = set(img_scp)
    assert not (images_per_split["train"] & images_per_split["dev"])
    assert not (images_per_split["train"] | images_per_split["dev"]) & images_per_split["test"]
    assert sum(map(len, images_per_split.values())) == NUM_IMAGES
    assert min(map(len, images_per_split.values())) >= 1


def test_rerun_skips_and_refuses_other_options(corpus):
    wavs = sorted((corpus / "corpus" / "wavs").iterdir())
    before = [p.stat().st_mtime_ns for p in wavs]
    proc = _data_sh(corpus)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping synthesis" in proc.stdout + proc.stderr
    assert [p.stat().st_mtime_ns for p in wavs] == before
    other = _data_sh(corpus, "--seed", "7")
    assert other.returncode != 0 and "seed" in other.stderr

    # a file lost after completion is made again, identical, and nothing else is rewritten
    lost = wavs[5]
    content = lost.read_bytes()
    lost.unlink()
    _load("make_corpus").main(["--corpus_dir", str(corpus / "corpus"), "--data_dir", str(corpus / "data"),
                               "--num_images", str(NUM_IMAGES), "--captions_per_image", str(CAPTIONS),
                               "--num_voices", str(VOICES), "--eval_group_size", str(GROUP), "--nj", "1",
                               "--no_progress"])
    assert lost.read_bytes() == content
    assert [p.stat().st_mtime_ns for i, p in enumerate(wavs) if i != 5] == before[:5] + before[6:]


def test_generation_is_deterministic(corpus, tmp_path):
    """Same seed -> byte-identical images and identical captions/audio for the same image index, whatever
    the corpus size or worker count; another seed -> other captions."""
    mc = _load("make_corpus")
    common = ["--num_images", "6", "--captions_per_image", str(CAPTIONS), "--num_voices", str(VOICES),
              "--nj", "1", "--no_progress"]
    mc.main(["--corpus_dir", str(tmp_path / "c0"), "--data_dir", str(tmp_path / "d0"), *common])
    mc.main(["--corpus_dir", str(tmp_path / "c1"), "--data_dir", str(tmp_path / "d1"), "--seed", "1",
             *common])

    def texts(data: Path) -> dict:
        return {k: v for s in SPLITS if (data / s / "text").exists() for k, v in _table(data / s / "text")}

    big, small, other = texts(corpus / "data"), texts(tmp_path / "d0"), texts(tmp_path / "d1")
    assert len(small) == 6 * CAPTIONS and all(big[k] == v for k, v in small.items())
    assert set(other.values()) != set(small.values())
    for png in sorted((tmp_path / "c0" / "images").iterdir()):
        assert png.read_bytes() == (corpus / "corpus" / "images" / png.name).read_bytes(), png.name
    for wav in sorted((tmp_path / "c0" / "wavs").iterdir())[:3]:
        a, b = wav.read_bytes(), (corpus / "corpus" / "wavs" / wav.name).read_bytes()
        assert a == b, wav.name


def test_recall_definition():
    """t2i: the caption's own image in the top k; i2t: any caption of the image in the top k."""
    import torch

    tc = _load("train_clip")
    img = torch.eye(3)
    # captions 0,1 -> image 0; 2 -> image 1; 3 -> image 2. Caption 1 points at image 2, caption 3 at image 1.
    txt = torch.tensor([[1.0, 0, 0], [0.1, 0, 1], [0, 1, 0], [0, 0.9, 0.2]])
    r = tc.retrieval_recall(img, txt, torch.tensor([0, 0, 1, 2]), ks=(1, 2))
    assert r["t2i_R@1"] == pytest.approx(2 / 4, abs=1e-3) and r["t2i_R@2"] == pytest.approx(1.0, abs=1e-3)
    # image 0: best caption 0 (hit); image 1: best caption 2 (hit); image 2: best caption 1 (miss), then 3.
    assert r["i2t_R@1"] == pytest.approx(2 / 3, abs=1e-3) and r["i2t_R@2"] == pytest.approx(1.0, abs=1e-3)


def test_teacher_recall_counts_ties_as_the_scorer_does():
    """The teacher's recall is the toolkit's: a tie goes against the query, so a collapsed teacher (every
    embedding equal) scores 0 where a top-k by index order could have scored 1."""
    import torch

    from speechclip_plus.eval.retrieval import recall_at_k

    tc = _load("train_clip")
    img, txt, txt2img = torch.ones(4, 3) / 3 ** 0.5, torch.ones(6, 3) / 3 ** 0.5, torch.tensor([0, 0, 1, 2, 3, 3])
    r = tc.retrieval_recall(img, txt, txt2img, ks=(1, 3))
    assert (r["t2i_R@1"], r["t2i_R@3"], r["i2t_R@1"], r["i2t_R@3"]) == (0.0, 0.0, 0.0, 0.0)
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5, 8, generator=g), torch.randn(9, 8, generator=g)
    txt2img = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3])
    ours = recall_at_k(txt, img, txt2img, (1, 5))
    r = tc.retrieval_recall(img, txt, txt2img, ks=(1, 5))
    assert r["t2i_R@1"] == round(ours["speech_to_image_r1"], 4) and r["i2t_R@1"] == round(ours["image_to_speech_r1"], 4)
    assert r["chance_t2i_R@5"] == 1.0 and (r["num_images"], r["num_captions"]) == (5, 9)


def test_teacher_trains_and_loads_through_open_clip(corpus, tmp_path):
    import open_clip
    import torch

    tc = _load("train_clip")
    config = MINI / "conf" / "clip_mini.json"
    cfg = json.loads(config.read_text())
    assert (cfg["text_cfg"]["context_length"], cfg["text_cfg"]["vocab_size"]) == (77, 49408)
    exp = tmp_path / "exp"
    args = ["--config", str(config), "--data_dir", str(corpus / "data"), "--exp_dir", str(exp),
            "--steps", "3", "--batch_size", "8", "--eval_sets", "test", "--threads", "1", "--no_progress"]
    assert tc.main(args) == 0
    outputs = {p.name for p in exp.iterdir()}
    assert {"clip.pt", "clip_mini.json", "metrics.json", "train.log", ".done"} <= outputs

    open_clip.add_model_config(exp / "clip_mini.json")
    model, _, preprocess = open_clip.create_model_and_transforms("clip_mini", pretrained=str(exp / "clip.pt"))
    assert type(model) is open_clip.CLIP
    saved = torch.load(exp / "clip.pt", map_location="cpu", weights_only=True)
    loaded = model.state_dict()
    assert set(saved) == set(loaded) and all(torch.equal(saved[k], loaded[k]) for k in saved)
    fresh = open_clip.create_model("clip_mini")  # trained weights differ from a fresh initialisation
    assert not torch.equal(fresh.state_dict()["text_projection"], loaded["text_projection"])

    # the trimmed text path used in training equals open_clip's own encode_text
    captions = ["a big red circle on the left", "two shapes: a small blue star"]
    tokens = open_clip.get_tokenizer("clip_mini")(captions)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(tc.encode_text_trimmed(model, tokens), model.encode_text(tokens))

    metrics = json.loads((exp / "metrics.json").read_text())
    n_test = len(_table(corpus / "data" / "test" / "img.scp"))
    assert metrics["test"]["num_images"] == n_test
    for key in ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10"):
        assert 0.0 <= metrics["test"][key] <= 1.0
    assert metrics["test"]["t2i_R@1"] <= metrics["test"]["t2i_R@5"] <= metrics["test"]["t2i_R@10"]

    mtime = (exp / "clip.pt").stat().st_mtime_ns
    assert tc.main(args) == 0 and (exp / "clip.pt").stat().st_mtime_ns == mtime  # .done: skipped


# ------------------------------------------------------------------------------ dev/test groups of scenes
def _one_edit(base, other) -> bool:
    """True when ``other`` differs from ``base`` by one edit of make_corpus.EDITS (checked from its definition,
    not from the generator): one attribute of one object; a single object moved; two objects trading places or
    one attribute; a pair's layout turned."""
    attrs = ("shape", "colour", "size")
    if len(base) != len(other):
        return False
    if len(base) == 1:
        return sum(getattr(base[0], k) != getattr(other[0], k) for k in attrs + ("position",)) == 1
    place = lambda objs: {(o.shape, o.colour, o.size): o.position for o in objs}  # noqa: E731
    pb, po = place(base), place(other)
    if set(pb) == set(po):  # the same two objects: they trade places, or the layout turns
        turn = {"left": "top", "right": "bottom", "top": "left", "bottom": "right"}
        (x, px), (y, py) = pb.items()
        return po in ({x: py, y: px}, {x: turn[px], y: turn[py]})
    a, b = ({o.position: o for o in objs} for objs in (base, other))
    if set(a) != set(b):
        return False
    p, q = sorted(a)
    changed = [(k, r) for r in (p, q) for k in attrs if getattr(a[r], k) != getattr(b[r], k)]
    traded = [k for k in attrs if getattr(a[p], k) == getattr(b[q], k) and getattr(a[q], k) == getattr(b[p], k)
              and getattr(a[p], k) != getattr(a[q], k)]
    return len(changed) == 1 or (len(changed) == 2 and len(traded) == 1 and changed[0][0] == traded[0])


def test_eval_groups_are_one_edit_apart():
    """Dev and test images come in groups of one base scene and its one-edit variants, all distinct; training
    images are those of an ungrouped corpus (same seed), so grouping the evaluation sets leaves training alone."""
    mc = _load("make_corpus")
    splits = mc.split_sizes(200, 0.1, 0.15)
    grouped, plain = mc.eval_groups(splits, 8), mc.eval_groups(splits, 1)
    voices = mc.VOICES[:5]
    for i in splits["train"]:
        assert mc.plan_image(3, i, 5, voices, grouped)[0] == mc.plan_image(3, i, 5, voices, plain)[0]
    kinds = set()
    for split in ("dev", "test"):
        idx = list(splits[split])
        for start in range(0, len(idx), 8):
            members = [mc.plan_image(3, i, 5, voices, grouped)[0].objs for i in idx[start:start + 8]]
            assert len({frozenset(m) for m in members}) == len(members), members
            for other in members[1:]:
                assert _one_edit(members[0], other), (members[0], other)
            kinds.add(len(members[0]))
    assert kinds == {1, 2}  # groups of one-object and of two-object scenes
    with pytest.raises(ValueError, match="unknown edit"):
        mc.edit_scene(members[0], "rotate", __import__("random").Random(0))


def test_group_size_is_checked_and_recorded(corpus, tmp_path):
    mc = _load("make_corpus")
    for bad in ("0", "17"):
        with pytest.raises(SystemExit, match="eval_group_size"):
            mc.main(["--corpus_dir", str(tmp_path / "c"), "--data_dir", str(tmp_path / "d"), "--eval_group_size", bad])
    assert not (tmp_path / "c").exists()
    params = json.loads((corpus / "corpus" / "params.json").read_text())
    assert params["eval_group_size"] == 2
    other = _data_sh(corpus, "--eval_group_size", "3")
    assert other.returncode != 0 and "eval_group_size" in other.stderr
