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
