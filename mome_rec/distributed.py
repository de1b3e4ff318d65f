"""Process-group set-up shared by one-process and many-process jobs.

Under ``torchrun`` (or TorchX) the environment names the rank and the store; a
plain ``mome-rec train`` becomes a one-process group on a free loopback port,
so the training code takes the same DistributedModelParallel path either way.
"""

import dataclasses
import logging
import os
import socket
from typing import Any, List, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DistEnv:
    """Rank, world size and the device this process computes on."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(backend: Optional[str] = None) -> DistEnv:
    """Join the process group named by the environment, or start a one-process one.

    ``backend`` defaults to nccl when CUDA is present, else gloo. The device is
    ``cuda:LOCAL_RANK`` with CUDA, else the CPU.
    """
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    backend = backend or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            # A one-process group on a fresh loopback port; the environment is left
            # untouched so that a later job in the same process starts cleanly.
            init_method = f"tcp://127.0.0.1:{free_port()}"
            dist.init_process_group(backend=backend, init_method=init_method, rank=0, world_size=1)

    rank = dist.get_rank()
    world_size = dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    logger.info("rank %d of %d on %s (%s)", rank, world_size, device, backend)
    return DistEnv(rank, world_size, local_rank, local_world_size, device, backend)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(value: Any) -> List[Any]:
    """Gather one picklable object from every rank (works on gloo and nccl)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_int(value: int, op: str = "max") -> int:
    """Reduce one integer over all ranks with ``max``, ``min`` or ``sum``."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    ops = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], dtype=torch.int64, device=backend_device)
    dist.all_reduce(tensor, op=ops[op])
    return int(tensor.item())


def all_reduce_mean(value: float) -> float:
    """Return the mean of one float over all ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], dtype=torch.float64, device=backend_device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
