"""The real recipes egs/flickr8k and egs/spokencoco, and a new recipe made with egs/TEMPLATE/setup.sh.

Tiny fake corpora in the ORIGINAL distribution layouts (test/fake_corpora.py, espeak-ng speech) go through
``./run.sh --stage 0 --stop_stage 6`` of copies of the recipes (in tmp: egs/<name> copied, egs/TEMPLATE and
utils/ symlinked to the repository's, so the repository stays clean) with a tiny model (s3prl fbank upstream,
random tiny CLIP) and a few training steps. Checked: stage 0 turns each layout (known quirks included, listed in
data/local/skipped.tsv) into valid data dirs with the right pairing, ids and counts; the image cache,
vocabularies, checkpoints, resume script, scores (RESULTS.md = results.json), export; a second run skips every
stage; a missing corpus stops stage 0 with a message naming the download and the variable; the engine's
--skip_bad reaches stages 0, 1 and 2; --vocab_source all; the recipes' configs against the reference's
(ShampooWang/SpeechCLIP_plus, config/). The policy's fault matrix is test_data_prep_policy.py.
Without espeak-ng the corpus tests are skipped, except under CI=true where that is a failure.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fake_corpora  # noqa: E402

from speechclip_plus.config import load_config  # noqa: E402
from speechclip_plus.data.datadir import DataDir, read_excluded, read_kv, validate_data_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SETS = ("train", "dev", "test")
TINY_CLIP = REPO / "speechclip_plus" / "models" / "clip_configs" / "tiny-clip.json"
TRAIN_ARGS = "--train.max_steps 4"
RUN_OPTS = ["--spm_vocab_size", "40", "--nj", "1", "--score_opts", "--num_plots 1 --no_progress"]
SOT = 49406  # CLIP's start-of-text id: counted once per caption in clip_vocab_usage.txt


def _env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    for name in ("FLICKR8K", "SPOKENCOCO", "MSCOCO", "KARPATHY_SPLIT", "CORPUS"):
        env.pop(name, None)
    env.update(extra)
    return env


def _run(cmd, cwd: Path, env: Dict[str, str], timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _tail(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """tmp/egs/TEMPLATE -> repo egs/TEMPLATE, tmp/utils -> repo utils, and tiny configs in tmp/conf."""
    ws = tmp_path_factory.mktemp("recipes")
    (ws / "egs").mkdir()
    (ws / "egs" / "TEMPLATE").symlink_to(REPO / "egs" / "TEMPLATE")
    (ws / "utils").symlink_to(REPO / "utils")
    (ws / "conf").mkdir()
    for variant, extra in (("hplus", ""), ("c", "  cascaded: {n_keywords: 4}\n")):
        (ws / "conf" / f"tiny_{variant}.yaml").write_text(
            "model:\n"
            f"  variant: {variant}\n"
            "  upstream: {name: fbank}\n"
            f"  clip: {{name: {TINY_CLIP}, pretrained: null}}\n"
            "  encoder: {type: mha, n_heads: 4, dropout: 0.0}\n"
            f"{extra}"
            "  cif: {dropout: 0.0, scaling_steps: 1000}\n"
            "  max_audio_len: 48000\n"
            "train: {batch_size: 8, valid_batch_size: 8, max_steps: 20, warmup_steps: 2, valid_every: 2,\n"
            "        log_every: 1, num_workers: 0}\n", encoding="utf-8")
    return ws


def _copy_recipe(ws: Path, name: str, dest: str = "") -> Path:
    """egs/<name> (run.sh, db.sh, conf, local) copied to ws/egs/<dest or name>."""
    target = ws / "egs" / (dest or name)
    shutil.copytree(REPO / "egs" / name, target,
                    ignore=shutil.ignore_patterns("data", "dump", "exp", "downloads", "*.md", "__pycache__"))
    return target


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, require):
    require("espeak-ng")  # speaks the fake corpora
    root = tmp_path_factory.mktemp("corpora")
    return {"flickr8k": fake_corpora.make_flickr8k(root / "flickr8k"),
            "spokencoco": fake_corpora.make_spokencoco(root / "spokencoco")}


# ----------------------------------------------------------------------------------------------- checks
def _check_data_dirs(recipe: Path, fake: fake_corpora.Fake) -> None:
    speakers = set()
    for dset in SETS:
        d = recipe / "data" / dset
        assert validate_data_dir(d) == [], f"{d} is not a valid data dir"
        dd = DataDir(d)
        assert len(dd) == fake.utterances[dset], dset
        assert len(dd.img) == fake.images[dset], dset
        for utt in dd.utts:
            spk = dd.utt2spk[utt]
            assert utt.startswith(f"{spk}-"), f"{utt} is not prefixed by its speaker {spk}"
            assert os.path.isabs(dd.wav[utt]) and os.path.isabs(dd.img[dd.utt2img[utt]])
            wav = os.path.basename(read_kv(d / "wav.scp.orig")[utt] if (d / "wav.scp.orig").exists()
                                   else dd.wav[utt])
            assert dd.text[utt] == fake.texts[wav], f"{utt}: caption of {wav}"
            assert not dd.text[utt].endswith(".")
            speakers.add(spk)
    assert len(speakers) == fake.speakers
    utts = [set(DataDir(recipe / "data" / s).utts) for s in SETS]
    imgs = [set(DataDir(recipe / "data" / s).img) for s in SETS]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not utts[a] & utts[b] and not imgs[a] & imgs[b], (SETS[a], SETS[b])


def _results_table(md: str, branch: str) -> list:
    """Numbers of the RESULTS.md row of ``branch`` (``-`` cells as None)."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].rstrip(" *") == branch:
            return [None if c == "-" else float(c) for c in cells[1:]]
    raise AssertionError(f"no {branch} row in RESULTS.md:\n{md}")


