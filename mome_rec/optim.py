"""Optimisers: fused in-backward updates for the embedding tables, Adam for the dense part."""

import logging
from typing import Iterable, List

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

logger = logging.getLogger(__name__)

_EMBEDDING_OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}


def embedding_optimizer_name(requested: str, device: torch.device) -> str:
    """The table optimizer that will run: fbgemm's CPU kernels reject fused Adam, so Adagrad stands in."""
    if requested == "adam" and device.type == "cpu":
        logger.warning("embedding_optimizer adam is not supported by fbgemm on the CPU; using adagrad instead")
        return "adagrad"
    return requested


def apply_embedding_optimizer(tables: torch.nn.Module, name: str, lr: float) -> None:
    """Attach the optimizer that DistributedModelParallel fuses into the tables' backward."""
    apply_optimizer_in_backward(_EMBEDDING_OPTIMIZERS[name], tables.parameters(), {"lr": lr})


class DenseOptimizer(torch.optim.Optimizer):
    """Adam on the replicated dense parameters, averaging their gradients over ranks first.

    The dense part is replicated by hand rather than with DistributedDataParallel
    because the MoME phase switch replaces its parameters with smaller ones, which
    a DDP wrapper built before the switch could not follow. All gradients go in
    one flattened all-reduce per step.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float) -> None:
        self.params: List[torch.nn.Parameter] = [param for param in params if param.requires_grad]
        self.adam = torch.optim.Adam(self.params, lr=lr)
        self.param_groups = self.adam.param_groups
        self.defaults = self.adam.defaults
        self.state = self.adam.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adam.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None) -> None:  # type: ignore[override]
        self.average_gradients()
        self.adam.step()

    def average_gradients(self) -> None:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        grads = [param.grad for param in self.params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(averaged)

    def state_dict(self):  # type: ignore[override]
        return self.adam.state_dict()

    def load_state_dict(self, state_dict) -> None:  # type: ignore[override]
        self.adam.load_state_dict(state_dict)


def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s dense parameters and buffers to every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)
