"""shellcheck (the Debian package) on every ``*.sh`` of egs/, utils/, tools/ and bench/: any finding fails.

Generated trees (``data/``, ``dump/``, ``exp/``, ``downloads/`` of recipes, hidden folders) are not sources and
are left out. Without shellcheck the test is skipped, except under CI=true where that is a failure.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("egs", "utils", "tools", "bench")
GENERATED = {"data", "dump", "exp", "downloads", "__pycache__"}


def shell_scripts() -> List[str]:
    """Repository-relative paths of the ``*.sh`` files under ``ROOTS`` (generated trees excluded)."""
    found = []
    for root in ROOTS:
        for dirpath, dirnames, filenames in os.walk(REPO / root):
            dirnames[:] = sorted(d for d in dirnames if d not in GENERATED and not d.startswith("."))
            found += [os.path.relpath(os.path.join(dirpath, f), REPO)
                      for f in sorted(filenames) if f.endswith(".sh")]
    return found


def test_every_shell_script_is_shellcheck_clean(require):
    require("shellcheck")
    scripts = shell_scripts()
    for expected in ("egs/TEMPLATE/speechclip.sh", "egs/TEMPLATE/setup.sh", "egs/flickr8k/run.sh",
                     "egs/flickr8k/db.sh", "egs/flickr8k/local/data.sh", "egs/spokencoco/local/data.sh",
                     "utils/parse_options.sh", "bench/gpu.sh"):
        assert expected in scripts, f"{expected} not found: the script walk is broken"
    proc = subprocess.run(["shellcheck", "--format=gcc", *scripts], cwd=REPO, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, f"shellcheck findings:\n{proc.stdout}{proc.stderr}"


def test_generated_trees_are_not_linted(tmp_path, monkeypatch):
    """A run.sh written by training into exp/<tag>/ is output, not source."""
    for d in ("egs/x/exp/tag", "egs/x/local", "utils"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "egs/x/exp/tag/run.sh").write_text("#!/bin/sh\n")
    (tmp_path / "egs/x/local/data.sh").write_text("#!/bin/sh\n")
    (tmp_path / "utils/a.sh").write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert shell_scripts() == ["egs/x/local/data.sh", "utils/a.sh"]
