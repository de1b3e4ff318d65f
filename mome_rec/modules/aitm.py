"""AITM: adaptive information transfer between sequential tasks (Xi et al., KDD 2021).

Each task has its own network ``q_t = h_t(x)``. For ``t >= 1`` (conversion
after click) the information of the previous task is carried over and mixed in
by the attention transfer unit (AIT):

    p_{t-1} = ReLU(BN(Linear(z_{t-1})))                   the transferred information
    u in {z'_t, p_{t-1}},  a_u = softmax_u(<Q u, K u> / sqrt(D)),  z_t = sum_u a_u V u

with ``z'_t = q_t``, ``z_0 = q_0`` and ``Q``, ``K``, ``V`` linear maps ``D -> D``.
``z_t`` goes to task ``t``'s tower. The tasks keep their configured order, so
the first label column must be the earlier step of the funnel.

Here the per-task networks are the over-arch and the transfer happens before
the towers, as in torch-rechub 0.9.0's AITM. In the paper the transfer sits
inside each task's tower. NOTE: the paper's behavioural expectation
calibrator, a loss term ``max(y_t - y_{t-1}, 0)``, is not implemented because
the over-arch does not see the logits.
"""

import math
from typing import List, Sequence

import torch
from torch import Tensor, nn

from mome_rec.config import ModelConfig
from mome_rec.modules.experts import ExpertGroup
from mome_rec.modules.over_arch import OverArch, register_over_arch


class AttentionTransfer(nn.Module):
    """The AIT unit: self-attention over a task's own representation and the transferred one.

    Args:
        dim: width D of both representations.

    Shape:
        ``own`` and ``transferred`` ``B x D``; output ``B x D``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)

    def forward(self, own: Tensor, transferred: Tensor) -> Tensor:
        inputs = torch.stack([own, transferred], dim=1)  # B x 2 x D
        scores = (self.query(inputs) * self.key(inputs)).sum(dim=-1) / math.sqrt(self.dim)  # B x 2
        weights = torch.softmax(scores, dim=1).unsqueeze(-1)
        return (weights * self.value(inputs)).sum(dim=1)


class AITMOverArch(OverArch):
    """One network per task, each task after the first receiving its predecessor's information through AIT.

    Args:
        in_features: width F of the input.
        hidden_dims: widths of each task's network; D is ``hidden_dims[-1]``.
        num_tasks: number of tasks T, in funnel order.
        dropout: dropout probability after each ReLU of the task networks.
        batch_norm: whether the task networks and the transfer layers have BatchNorm.

    Shape:
        input ``B x F``; output T tensors of ``B x D``.
    """

    def __init__(
        self, in_features: int, hidden_dims: Sequence[int], num_tasks: int, *, dropout: float = 0.2, batch_norm: bool = True
    ) -> None:
        super().__init__(in_features, num_tasks, hidden_dims[-1])
        dim = hidden_dims[-1]
        self.networks = ExpertGroup(in_features, hidden_dims, num_tasks, dropout=dropout, batch_norm=batch_norm)
        self.transfers = nn.ModuleList(_transfer_layer(dim, batch_norm) for _ in range(num_tasks - 1))
        self.attention = nn.ModuleList(AttentionTransfer(dim) for _ in range(num_tasks - 1))

    def forward(self, features: Tensor) -> List[Tensor]:
        outputs = list(self.networks(features).unbind(dim=1))
        for task in range(1, self.num_tasks):
            transferred = self.transfers[task - 1](outputs[task - 1])
            outputs[task] = self.attention[task - 1](outputs[task], transferred)
        return outputs


def _transfer_layer(dim: int, batch_norm: bool) -> nn.Sequential:
    layers: List[nn.Module] = [nn.Linear(dim, dim)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(dim))
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def build_aitm(in_features: int, num_tasks: int, cfg: ModelConfig) -> AITMOverArch:
    return AITMOverArch(in_features, cfg.hidden_dims, num_tasks, dropout=cfg.dropout, batch_norm=cfg.batch_norm)


register_over_arch("aitm", build_aitm)
