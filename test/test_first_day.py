"""A researcher's first day, played as they would: only the README and egs/TEMPLATE/README.md, no reading of code.

``test_first_day``: ``make setup`` (a no-op once set up), a CSV-described corpus of their own (FLAC at 22.05 kHz
and MP3 at 44.1 kHz, PNG images, quoted captions with commas), ``egs/TEMPLATE/setup.sh``, the Python
``local/data.sh`` of the TEMPLATE README, the CPU config it writes with the teacher CLIP trained by stage 2,
stages 0-6 from a shell with no virtualenv on PATH and no VIRTUAL_ENV, then the Python API on the exported
model. The recipe lives in a temporary tree (egs/TEMPLATE and utils/ symlinked) so the repository stays clean.

The other tests play the places where the first day went quietly wrong: the interpreter search of
``egs/TEMPLATE/path.sh``, stage 0's marker after a failed validation, and the engine's ``Finished`` line.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import soundfile as sf
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fake_corpora  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def fresh_shell(tmp_path: Path, **extra: str) -> Dict[str, str]:
    """The environment of a new terminal: system PATH only, no VIRTUAL_ENV / PYTHONPATH / HF variables."""
    env = {"PATH": SYSTEM_PATH, "HOME": os.environ.get("HOME", str(tmp_path)), "LANG": "C.UTF-8",
           "XDG_CACHE_HOME": str(tmp_path / "user_cache"), "TMPDIR": os.environ.get("TMPDIR", "/tmp")}
    env.update(extra)
    return env


def run(cmd, cwd: Path, env: Dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def tail(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-5000:]}\n--- stderr\n{proc.stderr[-5000:]}"


def workspace(tmp_path: Path) -> Path:
    """tmp/egs/TEMPLATE -> the repository's, tmp/utils -> the repository's."""
    ws = tmp_path / "ws"
    (ws / "egs").mkdir(parents=True)
    (ws / "egs" / "TEMPLATE").symlink_to(REPO / "egs" / "TEMPLATE")
    (ws / "utils").symlink_to(REPO / "utils")
    return ws


def need_system_python_without_torch() -> None:
    probe = subprocess.run(["python3", "-c", "import torch"], env={"PATH": SYSTEM_PATH}, capture_output=True)
    if probe.returncode == 0:
        pytest.skip("the system python3 has torch: a fresh shell here cannot show a missing environment")


# ----------------------------------------------------------------------------------------------- path.sh
def source_path_sh(path_sh: Path, env: Dict[str, str], python: str = "") -> subprocess.CompletedProcess:
    script = (f"set -euo pipefail; python={python!r}; . {str(path_sh)!r}; "
              'echo "python=${python}"; echo "PYTHON=${PYTHON}"; echo "PYTHONPATH=${PYTHONPATH}"; '
              'echo "PATH=${PATH}"')
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)


def test_path_sh_finds_the_checkout_venv_from_a_fresh_shell(tmp_path):
    if not VENV_PYTHON.exists():
        pytest.skip("no .venv in this checkout (make setup)")
    need_system_python_without_torch()
    path_sh = workspace(tmp_path) / "egs" / "TEMPLATE" / "path.sh"  # through the symlink, as recipes do
    proc = source_path_sh(path_sh, fresh_shell(tmp_path))
    assert proc.returncode == 0, tail(proc)
    out = dict(line.split("=", 1) for line in proc.stdout.splitlines())
    assert out["python"] == out["PYTHON"] == str(VENV_PYTHON)
    assert out["PYTHONPATH"].split(":")[0] == str(REPO)
    assert out["PATH"].split(":")[0] == str(VENV_PYTHON.parent)
    # a parent's choice (the engine exports it) reaches a child script, e.g. local/data.sh
    proc = source_path_sh(path_sh, fresh_shell(tmp_path, SPEECHCLIP_PYTHON="/some/chosen/python"))
    assert "python=/some/chosen/python" in proc.stdout, tail(proc)
    # --python that lacks the toolkit's dependencies: one line naming it and what to run
    proc = source_path_sh(path_sh, fresh_shell(tmp_path), python="/usr/bin/python3")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "--python /usr/bin/python3 cannot import" in proc.stderr
    assert f"run 'make setup' in {REPO}" in proc.stderr


def test_path_sh_without_any_environment_says_what_to_run(tmp_path):
    need_system_python_without_torch()
    clone = tmp_path / "clone"  # a fresh clone before `make setup`: no .venv
    (clone / "egs" / "TEMPLATE").mkdir(parents=True)
    shutil.copy(REPO / "egs" / "TEMPLATE" / "path.sh", clone / "egs" / "TEMPLATE" / "path.sh")
    proc = source_path_sh(clone / "egs" / "TEMPLATE" / "path.sh", fresh_shell(tmp_path))
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"run 'make setup' in {clone}" in lines[0] and f"{clone}/.venv/bin/python" in lines[0]


# ----------------------------------------------------------------------------------------------- engine
def tiny_recipe(ws: Path, data_sh: str) -> Path:
    """A recipe whose run.sh passes one config and whose local/data.sh is ``data_sh``."""
    recipe = ws / "egs" / "tiny"
    (recipe / "local").mkdir(parents=True)
    (recipe / "conf").mkdir()
    for name in ("a", "b"):
        shutil.copy(REPO / "speechclip_plus" / "conf" / "base_hplus.yaml", recipe / "conf" / f"{name}.yaml")
    (recipe / "run.sh").write_text('#!/usr/bin/env bash\nset -euo pipefail\ncd "$(dirname "$0")"\n'
                                   '../TEMPLATE/speechclip.sh --train_config conf/a.yaml --nj 1 "$@"\n')
    (recipe / "local" / "data.sh").write_text(data_sh)
    for script in (recipe / "run.sh", recipe / "local" / "data.sh"):
        script.chmod(0o755)
    return recipe


DATA_SH = """#!/usr/bin/env bash
# writes data/{train,dev,test}; the image of the first train utterance is BROKEN=1's choice
set -euo pipefail
cd "$(dirname "$0")/.."
. ../TEMPLATE/path.sh
echo "local/data.sh ran with ${python}" >> data_sh_runs.txt
"${python}" - <<'EOF'
import os
import numpy as np
import soundfile as sf
from PIL import Image
from speechclip_plus.data.datadir import write_data_dir
root = os.path.abspath("media")
os.makedirs(root, exist_ok=True)
for s, n in (("train", 3), ("dev", 2), ("test", 2)):
    wav, img = {}, {}
    for k in range(n):
        wav[f"spk-{s}{k}"] = os.path.join(root, f"{s}{k}.wav")
        sf.write(wav[f"spk-{s}{k}"], 0.1 * np.sin(np.arange(8000) / (3 + k)), 16000)
        img[f"{s}img{k}"] = os.path.join(root, f"{s}{k}.png")
        Image.new("RGB", (8, 8), (40 * k, 0, 0)).save(img[f"{s}img{k}"])
    if os.environ.get("BROKEN") == "1":
        img[f"{s}img0"] = os.path.join(root, "missing.png")
    write_data_dir(os.path.join("data", s), wav, {u: "a caption" for u in wav}, {u: "spk" for u in wav},
                   {u: f"{s}img{k}" for k, u in enumerate(sorted(wav))}, img)
