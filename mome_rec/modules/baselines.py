"""The usual multi-task over-arches: single-task networks, shared bottom, MoE and MMoE.

With ``h_e`` an expert MLP (``model.hidden_dims``) and ``x`` the concatenated
features, the representation handed to task ``t``'s tower is

* ``single_task``: ``h_t(x)``, one network per task, nothing shared;
* ``shared_bottom``: ``h(x)``, one network for every task (Caruana, 1997);
* ``moe``: ``sum_e g(x)_e h_e(x)``, one softmax gate shared by the tasks
  (the one-gate MoE baseline of Ma et al., KDD 2018);
* ``mmoe``: ``sum_e g_t(x)_e h_e(x)``, one softmax gate per task (Ma et al., KDD 2018).

CGC and PLE live in :mod:`mome_rec.modules.ple`, AITM in :mod:`mome_rec.modules.aitm`.
"""

from typing import List, Sequence

from torch import Tensor

from mome_rec.config import ModelConfig
from mome_rec.modules.experts import ExpertGroup, mix_experts
from mome_rec.modules.gates import TaskGates
from mome_rec.modules.over_arch import OverArch, register_over_arch


class SingleTaskOverArch(OverArch):
    """One MLP per task, the task's tower reading only its own network.

    Args:
        in_features: width F of the input.
        hidden_dims: widths of each task's MLP.
        num_tasks: number of tasks T.
        dropout: dropout probability after each ReLU.
        batch_norm: whether each layer has a BatchNorm.

    Shape:
        input ``B x F``; output T tensors of ``B x hidden_dims[-1]``.
    """

    def __init__(
        self, in_features: int, hidden_dims: Sequence[int], num_tasks: int, *, dropout: float = 0.2, batch_norm: bool = True
    ) -> None:
        super().__init__(in_features, num_tasks, hidden_dims[-1])
        self.networks = ExpertGroup(in_features, hidden_dims, num_tasks, dropout=dropout, batch_norm=batch_norm)

    def forward(self, features: Tensor) -> List[Tensor]:
        return list(self.networks(features).unbind(dim=1))


class SharedBottomOverArch(OverArch):
    """One MLP whose output every task's tower reads.

    Args:
        in_features: width F of the input.
        hidden_dims: widths of the shared MLP.
        num_tasks: number of tasks T.
        dropout: dropout probability after each ReLU.
        batch_norm: whether each layer has a BatchNorm.

    Shape:
        input ``B x F``; output T references to one ``B x hidden_dims[-1]`` tensor.
    """

    def __init__(
        self, in_features: int, hidden_dims: Sequence[int], num_tasks: int, *, dropout: float = 0.2, batch_norm: bool = True
    ) -> None:
        super().__init__(in_features, num_tasks, hidden_dims[-1])
        self.bottom = ExpertGroup(in_features, hidden_dims, 1, dropout=dropout, batch_norm=batch_norm)

    def forward(self, features: Tensor) -> List[Tensor]:
        shared = self.bottom(features).squeeze(1)
        return [shared] * self.num_tasks


class MixtureOverArch(OverArch):
    """Experts mixed by softmax gates: one gate per task (MMoE) or one gate for all tasks (MoE).

    Args:
        in_features: width F of the input; the gates read it too.
        hidden_dims: widths of each expert MLP.
        num_experts: number of experts E.
        num_tasks: number of tasks T.
        gate_per_task: True for MMoE, False for MoE.
        dropout: dropout probability after each ReLU.
        batch_norm: whether each expert layer has a BatchNorm.

    Shape:
        input ``B x F``; output T tensors of ``B x hidden_dims[-1]``.

    Example::

        mmoe = MixtureOverArch(2111, [512, 256], num_experts=8, num_tasks=2, gate_per_task=True)
        click, conversion = mmoe(torch.randn(32, 2111))  # 32 x 256 each
    """

    def __init__(
        self,
        in_features: int,
        hidden_dims: Sequence[int],
        num_experts: int,
        num_tasks: int,
        *,
        gate_per_task: bool,
        dropout: float = 0.2,
        batch_norm: bool = True,
    ) -> None:
        super().__init__(in_features, num_tasks, hidden_dims[-1])
        self.gate_per_task = gate_per_task
        self.experts = ExpertGroup(in_features, hidden_dims, num_experts, dropout=dropout, batch_norm=batch_norm)
        self.gates = TaskGates(in_features, num_experts, num_tasks if gate_per_task else 1)

    def forward(self, features: Tensor) -> List[Tensor]:
        mixed = mix_experts(self.gates(features), self.experts(features))  # B x (T or 1) x D
        if self.gate_per_task:
            return list(mixed.unbind(dim=1))
        return [mixed.squeeze(1)] * self.num_tasks


# --------------------------------------------------------------- registration


def build_single_task(in_features: int, num_tasks: int, cfg: ModelConfig) -> SingleTaskOverArch:
    return SingleTaskOverArch(in_features, cfg.hidden_dims, num_tasks, dropout=cfg.dropout, batch_norm=cfg.batch_norm)


def build_shared_bottom(in_features: int, num_tasks: int, cfg: ModelConfig) -> SharedBottomOverArch:
    return SharedBottomOverArch(in_features, cfg.hidden_dims, num_tasks, dropout=cfg.dropout, batch_norm=cfg.batch_norm)


def build_moe(in_features: int, num_tasks: int, cfg: ModelConfig) -> MixtureOverArch:
    return MixtureOverArch(
        in_features, cfg.hidden_dims, cfg.num_experts, num_tasks,
        gate_per_task=False, dropout=cfg.dropout, batch_norm=cfg.batch_norm,
    )


def build_mmoe(in_features: int, num_tasks: int, cfg: ModelConfig) -> MixtureOverArch:
    return MixtureOverArch(
        in_features, cfg.hidden_dims, cfg.num_experts, num_tasks,
        gate_per_task=True, dropout=cfg.dropout, batch_norm=cfg.batch_norm,
    )


register_over_arch("single_task", build_single_task)
register_over_arch("shared_bottom", build_shared_bottom)
register_over_arch("moe", build_moe)
register_over_arch("mmoe", build_mmoe)
