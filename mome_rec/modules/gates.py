"""Per-task softmax gates that mix the experts, as in MMoE."""

import torch
from torch import Tensor, nn


class TaskGates(nn.Module):
    """Gate weights ``g_t(x) = softmax(x W_t^T + b_t)`` over the experts, for every task ``t``.

    All tasks share one ``Linear(in_features, num_tasks * num_experts)``, so the
    gates of every task come from one matmul.

    Args:
        in_features: width F of the input.
        num_experts: number of experts E.
        num_tasks: number of tasks T.

    Shape:
        input ``B x F``, output ``B x T x E`` with every row summing to 1 over E.

    Example::

        gates = TaskGates(in_features=16, num_experts=4, num_tasks=2)
        weights = gates(torch.randn(8, 16))  # 8 x 2 x 4
    """

    def __init__(self, in_features: int, num_experts: int, num_tasks: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.num_tasks = num_tasks
        self.linear = nn.Linear(in_features, num_tasks * num_experts)

    def forward(self, features: Tensor) -> Tensor:
        logits = self.linear(features).view(features.shape[0], self.num_tasks, self.num_experts)
        return torch.softmax(logits, dim=-1)
