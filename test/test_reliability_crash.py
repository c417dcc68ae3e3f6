"""Crashes and resumption: SIGKILLed stages leave no partial file under a final name and re-run cleanly; a
SIGKILLed training resumed with --resume ends with the weights of an uninterrupted run; non-finite losses
stop training with exit 1 keeping the last good checkpoint; a failed checkpoint write (ENOSPC, injected)
exits 3 with the previous checkpoint intact, and the run resumes once the disk has room again."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "speechclip_plus" / "conf"

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
TMP_RE = re.compile(r"\.tmp-")


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def temps(directory) -> list:
    if not Path(directory).exists():
        return []
    return sorted(p.name for p in Path(directory).iterdir() if TMP_RE.search(p.name))


def start(code_or_module: str, args, cwd, slow_code: str = ""):
    """A subprocess running ``python -m module args`` (or the fake ``slow_code`` first, then the module)."""
    if slow_code:
        prog = textwrap.dedent(slow_code) + f"\nimport runpy, sys\nsys.argv = ['x'] + {list(map(str, args))!r}\n" \
            f"runpy.run_module({code_or_module!r}, run_name='__main__')\n"
        cmd = [sys.executable, "-c", prog]
    else:
        cmd = [sys.executable, "-m", code_or_module, *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when(proc, condition, timeout: float = 120.0) -> None:
    """SIGKILL ``proc`` as soon as ``condition()`` holds; fail if it ends or times out first."""
    t0 = time.time()
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended (rc {proc.returncode}) before the kill point:\n{err[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail("kill point not reached in time")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


# ---------------------------------------------------------------------------------------------- data stages
FAKE_ENCODER = """
import sys, time, torch
from speechclip_plus.data.datadir import DataDir
from speechclip_plus.data.image_cache import compute_image_embeddings
import numpy as np
def preprocess(im):
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
def encode(x):  # a deterministic stand-in for CLIP's image tower (512-d), slowed down when asked
    time.sleep(float(sys.argv[3]))
    return torch.cat([x.flatten(1)] * 3, dim=1)[:, :512]
compute_image_embeddings(DataDir(sys.argv[1]).img, encode, preprocess, sys.argv[2], batch_size=6,
                         progress=False)
