"""utils/*.sh: shellcheck, and each script's behaviour on generated data dirs."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import soundfile as sf
from PIL import Image

from speechclip_plus.data.datadir import DataDir, read_kv, spk2utt_from_utt2spk, validate_data_dir, write_data_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UTILS = os.path.join(REPO, "utils")
SCRIPTS = ["validate_data_dir.sh", "subset_data_dir.sh", "combine_data.sh", "fix_data_dir.sh",
           "utt2spk_to_spk2utt.sh"]


def run(script, *args, stdin=None):
    env = dict(os.environ, PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.run([os.path.join(UTILS, script), *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=env, timeout=120)


def make_dir(root, n=6, with_dur=True):
    """n utterances (2 per speaker, durations 0.1*(k+1) s), 3 images."""
    root = str(root)
    os.makedirs(os.path.join(root, "media"), exist_ok=True)
    img = {}
    for k in range(3):
        img[f"im{k}"] = os.path.join(root, "media", f"im{k}.png")
        Image.new("RGB", (4, 4), (k, k, k)).save(img[f"im{k}"])
    wav, text, utt2spk, utt2img, dur = {}, {}, {}, {}, {}
    for k in range(n):
        u = f"s{k // 2}-u{k}"
        wav[u] = os.path.join(root, "media", f"{u}.wav")
        sf.write(wav[u], np.zeros(1600 * (n - k), np.float32), 16000)
        text[u], utt2spk[u], utt2img[u], dur[u] = f"caption {k}", f"s{k // 2}", f"im{k % 3}", 0.1 * (n - k)
    d = os.path.join(root, "data")
    write_data_dir(d, wav, text, utt2spk, utt2img, img, dur if with_dur else None)
    return d


def snapshot(d):
    return {n: open(os.path.join(d, n), encoding="utf-8").read() for n in sorted(os.listdir(d))
            if os.path.isfile(os.path.join(d, n))}


def test_shellcheck_clean(require):
    require("shellcheck")
    r = subprocess.run(["shellcheck", *SCRIPTS], cwd=UTILS, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_help_and_usage_errors():
    for s in SCRIPTS:
        r = run(s, "--help")
        assert r.returncode == 0 and "Usage" in r.stdout, s
    for s in SCRIPTS[:4]:
        assert run(s).returncode == 2, s


def test_utt2spk_to_spk2utt_matches_python(tmp_path):
    utt2spk = {"b-2": "b", "a-1": "a", "b-1": "b", "a-10": "a", "c-1": "B"}
    f = tmp_path / "utt2spk"
    f.write_bytes("".join(f"{u} {s}\r\n" for u, s in utt2spk.items()).encode())  # unsorted, CRLF
    r = run("utt2spk_to_spk2utt.sh", f)
    assert r.returncode == 0, r.stderr
    expected = spk2utt_from_utt2spk(utt2spk)
    assert r.stdout == "".join(f"{s} {' '.join(expected[s])}\n" for s in sorted(expected))
    assert run("utt2spk_to_spk2utt.sh", stdin=f.read_text()).stdout == r.stdout
    bad = run("utt2spk_to_spk2utt.sh", stdin="u1 s1 extra\n")
    assert bad.returncode != 0 and "line 1" in bad.stderr


def test_validate_script(tmp_path):
    d = make_dir(tmp_path)
    r = run("validate_data_dir.sh", d)
    assert r.returncode == 0 and "OK" in r.stdout
    os.remove(read_kv(os.path.join(d, "wav.scp"))["s0-u1"])
    r = run("validate_data_dir.sh", d)
    assert r.returncode == 1 and f"{d}/wav.scp:2: s0-u1: file not found" in r.stderr
    assert run("validate_data_dir.sh", "--no-check-files", d).returncode == 0


def test_subset(tmp_path):
    src = make_dir(tmp_path)
    r = run("subset_data_dir.sh", "--first", 2, src, tmp_path / "first")
    assert r.returncode == 0, r.stderr
    first = DataDir(tmp_path / "first")
    assert first.utts == DataDir(src).utts[:2]
    assert set(first.img) == {"im0", "im1"}  # only the images in use
    assert validate_data_dir(first.path) == []
    assert first.utt2dur == {u: DataDir(src).utt2dur[u] for u in first.utts}

    (tmp_path / "list").write_text("s2-u5\ns0-u0 extra fields\n")
    assert run("subset_data_dir.sh", "--utt-list", tmp_path / "list", src, tmp_path / "l").returncode == 0
    assert DataDir(tmp_path / "l").utts == ["s0-u0", "s2-u5"] and DataDir(tmp_path / "l").spk2utt == {
        "s0": ["s0-u0"], "s2": ["s2-u5"]}

    assert run("subset_data_dir.sh", "--shortest", 2, src, tmp_path / "short").returncode == 0
    assert DataDir(tmp_path / "short").utts == ["s2-u4", "s2-u5"]

    a = run("subset_data_dir.sh", "--random", 3, "--seed", 7, src, tmp_path / "r1")
    run("subset_data_dir.sh", "--random", 3, "--seed", 7, src, tmp_path / "r2")
    assert a.returncode == 0 and len(DataDir(tmp_path / "r1")) == 3
    assert snapshot(tmp_path / "r1") == snapshot(tmp_path / "r2")

    (tmp_path / "bad").write_text("nobody\n")
    r = run("subset_data_dir.sh", "--utt-list", tmp_path / "bad", src, tmp_path / "b")
    assert r.returncode == 1 and "nobody" in r.stderr
    nodur = make_dir(tmp_path / "nodur", with_dur=False)
    r = run("subset_data_dir.sh", "--shortest", 1, nodur, tmp_path / "c")
    assert r.returncode == 1 and "needs utt2dur" in r.stderr


def test_combine_restores_the_split(tmp_path):
    src = make_dir(tmp_path)
    utts = DataDir(src).utts
    (tmp_path / "l1").write_text("\n".join(utts[:4]) + "\n")
    (tmp_path / "l2").write_text("\n".join(utts[4:]) + "\n")
    run("subset_data_dir.sh", "--utt-list", tmp_path / "l1", src, tmp_path / "p1")
    run("subset_data_dir.sh", "--utt-list", tmp_path / "l2", src, tmp_path / "p2")
    r = run("combine_data.sh", tmp_path / "all", tmp_path / "p1", tmp_path / "p2")
    assert r.returncode == 0, r.stderr
    assert snapshot(tmp_path / "all") == snapshot(src)
    r = run("combine_data.sh", tmp_path / "dup", tmp_path / "p1", tmp_path / "all")
    assert r.returncode == 1 and "is in both" in r.stderr


def test_fix_repairs_a_messy_dir(tmp_path):
    d = make_dir(tmp_path)
    good = snapshot(d)
    j = lambda n: os.path.join(d, n)  # noqa: E731
    wav_lines = good["wav.scp"].splitlines()
    with open(j("wav.scp"), "wb") as f:  # reversed, CRLF, one identical duplicate line, one blank line
        f.write(("\r\n".join(wav_lines[::-1] + [wav_lines[0], ""]) + "\r\n").encode())
    text = read_kv(j("text"))
    text["s1-u2"] = " "
    del text["s1-u3"]
    with open(j("text"), "w") as f:
        f.writelines(f"{u} {t}\n" for u, t in text.items())
    u2i = read_kv(j("utt2img"))
    with open(j("utt2img"), "a") as f:
        f.write("s2-u4 im9\n")  # a conflicting duplicate: cannot be fixed automatically
    r = run("fix_data_dir.sh", d)
    assert r.returncode == 1 and "s2-u4: duplicate key with a different value" in r.stderr
    assert not os.path.exists(j(".backup"))  # nothing touched
    u2i["s2-u4"] = "im9"  # image not in img.scp
    with open(j("utt2img"), "w") as f:
        f.writelines(f"{u} {i}\n" for u, i in u2i.items())
    r = run("fix_data_dir.sh", d)
    assert r.returncode == 0, r.stderr
    assert validate_data_dir(d) == []
    assert DataDir(d).utts == ["s0-u0", "s0-u1", "s2-u5"]  # u2 empty caption, u3 no caption, u4 bad image
    assert DataDir(d).spk2utt == {"s0": ["s0-u0", "s0-u1"], "s2": ["s2-u5"]}
    assert set(DataDir(d).img) == {"im0", "im1", "im2"}  # u0, u1, u5 use im0, im1, im2
    assert open(os.path.join(d, ".backup", "text")).read().count("\n") == 5
    for u in ("s1-u2", "s1-u3", "s2-u4"):
        assert u in r.stderr


# ---------------------------------------------------------------------------------------------- parse_options.sh
def parse_options(tmp_path, *args):
    """A script with options stage, stop_stage, train_args that sources utils/parse_options.sh and prints the
    values and the positional arguments left, '|'-separated."""
    script = tmp_path / "opts.sh"
    script.write_text(f"""#!/usr/bin/env bash
