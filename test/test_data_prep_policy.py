"""Stage 0 of egs/flickr8k and egs/spokencoco loses nothing silently (docs/reliability.md, "Stage 0").

Generated corpora in the original layouts (test/fake_corpora.py, tones instead of speech: stage 0 reads only
names and headers), and copies of them with one fault each (``fake_corpora.FLICKR8K_FAULTS``,
``SPOKENCOCO_FAULTS``), go through the recipes' ``local/prepare_*.py`` (called in-process; the shell path is
covered by test_recipes.py). Checked: a clean corpus gives exactly the data dirs of the code before the policy,
and its known quirks are listed in ``data/local/skipped.tsv``; every fault stops stage 0 with exit 1, nothing
written, and one error line naming the item and its file; ``--skip_bad true`` lists exactly the excluded items
in ``data/<set>/excluded.txt`` (or ``data/local/excluded.txt``) and leaves them, and only them, out; the
corpus is never modified; a re-run after fixing the corpus gives the clean data dirs again.

``test/data/clean_corpora_datadirs.json`` holds the data dirs that the prepare scripts of commit 654d5f4 (before
this policy) wrote for these generated corpora, with the corpus folder written as ``<root>``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fake_corpora  # noqa: E402

from speechclip_plus.data.datadir import DataDir, read_excluded, read_kv, validate_data_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SETS = ("train", "dev", "test")
FILES = ("wav.scp", "text", "utt2spk", "spk2utt", "utt2img", "img.scp")
EXPECTED = json.loads((Path(__file__).parent / "data" / "clean_corpora_datadirs.json").read_text())
MAKE = {"flickr8k": fake_corpora.make_flickr8k, "spokencoco": fake_corpora.make_spokencoco}
FAULT = {"flickr8k": fake_corpora.flickr8k_fault, "spokencoco": fake_corpora.spokencoco_fault}
CASES = [("flickr8k", f) for f in fake_corpora.FLICKR8K_FAULTS] + \
        [("spokencoco", f) for f in fake_corpora.SPOKENCOCO_FAULTS]


def _prepare(name: str):
    """egs/<name>/local/prepare_<name>.py as a module."""
    path = REPO / "egs" / name / "local" / f"prepare_{name}.py"
    spec = importlib.util.spec_from_file_location(f"prepare_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PREPARE = {name: _prepare(name) for name in MAKE}


def _args(name: str, fake: fake_corpora.Fake, out: Path, *extra: str) -> List[str]:
    if name == "flickr8k":
        corpus = ["--root", str(fake.root)]
    else:
        corpus = ["--spokencoco", fake.env["SPOKENCOCO"], "--mscoco", fake.env["MSCOCO"],
                  "--karpathy_split", fake.env["KARPATHY_SPLIT"]]
    return [*corpus, "--out_dir", str(out), *extra]


def _tree(root: Path) -> Dict[str, str]:
    """sha256 of every file and the target of every link under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p)] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _data_dirs(out: Path, root: Path) -> dict:
    """``{set: {file: {key: value}}}`` of the written data dirs, the corpus folder written as ``<root>``."""
    return {s: {f: {k: v.replace(str(root), "<root>") for k, v in read_kv(out / s / f).items()} for f in FILES}
            for s in SETS}


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Dict[str, fake_corpora.Fake]:
    root = tmp_path_factory.mktemp("clean")
    return {name: make(root / name, speech=False) for name, make in MAKE.items()}


