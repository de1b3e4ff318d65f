"""Achieved GFLOP/s of the over-arch next to plain ``torch.mm``/``torch.bmm`` at the same shapes.

The FLOPs counted are those of the matrix products: each layer's (``2 B in
E out``) and the gates' (``2 B F T E``). A forward pass does each product once.
A training pass (forward and backward, the input requiring a gradient) does it
three times: forward, gradient of the input and gradient of the weight.
Everything else (masks, BatchNorm, ReLU, dropout, the gate softmax and the
mixing of the experts) counts as time, not as FLOPs, so the ratio to the
reference is the share of the over-arch's time spent at matmul speed.

The reference runs the same products on contiguous random operands, each as
one ``torch.mm`` (a layer reading the shared input, the gates) or one
``torch.bmm`` (a layer with one input per expert), in the same repetitions.
"""

import dataclasses
import logging
from typing import Any, Callable, Dict, List, Sequence

import torch
from torch import Tensor, nn

from benchmarks.common import Dimensions, median_seconds, synthetic_batch, time_interleaved
from mome_rec.modules import build_over_arch
from mome_rec.modules.over_arch import OVER_ARCHS

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Gemm:
    """A product ``(groups x) m x k @ k x n``: ``groups`` 0 for one ``torch.mm``, else a ``torch.bmm``."""

    m: int
    k: int
    n: int
    groups: int = 0

    @property
    def flops(self) -> int:
        return 2 * max(self.groups, 1) * self.m * self.k * self.n


def mome_gemms(layer_widths: Sequence[Sequence[int]], num_experts: int, batch: int, in_features: int, num_tasks: int) -> List[Gemm]:
    """Return the products of an expert-phase MoME (or MMoE) over-arch.

    Args:
        layer_widths: ``(in, out)`` of each layer, per expert.
        num_experts: E. The first layer reads the shared input, so its experts
            form one ``B x in @ in x (E * out)`` product, the later layers one
            ``bmm`` over the experts.
        batch: B.
        in_features: F, the width the gates read.
        num_tasks: T.
    """
    gemms = []
    for index, (width_in, width_out) in enumerate(layer_widths):
        if index == 0:
            gemms.append(Gemm(batch, width_in, num_experts * width_out))
        else:
            gemms.append(Gemm(batch, width_in, width_out, groups=num_experts))
    gemms.append(Gemm(batch, in_features, num_tasks * num_experts))
    return gemms


def total_flops(gemms: Sequence[Gemm], training: bool) -> int:
    return sum(gemm.flops for gemm in gemms) * (3 if training else 1)


def reference_run(gemms: Sequence[Gemm], training: bool) -> Callable[[], None]:
    """Return a function running the products (and, for ``training``, their two backward products) once."""
    calls = []
    for gemm in gemms:
        shapes = [(gemm.m, gemm.k, gemm.n)]
        if training:
            shapes += [(gemm.m, gemm.n, gemm.k), (gemm.k, gemm.m, gemm.n)]
        for m, k, n in shapes:
            if gemm.groups:
                left, right = torch.randn(gemm.groups, m, k), torch.randn(gemm.groups, k, n)
                calls.append((torch.bmm, left, right))
            else:
                calls.append((torch.mm, torch.randn(m, k), torch.randn(k, n)))

    def run() -> None:
        for function, left, right in calls:
            function(left, right)

    return run


def forward_run(over_arch: nn.Module, features: Tensor) -> Callable[[], None]:
    """Return a function running ``over_arch`` once in eval mode, without autograd."""

    def run() -> None:
        over_arch.eval()
        with torch.inference_mode():
            over_arch(features)

    return run


def training_run(over_arch: nn.Module, features: Tensor) -> Callable[[], None]:
    """Return a function running ``over_arch`` forward and backward once in training mode."""
    leaf = features.detach().clone().requires_grad_(True)

    def run() -> None:
        over_arch.train()
        over_arch.zero_grad(set_to_none=True)
        leaf.grad = None
        torch.stack(over_arch(leaf)).sum().backward()

    return run


def run_over_arch(dims: Dimensions, repeats: int) -> Dict[str, Any]:
    """Time MoME (expert phase, unpruned) and MMoE over-arches next to the reference products."""
    features, _ = synthetic_batch(dims)
    torch.manual_seed(0)
    over_arches: Dict[str, nn.Module] = {}
    mome = build_over_arch("mome", dims.in_features, dims.num_tasks, dims.model_config("mome"))
    mome.start_expert_phase()
    over_arches["mome_expert_phase"] = mome
    if "mmoe" in OVER_ARCHS:
        over_arches["mmoe"] = build_over_arch("mmoe", dims.in_features, dims.num_tasks, dims.model_config("mmoe"))

    widths = list(zip([dims.in_features] + list(dims.hidden_dims[:-1]), dims.hidden_dims))
    gemms = mome_gemms(widths, dims.num_experts, dims.batch_size, dims.in_features, dims.num_tasks)
    timers: Dict[str, Callable[[], None]] = {
        "reference_forward": reference_run(gemms, training=False),
        "reference_training": reference_run(gemms, training=True),
    }
    for name, over_arch in over_arches.items():
        timers[f"{name}_forward"] = forward_run(over_arch, features)
        timers[f"{name}_training"] = training_run(over_arch, features)

    logger.info("over-arch: timing %s, %d repeats", ", ".join(timers), repeats)
    seconds = {name: median_seconds(values) for name, values in time_interleaved(timers, repeats).items()}

    result: Dict[str, Any] = {"gemms": [dataclasses.asdict(gemm) for gemm in gemms], "seconds": seconds, "gflops": {}}
    for mode in ("forward", "training"):
        flops = total_flops(gemms, training=mode == "training")
        reference = flops / seconds[f"reference_{mode}"]["median"] / 1e9
        result["gflops"][f"torch_mm_{mode}"] = reference
        for name in over_arches:
            achieved = flops / seconds[f"{name}_{mode}"]["median"] / 1e9
            result["gflops"][f"{name}_{mode}"] = achieved
            result.setdefault("fraction_of_torch_mm", {})[f"{name}_{mode}"] = achieved / reference
    return result


def describe(result: Dict[str, Any]) -> List[List[str]]:
    rows = []
    for name, value in result["gflops"].items():
        fraction = result.get("fraction_of_torch_mm", {}).get(name)
        rows.append([f"over-arch {name}", f"{value:.1f} GFLOP/s", "" if fraction is None else f"{100 * fraction:.0f} % of torch.mm"])
    return rows
