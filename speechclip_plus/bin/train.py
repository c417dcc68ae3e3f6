"""Train a SpeechCLIP / SpeechCLIP+ model (recipe stage 4).

    python -m speechclip_plus.bin.train --config conf/train_cplus.yaml \\
        --train_data data/train --valid_data data/dev \\
        --image_embeds dump/clip_ViT-B-32_openai/train/img_embed.scp \\
        [--valid_image_embeds dump/clip_ViT-B-32_openai/dev/img_embed.scp] \\
        --exp_dir exp/train_cplus [--resume] [--print_config] [--dry_run] \\
        [--ngpu N | --nproc N] [--num_nodes M --node_rank K --master_addr HOST --master_port PORT] \\
        [--train.lr 1e-4 --model.cif.threshold 0.9 ...]

Before training it warns when train.select_metric is a recall that the valid set cannot move (R@k is 1 for
any model when the set has k images or fewer: eval.retrieval.selection_warning).
Writes <exp_dir>/config.yaml (resolved, with the data paths), train.log (train.rank<k>.log per rank when
distributed), tensorboard/, checkpoints/{last,best,step-N}.pt + metrics.jsonl, and run.sh (resumes the run).
Several processes: --ngpu N (GPUs, NCCL) or --nproc N (CPU processes, gloo) re-launch this command under
torchrun; several machines: run the same command on each with --num_nodes/--node_rank/--master_addr/--master_port.
train.batch_size is the global batch of one micro-step (divided over the processes), so results do not depend
on the number of processes; the effective batch per optimiser step is batch_size x accum_grad.
Exit status: 0 done, 1 training diverged (train.max_bad_steps consecutive non-finite losses; the last good
checkpoint is kept), 2 bad arguments, config, data or checkpoint (e.g. --resume from a file that is not plain
weights), 3 an output could not be written (disk full, read-only exp dir; the previous checkpoint is intact).
"""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
from typing import List, Optional, Sequence, Tuple

from ..config import ConfigError, dump_config, load_config

PATH_ARGS = ("train_data", "valid_data", "image_embeds", "valid_image_embeds")
LAUNCH_ARGS = ("ngpu", "nproc", "num_nodes", "node_rank", "master_addr", "master_port")
_CHILD_ENV = "SPEECHCLIP_TRAIN_LAUNCHER"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m speechclip_plus.bin.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--config", help="YAML config (defaults: speechclip_plus.config.DEFAULTS)")
    p.add_argument("--train_data", help="training Kaldi data dir (sets train.train_data)")
    p.add_argument("--valid_data", help="validation Kaldi data dir (sets train.valid_data)")
    p.add_argument("--image_embeds", help="image-embedding scp of the training images (train.image_embeds)")
    p.add_argument("--valid_image_embeds",
                   help="image-embedding scp of the validation images (default: --image_embeds)")
    p.add_argument("--exp_dir", help="experiment directory")
    p.add_argument("--resume", action="store_true", help="continue from <exp_dir>/checkpoints/last.pt if present")
    p.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry_run", action="store_true",
                   help="check config, data and model, then exit without training")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    g = p.add_argument_group("processes")
    g.add_argument("--ngpu", type=int, help="GPUs per node (0 = CPU; >1 re-launches under torchrun)")
    g.add_argument("--nproc", type=int, help="CPU processes per node (>1 re-launches under torchrun, gloo)")
    g.add_argument("--num_nodes", type=int, default=1)
    g.add_argument("--node_rank", type=int, default=0)
    g.add_argument("--master_addr", default="127.0.0.1")
    g.add_argument("--master_port", type=int,
                   help="default: a free port (single node); required for several nodes")
    return p


def parse_args(argv: Optional[Sequence[str]]):
    parser = get_parser()
    args, overrides = parser.parse_known_args(argv)
    for extra in overrides:
        if extra.startswith("--") and "." not in extra.split("=", 1)[0]:
            parser.error(f"unknown option {extra} (config overrides look like --section.key value)")
    return parser, args, overrides


def resolve_config(args, overrides: List[str]) -> dict:
    """Config file <- data paths given as options <- overrides; data paths made absolute."""
    data = {"train": {k: getattr(args, k) for k in PATH_ARGS if getattr(args, k)}}
    cfg = load_config(args.config, overrides, data=data)
    for k in PATH_ARGS:
        if cfg["train"][k]:
            cfg["train"][k] = os.path.abspath(cfg["train"][k])
    return cfg


