"""Process-group set-up for ``torchrun`` launches, small collectives, and the torchrun re-launch.

``torchrun`` exports RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/PORT). ``init_distributed`` reads them:
without them (or with WORLD_SIZE=1) the run is single-process and nothing is initialised. The backend is
NCCL when the process drives a GPU and gloo otherwise. Batches are split over ranks by the data sampler
(the union of the rank slices is the single-process global batch) and the contrastive loss all-gathers
embeddings, so a run's result does not depend on the world size (up to BatchNorm statistics, which are
per rank).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def init_distributed(device: str = "auto", backend: Optional[str] = None) -> DistInfo:
    """Initialise ``torch.distributed`` from the torchrun environment; return this process's place.

    ``device``: auto (the local GPU when CUDA is available, else CPU) | cpu | cuda.
    """
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but CUDA is not available")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(local)
    dev = f"cuda:{local}" if use_cuda else "cpu"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"))
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_tensor(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum`` | ``min`` | ``max``) when distributed; returns ``t``."""
    if is_initialized():
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        dist.all_reduce(t, op=ops[op])
    return t


def all_gather_object(obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` when single-process)."""
    if not is_initialized():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def torchrun_command(
    module_args: Sequence[str],
    nproc_per_node: int,
    num_nodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
    module: str = "speechclip_plus.bin.train",
    python: Optional[str] = None,
) -> List[str]:
    """The ``python -m torch.distributed.run ... -m <module> <module_args>`` command line."""
    if nproc_per_node < 1 or num_nodes < 1 or not 0 <= node_rank < num_nodes:
        raise ValueError(f"bad launch: nproc_per_node={nproc_per_node}, num_nodes={num_nodes}, "
                         f"node_rank={node_rank}")
    return [
        python or sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc_per_node}", f"--nnodes={num_nodes}", f"--node_rank={node_rank}",
        f"--master_addr={master_addr}", f"--master_port={master_port}",
        "-m", module, *module_args,
    ]
