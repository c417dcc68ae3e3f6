"""Stage-3 vocabularies: CLIP token usage counts, the usage file, sentencepiece training, the CLI."""
from __future__ import annotations

import os
import random

import pytest

from speechclip_plus.data.datadir import DataError, write_kv
from speechclip_plus.data.vocab import (
    clip_vocab_usage,
    normalize_caption,
    read_vocab_usage,
    train_spm,
    write_vocab_usage,
)


@pytest.fixture(scope="module")
def tok():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def one(tok, word):
    ids = tok.encode(word)
    assert len(ids) == 1, word
    return ids[0]


def test_normalize_caption():
    assert normalize_caption("  A dog runs .  ") == "A dog runs"
    assert normalize_caption("Two dots..") == "Two dots."
    assert normalize_caption("no dot") == "no dot"


def test_usage_counts_and_order(tok):
    texts = ["A dog runs.", "a dog, a cat!", "  cat .", "Runs"]
    ids, counts = clip_vocab_usage(texts)
    a, dog, cat, runs = (one(tok, w) for w in ("a", "dog", "cat", "runs"))
    comma, bang, dot = one(tok, ","), one(tok, "!"), one(tok, ".")
    sot, eot = tok.sot_token_id, tok.eot_token_id
    got = dict(zip(ids, counts))
    assert got == {a: 3, sot: 4, eot: 4, dog: 2, cat: 2, runs: 2, comma: 1, bang: 1}
    assert dot not in got  # the trailing "." is removed before tokenising
    assert 0 not in got  # pad id 0 is not counted (the reference counts the zero padding)
    # count descending, then id ascending
    assert list(zip(ids, counts)) == sorted(got.items(), key=lambda kv: (-kv[1], kv[0]))


def test_usage_rejects_overlong_caption():
    long = " ".join(["dog"] * 76)  # 76 + SOT + EOT = 78 > 77
    with pytest.raises(DataError, match=r"^text: u7: 78 CLIP tokens"):
        clip_vocab_usage(["a dog", long], names=["text: u1", "text: u7"])
    clip_vocab_usage([" ".join(["dog"] * 75)])  # exactly 77 fits


def test_usage_file_round_trip_and_models_reader(tmp_path):
    from speechclip_plus.models.clip import load_vocab_usage

    ids, counts = clip_vocab_usage(["a dog runs", "a red ball"])
    path = tmp_path / "tok" / "clip_vocab_usage.txt"
    write_vocab_usage(path, ids, counts)
    assert path.read_text().splitlines()[0] == f"{ids[0]} {counts[0]}"
    assert read_vocab_usage(path) == (ids, counts)
    assert load_vocab_usage(str(path)) == ids  # the CLIP wrapper reads the same format
    with pytest.raises(ValueError, match="not distinct"):
        write_vocab_usage(path, [1, 1], [2, 2])
    path.write_text("5 3\n6 x\n")
    with pytest.raises(DataError, match=rf"{path}:2: expected"):
        read_vocab_usage(path)


def sentences(n=50, seed=0):
    words = ("a the dog cat boy girl runs jumps over into grass water red blue ball plays with man woman "
             "field").split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))) + " ." for _ in range(n)]


def test_train_spm(tmp_path):
    import sentencepiece as spm

    model = train_spm(sentences(), tmp_path / "spm" / "bpe", vocab_size=60)
    assert model == str(tmp_path / "spm" / "bpe.model")
    assert sorted(os.listdir(tmp_path / "spm")) == ["bpe.model", "bpe.vocab"]
    sp = spm.SentencePieceProcessor(model_file=model)
    assert sp.get_piece_size() == 60
    pieces = sp.encode("the dog runs into the water", out_type=str)
    assert "".join(pieces).replace("\u2581", " ").strip() == "the dog runs into the water"
    assert len(pieces) < len("the dog runs into the water")  # merges were learnt
    with pytest.raises(DataError, match="vocab 100000"):
        train_spm(sentences(), tmp_path / "spm" / "big", vocab_size=100000)
    assert sorted(os.listdir(tmp_path / "spm")) == ["bpe.model", "bpe.vocab"]  # nothing partial left


def test_make_vocab_cli(tmp_path):
    from speechclip_plus.bin.make_vocab import main

    texts = sentences(40)
    write_kv(tmp_path / "t1", {f"u{k:02d}": t for k, t in enumerate(texts[:20])})
    write_kv(tmp_path / "t2", {f"v{k:02d}": t for k, t in enumerate(texts[20:])})
    out = tmp_path / "token_list"
    assert main(["--text", str(tmp_path / "t1"), "--text", str(tmp_path / "t2"), "--out_dir", str(out),
                 "--spm_vocab_size", "50"]) == 0
    assert read_vocab_usage(out / "clip_vocab_usage.txt") == clip_vocab_usage(texts)
    assert os.path.isfile(out / "spm" / "bpe.model")
    write_kv(tmp_path / "t3", {"bad": " ".join(["dog"] * 80)})
    assert main(["--text", str(tmp_path / "t3"), "--out_dir", str(tmp_path / "x")]) == 1
    assert not os.path.exists(tmp_path / "x" / "clip_vocab_usage.txt")


def test_make_vocab_caps_a_sentencepiece_size_too_large_for_a_small_corpus(tmp_path, caplog, capsys):
    """A small corpus cannot fill --spm_vocab_size 500: capped at what it allows, with a warning naming the
    size; a size it can fill is exact; --spm_exact turns the cap into an error naming the option."""
    import logging

    import sentencepiece as spm

    from speechclip_plus.bin.make_vocab import main

    caplog.set_level(logging.INFO)
    write_kv(tmp_path / "text", {f"u{k:02d}": t for k, t in enumerate(sentences(6))})
    out = tmp_path / "token_list"
    assert main(["--text", str(tmp_path / "text"), "--out_dir", str(out), "--spm_vocab_size", "500"]) == 0
    pieces = spm.SentencePieceProcessor(model_file=str(out / "spm" / "bpe.model")).get_piece_size()
    assert 20 < pieces < 500
    assert (f"--spm_vocab_size 500 is more than these 6 caption(s) allow: capped at {pieces} pieces "
            f"(pass --spm_vocab_size {pieces} to make it explicit)") in caplog.text
    caplog.clear()
    assert main(["--text", str(tmp_path / "text"), "--out_dir", str(out), "--spm_vocab_size", str(pieces - 5)]) == 0
    assert spm.SentencePieceProcessor(model_file=str(out / "spm" / "bpe.model")).get_piece_size() == pieces - 5
    assert "capped" not in caplog.text
    assert main(["--text", str(tmp_path / "text"), "--out_dir", str(tmp_path / "exact"), "--spm_vocab_size", "500",
                 "--spm_exact"]) == 1
    err = capsys.readouterr().err
    assert f"<= {pieces}" in err and "--spm_vocab_size" in err
    assert not (tmp_path / "exact" / "spm" / "bpe.model").exists()
