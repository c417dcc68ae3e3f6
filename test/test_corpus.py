"""speechclip_plus.data.corpus: stage 0's shared writer applies the data-integrity policy (faults stop the write,
--skip_bad excludes and lists them with what depends on them, known quirks go to skipped.tsv) and its checks
(wav headers, images decoded, text lines decoded) find what they claim to, in parallel as alone."""
from __future__ import annotations

import io
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from speechclip_plus.data.corpus import CorpusFaults, CorpusWriter, check_images, read_lines
from speechclip_plus.data.datadir import DataDir, DataError, read_excluded, validate_data_dir


def wav(path: Path, seconds: float = 0.2) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), (0.2 * np.sin(np.arange(int(16000 * seconds)) / 5)).astype(np.float32), 16000)
    return str(path)


def jpeg_bytes(side: int = 48) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def image(path: Path, data: bytes = b"") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data or jpeg_bytes())
    return str(path)


def png_with_bad_crc() -> bytes:
    """A PNG whose IDAT chunk has a wrong CRC (its pixel data still inflates)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    at = data.index(b"IDAT")
    length = int.from_bytes(data[at - 4:at], "big")
    crc_at = at + 4 + length
    assert int.from_bytes(data[crc_at:crc_at + 4], "big") == zlib.crc32(bytes(data[at:crc_at]))
    data[crc_at] ^= 0xFF
    return bytes(data)


def small_corpus(root: Path, skip_bad: bool) -> CorpusWriter:
    """Set a: i1 (good; u1, u2 whose wav is missing), i2 (file missing; u3, u4), i3 (good; u5, empty caption);
    set b: j1 (good; v1). A fault of no set: junk.wav."""
    w = CorpusWriter(("a", "b"), skip_bad=skip_bad)
    w.add_image("a", "i1", image(root / "img" / "i1.jpg"), "list:1")
    w.add_image("a", "i2", str(root / "img" / "gone.jpg"), "list:2")
    w.add_image("a", "i3", image(root / "img" / "i3.jpg"), "list:3")
    w.add_image("b", "j1", image(root / "img" / "j1.jpg"), "list:4")
    for utt, img, text in (("s1-u1", "i1", "a dog"), ("s1-u2", "i1", "a cat"), ("s2-u3", "i2", "a red boat"),
                           ("s2-u4", "i2", "a boat"), ("s2-u5", "i3", "  ")):
        path = root / "wav" / f"{utt}.wav"
        w.add_utterance("a", utt, str(path) if utt == "s1-u2" else wav(path), text, utt[:2], img, f"{utt}.json")
    w.add_utterance("b", "s1-v1", wav(root / "wav" / "v1.wav"), "a kite", "s1", "j1", "v1.json")
    w.fault("junk.wav", "wav without a transcription", "wavs/")
    w.skip("__MACOSX/", "macOS metadata")
    return w


def test_faults_stop_the_write_with_ten_lines_and_the_count_and_nothing_is_written(tmp_path):
    w = small_corpus(tmp_path, skip_bad=False)
    for k in range(8):
        w.fault(f"extra{k}", "a planted problem", f"extra.txt:{k + 1}")
    w.check_media(nj=2)
    with pytest.raises(CorpusFaults, match=r"^12 problem\(s\) in the corpus; nothing was written") as e:
        w.write(str(tmp_path / "data"))
    lines = str(e.value).splitlines()
    assert lines[0] == "12 problem(s) in the corpus; nothing was written:"
    assert lines[1] == "  s2-u5.json: s2-u5: empty caption: give it its text (or leave the entry out of the corpus)"
    assert lines[2] == "  wavs/: junk.wav: wav without a transcription"
    assert lines[3:11] == [f"  extra.txt:{k + 1}: extra{k}: a planted problem" for k in range(8)]
    assert lines[11] == "  ... and 2 more"  # the media check's two, found last
    assert "--skip_bad true" in lines[12] and f"{tmp_path / 'data'}/<set>/excluded.txt" in lines[12]
    assert [str(f) for f in w.faults[-2:]] == [f"list:2: i2: file not found: {tmp_path}/img/gone.jpg",
                                               f"s1-u2.json: s1-u2: {tmp_path}/wav/s1-u2.wav: audio file not found"]
    assert not (tmp_path / "data").exists()


def test_skip_bad_excludes_faulty_items_and_what_depends_on_them_and_lists_each(tmp_path, capsys):
    w = small_corpus(tmp_path, skip_bad=True)
    w.check_media(nj=1)
    out = tmp_path / "data"
    summary = w.write(str(out), "mine.json", info={"corpus": "test"})
    a = DataDir(out / "a")
    assert a.utts == ["s1-u1"] and a.img == {"i1": str(tmp_path / "img" / "i1.jpg")}
    assert validate_data_dir(out / "a") == [] and validate_data_dir(out / "b") == []
    excluded = read_excluded(out / "a")
    assert set(excluded) == {"s1-u2", "i2", "s2-u3", "s2-u4", "s2-u5", "i3"}
    assert excluded["s1-u2"].startswith(f"s1-u2.json: s1-u2: {tmp_path}/wav/s1-u2.wav: audio file not found")
    assert excluded["i2"] == excluded["s2-u3"] == excluded["s2-u4"] == \
        f"list:2: i2: file not found: {tmp_path}/img/gone.jpg"  # an excluded image takes its utterances
    assert excluded["i3"] == "i3: all its utterances were excluded"
    assert read_excluded(out / "local") == {"junk.wav": "wavs/: junk.wav: wav without a transcription"}
    assert not (out / "b" / "excluded.txt").exists() and DataDir(out / "b").utts == ["s1-v1"]
    assert (out / "local" / "skipped.tsv").read_text() == "item\treason\n__MACOSX/\tmacOS metadata\n"
    assert summary["corpus"] == "test" and summary["sets"]["a"]["excluded"] == 6
    assert summary["skipped"] == {"macOS metadata": 1} and summary["excluded_no_set"] == 1
    log = capsys.readouterr().out
    assert f"excluded 7 item(s) for 4 fault(s), listed with their reasons in {out}/a/excluded.txt, " \
           f"{out}/local/excluded.txt" in log
    # a second run after the corpus was fixed: no list is left behind, nor a killed run's temporary dir
    (out / ".a.tmp424242").mkdir()
    w = CorpusWriter(("a",))
    w.add_image("a", "i1", str(tmp_path / "img" / "i1.jpg"))
    w.add_utterance("a", "s1-u1", str(tmp_path / "wav" / "s1-u1.wav"), "a dog", "s1", "i1")
    w.check_media()
    w.write(str(out))
    assert sorted(os.listdir(out)) == ["a", "b", "local"]
    assert not (out / "a" / "excluded.txt").exists() and not (out / "local" / "excluded.txt").exists()
    assert (out / "local" / "skipped.tsv").read_text() == "item\treason\n"


def test_a_set_left_without_utterances_stops_even_with_skip_bad(tmp_path):
    w = CorpusWriter(("a", "b"), skip_bad=True)
    w.add_image("a", "i1", image(tmp_path / "i1.jpg"))
    w.add_utterance("a", "s-u1", wav(tmp_path / "u1.wav"), "a dog", "s", "i1")
    w.add_image("b", "j1", image(tmp_path / "j1.jpg"))
    w.add_utterance("b", "s-v1", str(tmp_path / "missing.wav"), "a cat", "s", "j1")
    w.check_media()
    with pytest.raises(DataError, match=r"/b: no utterance in the b set once 2 item\(s\) are excluded"):
        w.write(str(tmp_path / "data"))
    assert not (tmp_path / "data").exists()


def test_repeated_utterance_id_is_a_fault_naming_both_places_and_ids_are_checked(tmp_path):
    w = CorpusWriter(("a", "b"))
    w.add_image("a", "i1", image(tmp_path / "i1.jpg"))
    w.add_image("b", "j1", image(tmp_path / "j1.jpg"))
    w.add_utterance("a", "s-u1", wav(tmp_path / "u1.wav"), "a dog", "s", "i1", "first.txt:3")
    w.add_utterance("b", "s-u1", wav(tmp_path / "u2.wav"), "a cat", "s", "j1", "second.txt:9")
    assert [str(f) for f in w.faults] == [
        "second.txt:9: s-u1: duplicate utterance id (first at first.txt:3): give each wav one entry"]
    assert w.faults[0].dset == "a"  # --skip_bad excludes the one that was kept
    with pytest.raises(ValueError, match="without whitespace"):
        w.add_utterance("a", "s u2", "/x.wav", "t", "s", "i1")
    with pytest.raises(ValueError, match="add_image first"):
        w.add_utterance("a", "s-u3", "/x.wav", "t", "s", "j1")
    with pytest.raises(ValueError, match="already in a"):
        w.add_image("b", "i1", str(tmp_path / "i1.jpg"))
    with pytest.raises(ValueError, match="unknown set"):
        w.fault("x", "y", dset="c")


def test_read_lines_reports_undecodable_lines_and_guesses_nothing(tmp_path):
    f = tmp_path / "captions.txt"
    f.write_bytes(b"a#0\tA dog .\r\n\n   \na#1\tA caf\xe9 .\nb#0\tna\xc3\xafve\n")
    good, bad = read_lines(str(f))
    assert good == [(1, "a#0\tA dog ."), (5, "b#0\tna\u00efve")]
    assert bad == [(4, "a#1\tA caf\ufffd .", "not valid UTF-8 (bad byte at column 10)")]
    good, bad = read_lines(str(f), "latin-1")
    assert (4, "a#1\tA caf\u00e9 .") in good and bad == []


def test_image_check_finds_what_decoding_finds_in_parallel_as_alone(tmp_path):
    data = jpeg_bytes()
    images = {"good": image(tmp_path / "good.jpg", data),
              "torn": image(tmp_path / "torn.jpg", data[: len(data) // 2]),  # verify() alone passes this one
              "short": image(tmp_path / "short.jpg", data[:-20]),
              "crc": image(tmp_path / "crc.png", png_with_bad_crc()),
              "text": image(tmp_path / "text.jpg", b"not an image at all"),
              "gone": str(tmp_path / "gone.jpg")}
    with Image.open(images["torn"]) as im:
        im.verify()  # why a decode is needed too
    alone = check_images(images, nj=1)
    assert check_images(images, nj=2) == alone
    assert set(alone) == {"torn", "short", "crc", "text", "gone"}
    assert alone["gone"] == f"file not found: {images['gone']}"
    assert alone["torn"].startswith(f"cannot decode {images['torn']} (OSError: image file is truncated")
    assert "crc" in alone["crc"].lower()
