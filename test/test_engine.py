"""The stage engine's options (egs/TEMPLATE/speechclip.sh): which tools each option runs, with which arguments.

The engine runs in a throw-away recipe whose Python is a recording stand-in (``--python "bash stub.sh"``: the
engine takes a multi-word interpreter as it is): every ``python -m speechclip_plus.bin.<tool> ...`` call is
written to a log and succeeds, so the engine's own logic is what runs. The tools themselves run for real in
test_recipes.py and test_mini_recipe.py.
"""
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETS = ("train", "dev", "test")
STUB = """#!/usr/bin/env bash
# Stand-in interpreter: log the call; print what the engine reads; make the dir an --out_dir names.
printf '%q ' "$@" >>"${STUB_LOG}"; echo >>"${STUB_LOG}"
[ "$1 $2" = "-m speechclip_plus.bin.show_config" ] && echo clip_stub
prev=""
for a in "$@"; do [ "${prev}" = --out_dir ] && mkdir -p "${a}"; prev=${a}; done
exit 0
"""


def run_engine(tmp_path: Path, *options: str, config: str = "conf/x.yaml"):
    """A fresh recipe under ``tmp_path``; returns (process, [tool calls as argument lists], recipe dir)."""
    root = tmp_path / "ws"
    (root / "egs").mkdir(parents=True)
    (root / "egs" / "TEMPLATE").symlink_to(REPO / "egs" / "TEMPLATE")
    (root / "utils").symlink_to(REPO / "utils")
    recipe = root / "egs" / "r"
    (recipe / "local").mkdir(parents=True)
    (recipe / "conf").mkdir()
    (recipe / "conf" / "x.yaml").write_text("base: tiny_hplus\n")
    data_sh = recipe / "local" / "data.sh"
    data_sh.write_text('#!/usr/bin/env bash\nprintf \'%q \' local/data.sh "$@" >>"${STUB_LOG}"; echo >>"${STUB_LOG}"\n'
                       'mkdir -p data\n')
    data_sh.chmod(0o755)
    stub, log = tmp_path / "stub.sh", tmp_path / "calls.log"
    stub.write_text(STUB)
    cmd = [str(root / "egs" / "TEMPLATE" / "speechclip.sh"), "--python", f"bash {stub}"]
    if config:
        cmd += ["--train_config", config]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "STUB_LOG": str(log), "LANG": "C.UTF-8"}
    proc = subprocess.run(cmd + list(options), cwd=recipe, env=env, capture_output=True, text=True, timeout=120)
    calls = [shlex.split(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls, recipe


def tool(calls, name):
    """The calls of ``speechclip_plus.bin.<name>`` (argument lists after the module)."""
    return [c[2:] for c in calls if c[:2] == ["-m", f"speechclip_plus.bin.{name}"]]


def value(args, option):
    return args[args.index(option) + 1]


def test_a_default_run_calls_every_stage_in_order_and_resumes(tmp_path):
    proc, calls, recipe = run_engine(tmp_path)
    assert proc.returncode == 0, proc.stderr
    order = [c[0] if c[0] == "local/data.sh" else c[1].rsplit(".", 1)[1] for c in calls]
    assert order == ["local/data.sh", "validate_data", *["format_audio"] * 3, "show_config", *["embed_images"] * 3,
                     "make_vocab", "train", "score", "export"]
    (train,) = tool(calls, "train")
    assert "--resume" in train and value(train, "--exp_dir") == "exp/x"
    assert value(train, "--image_embeds") == "dump/clip_stub/train/img_embed.scp"
    assert [value(a, "--dump_dir") for a in tool(calls, "format_audio")] == [f"dump/audio/{s}" for s in SETS]
    for marker in ("data/.stage0.done", "exp/x/.train.done", "exp/x/test/.done", "exp/x/.export.done"):
        assert (recipe / marker).is_file(), marker
    again, calls, _ = run_engine(tmp_path / "again", "--stage", "4", "--stop_stage", "4", "--resume", "false")
    (train,) = tool(calls, "train")
    assert again.returncode == 0 and "--resume" not in train  # --resume false: a fresh start
    assert order.count("train") == 1


@pytest.mark.parametrize("option,runs,skipped", [("--skip_train", ["score", "export"], ["train"]),
                                                 ("--skip_eval", ["train"], ["score", "export"])])
def test_skip_train_and_skip_eval_leave_out_their_stages(tmp_path, option, runs, skipped):
    proc, calls, recipe = run_engine(tmp_path, option, "true", "--stage", "4")
    assert proc.returncode == 0, proc.stderr
    assert all(tool(calls, t) for t in runs) and not any(tool(calls, t) for t in skipped)
    done = {"train": "exp/x/.train.done", "score": "exp/x/test/.done", "export": "exp/x/.export.done"}
    assert all((recipe / done[t]).exists() for t in runs) and not any((recipe / done[t]).exists() for t in skipped)


def test_dumpdir_expdir_and_tag_place_every_output(tmp_path):
    proc, calls, recipe = run_engine(tmp_path, "--dumpdir", "d2", "--expdir", "e2", "--tag", "t1")
    assert proc.returncode == 0, proc.stderr
    assert [value(a, "--dump_dir") for a in tool(calls, "format_audio")] == [f"d2/audio/{s}" for s in SETS]
    assert [value(a, "--out_dir") for a in tool(calls, "embed_images")] == [f"d2/clip_stub/{s}" for s in SETS]
    (train,), (score,), (export,) = tool(calls, "train"), tool(calls, "score"), tool(calls, "export")
    assert value(train, "--exp_dir") == "e2/t1"
    assert value(train, "--valid_image_embeds") == "d2/clip_stub/dev/img_embed.scp"
    assert (value(score, "--exp_dir"), value(score, "--out_dir"), value(score, "--image_embeds")) == \
        ("e2/t1", "e2/t1/test", "d2/clip_stub/test/img_embed.scp")
    assert value(export, "--out") == "e2/t1/model.pt" and (recipe / "e2" / "t1" / ".export.done").exists()
    assert not (recipe / "exp").exists() and not (recipe / "dump").exists()


def test_tool_options_pass_through_word_by_word(tmp_path):
    proc, calls, _ = run_engine(tmp_path, "--stop_stage", "1", "--validate_opts", "--fix_dir --check_images",
                                "--format_audio_opts", "--skip_bad", "--local_data_opts", "--nj 3 --encoding latin-1")
    assert proc.returncode == 0, proc.stderr
    (validate,) = tool(calls, "validate_data")
    assert validate == ["--fix_dir", "--check_images", "data/train", "data/dev", "data/test"]
    assert all(a[-1] == "--skip_bad" for a in tool(calls, "format_audio")) and len(tool(calls, "format_audio")) == 3
    assert calls[0] == ["local/data.sh", "--nj", "3", "--encoding", "latin-1"]
    proc, calls, _ = run_engine(tmp_path / "b", "--stop_stage", "1", "--skip_bad", "true")
    assert calls[0] == ["local/data.sh", "--skip_bad", "true"]
    assert all("--skip_bad" in a for a in tool(calls, "format_audio"))


@pytest.mark.parametrize("options,config,message", [
    ([], "", "--train_config is required"),
    ([], "conf/none.yaml", "--train_config conf/none.yaml: no such file"),
    (["stray"], "conf/x.yaml", "unexpected arguments: stray"),
    (["--stage", "1", "oops", "--nj", "1"], "conf/x.yaml", "unexpected arguments: oops"),
    (["--no_such_option", "1"], "conf/x.yaml", "unknown option --no_such_option"),
    (["--skip_bad", "yes"], "conf/x.yaml", "--skip_bad must be true or false, got 'yes'"),
])
def test_bad_invocations_stop_before_any_stage_with_exit_2(tmp_path, options, config, message):
    proc, calls, _ = run_engine(tmp_path, *options, config=config)
    assert proc.returncode == 2 and message in proc.stderr and calls == [], proc.stderr
    if "unexpected" in message:
        assert "Usage:" in proc.stderr  # the help follows