def _check_trained(recipe: Path, tag: str, variant: str) -> None:
    data = recipe / "data"
    for dset in SETS:  # stage 1: durations; 16 kHz audio (converted copies under dump/audio when needed)
        dd = DataDir(data / dset)
        assert dd.utt2dur is not None and set(dd.utt2dur) == set(dd.utts)
        for utt in dd.utts[:3]:
            assert sf.info(dd.wav[utt]).samplerate == 16000
    caches = list((recipe / "dump").glob("clip_*"))
    assert len(caches) == 1, caches
    for dset in SETS:  # stage 2: one embedding per image of the set
        scp = read_kv(caches[0] / dset / "img_embed.scp")
        assert set(scp) == set(DataDir(data / dset).img)
    usage = [line.split() for line in (data / "token_list" / "clip_vocab_usage.txt").read_text().splitlines()]
    assert dict(usage)[str(SOT)] == str(len(DataDir(data / "train")))  # stage 3: train captions only
    assert (data / "token_list" / "spm" / "bpe.model").is_file()
    exp = recipe / "exp" / tag
    for name in ("config.yaml", "train.log", "checkpoints/last.pt", "checkpoints/best.pt", "model.pt"):
        assert (exp / name).exists(), f"{exp / name} missing"
    resume = (exp / "run.sh").read_text()
    assert os.access(exp / "run.sh", os.X_OK) and "--resume" in resume and str(exp / "config.yaml") in resume
    results = json.loads((exp / "test" / "results.json").read_text())
    assert results["variant"] == variant and results["n_utterances"] == len(DataDir(data / "test"))
    md = (exp / "RESULTS.md").read_text()
    branches = ["parallel", "cascaded"] if variant in ("h", "hplus") else ["cascaded"]
    for branch in branches:
        row = _results_table(md, branch)
        r = results["retrieval"][branch]
        expected = [r[f"{d}_r{k}"] * 100 for d in ("speech_to_image", "image_to_speech") for k in (1, 5, 10)]
        assert row[:6] == pytest.approx(expected, abs=0.006), branch
    kw = _results_table(md, "cascaded")
    assert kw[6] == pytest.approx(100 * results["keywords"]["subword_hit_rate"], abs=0.006)
    assert all(v is not None for v in kw[6:9])


