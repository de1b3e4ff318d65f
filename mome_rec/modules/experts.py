"""A group of expert MLPs of one shape, computed together with batched matmuls.

Every baseline over-arch is built from such groups: a shared bottom is a group
of one, single-task networks are a group of one expert per task, and MMoE, CGC
and PLE mix the outputs of larger groups with softmax gates. Layer ``l`` of
expert ``e`` computes

    h_e^(l+1) = Dropout(ReLU(BN_e(h_e^(l) W_e^(l)T + b_e^(l))))

with ``W_e^(l)`` of shape ``out x in``. The weights of all experts of a layer
are one ``E x out x in`` parameter, so a layer is one matmul for every expert,
whether they read the same input (``B x in``) or one input each (``B x E x in``).
"""

import math
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ExpertLayer(nn.Module):
    """One layer of ``num_experts`` independent experts: Linear, BatchNorm, ReLU, dropout.

    Args:
        in_features: input width of each expert.
        out_features: output width of each expert.
        num_experts: number of experts E.
        dropout: dropout probability after the ReLU.
        batch_norm: whether to normalise the pre-activations, one BatchNorm
            channel per expert and output neuron (``E * out`` channels,
            channel ``e * out + o`` belonging to expert ``e``).

    Shape:
        input ``B x in`` (every expert reads it) or ``B x E x in`` (expert ``e``
        reads ``[:, e]``); output ``B x E x out``.

    Attributes:
        weight: ``E x out x in``, each expert Kaiming-uniform initialised for a
            ReLU (bound ``sqrt(6 / in)``), as :class:`~mome_rec.modules.mome_layer.MoMELayer`.
        bias: ``E x out``, zero-initialised.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int, *, dropout: float, batch_norm: bool) -> None:
        super().__init__()
        if min(in_features, out_features, num_experts) < 1:
            raise ValueError(
                f"ExpertLayer: widths and num_experts must be positive, got {in_features}, {out_features}, {num_experts}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features))
        self.batch_norm = nn.BatchNorm1d(num_experts * out_features) if batch_norm else None
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = math.sqrt(6.0 / self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.bias)
        if self.batch_norm is not None:
            self.batch_norm.reset_parameters()

    def forward(self, features: Tensor) -> Tensor:
        batch = features.shape[0]
        experts, out_features, in_features = self.weight.shape
        if features.dim() == 2:
            # B x in @ in x (E * out): column e * out + o is expert e's neuron o.
            stacked = self.weight.permute(2, 0, 1).reshape(in_features, experts * out_features)
            hidden = torch.addmm(self.bias.reshape(-1), features, stacked)
        elif features.dim() == 3 and features.shape[1] == experts:
            # (E x B x in) @ (E x in x out) -> E x B x out, then B x (E * out).
            hidden = torch.baddbmm(self.bias.unsqueeze(1), features.transpose(0, 1), self.weight.transpose(1, 2))
            hidden = hidden.transpose(0, 1).reshape(batch, experts * out_features)
        else:
            raise ValueError(
                f"ExpertLayer: expected input B x {in_features} or B x {experts} x {in_features}, got {list(features.shape)}"
            )

        if self.batch_norm is not None:
            hidden = self.batch_norm(hidden)
        hidden = self.dropout(F.relu(hidden))
        return hidden.view(batch, experts, out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}"


class ExpertGroup(nn.Module):
    """``num_experts`` MLPs with the hidden widths ``dims``, run side by side.

    Args:
        in_features: input width of each expert.
        dims: hidden widths; the last is each expert's output width.
        num_experts: number of experts E.
        dropout: dropout probability after each ReLU.
        batch_norm: whether each layer has a BatchNorm.

    Shape:
        input ``B x in`` (shared) or ``B x E x in`` (one input per expert);
        output ``B x E x dims[-1]``.

    Example::

        experts = ExpertGroup(118, [128, 64], num_experts=8, dropout=0.2, batch_norm=True)
        outputs = experts(torch.randn(32, 118))  # 32 x 8 x 64
    """

    def __init__(
        self, in_features: int, dims: Sequence[int], num_experts: int, *, dropout: float = 0.2, batch_norm: bool = True
    ) -> None:
        super().__init__()
        if not dims:
            raise ValueError("ExpertGroup: dims must name at least one hidden width")
        widths: List[int] = [in_features] + list(dims)
        self.in_features = in_features
        self.output_dim = widths[-1]
        self.num_experts = num_experts
        self.layers = nn.ModuleList(
            ExpertLayer(widths[index], widths[index + 1], num_experts, dropout=dropout, batch_norm=batch_norm)
            for index in range(len(dims))
        )

    def forward(self, features: Tensor) -> Tensor:
        hidden = features
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


def mix_experts(weights: Tensor, expert_outputs: Tensor) -> Tensor:
    """Return the gate-weighted sums ``y_t = sum_e weights[:, t, e] * expert_outputs[:, e]``.

    Args:
        weights: ``B x T x E`` gate weights (each row sums to 1 for softmax gates).
        expert_outputs: ``B x E x D``.

    Returns:
        ``B x T x D``.
    """
    return torch.bmm(weights, expert_outputs)