EOF
"""


def test_stage0_marks_done_only_after_every_set_validates(tmp_path):
    ws = workspace(tmp_path)
    recipe = tiny_recipe(ws, DATA_SH)
    env = dict(os.environ, BROKEN="1")
    stage0 = [recipe / "run.sh", "--stage", "0", "--stop_stage", "0"]
    proc = run(stage0, recipe, env)
    assert proc.returncode == 1, tail(proc)
    for dset in ("train", "dev", "test"):  # every set was validated before stopping
        assert re.search(rf"data/{dset}/img.scp:1: {dset}img0: file not found", proc.stderr), tail(proc)
    assert '--validate_opts "--fix_dir"' in proc.stderr and "excluded.txt" in proc.stderr
    assert not (recipe / "data" / ".stage0.done").exists()
    # the corpus script is fixed: the next run runs it again (no stale marker), validates and marks done;
    # --python reaches local/data.sh
    python = tmp_path / "my-python"  # a wrapper, as a cluster's module system or a container would give
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    proc = run(stage0 + ["--python", python], recipe, dict(os.environ, BROKEN="0"))
    assert proc.returncode == 0, tail(proc)
    assert (recipe / "data" / ".stage0.done").exists()
    runs = (recipe / "data_sh_runs.txt").read_text().splitlines()
    assert len(runs) == 2 and runs[1] == f"local/data.sh ran with {python}"
    proc = run(stage0, recipe, dict(os.environ, BROKEN="0"))
    assert proc.returncode == 0 and "skipping local/data.sh, validating again" in proc.stdout, tail(proc)
    assert len((recipe / "data_sh_runs.txt").read_text().splitlines()) == 2
    # the repair option named in the error works on a broken corpus
    (recipe / "data" / ".stage0.done").unlink()
    proc = run(stage0 + ["--validate_opts", "--fix_dir"], recipe, env)
    assert proc.returncode == 0, tail(proc)
    assert "spk-train0" in (recipe / "data" / "train" / "excluded.txt").read_text()


def test_finished_line_shows_the_options_that_ran(tmp_path):
    ws = workspace(tmp_path)
    recipe = tiny_recipe(ws, DATA_SH)
    proc = run([recipe / "run.sh", "--stage", "7", "--train_config", "conf/b.yaml", "--train_args",
                "--train.lr 5e-5"], recipe, dict(os.environ))
    assert proc.returncode == 0, tail(proc)
    finished = [ln for ln in proc.stdout.splitlines() if "Finished (" in ln]
    assert len(finished) == 1, proc.stdout
    line = finished[0]
    assert "--train_config conf/b.yaml" in line and "conf/a.yaml" not in line  # the user's option won
    assert "--stage 7" in line and "--nj 1" in line and r"--train_args --train.lr\ 5e-5" in line
    assert "--valid_set" not in line  # defaults are not repeated


# ----------------------------------------------------------------------------------------------- first day
def _make_setup_is_a_no_op() -> None:
    """``make -n setup`` must not plan a reinstall: a test never re-installs the environment."""
    if shutil.which("make") is None or not VENV_PYTHON.exists():
        pytest.skip("needs make and a set-up checkout (make setup)")
    dry = subprocess.run(["make", "-n", "setup"], cwd=REPO, capture_output=True, text=True, timeout=60)
    if "pip install" in dry.stdout:
        msg = "setup.py is newer than .venv/.installed: `make setup` would reinstall; run it yourself first"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)


def test_first_day(tmp_path, require, template_readme_block):
    require("espeak-ng")  # speaks the corpus
    need_system_python_without_torch()
    _make_setup_is_a_no_op()
    env = fresh_shell(tmp_path)
    proc = run(["make", "setup"], REPO, env, timeout=300)  # the README's set-up, from a fresh shell
    assert proc.returncode == 0, tail(proc)

    fake = fake_corpora.make_csv(tmp_path / "my corpus")  # a space in the corpus path too
    ws = workspace(tmp_path)
    proc = run([ws / "egs" / "TEMPLATE" / "setup.sh", "egs/mycorpus"], ws, env)
    assert proc.returncode == 0, tail(proc)
    recipe = ws / "egs" / "mycorpus"
    (recipe / "local" / "data.sh").write_text(template_readme_block("bash", "# local/data.sh for a CSV manifest"))
    (recipe / "local" / "prepare_csv.py").write_text(template_readme_block("python", "# local/prepare_csv.py"))
    if require("shellcheck", skip=False):
        lint = run(["shellcheck", recipe / "local" / "data.sh"], recipe, env)
        assert lint.returncode == 0, lint.stdout

    env["CORPUS"] = str(fake.root)
    args = ["--train_config", "conf/cpu_hplus.yaml", "--train_teacher", "true",
            "--teacher_opts", "--steps 3 --batch_size 8 --no_progress", "--nj", "1",
            "--train_args", "--train.max_steps 3 --train.batch_size 8 --train.valid_batch_size 8 "
                            "--train.valid_every 3 --train.warmup_steps 1 --train.num_workers 0",
            "--score_opts", "--num_plots 1 --no_progress"]
    proc = run([recipe / "run.sh", *args], tmp_path, env, timeout=900)  # from any directory
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, tail(proc)
    for stage in range(7):
        assert f"Stage {stage}:" in log, f"stage {stage} not logged\n{tail(proc)}"
    assert f"(python: {VENV_PYTHON})" in log  # found by path.sh, nothing activated

    # stage 0: the CSV's quoted captions (commas, double quotes) and ids, every set valid
    from speechclip_plus.data.datadir import DataDir

    for dset in ("train", "dev", "test"):
        dd = DataDir(recipe / "data" / dset)
        assert len(dd) == fake.utterances[dset] and len(dd.img) == fake.images[dset]
        for utt in dd.utts:
            audio = utt.split("-", 1)[1]
            caption = next(t for name, t in fake.texts.items() if name.startswith(audio + "."))
            assert dd.text[utt] == caption and '"' in caption and "," in caption
    # stage 1: every FLAC / MP3 became a 16 kHz copy
    for path in DataDir(recipe / "data" / "train").wav.values():
        assert "/dump/audio/" in path and sf.info(path).samplerate == 16000
    # stage 2: the teacher, then a cache keyed by its weights' digest
    from speechclip_plus.data.cache_key import clip_tag

    teacher = recipe / "exp" / "clip_teacher" / "clip.pt"
    assert teacher.is_file() and json.loads((recipe / "exp" / "clip_teacher" / "metrics.json").read_text())
    (cache,) = (recipe / "dump").glob("clip_*")
    assert cache.name == clip_tag(str(recipe / "conf" / "cpu_clip.json"), str(teacher))
    # small-corpus guidance: the capped sentencepiece size, the select-metric warning (3 dev images)
    assert "--spm_vocab_size 500 is more than these 12 caption(s) allow" in log
    assert "train.select_metric=recall_mean_10 cannot tell checkpoints apart" in log
    # stage 5: image and zero-shot text retrieval, with chance levels
    (exp,) = (recipe / "exp").glob("cpu_hplus_train.max_steps_3_*")
    results = json.loads((exp / "test" / "results.json").read_text())
    assert set(results["text_retrieval"]) == {"parallel", "cascaded"}
    assert results["chance"]["retrieval"]["speech_to_image_r1"] == pytest.approx(1 / 3)
    md = (exp / "RESULTS.md").read_text()
    assert "S→T R@1" in md and "| chance" in md
    assert (exp / "test" / "plots" / "text_retrieval_parallel.png").is_file()
    finished = [ln for ln in log.splitlines() if "Finished (" in ln][0]
    assert "--train_config conf/cpu_hplus.yaml" in finished and "base_hplus" not in finished

    # the Python API on the exported model: an MP3 at 44.1 kHz, a FLAC at 22.05 kHz, a PNG, captions
    from speechclip_plus import SpeechCLIPPlus

    model = SpeechCLIPPlus.from_pretrained(exp / "model.pt")
    mp3 = next(fake.root.glob("audio/*.mp3"))
    flac = next(fake.root.glob("audio/*.flac"))
    speech = model.embed_speech([str(mp3), str(flac)])
    assert speech.shape == (2, model.embed_dim)
    torch.testing.assert_close(speech.norm(dim=-1), torch.ones(2))
    images = model.embed_image(sorted(str(p) for p in fake.root.glob("images/*.png"))[:2])
    texts = model.embed_text([fake.texts[mp3.name], fake.texts[flac.name]])
    assert model.similarity(speech, images).shape == (2, 2) and model.similarity(speech, texts).shape == (2, 2)
    assert len(model.keywords(str(mp3))) >= 1
    with pytest.raises(FileNotFoundError, match="audio file not found"):
        model.embed_speech(str(fake.root / "audio" / "nope.mp3"))
