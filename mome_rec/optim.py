"""Optimisers of the three kinds of parameters, and their state in a checkpoint.

* Sharded embedding tables (table_wise, column_wise, ...): TorchRec fuses the
  optimizer named by ``train.embedding_optimizer`` into their backward pass, so
  they are updated while the gradients are computed and never hold a ``.grad``.
* data_parallel tables: TorchRec's dense kernel gives them ordinary gradients,
  averaged over the ranks by the DistributedDataParallel wrapper that TorchRec
  puts around their lookup, but no optimizer. The same optimizer class, with
  ``train.embedding_lr``, steps them after the backward pass.
* The dense part (over-arch, gates, towers): Adam, with gradients averaged here.

:class:`OptimizerChain` steps the last two together, as TorchRec's train
pipeline expects a single optimizer.
"""

import logging
from typing import Dict, Iterable, List, Optional, Sequence

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
    """Return the table optimizer that will run on ``device``.

    fbgemm-gpu's CPU kernels (fbgemm-gpu-cpu 1.8.0) reject fused Adam, so a CPU
    run that requests ``adam`` uses ``adagrad`` and logs that once, on rank 0.
    """
    if requested == "adam" and torch.device(device).type == "cpu":
        if not dist.is_initialized() or dist.get_rank() == 0:
            logger.warning("train.embedding_optimizer adam has no fused CPU kernel in fbgemm; using adagrad instead")
        return "adagrad"
    return requested


def apply_embedding_optimizer(tables: torch.nn.Module, name: str, lr: float) -> None:
    """Attach the optimizer that DistributedModelParallel fuses into the tables' backward."""
    apply_optimizer_in_backward(_EMBEDDING_OPTIMIZERS[name], tables.parameters(), {"lr": lr})


def replicated_table_parameters(model: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    """Return the data_parallel embedding tables of a DistributedModelParallel model, by name.

    These are the sparse-arch parameters without a fused optimizer: TorchRec
    marks every sharded table's weight with ``_in_backward_optimizers``, also
    on ranks that hold none of its rows.
    """
    return {
        name: param
        for name, param in model.named_parameters()
        if ".sparse_arch." in f".{name}" and param.requires_grad and param.numel() > 0
        and not hasattr(param, "_in_backward_optimizers")
    }


def build_table_optimizer(name: str, params: Sequence[torch.nn.Parameter], lr: float) -> Optional[torch.optim.Optimizer]:
    """Return the optimizer ``name`` over the data_parallel tables ``params``, or None without any.

    NOTE: this is torch's optimizer, not fbgemm's fused one. For ``adagrad``
    both keep a per-element sum of squared gradients, so the first step moves
    each touched weight by ``lr`` in both. Their epsilon differs: 1e-10 here,
    1e-8 in fbgemm.
    """
    if not params:
        return None
    return _EMBEDDING_OPTIMIZERS[name](list(params), lr=lr)


class DenseOptimizer:
    """Adam on the replicated dense parameters, averaging gradients and buffers over ranks first.

    The dense part is replicated by hand rather than with DistributedDataParallel
    because the MoME phase switch replaces its parameters with smaller ones, which
    a DDP wrapper built before the switch could not follow.

    Each :meth:`step` runs one flattened all-reduce holding every gradient and
    every floating-point buffer (BatchNorm running statistics), then Adam. The
    buffers become the mean over ranks, so the replicas stay identical.

    NOTE: the mean of per-rank running variances is not the variance of the
    global batch. It equals the one-rank statistics only when the ranks' batch
    means agree.

    Args:
        params: the dense parameters; those without ``requires_grad`` are skipped.
        lr: Adam's learning rate.
        buffers: tensors to keep equal on every rank; non-floating ones are skipped.
        mask_params: those of ``params`` that are mask means. They form a second
            Adam parameter group with learning rate ``mask_lr``.
        mask_lr: learning rate of ``mask_params``; None means ``lr``.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        buffers: Iterable[torch.Tensor] = (),
        mask_params: Iterable[torch.nn.Parameter] = (),
        mask_lr: Optional[float] = None,
    ) -> None:
        self.params: List[torch.nn.Parameter] = [param for param in params if param.requires_grad]
        self.buffers: List[torch.Tensor] = [buffer for buffer in buffers if buffer.is_floating_point()]
        masks = {id(param) for param in mask_params}
        groups = [
            {"params": [param for param in self.params if id(param) not in masks], "lr": lr},
            {"params": [param for param in self.params if id(param) in masks], "lr": lr if mask_lr is None else mask_lr},
        ]
        self.adam = torch.optim.Adam([group for group in groups if group["params"]], lr=lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adam.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.average_over_ranks()
        self.adam.step()

    def average_over_ranks(self) -> None:
        """Replace every gradient and buffer by its mean over the ranks."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        tensors = [param.grad for param in self.params] + self.buffers
        flat = _flatten_dense_tensors(tensors)
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for tensor, averaged in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
            tensor.copy_(averaged)


class OptimizerChain:
    """Call ``zero_grad`` and ``step`` of several optimizers in order; TorchRec's pipeline takes one."""

    def __init__(self, optimizers: Sequence) -> None:
        self.optimizers = [optimizer for optimizer in optimizers if optimizer is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


def optimizer_state(optimizer: Optional[torch.optim.Optimizer], named_params: Dict[str, torch.nn.Parameter]) -> Dict:
    """Return ``{parameter name: {state name: tensor}}``, the live state of ``optimizer``.

    Parameters are keyed by name rather than position so that the state of a
    replicated parameter loads whatever else changed. The state is created
    first if the optimizer has not stepped yet (see :func:`initialize_state`),
    so the returned tensors can be loaded into in place.
    """
    if optimizer is None:
        return {}
    initialize_state(optimizer)
    by_param = {id(param): name for name, param in named_params.items()}
    state = {}
    for param, values in optimizer.state.items():
        name = by_param.get(id(param))
        if name is None:
            raise ValueError("optimizer_state: a parameter of the optimizer is missing from named_params")
        state[name] = {key: value for key, value in values.items() if isinstance(value, torch.Tensor)}
    return state


@torch.no_grad()
def initialize_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the state of an optimizer that has not stepped, without changing any parameter.

    One step with all-zero gradients creates Adam's and Adagrad's moments at 0
    and moves no weight (no weight decay is configured). Gradients are reset to
    None afterwards. SGD has no state and is left alone.
    """
    params = [param for group in optimizer.param_groups for param in group["params"]]
    if all(param in optimizer.state for param in params) or isinstance(optimizer, torch.optim.SGD):
        return
    saved = [param.grad for param in params]
    for param in params:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    for param, grad in zip(params, saved):
        param.grad = grad


def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s dense parameters and buffers to every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)