@pytest.mark.parametrize("name", list(MAKE))
def test_clean_corpus_gives_the_data_dirs_of_before_and_lists_its_known_quirks(name, clean, tmp_path, capsys):
    fake = clean[name]
    out = tmp_path / "data"
    assert PREPARE[name].main(_args(name, fake, out, "--nj", "2")) == 0, capsys.readouterr().err
    assert _data_dirs(out, fake.root) == EXPECTED[name]
    for s in SETS:
        assert sorted(p.name for p in (out / s).iterdir()) == sorted(FILES), s  # no excluded.txt
        assert validate_data_dir(out / s) == []
    rows = (out / "local" / "skipped.tsv").read_text().splitlines()
    assert rows[0] == "item\treason"
    skipped = dict(row.split("\t") for row in rows[1:])
    assert set(skipped) == set(fake.junk)  # flickr8k: macOS files, the .jpg.1 group, the image in no split
    reasons = {kind: {skipped[i] for i, k in fake.junk.items() if k == kind} for kind in fake.junk.values()}
    assert all(len(r) == 1 for r in reasons.values())  # one reason per kind of quirk ...
    assert len(set(skipped.values())) == len(reasons)  # ... and no two kinds share one
    summary = json.loads((out / "local" / f"{name}_prep.json").read_text())
    assert sum(summary["skipped"].values()) == len(fake.junk)
    assert not (out / "local" / "excluded.txt").exists()
    log = capsys.readouterr().out
    if fake.junk:
        assert f"skipped {len(fake.junk)} known quirk(s) of the distribution, listed in {out}/local/skipped.tsv" in log