"""


def test_image_cache_killed_mid_write_is_redone(tmp_path):
    """Stage 2 with a slow stand-in encoder, SIGKILLed with part of the ark on disk: the stage's skip test
    (``embed_images._up_to_date``) does not take it for a cache, and the re-run removes it and recomputes."""
    from speechclip_plus.bin.embed_images import _up_to_date
    from speechclip_plus.data.datadir import write_data_dir
    from speechclip_plus.data.image_cache import load_image_embeddings

    img = {}
    os.makedirs(tmp_path / "images")
    for k in range(60):
        img[f"im{k:02d}"] = str(tmp_path / "images" / f"{k}.png")
        Image.new("RGB", (8, 8), (4 * k, 255 - 4 * k, 7)).save(img[f"im{k:02d}"])
    utts = {f"u{k:02d}": i for k, i in enumerate(img)}
    d = tmp_path / "data"
    write_data_dir(d, {u: "/a.wav" for u in utts}, {u: "x" for u in utts}, {u: "s" for u in utts}, utts, img)
    out, ref = tmp_path / "cache", tmp_path / "ref"
    run = [sys.executable, "-c", FAKE_ENCODER, str(d)]
    proc = subprocess.Popen(run + [str(out), "0.2"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)

    def partial_ark_on_disk():  # > 0 bytes: the write buffer was flushed at least once (every ~4 vectors)
        return any(p.suffix == ".ark" and p.stat().st_size > 0 for p in out.glob(".img_embed.tmp-*"))

    kill_when(proc, partial_ark_on_disk)
    left = temps(out)
    assert len(left) == 1 and left[0].endswith(".ark")  # the partial ark, under its temporary name only
    assert not (out / "img_embed.scp").exists() and not (out / "img_embed.ark").exists()
    assert not _up_to_date(str(out / "img_embed.scp"), img)  # the stage would run again
    for target in (out, ref):  # the re-run, and an uninterrupted run to compare with
        subprocess.run(run + [str(target), "0"], env=ENV, check=True, capture_output=True, timeout=300)
    assert temps(out) == []  # the killed run's partial file was removed
    assert _up_to_date(str(out / "img_embed.scp"), img)
    got, want = load_image_embeddings(out / "img_embed.scp"), load_image_embeddings(ref / "img_embed.scp")
    assert sorted(got) == sorted(img) and all(np.array_equal(got[i], want[i]) for i in img)
    assert (out / "img_embed.ark").read_bytes() == (ref / "img_embed.ark").read_bytes()


def test_format_audio_killed_mid_write_is_redone(tmp_path):
    from speechclip_plus.bin.format_audio import main
    from speechclip_plus.data.datadir import DataDir, read_kv, write_data_dir

    src = tmp_path / "src audio"
    src.mkdir()
    wav = {}
    for k in range(12):
        wav[f"u{k:02d}"] = str(src / f"u{k:02d}.wav")
        t = np.arange(4000) / 8000
        sf.write(wav[f"u{k:02d}"], (0.3 * np.sin(2 * np.pi * (200 + 20 * k) * t)).astype(np.float32), 8000)
    sources = {p: sha(p) for p in wav.values()}
    for name in ("data", "ref"):
        write_data_dir(tmp_path / name, wav, {u: "x" for u in wav}, {u: "s" for u in wav}, {u: "i" for u in wav},
                       {"i": "/i.png"})
    d, dump = tmp_path / "data", tmp_path / "dump"
    scp_before = (d / "wav.scp").read_bytes()
    slow = """
        import time
        import soundfile
        _write = soundfile.write
        def slow(file, *a, **k):
            _write(file, *a, **k)
            time.sleep(0.2)  # killed here: the converted file exists under its temporary name only
        soundfile.write = slow
    """
    proc = start("speechclip_plus.bin.format_audio",
                 ["--data_dir", d, "--dump_dir", dump, "--no_progress"], tmp_path, slow)
    kill_when(proc, lambda: len(list(dump.glob("u*.wav"))) >= 2 and temps(dump))
    assert len(temps(dump)) == 1
    assert (d / "wav.scp").read_bytes() == scp_before and not (d / "utt2dur").exists()  # not marked done
    assert main(["--data_dir", str(d), "--dump_dir", str(dump), "--no_progress"]) == 0
    assert temps(dump) == []
    assert main(["--data_dir", str(tmp_path / "ref"), "--dump_dir", str(tmp_path / "ref dump"),
                 "--no_progress"]) == 0
    got, ref = DataDir(d), DataDir(tmp_path / "ref")
    assert got.utt2dur == ref.utt2dur and len(got.utt2dur) == 12
    for u in wav:  # every converted file complete and identical to an uninterrupted run's
        assert got.wav[u] == str(dump / f"{u}.wav")
        assert sha(got.wav[u]) == sha(ref.wav[u])
    assert read_kv(d / "wav.scp.orig") == wav
    assert {p: sha(p) for p in wav.values()} == sources


def test_engine_marks_a_stage_done_only_after_its_command_succeeds(tmp_path):
    """``done_or_run`` of egs/TEMPLATE/speechclip.sh under the engine's ``set -euo pipefail``."""
    engine = (REPO / "egs" / "TEMPLATE" / "speechclip.sh").read_text()
    m = re.search(r"^done_or_run\(\) \{.*?^\}\n", engine, flags=re.S | re.M)
    assert m, "done_or_run() not found in egs/TEMPLATE/speechclip.sh"
    script = tmp_path / "t.sh"
    script.write_text("set -euo pipefail\nlog() { echo \"$*\"; }\n" + m.group(0) + '"$@"\n')

    def run(*cmd):
        return subprocess.run(["bash", str(script), *cmd], cwd=tmp_path, capture_output=True, text=True)

    marker = tmp_path / "stage" / ".done"
    r = run("done_or_run", str(marker), "bash", "-c", "echo partial > out; kill -9 $$")
    assert r.returncode != 0 and not marker.exists() and (tmp_path / "out").exists()
    r = run("done_or_run", str(marker), "bash", "-c", "exit 3")
    assert r.returncode == 3 and not marker.exists()
    assert run("done_or_run", str(marker), "true").returncode == 0 and marker.exists()
    r = run("done_or_run", str(marker), "false")  # done: skipped
    assert r.returncode == 0 and "already done" in r.stdout


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_train_dev):
    return make_train_dev(tmp_path_factory.mktemp("corpus"), dev=(4, 2))


