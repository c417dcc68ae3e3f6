"""Kaldi data dirs: reading/writing, validation messages, check_data_dir, DataDir."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from speechclip_plus.data.datadir import (
    DataDir,
    DataError,
    check_data_dir,
    combine_data_dirs,
    read_kv,
    spk2utt_from_utt2spk,
    validate_data_dir,
    write_data_dir,
    write_kv,
)
from speechclip_plus.io import atomic_path, atomic_write_text


def make_data_dir(root, n_utts: int = 4, n_images: int = 2, name: str = "set") -> str:
    """A valid data dir: n_utts short 16 kHz wavs (speaker = utt // 2), images cycled over n_images PNGs."""
    root = str(root)
    audio = os.path.join(root, "audio dir")  # a space in every path
    images = os.path.join(root, "images")
    os.makedirs(audio, exist_ok=True)
    os.makedirs(images, exist_ok=True)
    wav, text, utt2spk, utt2img, img = {}, {}, {}, {}, {}
    for k in range(n_images):
        path = os.path.join(images, f"img{k}.png")
        Image.new("RGB", (8, 8), (40 * k, 10, 200)).save(path)
        img[f"img{k}"] = path
    for u in range(n_utts):
        utt = f"spk{u // 2}-{name}{u:02d}"
        path = os.path.join(audio, f"{utt}.wav")
        sf.write(path, np.full(1600 * (u + 1), 0.1, dtype=np.float32), 16000)
        wav[utt], text[utt], utt2spk[utt] = path, f"a dog number {u} runs .", f"spk{u // 2}"
        utt2img[utt] = f"img{u % n_images}"
    d = os.path.join(root, name)
    write_data_dir(d, wav, text, utt2spk, utt2img, img)
    return d


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def test_write_kv_sorts_in_byte_order_and_keeps_spaces(tmp_path):
    f = tmp_path / "wav.scp"
    data = {"b": "/x/y z.wav", "a-1": "/p", "B": "/q", "a": "/r", "\u00e4": "/s"}
    write_kv(f, data)
    keys = [line.split(" ", 1)[0] for line in _lines(f)]
    assert keys == sorted(data, key=lambda k: k.encode())  # LC_ALL=C: "B" < "a" < "a-1" < "b" < "ä"
    assert keys[0] == "B" and keys[-1] == "\u00e4"
    assert read_kv(f) == data
    assert read_kv(f)["b"] == "/x/y z.wav"
    with pytest.raises(ValueError, match="bad key"):
        write_kv(f, {"a b": "x"})
    with pytest.raises(ValueError, match="k: bad value"):
        write_kv(f, {"k": "two\nlines"})
    assert read_kv(f) == data  # a failed write leaves the old file


def test_read_kv_errors_name_file_line_key(tmp_path):
    f = tmp_path / "text"
    f.write_text("u1 hello\nu2 world\nu1 again\n")
    with pytest.raises(DataError, match=rf"^{f}:3: u1: duplicate key \(first on line 1\)"):
        read_kv(f)
    f.write_text("u1 hello\nu2\n")
    with pytest.raises(DataError, match=rf"^{f}:2: u2: missing value"):
        read_kv(f)
    assert read_kv(f, allow_empty=True) == {"u1": "hello", "u2": ""}
    f.write_bytes(b"u1 hello\nu2 caf\xe9\n")
    with pytest.raises(DataError, match=rf"^{f}:2: u2: not valid UTF-8"):
        read_kv(f)
    f.write_text("u1 hello\n\nu2 x\n")
    with pytest.raises(DataError, match=rf"^{f}:2: empty line"):
        read_kv(f)
    with pytest.raises(DataError, match="file not found"):
        read_kv(tmp_path / "nope")


def test_read_kv_crlf_stripped_with_warning(tmp_path, caplog):
    f = tmp_path / "text"
    f.write_bytes(b"u1 a dog\r\nu2  two  spaces \r\n")
    with caplog.at_level(logging.WARNING):
        assert read_kv(f) == {"u1": "a dog", "u2": "two  spaces"}
    assert any("CR LF" in r.getMessage() and str(f) in r.getMessage() for r in caplog.records)


def test_valid_dir_has_no_problems(tmp_path):
    d = make_data_dir(tmp_path)
    assert validate_data_dir(d) == []
    check_data_dir(d)
    dd = DataDir(d)
    assert dd.utts == sorted(dd.wav) and len(dd) == 4
    assert dd.utt2dur is None
    assert dd.spk2utt == {"spk0": dd.utts[:2], "spk1": dd.utts[2:]}
    write_kv(os.path.join(d, "utt2dur"), {u: "0.1" for u in dd.utts})
    assert DataDir(d).utt2dur == {u: 0.1 for u in dd.utts}


def test_validation_reports_each_problem(tmp_path):
    d = make_data_dir(tmp_path)
    dd = DataDir(d)
    u0, u1, u2, u3 = dd.utts
    j = lambda name: os.path.join(d, name)  # noqa: E731
    # wav.scp: swap two lines (unsorted), make one path relative and one missing
    lines = _lines(j("wav.scp"))
    lines[1], lines[2] = lines[2], lines[1]
    lines[0] = f"{u0} relative/a.wav"
    os.remove(dd.wav[u3])
    atomic_write_text(j("wav.scp"), "\n".join(lines) + "\n")
    # text: empty caption for u1, u2 missing; utt2img: unknown image for u3
    atomic_write_text(j("text"), f"{u0} fine\n{u1}  \n{u3} fine\n")
    write_kv(j("utt2img"), {**dd.utt2img, u3: "img9"})
    # spk2utt: spk1 lost one utterance
    write_kv(j("spk2utt"), {"spk0": [u0, u1], "spk1": [u2]})
    os.remove(dd.img["img1"])
    problems = validate_data_dir(d)
    text = "\n".join(problems)
    assert f"{j('wav.scp')}:3: {u1}: not sorted (LC_ALL=C order): comes after {u2}" in problems
    assert f"{j('wav.scp')}:1: {u0}: path is not absolute: relative/a.wav" in problems
    assert f"{j('wav.scp')}:4: {u3}: file not found: {dd.wav[u3]}" in problems
    assert f"{j('text')}:2: {u1}: empty caption" in problems
    assert f"{j('text')}: {u2}: missing (utterance on wav.scp line 2)" in problems
    assert f"{j('utt2img')}:4: {u3}: image img9 not in img.scp" in problems
    assert f"{j('spk2utt')}:2: spk1: does not match utt2spk (missing {u3})" in problems
    assert f"{j('img.scp')}:2: img1: file not found: {dd.img['img1']}" in problems
    assert len(problems) == 8, text
    # without file checks the two "file not found" problems disappear, the rest stay
    assert len(validate_data_dir(d, check_files=False)) == 6


def test_validation_missing_files_and_duplicates(tmp_path):
    d = make_data_dir(tmp_path)
    os.remove(os.path.join(d, "utt2img"))
    u = DataDir(d).utts[0]
    with open(os.path.join(d, "text"), "a", encoding="utf-8") as f:
        f.write(f"{u} again\n")
    problems = validate_data_dir(d)
    assert f"{os.path.join(d, 'utt2img')}: missing (required file)" in problems
    assert f"{os.path.join(d, 'text')}:5: {u}: duplicate key (first on line 1)" in problems
    assert validate_data_dir(tmp_path / "absent") == [f"{tmp_path / 'absent'}: data dir not found"]


def test_check_data_dir_shows_first_ten_and_count(tmp_path):
    d = make_data_dir(tmp_path, n_utts=12, n_images=1)
    write_kv(os.path.join(d, "text"), {"zz-extra": "x"})
    problems = validate_data_dir(d)
    assert len(problems) == 13  # 12 missing captions + 1 unknown utterance
    with pytest.raises(DataError, match=r"13 problem\(s\) in the data dir") as e:
        check_data_dir(d)
    msg = str(e.value)
    assert msg.startswith(f"{d}: 13 problem(s)")
    assert "... and 3 more" in msg
    assert sum(p in msg for p in problems) == 10


def test_spk2utt_from_utt2spk():
    assert spk2utt_from_utt2spk({"b": "s1", "a": "s1", "c": "s0"}) == {"s1": ["a", "b"], "s0": ["c"]}


def test_combine_rejects_conflicts(tmp_path):
    a = make_data_dir(tmp_path / "a", name="x")
    b = make_data_dir(tmp_path / "b", name="x")  # same utterance ids
    with pytest.raises(DataError, match="is in both"):
        combine_data_dirs(tmp_path / "c", [a, b])
    c = make_data_dir(tmp_path / "c", name="y")  # new utts, but img0 has another path
    with pytest.raises(DataError, match="image img0 is"):
        combine_data_dirs(tmp_path / "out", [a, c])


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("new")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(os.listdir(target.parent)) == ["f.txt"]
    with atomic_path(target) as tmp:
        assert tmp.endswith(".txt") and os.path.dirname(tmp) == str(target.parent)
        with open(tmp, "w") as f:
            f.write("new")
    assert target.read_text() == "new" and sorted(os.listdir(target.parent)) == ["f.txt"]