def _run_recipe(recipe: Path, env: Dict[str, str], conf: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run([recipe / "run.sh", "--stage", "0", "--stop_stage", "6", "--train_config", conf,
                 "--train_args", TRAIN_ARGS, *RUN_OPTS, *extra], recipe, env)


def _outputs(recipe: Path) -> Dict[Path, int]:
    """Every file under the recipe's data/, dump/ and exp/ with its modification time."""
    return {p: p.stat().st_mtime_ns for d in ("data", "dump", "exp") for p in (recipe / d).rglob("*") if p.is_file()}


def _check_rerun_skips(recipe: Path, env: Dict[str, str], conf: Path, tag: str) -> None:
    """A second run of every stage redoes nothing: each stage says it skipped (its marker, or stage 2's cache
    key), and no file under data/, dump/ or exp/ is written, created or removed."""
    before = _outputs(recipe)
    assert before
    proc = _run_recipe(recipe, env, conf)
    assert proc.returncode == 0, _tail(proc)
    log = proc.stdout + proc.stderr
    for stage in range(7):
        assert re.search(rf"Stage {stage}:", log), f"stage {stage} not logged"
    for marker in ("data/.stage0.done", "data/train/.stage1.done", "data/token_list/.done",
                   f"exp/{tag}/.train.done", f"exp/{tag}/test/.done", f"exp/{tag}/.export.done"):
        assert re.search(rf"already done \([^)]*{re.escape(marker)}\)", log), f"{marker} not skipped:\n{log}"
    for dset in SETS:  # stage 2 checks its cache's key instead of a marker
        assert re.search(rf"reusing \S*dump/clip_\S+/{dset} \(same CLIP weights random, same \d+ images\)", log), \
            f"stage 2 cache of {dset} not reused:\n{log}"
    assert "local/data.sh done in" not in log and "resumed from" not in log
    after = _outputs(recipe)
    changed = sorted(str(p.relative_to(recipe)) for p in set(before) | set(after) if before.get(p) != after.get(p))
    assert changed == [], f"the re-run wrote: {changed}"


# ----------------------------------------------------------------------------------------------- stage 0 alone
def _skipped(recipe: Path) -> Dict[str, str]:
    rows = (recipe / "data" / "local" / "skipped.tsv").read_text().splitlines()
    assert rows[0] == "item\treason"
    return dict(row.split("\t") for row in rows[1:])


def test_flickr8k_data_prep_uses_wav2capt_and_lists_known_quirks(corpora, workspace):
    fake = corpora["flickr8k"]
    recipe = _copy_recipe(workspace, "flickr8k", "flickr8k_prep")
    proc = _run([recipe / "local" / "data.sh", "--nj", "2"], workspace, _env(FLICKR8K=str(fake.root)))  # any cwd
    assert proc.returncode == 0, _tail(proc)
    _check_data_dirs(recipe, fake)
    permuted = [u for u in DataDir(recipe / "data" / "train").utts if fake.permuted_image in u]
    assert len(permuted) == 5  # their texts were checked against wav2capt.txt above, not the file names
    assert set(_skipped(recipe)) == set(fake.junk)  # each known quirk by name, nothing else
    assert f"skipped {len(fake.junk)} known quirk(s) of the distribution" in proc.stdout
    report = json.loads((recipe / "data" / "local" / "flickr8k_prep.json").read_text())
    assert sum(report["skipped"].values()) == len(fake.junk)


def test_spokencoco_karpathy_json_and_ksplit_files_agree(corpora, workspace):
    fake = corpora["spokencoco"]
    recipe = _copy_recipe(workspace, "spokencoco", "spokencoco_prep")
    proc = _run([recipe / "local" / "data.sh", "--split_source", "karpathy"], recipe, _env(**fake.env))
    assert proc.returncode == 0, _tail(proc)
    _check_data_dirs(recipe, fake)
    report = json.loads((recipe / "data" / "local" / "spokencoco_prep.json").read_text())
    assert report["split_source"] == "karpathy"
    assert _skipped(recipe) == {} and report["skipped"] == {}  # SpokenCOCO has no known quirk that drops items
    for dset in SETS:
        assert all(t == t.lower() for t in DataDir(recipe / "data" / dset).text.values())
    karpathy = {s: (recipe / "data" / s / "text").read_text() + (recipe / "data" / s / "img.scp").read_text()
                for s in SETS}
    env = _env(**{**fake.env, "KARPATHY_SPLIT": str(fake.root / "absent.json")})  # auto -> the ksplit files
    proc = _run([recipe / "local" / "data.sh"], recipe, env)
    assert proc.returncode == 0, _tail(proc)
    assert "split source: ksplit" in proc.stdout
    for dset in SETS:
        assert (recipe / "data" / dset / "text").read_text() + (recipe / "data" / dset / "img.scp").read_text() \
            == karpathy[dset]


def test_missing_corpus_stops_stage0_with_download_instructions(workspace, tmp_path):
    flickr = _copy_recipe(workspace, "flickr8k", "flickr8k_missing")
    proc = _run([flickr / "run.sh", "--stage", "0", "--stop_stage", "0", "--train_config",
                 workspace / "conf" / "tiny_hplus.yaml"], flickr, _env(FLICKR8K=str(tmp_path / "nowhere")))
    assert proc.returncode != 0
    for needle in ("FLICKR8K", "Flickr8k_Dataset.zip", "Flickr8k_text.zip", "flickr_audio.tar.gz",
                   "groups.csail.mit.edu/sls/downloads/flickraudio", str(tmp_path / "nowhere")):
        assert needle in proc.stderr, needle
    assert not (flickr / "data" / "train").exists() and not (flickr / "data" / ".stage0.done").exists()
    # a partial Flickr8k: images and text, no audio archive
    (tmp_path / "f8k" / "Flicker8k_Dataset").mkdir(parents=True)
    for name in ("Flickr8k.token.txt", "Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt",
                 "Flickr_8k.testImages.txt"):
        (tmp_path / "f8k" / name).write_text("")
    proc = _run([flickr / "local" / "data.sh"], flickr, _env(FLICKR8K=str(tmp_path / "f8k")))
    assert proc.returncode == 1 and "flickr_audio/wavs" in proc.stderr and "flickr_audio.tar.gz" in proc.stderr

    coco = _copy_recipe(workspace, "spokencoco", "spokencoco_missing")
    proc = _run([coco / "run.sh", "--stage", "0", "--stop_stage", "0", "--train_config",
                 workspace / "conf" / "tiny_hplus.yaml"], coco, _env(SPOKENCOCO=str(tmp_path / "nowhere")))
    assert proc.returncode != 0
    for needle in ("SPOKENCOCO", "SpokenCOCO.tar.gz", "data.csail.mit.edu/placesaudio"):
        assert needle in proc.stderr, needle
    sc = tmp_path / "sc" / "SpokenCOCO"
    sc.mkdir(parents=True)
    for name in ("SpokenCOCO_train.json", "SpokenCOCO_val.json"):
        (sc / name).write_text('{"data": []}')
    (tmp_path / "coco" / "train2014").mkdir(parents=True)
    (tmp_path / "coco" / "val2014").mkdir()
    env = {"SPOKENCOCO": str(tmp_path / "sc"), "MSCOCO": str(tmp_path / "coco")}
    proc = _run([coco / "local" / "data.sh"], coco, _env(**env, KARPATHY_SPLIT=str(tmp_path / "none.json")))
    assert proc.returncode == 1
    assert "KARPATHY_SPLIT" in proc.stderr and "caption_datasets.zip" in proc.stderr
    (tmp_path / "k.json").write_text('{"images": []}')
    proc = _run([coco / "local" / "data.sh"], coco,
                _env(**{**env, "MSCOCO": str(tmp_path / "nococo")}, KARPATHY_SPLIT=str(tmp_path / "k.json")))
    assert proc.returncode == 1 and "MSCOCO" in proc.stderr and "train2014.zip" in proc.stderr


def test_engine_skip_bad_reaches_stages_0_to_2(corpora, workspace, tmp_path):
    """The engine's --skip_bad true: stage 0 leaves out a missing wav, stage 1 a silent one (its header is fine),
    stage 2 the utterances of an image damaged after stage 0; each is listed in data/<set>/excluded.txt. Without
    it, stage 0 stops naming the missing wav, writes no data dir and marks nothing done."""
    import numpy as np

    bad = fake_corpora.flickr8k_fault(corpora["flickr8k"], tmp_path / "corpus", "missing_wav")
    missing = bad.named[0]
    wavs = bad.fake.root / "flickr_audio" / "wavs"
    silent = sorted(w for w in os.listdir(wavs) if w.startswith(missing.split("-", 1)[1][:-2]))[0]
    (wavs / silent).unlink()
    sf.write(str(wavs / silent), np.zeros(8000, np.float32), 16000)
    recipe = _copy_recipe(workspace, "flickr8k", "flickr8k_skip_bad")
    env = _env(FLICKR8K=str(bad.fake.root))
    run = [recipe / "run.sh", "--train_config", workspace / "conf" / "tiny_hplus.yaml", "--nj", "1"]
    proc = _run(run + ["--stage", "0", "--stop_stage", "0"], recipe, env)
    assert proc.returncode != 0 and missing in proc.stderr and "--skip_bad true" in proc.stderr, _tail(proc)
    assert not (recipe / "data" / "test").exists() and not (recipe / "data" / ".stage0.done").exists()

    proc = _run(run + ["--stage", "0", "--stop_stage", "1", "--skip_bad", "true"], recipe, env)
    assert proc.returncode == 0, _tail(proc)
    excluded = read_excluded(recipe / "data" / "test")
    silent_utt = next(u for u in DataDir(recipe / "data" / "test" / ".backup").utts if silent[:-4] in u)
    assert set(excluded) == {missing, silent_utt}
    assert "audio file not found" in excluded[missing] and "audio is silent" in excluded[silent_utt]

    dev = DataDir(recipe / "data" / "dev")
    image = dev.utt2img[dev.utts[0]]
    path = Path(dev.img[image])
    data = path.read_bytes()
    path.unlink()  # a link into the generated corpus: replaced, the original stays whole
    path.write_bytes(data[: len(data) // 2])
    proc = _run(run + ["--stage", "2", "--stop_stage", "2", "--skip_bad", "true"], recipe, env)
    assert proc.returncode == 0, _tail(proc)
    lost = {u for u in dev.utts if dev.utt2img[u] == image}
    assert set(read_excluded(recipe / "data" / "dev")) == lost
    assert all(f"{image}: cannot decode" in r for r in read_excluded(recipe / "data" / "dev").values())
    scp = read_kv(next((recipe / "dump").glob("clip_*")) / "dev" / "img_embed.scp")
    assert set(scp) == set(dev.img) - {image} == set(DataDir(recipe / "data" / "dev").img)


# ----------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", ["flickr8k", "spokencoco"])
def test_recipe_end_to_end_then_rerun_skips(name, corpora, workspace):
    fake = corpora[name]
    recipe = _copy_recipe(workspace, name)
    env = _env(**fake.env)
    conf = workspace / "conf" / "tiny_hplus.yaml"
    proc = _run_recipe(recipe, env, conf)
    assert proc.returncode == 0, _tail(proc)
    tag = "tiny_hplus_train.max_steps_4"  # the engine's tag: config name + train_args
    _check_data_dirs(recipe, fake)
    _check_trained(recipe, tag, "hplus")
    _check_rerun_skips(recipe, env, conf, tag)
    if name != "flickr8k":
        return
    # exp/<tag>/run.sh resumes the experiment from anywhere: 2 more steps after the last checkpoint (step 4)
    proc = _run([recipe / "exp" / tag / "run.sh", "--train.max_steps", "6", "--no_progress"], workspace, env)
    assert proc.returncode == 0, _tail(proc)
    assert re.search(r"resumed from \S*last\.pt: step 4", proc.stderr + proc.stdout), _tail(proc)
    assert "finished at step 6" in proc.stderr + proc.stdout, _tail(proc)
    # --vocab_source all (the reference's vocabulary: every set's captions) refuses to reuse the train-only
    # vocabularies, then rebuilds them from all sets once they are removed.
    stage3 = [recipe / "run.sh", "--stage", "3", "--stop_stage", "3", "--train_config", conf,
              "--spm_vocab_size", "40", "--vocab_source", "all"]
    proc = _run(stage3, recipe, env)
    assert proc.returncode == 2 and "--vocab_source train" in proc.stderr, _tail(proc)
    shutil.rmtree(recipe / "data" / "token_list")
    proc = _run(stage3, recipe, env)
    assert proc.returncode == 0, _tail(proc)
    usage = dict(line.split() for line in (recipe / "data" / "token_list" / "clip_vocab_usage.txt").open())
    assert int(usage[str(SOT)]) == sum(fake.utterances.values())


def test_new_recipe_from_template_setup(workspace, tmp_path, require, template_readme_block):
    """egs/TEMPLATE/setup.sh makes a recipe whose stages 0-1 run with the README's TSV (awk) local/data.sh.
    (Stages 2-6 of a setup.sh recipe run in test_first_day.py, on the CPU config and a CSV corpus.)"""
    require("espeak-ng")  # speaks the fake corpora
    fake = fake_corpora.make_plain(tmp_path / "plain_corpus")  # 22.05 kHz audio: stage 1 resamples
    setup = workspace / "egs" / "TEMPLATE" / "setup.sh"
    proc = _run([setup, "egs/plain"], workspace, _env())
    assert proc.returncode == 0, _tail(proc)
    recipe = workspace / "egs" / "plain"
    cpu_route = {"cpu_hplus.yaml", "cpu_fbank.yaml", "cpu_clip.json"}
    assert {p.name for p in (recipe / "conf").iterdir()} == cpu_route | {"base_common.yaml", "large_common.yaml"} | {
        f"{s}_{v}.yaml" for s in ("base", "large") for v in ("p", "c", "cplus", "h", "hplus")}
    for conf in (recipe / "conf").glob("[bl]*_*.yaml"):
        assert load_config(str(conf)) == load_config(str(REPO / "speechclip_plus" / "conf" / conf.name))
    stub = _run([recipe / "run.sh", "--stop_stage", "0", "--train_config", workspace / "conf" / "tiny_c.yaml"],
                recipe, _env(CORPUS=str(fake.root)))
    assert stub.returncode != 0 and "not written yet" in stub.stderr
    readme_data_sh = template_readme_block("bash", "# local/data.sh for a TSV manifest")
    (recipe / "local" / "data.sh").write_text(readme_data_sh)  # the README's example, verbatim
    if require("shellcheck", skip=False):
        lint = _run(["shellcheck", recipe / "local" / "data.sh"], recipe, _env())
        assert lint.returncode == 0, lint.stdout
    env = _env(CORPUS=str(fake.root))
    proc = _run_recipe(recipe, env, workspace / "conf" / "tiny_c.yaml", "--stop_stage", "1")
    assert proc.returncode == 0, _tail(proc)
    _check_data_dirs(recipe, fake)
    converted = read_kv(recipe / "data" / "train" / "wav.scp")
    assert all(str(recipe / "dump" / "audio") in p for p in converted.values())  # resampled copies
    assert {sf.info(p).samplerate for p in converted.values()} == {16000}
    for dset in SETS:
        assert set(DataDir(recipe / "data" / dset).utt2dur) == set(DataDir(recipe / "data" / dset).utts)
    again = _run([setup, "egs/plain"], workspace, _env())
    assert again.returncode == 0 and "keeping existing" in again.stdout and "wrote" not in again.stdout
    assert (recipe / "local" / "data.sh").read_text() == readme_data_sh


# ----------------------------------------------------------------------------------------------- configs
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_recipe_configs_follow_the_reference():
    """Every conf loads; Flickr8k's equal the package's; SpokenCOCO's differ only where the official large COCO
    configs do (ShampooWang/SpeechCLIP_plus, config/speechCLIP+/model_large/coco/spchclip_{c+,h,h+}.yaml)."""
    coco_only = {
        "large_cplus": {"model.cif.conv_width": 5, "model.cif.conv_layers": 2},
        "large_h": {"model.encoder.type": "transformer", "model.encoder.n_layers": 1, "model.encoder.n_heads": 1,
                    "model.encoder.ffn_dim": 4096, "model.parallel.projection": [],
                    "model.loss.learnable_temperature": False, "train.batch_size": 64, "train.accum_grad": 4},
        "large_hplus": {"model.parallel.weight": 1.0, "model.cascaded.weight": 1.0, "train.batch_size": 128,
                        "train.accum_grad": 2, "model.retrieval_branch": "parallel"},
    }
    names = [f"{s}_{v}" for s in ("base", "large") for v in ("p", "c", "cplus", "h", "hplus")]
    for recipe in ("flickr8k", "spokencoco"):
        shipped = sorted(p.stem for p in (REPO / "egs" / recipe / "conf").glob("*.yaml"))
        assert shipped == sorted(names + ["base_common", "large_common"])
    for name in names:
        package = _flat(load_config(str(REPO / "speechclip_plus" / "conf" / f"{name}.yaml")))
        flickr = _flat(load_config(str(REPO / "egs" / "flickr8k" / "conf" / f"{name}.yaml")))
        coco = _flat(load_config(str(REPO / "egs" / "spokencoco" / "conf" / f"{name}.yaml")))
        assert flickr == package, name
        expected = dict(flickr, **coco_only.get(name, {}))
        assert coco == expected, {k: (expected[k], coco[k]) for k in coco if coco[k] != expected[k]}
        assert flickr["model.variant"] in name
        assert (flickr["train.lr"], flickr["train.max_steps"]) == (1e-4, 50000)
    flickr_hplus = _flat(load_config(str(REPO / "egs" / "flickr8k" / "conf" / "large_hplus.yaml")))
    assert (flickr_hplus["model.cascaded.weight"], flickr_hplus["model.parallel.weight"]) == (1.5, 0.5)


def test_run_sh_help_lists_engine_options():
    for recipe in ("flickr8k", "spokencoco"):
        proc = _run([REPO / "egs" / recipe / "run.sh", "--help"], REPO, _env())
        assert proc.returncode == 0 and "--train_config conf/base_hplus.yaml" in proc.stdout, _tail(proc)
        assert "--vocab_source train" in proc.stdout
