"""egs/mini end to end at its reduced size (--size ci): corpus, teacher, stages 2-6, summary.

The same script `make demo` runs, on a copy of the recipe in a temporary tree (egs/TEMPLATE and utils/
symlinked), so the repository stays clean.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_mini_recipe_ci_size_runs_every_stage(tmp_path, require):
    require("espeak-ng")
    (tmp_path / "egs").mkdir()
    (tmp_path / "egs" / "TEMPLATE").symlink_to(REPO / "egs" / "TEMPLATE")
    (tmp_path / "utils").symlink_to(REPO / "utils")
    recipe = tmp_path / "egs" / "mini"
    shutil.copytree(REPO / "egs" / "mini", recipe,
                    ignore=shutil.ignore_patterns("data", "dump", "exp", "downloads", "RESULTS.md", "results_plots",
                                                  "__pycache__"))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(["./run.sh", "--size", "ci", "--results", "RESULTS_ci.md"], cwd=recipe, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    teacher = json.loads((recipe / "exp" / "clip_mini" / "metrics.json").read_text())
    assert 0 <= teacher["test"]["t2i_R@5"] <= 1
    exp = recipe / "exp" / "mini_hplus_seed1"
    results = json.loads((exp / "test" / "results.json").read_text())
    assert {"parallel", "cascaded"} <= set(results["retrieval"])
    assert "subword_hit_rate" in results["keywords"]
    assert (exp / "model.pt").is_file()
    assert (exp / "test_untrained" / "results.json").is_file()
    report = (recipe / "RESULTS_ci.md").read_text()
    assert "h+ trained | parallel" in report and "h+ untrained | parallel" in report
    assert "## Quality bars" in report and "Teacher" in report
    s2i = results["retrieval"]["parallel"]["speech_to_image_r5"]
    assert f"{100 * s2i:.1f}" in report

    # A second run finds every stage done.
    again = subprocess.run(["./run.sh", "--size", "ci", "--results", "RESULTS_ci.md"], cwd=recipe, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already done" in again.stdout + again.stderr


# ------------------------------------------------------------------------------------------ the claims study
def _summarize():
    import importlib.util

    key = "egs_mini_summarize"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "egs" / "mini" / "local" / "summarize.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.mark.parametrize("diffs, expected", [
    ([0.03, 0.05, 0.04], "holds"),                       # every seed agrees, mean 4 points, SE 0.6 points
    ([-0.03, -0.05, -0.04], "does not hold"),            # the other run is better by as much
    ([0.002, -0.001, 0.001], "does not hold"),           # mean +- 3 SE inside +-1 point: no difference
    ([0.08, 0.01, 0.002], "cannot tell at this size"),   # all positive, but the mean is within 3 SE
    ([0.03, -0.01, 0.04], "cannot tell at this size"),   # one seed disagrees
    ([0.005, 0.006, 0.007], "does not hold"),           # consistent, but surely below 1 point: too small to count
    ([0.002, 0.009, 0.004], "cannot tell at this size"),  # below 1 point on average, not surely
    ([0.05, 0.06], "cannot tell at this size"),          # fewer than 3 seeds
])
def test_decision_rule(diffs, expected):
    assert _summarize().verdict(diffs) == expected


def test_claims_combine_measures():
    s = _summarize()
    assert s.combine(["holds", "holds"]) == "holds"
    assert s.combine(["holds", "does not hold"]) == "does not hold"
    assert s.combine(["holds", "cannot tell at this size"]) == "cannot tell at this size"
    # pairs only the seeds both runs have; sign orients "lower is better"
    assert s.paired_differences({"1": 0.5, "2": 0.4, "3": None}, {"1": 0.3, "2": 0.1, "4": 0.0}, -1) == \
        pytest.approx([-0.2, -0.3])


def test_study_runs_are_like_for_like():
    """Every run the claims compare exists in conf/arms.txt, and a control's resolved config differs from the run
    it is compared with only in the keys its overrides name."""
    from speechclip_plus.config import load_config

    s = _summarize()
    mini = REPO / "egs" / "mini"
    arms = {}
    for line in (mini / "conf" / "arms.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, config, *overrides = line.split()
            arms[name] = (mini / "conf" / config, overrides)
    study = (mini / "local" / "study.sh").read_text()
    for claim in s.CLAIMS:
        for run in (claim.better, claim.worse):
            assert run in arms and run in study, run

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    def resolved(run):
        config, overrides = arms[run]
        known = [o for o in overrides]
        return flat(load_config(str(config), known))

    def changed(a, b):
        return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}

    def named(run):
        return {o[2:] for o in arms[run][1] if o.startswith("--")}

    assert changed(resolved("p_ctl"), resolved("hplus")) == {"model.variant"}
    assert changed(resolved("cplus_dur"), resolved("cplus")) == named("cplus_dur")
    assert changed(resolved("cplus_ref"), resolved("cplus")) == named("cplus_ref")
    assert resolved("cplus_ref")["model.cif.scaling_steps"] == resolved("cplus_ref")["train.max_steps"] // 10
    # the reference p differs from p with h+'s settings in the encoder settings only
    assert changed(resolved("p"), resolved("p_ctl")) <= {
        "model.upstream.normalize_waveform", "model.loss.learnable_temperature", "model.loss.temperature",
        "model.encoder.type", "model.encoder.n_heads", "model.encoder.n_layers", "model.encoder.ffn_dim"}


def _results(parallel_r1=None, cascaded_r1=None, excess=None, coverage=None):
    res = {"n_utterances": 750, "n_images": 150, "retrieval": {}, "keywords": None}
    for branch, r1 in (("parallel", parallel_r1), ("cascaded", cascaded_r1)):
        if r1 is not None:
            res["retrieval"][branch] = {"speech_to_image_r1": r1, "speech_to_image_r5": min(1.0, r1 + 0.2),
                                        "image_to_speech_r5": min(1.0, r1 + 0.25)}
    if excess is not None:
        res["keywords"] = {"excess_duplicate_rate": excess, "word_coverage": coverage, "subword_hit_rate": 0.8,
                           "mean_keywords": 8.0}
    return res


def test_summary_gives_the_verdicts_of_the_rule(tmp_path):
    """summarize.py on made-up results of every study run: each claim gets the verdict the rule gives its numbers,
    the per-seed differences are listed, the claims plot and the gradient-norm table are written."""
    from speechclip_plus.train.logging import ScalarWriter

    recipe = tmp_path / "egs" / "mini"
    (recipe / "local").mkdir(parents=True)
    shutil.copy(REPO / "egs" / "mini" / "local" / "summarize.py", recipe / "local")
    seeds = ("1", "2", "3")
    runs = {  # per seed
        "hplus": [_results(0.40, 0.20, 0.10, 0.50), _results(0.42, 0.22, 0.12, 0.52), _results(0.41, 0.21, 0.1, 0.5)],
        "p_ctl": [_results(0.35), _results(0.36), _results(0.34)],       # h+ better by 5-6 points: (b) holds
        "p": [_results(0.45), _results(0.35), _results(0.30)],            # mixed signs: cannot tell
        "c": [_results(None, 0.2, 0.30, 0.40), _results(None, 0.2, 0.31, 0.41), _results(None, 0.2, 0.29, 0.40)],
        # c+ repeats less (holds) but covers fewer words (does not hold): (a) does not hold
        "cplus_ref": [_results(None, 0.2, 0.10, 0.30), _results(None, 0.2, 0.12, 0.31),
                      _results(None, 0.2, 0.11, 0.29)],
    }
    for run, per_seed in runs.items():
        for seed, res in zip(seeds, per_seed):
            exp = recipe / "exp" / f"mini_{run}_seed{seed}"
            (exp / "test").mkdir(parents=True)
            (exp / "test" / "results.json").write_text(json.dumps(res))
    writer = ScalarWriter(str(recipe / "exp" / "mini_hplus_seed1" / "tensorboard"))
    for step in (25, 50):
        writer.scalars({"grad_norm/cl_parallel": 0.5, "grad_norm/cl_cascaded": 2.0,
                        "grad_cos/cl_parallel~cl_cascaded": -0.1 * step / 25}, step, prefix="train/")
    writer.close()

    proc = subprocess.run([sys.executable, str(recipe / "local" / "summarize.py"), "--variants", *runs,
                           "--seeds", *seeds, "--out", "RESULTS.md"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (recipe / "RESULTS.md").read_text()
    claims = {line.split(")")[0][3:]: line for line in report.splitlines() if line.startswith("- (")}
    assert claims["a"].endswith("**does not hold**."), claims["a"]
    assert claims["b"].endswith("**holds**."), claims["b"]
    rows = [line for line in report.splitlines() if line.startswith("| b, as published |")]
    assert len(rows) == 1 and "-5.0, +7.0, +11.0" in rows[0] and "cannot tell at this size" in rows[0], rows
    assert "| h+ | norm cl_cascaded | 2 | 1 |" in report
    assert "| h+ | cosine cl_parallel~cl_cascaded | -0.15 | 1 |" in report
    assert (recipe / "results_plots" / "claims.png").stat().st_size > 0
    assert (recipe / "results_plots" / "grad_norms.png").stat().st_size > 0
    assert "excess duplicates" in report and "30.0 ± 1.0" in report  # c's excess duplicate rate


@pytest.mark.parametrize("parallel_r5, code", [(0.95, 0), (0.5, 1)])
def test_check_bars_sets_the_exit_code(tmp_path, parallel_r5, code):
    """--check_bars: exit 1 exactly when a bar is missed (here h+'s parallel R@5 against the teacher's), and the
    report marks the missed bar; mean ± std over seeds in the tables."""
    s = _summarize()
    recipe = tmp_path / "egs" / "mini"
    (recipe / "local").mkdir(parents=True)
    shutil.copy(REPO / "egs" / "mini" / "local" / "summarize.py", recipe / "local")
    (recipe / "exp" / "clip_mini").mkdir(parents=True)
    (recipe / "exp" / "clip_mini" / "metrics.json").write_text(json.dumps({"test": {"t2i_R@5": 1.0}}))
    for seed, r1 in (("1", 0.5), ("2", 0.6)):
        res = _results(0.5, 0.5, 0.1, 0.5)
        res["retrieval"]["parallel"]["speech_to_image_r5"] = parallel_r5
        res["retrieval"]["parallel"]["speech_to_image_r1"] = r1
        res["retrieval"]["cascaded"]["speech_to_image_r5"] = s.CASCADED_BAR + 0.05
        (recipe / "exp" / f"mini_hplus_seed{seed}" / "test").mkdir(parents=True)
        (recipe / "exp" / f"mini_hplus_seed{seed}" / "test" / "results.json").write_text(json.dumps(res))
    proc = subprocess.run([sys.executable, str(recipe / "local" / "summarize.py"), "--variants", "hplus",
                           "--seeds", "1", "2", "--check_bars"], capture_output=True, text=True)
    assert proc.returncode == code, proc.stderr[-3000:]
    report = (recipe / "exp" / "RESULTS.md").read_text()
    bar = next(line for line in report.splitlines() if line.startswith("| h+ parallel S→I R@5 ≥"))
    assert bar.endswith("| MISSED |" if code else "| pass |"), bar
    assert "| h+ trained | parallel | 55.0 ± 7.1 |" in report  # R@1 of 50 and 60 %
    assert ("1 quality bar(s) missed" in proc.stderr) == bool(code)


def test_word_emission_counts_each_spoken_word(tmp_path):
    s = _summarize()
    jsonl = tmp_path / "keywords.jsonl"
    records = [{"text": "a red star, a red cross", "keywords": [{"token": "red</w>"}, {"token": "st"},
                                                               {"token": "red</w>"}]},
               {"text": "The blue star", "keywords": [{"token": "star</w>"}, {"token": "the</w>"}]}]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert s.word_emission(str(jsonl)) == {"a": (1, 0), "red": (1, 1), "star": (2, 1), "cross": (1, 0),
                                           "the": (1, 1), "blue": (1, 0)}
    jsonl.write_text(json.dumps(records[0]) + "\n" + json.dumps({"text": "no keywords"}) + "\n")
    with pytest.raises(SystemExit, match="keywords.jsonl:2: not a keyword record"):
        s.word_emission(str(jsonl))


def test_untrained_scoring_finds_the_runs_test_image_cache(tmp_path):
    """The untrained model is scored on the test images of the cache the run trained with (its config's
    train.image_embeds), never on a cache found by name; a missing one is an error naming both paths."""
    s = _summarize()
    exp = tmp_path / "exp" / "mini_hplus_seed1"
    exp.mkdir(parents=True)
    assert s.test_image_embeds(str(exp)) is None  # not trained yet
    cache = tmp_path / "dump" / "clip_key123"
    (exp / "config.yaml").write_text(f"train: {{image_embeds: {cache}/train/img_embed.scp}}\n")
    with pytest.raises(SystemExit, match=r"clip_key123/test/img_embed.scp does not exist"):
        s.test_image_embeds(str(exp))
    (cache / "test").mkdir(parents=True)
    (cache / "test" / "img_embed.scp").write_text("")
    assert s.test_image_embeds(str(exp)) == str(cache / "test" / "img_embed.scp")
    (exp / "config.yaml").write_text("train: {seed: 1}\n")
    with pytest.raises(SystemExit, match="no train.image_embeds"):
        s.test_image_embeds(str(exp))


def _recipe_copy(tmp_path):
    (tmp_path / "egs").mkdir()
    (tmp_path / "egs" / "TEMPLATE").symlink_to(REPO / "egs" / "TEMPLATE")
    (tmp_path / "utils").symlink_to(REPO / "utils")
    recipe = tmp_path / "egs" / "mini"
    shutil.copytree(REPO / "egs" / "mini", recipe,
                    ignore=shutil.ignore_patterns("data", "dump", "exp", "downloads", "RESULTS.md", "results_plots",
                                                  "__pycache__"))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return recipe, env


def test_run_sh_rejects_bad_options(tmp_path):
    recipe, env = _recipe_copy(tmp_path)
    for args, message in ((["--jobs", "0"], "--jobs must be a number >= 1, got '0'"),
                          (["--jobs", "two"], "--jobs must be a number >= 1, got 'two'"),
                          (["--variants", "hplus bogus"], "unknown run 'bogus'")):
        proc = subprocess.run(["./run.sh", *args], cwd=recipe, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr[-2000:])
    assert not (recipe / "data").exists() and not (recipe / "exp").exists()  # nothing started


def test_run_sh_jobs_reports_every_failed_run(tmp_path):
    """Runs side by side (--jobs 2): when runs fail (here: no data prepared), run.sh waits for all, names each
    failed run with its log, and exits 1."""
    recipe, env = _recipe_copy(tmp_path)
    proc = subprocess.run(["./run.sh", "--stage", "4", "--stop_stage", "4", "--variants", "hplus p",
                           "--seeds", "1 2", "--jobs", "2"], cwd=recipe, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    failed = sorted(line.split()[0] for line in proc.stderr.splitlines() if "(log: exp/logs/" in line)
    assert failed == ["mini_hplus_seed1", "mini_hplus_seed2", "mini_p_seed1", "mini_p_seed2"], proc.stderr
    assert (recipe / "exp" / "logs" / "mini_p_seed2.log").stat().st_size > 0