@pytest.mark.parametrize("name,fault", CASES)
def test_a_fault_stops_stage0_naming_it_or_is_excluded_by_name(name, fault, clean, tmp_path, capsys):
    bad = FAULT[name](clean[name], tmp_path / "corpus", fault)
    prepare, out = PREPARE[name], tmp_path / "data"
    before = _tree(bad.fake.root)

    assert prepare.main(_args(name, bad.fake, out)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    assert any(all(s in line for s in bad.named) for line in err.splitlines()), f"{bad.named} not on one line:\n{err}"
    assert not out.exists() or not any(p.name in SETS for p in out.iterdir()), "a data dir was written"

    rc = prepare.main(_args(name, bad.fake, out, "--skip_bad", "true", "--nj", "2"))
    std = capsys.readouterr()
    if not bad.excluded:  # a fault --skip_bad cannot work around
        assert rc == 1 and any(all(s in line for s in bad.named) for line in std.err.splitlines()), std.err
    else:
        assert rc == 0, std.err
        listed = {s: read_excluded(out / s) for s in SETS if (out / s / "excluded.txt").exists()}
        if (out / "local" / "excluded.txt").exists():
            listed["local"] = read_excluded(out / "local")
        assert {k: set(v) for k, v in listed.items()} == bad.excluded
        assert f"excluded {sum(len(v) for v in bad.excluded.values())} item(s)" in std.out
        for where in listed:
            assert str(out / where / "excluded.txt") in std.out
        reasons = [r for v in listed.values() for r in v.values()]
        assert any(all(s in r for s in bad.named[1:]) for r in reasons), reasons  # the reason says what
        got = _data_dirs(out, bad.fake.root)
        gone = set()
        for s in SETS:
            assert validate_data_dir(out / s) == []
            kept, expected = set(got[s]["wav.scp"]), set(EXPECTED[name][s]["wav.scp"])
            assert kept <= expected
            gone |= expected - kept
            for utt in kept:  # the rest is untouched
                assert all(got[s][f][utt] == EXPECTED[name][s][f][utt] for f in ("wav.scp", "text", "utt2img"))
        items = [item for v in listed.values() for item in v]
        for utt in gone:  # every utterance left out is listed, by its id or by its wav
            assert any(utt.split("-", 1)[1] in item for item in items), utt

    if bad.fixed_by:  # e.g. --encoding latin-1 for a Latin-1 caption
        assert prepare.main(_args(name, bad.fake, out, *bad.fixed_by)) == 0, capsys.readouterr().err
        assert any("caf\u00e9" in t for s in SETS for t in DataDir(out / s).text.values())
        assert not any((out / s / "excluded.txt").exists() for s in SETS)
    assert _tree(bad.fake.root) == before, "the corpus was modified"


def test_rerun_after_fixing_the_corpus_replaces_every_output(clean, tmp_path, capsys):
    """--skip_bad run with a missing wav and a missing image; the files come back; the re-run without --skip_bad
    gives the clean data dirs, no excluded.txt anywhere, and no leftover of an interrupted run."""
    bad = fake_corpora.flickr8k_fault(clean["flickr8k"], tmp_path / "corpus", "missing_wav")
    wavs = bad.fake.root / "flickr_audio" / "wavs"
    missing = sorted(set(os.listdir(clean["flickr8k"].root / "flickr_audio" / "wavs")) - set(os.listdir(wavs)))
    (wavs / "extra_0.wav").symlink_to(clean["flickr8k"].root / "flickr_audio" / "wavs" / missing[0])  # no line
    out = tmp_path / "data"
    prepare = PREPARE["flickr8k"]
    assert prepare.main(_args("flickr8k", bad.fake, out, "--skip_bad", "true")) == 0
    assert (out / "test" / "excluded.txt").exists() and (out / "local" / "excluded.txt").exists()
    (out / ".train.tmp999999").mkdir()  # what a killed run leaves
    (out / ".dev.old999999").mkdir()
    (wavs / missing[0]).symlink_to(clean["flickr8k"].root / "flickr_audio" / "wavs" / missing[0])
    (wavs / "extra_0.wav").unlink()
    capsys.readouterr()
    assert prepare.main(_args("flickr8k", bad.fake, out)) == 0, capsys.readouterr().err
    assert _data_dirs(out, bad.fake.root) == EXPECTED["flickr8k"]
    assert not (out / "test" / "excluded.txt").exists() and not (out / "local" / "excluded.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["dev", "local", "test", "train"]


def test_sets_that_were_not_asked_for_are_left_alone(clean, tmp_path):
    """--sets test: faults of the other sets do not stop it, and only data/test is written."""
    bad = fake_corpora.flickr8k_fault(clean["flickr8k"], tmp_path / "corpus", "corrupt_image")  # a train image
    out = tmp_path / "data"
    assert PREPARE["flickr8k"].main(_args("flickr8k", bad.fake, out, "--sets", "test")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["local", "test"]
    assert set(DataDir(out / "test").utts) == set(EXPECTED["flickr8k"]["test"]["wav.scp"])


def test_the_template_readme_prepare_py_follows_the_policy(tmp_path):
    """The local/prepare_csv.py of egs/TEMPLATE/README.md, run as written on a CSV-described corpus: valid data
    dirs; a missing audio file stops it naming the utterance and the manifest line; --skip_bad true lists it."""
    import csv

    text = (REPO / "egs" / "TEMPLATE" / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(#!/usr/bin/env python3\n.*?)```", text, flags=re.S)
              if "CorpusWriter(" in b]
    assert len(blocks) == 1, "egs/TEMPLATE/README.md should hold one example local/prepare_csv.py on CorpusWriter"
    script = tmp_path / "prepare_csv.py"
    script.write_text(blocks[0])
    fake = fake_corpora.make_csv(tmp_path / "corpus", speech=False)
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), "--corpus", str(fake.root), "--out_dir", str(out),
                               *extra], env=env, capture_output=True, text=True, timeout=120, check=False)

    proc = run(tmp_path / "data", "--nj", "2")
    assert proc.returncode == 0, proc.stderr
    for s in SETS:
        d = DataDir(tmp_path / "data" / s)
        assert validate_data_dir(d.path) == [] and len(d) == fake.utterances[s] and len(d.img) == fake.images[s]
    with open(fake.root / "metadata.csv", newline="", encoding="utf-8") as f:
        first = next(csv.DictReader(f))
    (fake.root / first["audio"]).unlink()
    utt = f"{first['speaker']}-{Path(first['audio']).stem}"
    proc = run(tmp_path / "bad")
    assert proc.returncode == 1 and not (tmp_path / "bad").exists()
    assert f"{fake.root}/metadata.csv:2: {utt}: {fake.root / first['audio']}: audio file not found" in proc.stderr
    proc = run(tmp_path / "bad", "--skip_bad", "true")
    assert proc.returncode == 0, proc.stderr
    assert list(read_excluded(tmp_path / "bad" / first["split"])) == [utt]