def _metrics(exp):
    """The validation lines of an exp dir without their wall-clock time."""
    return [{k: v for k, v in json.loads(x).items() if k != "time"}
            for x in (Path(exp) / "checkpoints" / "metrics.jsonl").read_text().splitlines()]


def _model_weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture
def one_thread():
    """In-process runs use one intra-op thread, like the subprocesses (OMP_NUM_THREADS=1): same arithmetic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_training_sigkilled_after_a_checkpoint_resumes_to_the_same_weights(corpus, tmp_path, one_thread):
    """``bin/train`` as a subprocess is SIGKILLed once its first checkpoint exists; ``--resume`` (run in-process
    to save a second start-up) ends with the weights and validation record of an uninterrupted run."""
    from speechclip_plus.bin.train import main

    max_steps = 16

    def cmd(exp, *extra):
        return [str(a) for a in (
            "--config", CONF / "tiny_cplus.yaml", "--train_data", corpus["train_data"],
            "--valid_data", corpus["valid_data"], "--image_embeds", corpus["image_embeds"],
            "--valid_image_embeds", corpus["valid_image_embeds"], "--exp_dir", exp, "--device", "cpu",
            "--no_progress", "--train.max_steps", max_steps, "--train.valid_every", 4, "--train.batch_size", 4,
            "--train.precision", "fp32", "--train.num_workers", 0, *extra)]

    part = start("speechclip_plus.bin.train", cmd(tmp_path / "part"), tmp_path)
    ckpt = tmp_path / "part" / "checkpoints"
    kill_when(part, lambda: (ckpt / "last.pt").exists())
    killed_at = torch.load(ckpt / "last.pt", weights_only=True)["step"]
    assert 0 < killed_at < max_steps and not (ckpt / f"step-{max_steps}.pt").exists()
    assert main(cmd(tmp_path / "part", "--resume")) == 0
    assert main(cmd(tmp_path / "full")) == 0
    assert f"resumed from {ckpt / 'last.pt'}: step {killed_at}," in (tmp_path / "part" / "train.log").read_text()
    a = _model_weights(tmp_path / "full" / "checkpoints" / "last.pt")
    b = _model_weights(ckpt / "last.pt")
    assert torch.load(ckpt / "last.pt", weights_only=True)["step"] == max_steps
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    rows = [_metrics(tmp_path / e) for e in ("full", "part")]
    assert rows[0] == rows[1] and len(rows[0]) == max_steps // 4
    assert temps(ckpt) == []


def _train_args(corpus, exp, *extra):
    return ["--config", str(CONF / "tiny_p.yaml"), "--train_data", corpus["train_data"],
            "--valid_data", corpus["valid_data"], "--image_embeds", corpus["image_embeds"],
            "--valid_image_embeds", corpus["valid_image_embeds"], "--exp_dir", str(exp), "--device", "cpu",
            "--no_progress", "--train.batch_size", "4", "--train.precision", "fp32", "--train.num_workers", "0",
            "--train.valid_every", "2", *extra]


def test_non_finite_losses_stop_with_exit_1_keeping_the_last_good_checkpoint(corpus, tmp_path, monkeypatch, capsys,
                                                                              one_thread):
    from speechclip_plus.bin.train import main
    from speechclip_plus.models.speechclip import SpeechCLIP

    real = SpeechCLIP.forward
    calls = {"n": 0}

    def forward(self, *a, **kw):  # training batches 1 and 2 are fine, every later one has a NaN loss
        out = real(self, *a, **kw)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 2:
                out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(SpeechCLIP, "forward", forward)
    exp = tmp_path / "exp"
    assert main(_train_args(corpus, exp, "--train.max_steps", "8", "--train.max_bad_steps", "3")) == 1
    ck = exp / "checkpoints"
    message = (f"stopping: 3 consecutive optimiser steps were skipped (non-finite loss or gradients; "
               f"train.max_bad_steps=3); last good checkpoint: {ck / 'last.pt'} (step 2)")
    err = capsys.readouterr().err
    assert f"ERROR {message}" in err and f"ERROR {message}" in (exp / "train.log").read_text()
    for n, epoch in ((1, 1), (2, 1), (3, 2)):  # 2 batches per epoch: the bad steps are in epochs 1 and 2
        assert f"step 3 (epoch {epoch}) skipped: non-finite loss or gradient ({n} in a row, {n} in total)" in err
    assert sorted(p.name for p in ck.glob("step-*.pt")) == ["step-2.pt"]
    assert os.path.samefile(ck / "last.pt", ck / "step-2.pt")
    state = torch.load(ck / "last.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(v.float()).all() for v in state["model"].values())


def test_disk_full_while_checkpointing_keeps_the_previous_one_and_resumes(corpus, tmp_path, monkeypatch, capsys,
                                                                          one_thread):
    """Simulated: ``torch.save`` writes part of ``step-4.pt``'s temporary file, then raises ENOSPC."""
    from speechclip_plus.bin.train import main

    real_save = torch.save
    seen = {}

    def save(obj, f, *a, **kw):  # f: the temporary file, opened for writing by io.torch_save_atomic
        path = Path(getattr(f, "name", f))
        if path.name.startswith(".step-4.tmp-"):
            seen["last.pt"] = sha(path.parent / "last.pt")
            f.write(b"PK\x03\x04" + b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    exp = tmp_path / "exp"
    args = _train_args(corpus, exp, "--train.max_steps", "6")
    assert main(args) == 3
    ck = exp / "checkpoints"
    message = (f"error: cannot write checkpoint {ck / 'step-4.pt'}: No space left on device; the previous "
               f"checkpoint {ck / 'last.pt'} (step 2) is intact")
    assert message in capsys.readouterr().err and message in (exp / "train.log").read_text()
    assert sha(ck / "last.pt") == seen["last.pt"] and os.path.samefile(ck / "last.pt", ck / "step-2.pt")
    assert sorted(p.name for p in ck.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl", "step-2.pt"]
    # the step-4 validation line is written before its checkpoint; --resume from step 2 drops it
    assert [json.loads(x)["step"] for x in (ck / "metrics.jsonl").read_text().splitlines()] == [2, 4]

    monkeypatch.setattr(torch, "save", real_save)  # space again: resume, and end as an uninterrupted run
    assert main(args + ["--resume"]) == 0
    assert main(_train_args(corpus, tmp_path / "ref", "--train.max_steps", "6")) == 0
    a, b = _model_weights(ck / "last.pt"), _model_weights(tmp_path / "ref" / "checkpoints" / "last.pt")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert _metrics(exp) == _metrics(tmp_path / "ref") and [r["step"] for r in _metrics(exp)] == [2, 4, 6]


def test_unwritable_exp_dir_is_a_clear_error(corpus, tmp_path, capsys):
    """Simulated with a path through a regular file (tests run as root, so chmod would not stop a write)."""
    from speechclip_plus.bin.train import main

    blocker = tmp_path / "not a dir"
    blocker.write_text("x")
    exp = blocker / "exp"
    assert main(_train_args(corpus, exp, "--train.max_steps", "2")) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write to the experiment dir {exp}: [Errno {errno.ENOTDIR}] "
                          "Not a directory")
    assert blocker.read_text() == "x"
