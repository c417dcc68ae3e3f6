"""bin.train's process launch: --ngpu/--nproc/--num_nodes/--node_rank -> the torchrun command, its children's
arguments and run.sh. Pure functions, plus main() with the torchrun call replaced (no process is started)."""
import os
import sys
from pathlib import Path

import pytest

from speechclip_plus.bin import train as bin_train
from speechclip_plus.config import ConfigError
from speechclip_plus.train.distributed import torchrun_command

CONF = Path(__file__).resolve().parents[1] / "speechclip_plus" / "conf"


def _args(*argv):
    return bin_train.parse_args(list(argv))[1]


@pytest.mark.parametrize("argv,plan", [
    ([], (1, "auto")), (["--device", "cpu"], (1, "cpu")), (["--ngpu", "0"], (1, "cpu")),
    (["--ngpu", "4"], (4, "cuda")), (["--nproc", "3"], (3, "cpu")), (["--nproc", "2", "--device", "cuda"], (2, "cuda")),
])
def test_processes_and_device_from_the_options(argv, plan):
    assert bin_train._launch_plan(_args(*argv)) == plan


@pytest.mark.parametrize("argv,error", [
    (["--ngpu", "2", "--nproc", "2"], "give --ngpu .* or --nproc .*, not both"),
    (["--ngpu", "-1"], "--ngpu must be >= 0, got -1"), (["--nproc", "0"], "--nproc must be >= 1, got 0"),
])
def test_bad_process_options_are_config_errors(argv, error):
    with pytest.raises(ConfigError, match=error):
        bin_train._launch_plan(_args(*argv))


def test_the_children_lose_every_process_option_in_both_spellings():
    argv = ["--config", "c.yaml", "--ngpu", "2", "--num_nodes=2", "--node_rank", "1", "--master_addr=h",
            "--master_port", "29600", "--device", "cuda", "--train.lr", "0.1", "--nproc=3", "--exp_dir", "e",
            "--model.cif.threshold=0.9"]
    assert bin_train._strip_launch_args(argv) == ["--config", "c.yaml", "--train.lr", "0.1", "--exp_dir", "e",
                                                  "--model.cif.threshold=0.9"]


def test_several_nodes_need_a_port_and_node_k_gets_its_rank():
    argv = ["--config", "c.yaml", "--exp_dir", "e", "--nproc", "2", "--num_nodes", "2", "--node_rank", "1",
            "--master_addr", "10.0.0.1"]
    with pytest.raises(ConfigError, match="--master_port is required with --num_nodes > 1"):
        bin_train.launch_commands(_args(*argv), argv, 2, "cpu")
    argv += ["--master_port", "29611"]
    cmd, launch = bin_train.launch_commands(_args(*argv), argv, 2, "cpu")
    i = cmd.index("torch.distributed.run")
    assert cmd[:i + 1] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[i + 1:i + 6] == ["--nproc_per_node=2", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1",
                                "--master_port=29611"]
    assert cmd[i + 6:] == ["-m", "speechclip_plus.bin.train", "--config", "c.yaml", "--exp_dir", "e",
                           "--device", "cpu"]
    assert launch == ["--nproc", "2", "--num_nodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1",
                      "--master_port", "29611", "--device", "cpu"]
    one = ["--exp_dir", "e", "--ngpu", "4"]  # one node: a free port, and run.sh repeats only --ngpu
    cmd, launch = bin_train.launch_commands(_args(*one), one, 4, "cuda")
    port = int(next(c for c in cmd if c.startswith("--master_port=")).split("=")[1])
    assert 0 < port < 65536 and launch == ["--ngpu", "4"] and cmd[-2:] == ["--device", "cuda"]


@pytest.mark.parametrize("nproc,nodes,rank", [(0, 1, 0), (2, 0, 0), (2, 2, 2), (2, 2, -1)])
def test_torchrun_command_refuses_impossible_launches(nproc, nodes, rank):
    with pytest.raises(ValueError, match=rf"bad launch: nproc_per_node={nproc}, num_nodes={nodes}, "
                                         rf"node_rank={rank}"):
        torchrun_command(["--x"], nproc, nodes, rank)
    argv = ["--exp_dir", "e", "--nproc", str(max(nproc, 1)), "--num_nodes", str(max(nodes, 1)), "--node_rank",
            str(rank), "--master_port", "29612"]
    if nproc >= 1 and nodes >= 1:  # bin.train turns it into a config error (exit 2), not a traceback
        with pytest.raises(ConfigError, match="bad launch"):
            bin_train.launch_commands(_args(*argv), argv, nproc, "cpu")


@pytest.mark.parametrize("rank", [0, 1])
def test_only_node_0_writes_run_sh_and_every_node_launches(rank, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bin_train.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
    exp = tmp_path / "exp"
    argv = ["--config", str(CONF / "tiny_p.yaml"), "--exp_dir", str(exp), "--nproc", "2", "--num_nodes", "2",
            "--node_rank", str(rank), "--master_port", "29613", "--train.lr", "0.01"]
    assert bin_train.main(argv) == 0
    ((cmd, env),) = calls
    assert f"--node_rank={rank}" in cmd and env[bin_train._CHILD_ENV] == "1"
    assert cmd[cmd.index("speechclip_plus.bin.train") + 1:] == ["--config", str(CONF / "tiny_p.yaml"), "--exp_dir",
                                                                 str(exp), "--train.lr", "0.01", "--device", "cpu"]
    if rank == 0:
        run_sh = (exp / "run.sh").read_text()
        assert "--nproc 2 --num_nodes 2 --node_rank 0" in run_sh and os.access(exp / "run.sh", os.X_OK)
    else:
        assert not exp.exists()
