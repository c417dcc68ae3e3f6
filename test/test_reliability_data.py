"""Bad corpora: every bad-input case of docs/reliability.md is detected where the table says, with the message
it shows (``file:line: key: what``, first ten + a count), and skippable cases are excluded only on request
(``validate_data --fix_dir``, ``format_audio --skip_bad``, ``embed_images --skip_bad``) with the reasons in
``<dir>/excluded.txt``. Source audio and image files are never modified (hashes compared); data-dir lists that
a repair rewrites keep byte-identical originals in ``<dir>/.backup/``. Every path holds a space. (Stage 0's
corpus preparation: test_data_prep_policy.py.)"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from speechclip_plus.data.datadir import DataDir, DataError, read_kv, validate_data_dir, write_data_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA_FILES = ("wav.scp", "text", "utt2spk", "spk2utt", "utt2img", "img.scp")


def tone(seconds: float = 0.25, rate: int = 16000, channels: int = 1, freq: float = 330.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return x if channels == 1 else np.stack([x * (c + 1) / channels for c in range(channels)], axis=1)


def png(path: Path, rgb=(200, 30, 30)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), rgb).save(path)
    return str(path)


def digests(paths) -> dict:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths if os.path.isfile(p)}


def tree(root: Path) -> dict:
    """sha256 of every file under ``root`` (so any write, rename or new file shows)."""
    return digests(sorted(p for p in root.rglob("*") if p.is_file()))


def write_lines(path: Path, lines, eol: str = "\n", encoding: str = "utf-8") -> None:
    path.write_bytes("".join(x + eol for x in lines).encode(encoding) if isinstance(lines[0], str)
                     else b"".join(x + eol.encode() for x in lines))


# ---------------------------------------------------------------------------------------------- stage 0
def messy_dir(root: Path, conflicting_duplicate: bool):
    """u1..u8 over images i1 (ok), i2 (file missing), i3 (not an image); see the test docstrings."""
    audio, images, d = root / "my audio", root / "my images", root / "data dir"
    audio.mkdir(parents=True)
    d.mkdir()
    wav = {}
    for k in range(1, 9):
        wav[f"u{k}"] = str(audio / f"u{k} take.wav")
        if k != 3:  # u3's audio is missing
            sf.write(wav[f"u{k}"], tone(freq=200 + 40 * k), 16000)
    img = {"i1": png(images / "one.png"), "i2": str(images / "gone.png"), "i3": str(images / "three.png")}
    Path(img["i3"]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    u2i = {"u1": "i1", "u2": "i2", "u3": "i1", "u4": "i1", "u5": "i1", "u6": "i9", "u7": "i3", "u8": "i1"}
    utts = sorted(wav)
    # wav.scp: u1 and u2 swapped (unsorted), Windows line ends
    order = ["u2", "u1"] + utts[2:]
    write_lines(d / "wav.scp", [f"{u} {wav[u]}" for u in order], eol="\r\n")
    text = [f"{u} a dog runs".encode() for u in utts]
    text[3] = b"u4   \t "  # whitespace-only caption
    text[4] = b"u5 caf\xe9 au lait"  # latin-1, not UTF-8
    write_lines(d / "text", text)
    spk = [f"{u} s{1 if u <= 'u4' else 2}" for u in utts]
    extra = ["u1 s9"] if conflicting_duplicate else ["u1 s1"]  # line 9: a second line for u1
    write_lines(d / "utt2spk", spk + extra)
    write_lines(d / "spk2utt", ["s1 u1 u2 u3 u4", "s2 u5 u6 u7 u8"])
    write_lines(d / "utt2img", [f"{u} {u2i[u]}" for u in utts])
    write_lines(d / "img.scp", [f"{i} {p}" for i, p in sorted(img.items())])
    return d, wav, img


def test_validation_names_file_line_key_for_every_problem_and_changes_nothing(tmp_path, capsys, caplog):
    """Unsorted, CRLF, missing wav, empty and non-UTF-8 captions, unknown image, missing and corrupt image,
    conflicting duplicate key, an utterance only in ``text``: each reported once; first ten + the count."""
    from speechclip_plus.bin.validate_data import main

    d, wav, img = messy_dir(tmp_path, conflicting_duplicate=True)
    with open(d / "text", "ab") as f:
        f.write(b"u9 an utterance without audio\n")
    f = {name: str(d / name) for name in DATA_FILES}
    expected = [
        f"{f['wav.scp']}:2: u1: not sorted (LC_ALL=C order): comes after u2",
        f"{f['wav.scp']}:3: u3: file not found: {wav['u3']}",
        f"{f['text']}:5: u5: not valid UTF-8 (bad byte at column 7)",
        f"{f['text']}:9: u9: utterance not in wav.scp",
        f"{f['text']}: u5: missing (utterance on wav.scp line 5)",
        f"{f['text']}:4: u4: empty caption",
        f"{f['utt2spk']}:9: u1: duplicate key (first on line 1)",
        f"{f['utt2img']}:6: u6: image i9 not in img.scp",
        f"{f['img.scp']}:2: i2: file not found: {img['i2']}",
        re.compile(re.escape(f"{f['img.scp']}:3: i3: cannot decode {img['i3']} (") + r"\w+Error: .+\)"),
    ]
    # a second missing file makes the count pass ten
    os.remove(wav["u8"])
    expected.append(f"{f['wav.scp']}:8: u8: file not found: {wav['u8']}")
    before = tree(tmp_path)
    problems = validate_data_dir(d, check_images=True)
    assert len(problems) == len(expected) == 11
    for want in expected:
        hits = [p for p in problems if (want.match(p) if isinstance(want, re.Pattern) else p == want)]
        assert len(hits) == 1, (want, problems)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main([str(d), "--check_images"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == problems[:10] + [f"{d}: 11 problem(s) (1 not shown)"]
    assert any(f"{f['wav.scp']}: 8 line(s) end with CR LF" in r.getMessage() for r in caplog.records)
    assert validate_data_dir(d, check_files=False, check_images=False).count(expected[1]) == 0  # not checked
    assert tree(tmp_path) == before  # validation never writes


def test_fix_dir_excludes_skippable_utterances_with_reasons_and_keeps_originals(tmp_path, capsys):
    """--fix_dir: u2 (image file missing), u3 (audio missing), u4 (blank caption), u5 (non-UTF-8 caption),
    u6 (image not in img.scp), u7 (undecodable image) leave; CRLF, order and the identical duplicate line
    are repaired; originals in .backup/; audio and images untouched."""
    from speechclip_plus.bin.validate_data import main
    from speechclip_plus.data.datadir import fix_data_dir

    d, wav, img = messy_dir(tmp_path, conflicting_duplicate=False)
    media = digests(list(wav.values()) + list(img.values()))
    lists = {name: (d / name).read_bytes() for name in DATA_FILES}
    assert main([str(d), "--check_images", "--fix_dir"]) == 0
    out = capsys.readouterr()
    assert f"{d}: fixed: 2 utterance(s) kept, 6 excluded" in out.out
    assert DataDir(d).utts == ["u1", "u8"]
    assert validate_data_dir(d, check_images=True) == []
    assert DataDir(d).img == {"i1": img["i1"]} and DataDir(d).spk2utt == {"s1": ["u1"], "s2": ["u8"]}
    excluded = read_kv(d / "excluded.txt")
    assert list(excluded) == ["u2", "u3", "u4", "u5", "u6", "u7"]
    assert excluded["u2"] == f"{d}/img.scp:2: i2: file not found: {img['i2']}"
    assert excluded["u3"] == f"{d}/wav.scp:3: u3: audio file not found: {wav['u3']}"
    assert excluded["u4"] == f"{d}/text:4: u4: empty caption"
    assert excluded["u5"] == f"{d}/text:5: u5: not valid UTF-8 (bad byte at column 7)"
    assert excluded["u6"] == f"{d}/utt2img:6: u6: image i9 not in img.scp"
    assert excluded["u7"].startswith(f"{d}/img.scp:3: i3: cannot decode {img['i3']} (")
    assert {n: (d / ".backup" / n).read_bytes() for n in DATA_FILES} == lists  # originals, byte for byte
    assert digests(list(wav.values()) + list(img.values())) == media
    # a later repair never overwrites the first backup; exclusions accumulate
    first_backup = tree(d / ".backup")
    (d / "text").write_text("u1 a dog runs\nu8  \n")
    assert fix_data_dir(d) == {"kept": 1, "removed": 1}
    assert tree(d / ".backup") == first_backup
    assert (d / ".backup.2" / "text").read_text() == "u1 a dog runs\nu8  \n"
    assert list(read_kv(d / "excluded.txt")) == ["u2", "u3", "u4", "u5", "u6", "u7", "u8"]


def test_conflicting_duplicate_key_is_fatal_even_with_fix_dir(tmp_path, capsys):
    from speechclip_plus.bin.validate_data import main

    d, _, _ = messy_dir(tmp_path, conflicting_duplicate=True)
    before = tree(tmp_path)
    assert main([str(d), "--fix_dir"]) == 1
    err = capsys.readouterr().err
    assert (f"error: {d}: cannot be fixed automatically: {d}/utt2spk:9: u1: duplicate key with a different value "
            "(first on line 1); fix it by hand") in err
    assert tree(tmp_path) == before and not (d / ".backup").exists()


def test_crlf_spaces_and_order_do_not_change_what_is_read(tmp_path, caplog):
    """Windows line ends and unsorted lines are read as the same entries; paths keep their spaces; the dataset
    loads the audio."""
    from speechclip_plus.data.dataset import SpeechImageDataset

    audio = tmp_path / "a dir with spaces"
    audio.mkdir()
    wav = {}
    for u in ("b", "a"):
        wav[u] = str(audio / f"utt {u}.wav")
        sf.write(wav[u], tone(0.1 if u == "a" else 0.2), 16000)
    d = tmp_path / "data"
    d.mkdir()
    write_lines(d / "wav.scp", [f"{u} {wav[u]}" for u in ("b", "a")], eol="\r\n")
    write_lines(d / "text", ["b two words", "a one"], eol="\r\n")
    write_lines(d / "utt2spk", ["a s", "b s"])
    write_lines(d / "spk2utt", ["s a b"])
    write_lines(d / "utt2img", ["a im", "b im"])
    write_lines(d / "img.scp", [f"im {png(tmp_path / 'an image.png')}"])
    with caplog.at_level(logging.WARNING):
        ds = SpeechImageDataset(d, image_embeds={"im": np.ones(3, np.float32)})
        items = [ds[0], ds[1]]
    assert [it["utt"] for it in items] == ["a", "b"] and [it["text"] for it in items] == ["one", "two words"]
    assert [len(it["wav"]) for it in items] == [1600, 3200]
    assert ds.wav == wav  # spaces kept, CR removed
    assert sum("end with CR LF" in r.getMessage() for r in caplog.records) == 2


# ---------------------------------------------------------------------------------------------- stage 1
def audio_dir(root: Path, n_good: int = 3):
    """Good utterances g0.., and 12 bad ones: 3 missing, 3 not audio, 2 with no samples, 2 silent, 2 with NaN."""
    audio = root / "raw audio"
    audio.mkdir(parents=True)
    wav, kinds = {}, {}
    for k in range(n_good):
        wav[f"g{k}"] = str(audio / f"g{k}.wav")
        sf.write(wav[f"g{k}"], tone(0.2, freq=300 + 50 * k), 16000)
    bad = [("missing", 3), ("corrupt", 3), ("empty", 2), ("silent", 2), ("nan", 2)]
    for kind, n in bad:
        for k in range(n):
            utt = f"x-{kind}{k}"
            kinds[utt], wav[utt] = kind, str(audio / f"{utt}.wav")
            if kind == "corrupt":
                Path(wav[utt]).write_bytes(b"RIFF\x00\x00" if k else b"")
            elif kind == "empty":
                sf.write(wav[utt], np.zeros(0, np.float32), 16000)
            elif kind == "silent":
                sf.write(wav[utt], np.zeros(4000, np.float32) + (k * 2.0 ** -15), 16000)  # 0 or 1 LSB
            elif kind == "nan":
                x = tone(0.2)
                x[100 + k] = np.nan if k == 0 else np.inf
                sf.write(wav[utt], x, 16000, subtype="FLOAT")
    img = {"im": png(root / "im.png")}
    d = root / "data set"
    write_data_dir(d, wav, {u: f"caption of {u}" for u in wav}, {u: "s" + u[0] for u in wav},
                   {u: "im" for u in wav}, img)
    return d, wav, kinds


def expected_audio_error(d: Path, wav: dict, kinds: dict):
    """Regexes of the bad-file lines in ``wav.scp`` order (libsndfile words its messages itself)."""
    lines = {u: n for n, u in enumerate(sorted(wav), 1)}
    what = {"missing": "audio file not found", "corrupt": r"cannot read audio \(.+\)",
            "empty": "audio file has no samples",
            "silent": r"audio is silent \(peak amplitude (0|3\.05e-05) <= 6\.1e-05, about -84 dBFS\)",
            "nan": r"1 non-finite sample value\(s\) \(NaN/inf\)"}
    return [re.escape(wav[u] + ": ") + what[kinds[u]] + re.escape(f" ({d}/wav.scp:{lines[u]}: {u})")
            for u in sorted(kinds)]


def test_bad_audio_stops_stage1_listing_ten_and_the_count(tmp_path, capsys):
    from speechclip_plus.bin.format_audio import main

    d, wav, kinds = audio_dir(tmp_path)
    before = tree(tmp_path)
    dump = tmp_path / "dump dir"
    assert main(["--data_dir", str(d), "--dump_dir", str(dump), "--no_progress"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"error: {d}: 12 bad audio file(s):"
    shown = expected_audio_error(d, wav, kinds)[:10]
    assert len(err) == 13
    for line, pattern in zip(err[1:11], shown):
        assert re.fullmatch("  " + pattern, line), (line, pattern)
    assert err[11:] == ["  ... and 2 more", f"(format_audio --skip_bad excludes them, listed in {d}/excluded.txt)"]
    assert tree(tmp_path) == before  # nothing rewritten: no utt2dur, no wav.scp.orig, no dump files


def test_skip_bad_excludes_them_and_lists_the_reasons(tmp_path):
    from speechclip_plus.bin.format_audio import main

    d, wav, kinds = audio_dir(tmp_path)
    lists = {name: (d / name).read_bytes() for name in DATA_FILES}
    sources = digests(wav.values())
    assert main(["--data_dir", str(d), "--dump_dir", str(tmp_path / "dump"), "--no_progress", "--skip_bad"]) == 0
    assert DataDir(d).utts == ["g0", "g1", "g2"]
    assert validate_data_dir(d) == []
    assert DataDir(d).utt2dur == pytest.approx({"g0": 0.2, "g1": 0.2, "g2": 0.2})
    assert DataDir(d).spk2utt == {"sg": ["g0", "g1", "g2"]}  # speaker "sx" had only bad utterances
    excluded = read_kv(d / "excluded.txt")
    assert list(excluded) == sorted(kinds)
    for (utt, reason), pattern in zip(sorted(excluded.items()), expected_audio_error(d, wav, kinds)):
        assert re.fullmatch(pattern, reason), (utt, reason)
    assert {n: (d / ".backup" / n).read_bytes() for n in DATA_FILES} == lists
    assert digests(wav.values()) == sources  # source audio never modified


def test_stereo_and_other_rates_are_converted_with_one_warning(tmp_path, caplog):
    from speechclip_plus.data.audio import format_audio, load_audio

    src = tmp_path / "src"
    src.mkdir()
    specs = {"a": (16000, 1), "b": (16000, 2), "c": (8000, 1), "d": (22050, 1), "e": (44100, 2)}
    wav = {}
    for u, (rate, ch) in specs.items():
        wav[u] = str(src / f"{u}.wav")
        sf.write(wav[u], tone(0.5, rate, ch), rate)
    d = tmp_path / "data"
    write_data_dir(d, wav, {u: "x" for u in wav}, {u: "s" for u in wav}, {u: "i" for u in wav},
                   {"i": png(tmp_path / "i.png")})
    dump = tmp_path / "dump"
    with caplog.at_level(logging.WARNING, logger="speechclip_plus.data.audio"):
        assert format_audio(d, dump, 16000, progress=False) == {"utts": 5, "converted": 4}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{d}: 2 file(s) not mono (channels averaged); 3 file(s) not at 16000 Hz (8000 Hz: 1, "
                        f"22050 Hz: 1, 44100 Hz: 1; resampled): converted copies (16-bit PCM, 16000 Hz mono) "
                        f"in {dump}"]
    for u in "bcde":
        info = sf.info(DataDir(d).wav[u])
        assert (info.samplerate, info.channels) == (16000, 1) and info.frames == 8000
    caplog.clear()  # reading an unconverted file at training time converts it too, with a warning per file
    with caplog.at_level(logging.WARNING, logger="speechclip_plus.data.audio"):
        x = load_audio(wav["e"])
    assert x.shape == (8000,) and x.dtype == np.float32
    assert [r.getMessage() for r in caplog.records] == [
        f"{wav['e']}: 2 channels, averaged to mono", f"{wav['e']}: sample rate 44100 Hz, resampled to 16000 Hz"]


def test_bad_audio_at_load_time_names_the_file(tmp_path):
    from speechclip_plus.data.audio import load_audio

    empty, nan = tmp_path / "e m p t y.wav", tmp_path / "nan.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    x = tone(0.1)
    x[5] = np.nan
    sf.write(nan, x, 16000, subtype="FLOAT")
    for path, what in ((tmp_path / "none.wav", "audio file not found"), (empty, "audio file has no samples"),
                       (nan, r"1 non-finite sample value\(s\) \(NaN/inf\)")):
        with pytest.raises(DataError, match=re.escape(str(path)) + ": " + what):
            load_audio(path)


# ---------------------------------------------------------------------------------------------- stages 2, 3
def encode(x):
    return x.mean(dim=(2, 3))


def preprocess(im):
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)


def test_bad_images_stop_stage2_listing_ten_and_the_count(tmp_path, tiny_clip_config, capsys):
    from speechclip_plus.bin.embed_images import main
    from speechclip_plus.data.image_cache import compute_image_embeddings

    images = tmp_path / "my images"
    img = {f"good{k}": png(images / f"good {k}.png", (50 * k, 0, 0)) for k in range(3)}
    for k in range(6):
        img[f"miss{k}"] = str(images / f"miss {k}.png")
        img[f"torn{k}"] = str(images / f"torn {k}.png")
        data = (images / "good 0.png").read_bytes()
        Path(img[f"torn{k}"]).write_bytes(data[: len(data) // 2])  # truncated PNG
    out = tmp_path / "cache"
    with pytest.raises(DataError, match=r"^12 of 15 image\(s\) cannot be used") as e:
        compute_image_embeddings(img, encode, preprocess, out, batch_size=4, progress=False)
    lines = str(e.value).splitlines()
    assert lines[0] == "12 of 15 image(s) cannot be used:"
    bad = sorted(i for i in img if not i.startswith("good"))
    for line, i in zip(lines[1:11], bad):
        what = "file not found: " if i.startswith("miss") else "cannot decode "
        assert line.startswith(f"  image {i}: {what}{img[i]}"), line
    assert lines[11:] == ["  ... and 2 more",
                          "(nothing was written; validate_data --check_images --fix_dir excludes their "
                          "utterances)"]
    assert os.listdir(out) == []
    # the CLI names the data dir's img.scp line of each bad image
    d = tmp_path / "data"
    utts = {f"u-{i}": i for i in img}
    write_data_dir(d, {u: "/a.wav" for u in utts}, {u: "x" for u in utts}, {u: "s" for u in utts}, utts, img)
    scp_line = {i: n for n, i in enumerate(sorted(img), 1)}
    assert main(["--data_dir", str(d), "--out_dir", str(out), "--clip_name", tiny_clip_config,
                 "--clip_pretrained", "none", "--no_progress"]) == 1
    err = capsys.readouterr().err
    assert (f"error: 12 of 15 image(s) cannot be used:\n  {d}/img.scp:{scp_line['miss0']}: miss0: "
            f"file not found: {img['miss0']}\n") in err
    assert f"  {d}/img.scp:{scp_line['torn0']}: torn0: cannot decode {img['torn0']} (" in err
    assert os.listdir(out) == []


def test_skip_bad_excludes_the_utterances_of_bad_images_in_stage2(tmp_path, tiny_clip_config, capsys):
    """embed_images --skip_bad: every image checked (2 processes); the utterances of the missing and the torn
    image leave the data dir (originals in .backup/, reasons naming img.scp:line in excluded.txt, merged with
    stage 1's); the cache holds the good images; the image files are untouched."""
    from speechclip_plus.bin.embed_images import main
    from speechclip_plus.data.datadir import add_excluded

    images = tmp_path / "my images"
    img = {f"good{k}": png(images / f"good {k}.png", (60 * k, 90, 0)) for k in range(3)}
    img["miss"] = str(images / "miss.png")
    data = (images / "good 0.png").read_bytes()
    img["torn"] = str(images / "torn.png")
    Path(img["torn"]).write_bytes(data[: len(data) // 2])
    d = tmp_path / "data"
    u2i = {f"s-u{k}": i for k, i in enumerate(["good0", "good1", "good2", "miss", "miss", "torn", "good0"])}
    write_data_dir(d, {u: f"/w/{u}.wav" for u in u2i}, {u: "a caption" for u in u2i}, {u: "s" for u in u2i},
                   u2i, img)
    add_excluded(d, {"s-u9": "an utterance stage 1 excluded"})
    lists = {name: (d / name).read_bytes() for name in DATA_FILES}
    media = digests(img.values())
    out = tmp_path / "cache"
    assert main(["--data_dir", str(d), "--out_dir", str(out), "--clip_name", tiny_clip_config,
                 "--clip_pretrained", "none", "--no_progress", "--skip_bad", "--nj", "2"]) == 0, capsys.readouterr()
    assert DataDir(d).utts == ["s-u0", "s-u1", "s-u2", "s-u6"] and validate_data_dir(d, check_files=False) == []
    line = {i: n for n, i in enumerate(sorted(img), 1)}
    excluded = read_kv(d / "excluded.txt")
    assert excluded == {"s-u3": f"{d}/img.scp:{line['miss']}: miss: file not found: {img['miss']}",
                        "s-u4": f"{d}/img.scp:{line['miss']}: miss: file not found: {img['miss']}",
                        "s-u5": excluded["s-u5"], "s-u9": "an utterance stage 1 excluded"}
    assert excluded["s-u5"].startswith(f"{d}/img.scp:{line['torn']}: torn: cannot decode {img['torn']} (")
    assert {n: (d / ".backup" / n).read_bytes() for n in DATA_FILES} == lists
    assert set(read_kv(out / "img_embed.scp")) == {"good0", "good1", "good2"}
    assert digests(img.values()) == media
    # without --skip_bad the same data stops stage 2 (as before), nothing written
    write_data_dir(d, {u: f"/w/{u}.wav" for u in u2i}, {u: "a caption" for u in u2i}, {u: "s" for u in u2i},
                   u2i, img)
    capsys.readouterr()
    assert main(["--data_dir", str(d), "--out_dir", str(tmp_path / "c2"), "--clip_name", tiny_clip_config,
                 "--clip_pretrained", "none", "--no_progress"]) == 1
    assert "error: 2 of 5 image(s) cannot be used:" in capsys.readouterr().err


def test_non_utf8_transcription_stops_the_vocabulary_stage(tmp_path, capsys):
    from speechclip_plus.bin.make_vocab import main

    text = tmp_path / "text"
    text.write_bytes(b"u1 a dog\nu2 na\xefve\n")
    assert main(["--text", str(text), "--out_dir", str(tmp_path / "tok")]) == 1
    assert capsys.readouterr().err == f"error: {text}:2: u2: not valid UTF-8 (bad byte at column 6)\n"
    assert not (tmp_path / "tok").exists()