set -euo pipefail
stage=0
stop_stage=100
train_args=""
help_message='Usage: opts.sh --stage ${{stage}} --stop_stage ${{stop_stage}}'
. {os.path.join(UTILS, "parse_options.sh")}
printf '%s|' "${{stage}}" "${{stop_stage}}" "${{train_args}}" "$#" "$@"
""")
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60)


def test_parse_options_sets_known_variables_in_every_spelling(tmp_path):
    r = parse_options(tmp_path, "--stage", "3", "--stop-stage=5", "pos 1", "--train_args", "--train.lr 1e-4 --x=1",
                      "pos2")
    assert r.returncode == 0 and r.stdout == "3|5|--train.lr 1e-4 --x=1|2|pos 1|pos2|", r.stderr
    r = parse_options(tmp_path, "--stop_stage=", "--stage", "")  # empty values are values
    assert r.returncode == 0 and r.stdout == "|||0|", r.stderr
    r = parse_options(tmp_path, "--train_args=a=b c")  # only the first '=' splits
    assert r.stdout == "0|100|a=b c|0|", r.stderr


def test_parse_options_refuses_unknown_and_incomplete_options(tmp_path):
    for args, message in [(["--nope", "1"], "unknown option --nope (see --help)"),
                          (["--no-pe=1"], "unknown option --no-pe"),
                          (["--bad.name", "1"], "unknown option --bad.name"),
                          (["--stage"], "option --stage needs a value")]:
        r = parse_options(tmp_path, *args)
        assert r.returncode == 2 and r.stdout == "" and message in r.stderr, (args, r.stderr)
    r = parse_options(tmp_path, "--stage", "7", "--help")  # help shows the values parsed so far, exit 0
    assert r.returncode == 0 and r.stdout.strip() == "Usage: opts.sh --stage 7 --stop_stage 100"
    r = parse_options(tmp_path, "-h")
    assert r.returncode == 0 and r.stdout.strip() == "Usage: opts.sh --stage 0 --stop_stage 100"