def _launch_plan(args):
    """(processes per node, device) from --ngpu/--nproc/--device."""
    if args.ngpu is not None and args.nproc is not None:
        raise ConfigError("give --ngpu (GPUs) or --nproc (CPU processes), not both")
    if args.ngpu is not None:
        if args.ngpu < 0:
            raise ConfigError(f"--ngpu must be >= 0, got {args.ngpu}")
        return max(1, args.ngpu), ("cpu" if args.ngpu == 0 else "cuda")
    if args.nproc is not None:
        if args.nproc < 1:
            raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
        return args.nproc, "cpu" if args.device == "auto" else args.device
    return 1, args.device


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _strip_launch_args(argv: Sequence[str]) -> List[str]:
    """``argv`` without the process options (the torchrun children must not re-launch)."""
    out, i = [], 0
    flags = {f"--{a}" for a in LAUNCH_ARGS} | {"--device"}
    while i < len(argv):
        key = argv[i].split("=", 1)[0]
        if key in flags:
            i += 1 if "=" in argv[i] else 2
            continue
        out.append(argv[i])
        i += 1
    return out


def write_run_sh(exp_dir: str, launch: List[str]) -> None:
    """``<exp_dir>/run.sh``: the command that resumes this experiment from its saved config."""
    from ..io import atomic_path

    exp_dir = os.path.abspath(exp_dir)
    cmd = [sys.executable, "-m", "speechclip_plus.bin.train", "--config", os.path.join(exp_dir, "config.yaml"),
           "--exp_dir", exp_dir, "--resume", *launch]
    text = ("#!/usr/bin/env bash\n"
            "# Resume this experiment (written by speechclip_plus.bin.train); extra options are passed on.\n"
            "set -euo pipefail\n"
            f"cd {shlex.quote(os.getcwd())}\n"
            f"{' '.join(shlex.quote(c) for c in cmd)} \"$@\"\n")
    path = os.path.join(exp_dir, "run.sh")
    with atomic_path(path, mode=0o755) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def dry_run(cfg: dict) -> None:
    """Build the datasets and sampler (when data paths are given) and the model; print what a run would use."""
    from ..data import LengthBucketSampler, SpeechImageDataset
    from ..models.speechclip import build_model

    tc = cfg["train"]
    if tc["train_data"]:
        if not tc["image_embeds"]:
            raise ConfigError("--image_embeds is required with --train_data")
        train = SpeechImageDataset(tc["train_data"], image_embeds=tc["image_embeds"])
        sampler = LengthBucketSampler(train.durations(), tc["batch_size"], tc["max_batch_seconds"], shuffle=True,
                                      seed=tc["seed"], drop_last=True)
        print(f"train: {tc['train_data']}: {len(train)} utterances, {len(sampler)} batches per epoch")
    else:
        print("train: no --train_data given: data not checked")
    if tc["valid_data"]:
        valid = SpeechImageDataset(tc["valid_data"], image_embeds=tc["valid_image_embeds"] or tc["image_embeds"])
        print(f"valid: {tc['valid_data']}: {len(valid)} utterances")
    model = build_model(cfg)
    n_train = sum(p.numel() for p in model.trainable_parameters())
    print(f"model: variant {model.variant}, branches {model.branches}, {n_train:,} trainable of "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")
    print("dry run: OK")


def warn_small_valid_set(cfg: dict) -> Optional[str]:
    """Print (stderr) and return ``eval.retrieval.selection_warning`` for the valid set: the recall chosen by
    ``train.select_metric`` is 1 for any model when the set has too few images."""
    valid = cfg["train"]["valid_data"]
    if not valid:
        return None
    from ..data.datadir import DataDir, DataError
    from ..eval.retrieval import selection_warning

    try:
        utt2img = DataDir(valid).utt2img
    except DataError:
        return None  # the trainer reports the data dir's problem
    if not utt2img:
        return None
    row = {img: k for k, img in enumerate(sorted(set(utt2img.values())))}
    warning = selection_warning([row[img] for img in utt2img.values()], cfg["train"]["select_metric"], valid)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return warning


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, args, overrides = parse_args(argv)
    try:
        cfg = resolve_config(args, overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        nproc, device = _launch_plan(args)
        if args.dry_run:
            dry_run(cfg)
            return 0
        if not args.exp_dir:
            parser.error("--exp_dir is required")
        if device == "cuda":
            import torch

            if torch.cuda.device_count() < nproc:
                raise ConfigError(f"{nproc} GPU(s) requested but {torch.cuda.device_count()} visible "
                                  "(use --ngpu 0 or --nproc N to train on CPU)")
        under_torchrun = "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ
        if (nproc > 1 or args.num_nodes > 1) and not under_torchrun:
            return relaunch(args, argv, nproc, device, cfg)
        if not under_torchrun or int(os.environ.get("RANK", "0")) == 0:
            if os.environ.get(_CHILD_ENV) != "1":
                launch = [] if device == "auto" else ["--device", device]
                if under_torchrun and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
                    launch += [f"--{'ngpu' if device == 'cuda' else 'nproc'}", os.environ["LOCAL_WORLD_SIZE"]]
                os.makedirs(args.exp_dir, exist_ok=True)
                write_run_sh(args.exp_dir, launch)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write to the experiment dir {args.exp_dir}: {e}", file=sys.stderr)
        return 3
    if os.environ.get(_CHILD_ENV) != "1" and os.environ.get("RANK", "0") == "0":
        warn_small_valid_set(cfg)
    return train(cfg, args.exp_dir, device, args.resume, progress=not args.no_progress)


def launch_commands(args, argv: Sequence[str], nproc: int, device: str) -> Tuple[List[str], List[str]]:
    """(the torchrun command of this run with ``nproc`` processes per node, the process options run.sh repeats).

    The children get ``argv`` without the process options (they must not re-launch) plus ``--device``. Several
    nodes need ``--master_port`` (every node must use the same one); one node picks a free port.
    """
    from ..train.distributed import torchrun_command

    if args.num_nodes > 1 and args.master_port is None:
        raise ConfigError("--master_port is required with --num_nodes > 1 (every node must use the same one)")
    port = args.master_port or _free_port()
    launch = [f"--{'ngpu' if device == 'cuda' else 'nproc'}", str(nproc)]
    if args.num_nodes > 1:
        launch += ["--num_nodes", str(args.num_nodes), "--node_rank", str(args.node_rank),
                   "--master_addr", args.master_addr, "--master_port", str(port)]
    if device != "auto" and not (device == "cuda" and args.ngpu):
        launch += ["--device", device]
    child_args = _strip_launch_args(argv) + ["--device", device]
    try:
        cmd = torchrun_command(child_args, nproc, args.num_nodes, args.node_rank, args.master_addr, port)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cmd, launch


def relaunch(args, argv: Sequence[str], nproc: int, device: str, cfg: Optional[dict] = None) -> int:
    """Run this command under torchrun with ``nproc`` processes per node; returns torchrun's exit status.
    Node 0 writes run.sh (and warns about the valid set); the other nodes write nothing."""
    cmd, launch = launch_commands(args, argv, nproc, device)
    if args.node_rank == 0:
        os.makedirs(args.exp_dir, exist_ok=True)
        write_run_sh(args.exp_dir, launch)
        if cfg is not None:
            warn_small_valid_set(cfg)
    env = dict(os.environ, **{_CHILD_ENV: "1"})
    print("launching: " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    return subprocess.call(cmd, env=env)


def train(cfg: dict, exp_dir: str, device: str, resume: bool, progress: bool = True) -> int:
    from ..data import DataError
    from ..train.checkpoint import CheckpointError
    from ..train.distributed import cleanup, init_distributed
    from ..train.trainer import Trainer, TrainingDiverged

    dist_info = init_distributed(device)
    try:
        trainer = Trainer(cfg, exp_dir, dist_info, resume=resume, progress=progress)
        try:
            trainer.fit()
        except TrainingDiverged as e:
            trainer.log.error(str(e))
            return 1
        except OSError as e:  # disk full, read-only file system, ...: the last checkpoint written stays valid
            trainer.log.error(f"error: {e}")  # train.log and the console (a failing log write is reported)
            return 3
        finally:
            trainer.close()  # the log files are closed: nothing is logged after this
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # before the trainer (and its log) exists
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
