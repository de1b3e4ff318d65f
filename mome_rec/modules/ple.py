"""CGC and PLE: shared and task-specific experts (Tang et al., RecSys 2020).

A CGC (customized gate control) level contains ``S`` shared experts and ``K``
experts per task. Task ``t``'s gate mixes its own ``K`` experts and the ``S``
shared ones:

    y_t = sum_{e in E_t ∪ E_shared} g_t(x_t)_e h_e(x_e)

where ``x_t`` is task ``t``'s input and a shared expert reads the shared input.
PLE stacks levels. Every level but the last also outputs a shared
representation, mixed by a shared gate over all ``T * K + S`` experts, which
the next level's shared experts and shared gate read. On the first level every
input is the over-arch's input. ``cgc`` is one level, ``ple`` two.

The experts of a level are MLPs with ``model.hidden_dims``, so a level after
the first maps ``hidden_dims[-1]`` to ``hidden_dims[-1]`` through the same
hidden widths, as in torch-rechub 0.9.0's PLE.
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from mome_rec.config import ModelConfig
from mome_rec.errors import ConfigError
from mome_rec.modules.experts import ExpertGroup, mix_experts
from mome_rec.modules.over_arch import OverArch, register_over_arch


class CGCLevel(nn.Module):
    """One extraction level: shared experts, per-task experts and their softmax gates.

    Args:
        in_features: width of every input of the level.
        hidden_dims: widths of each expert MLP.
        num_shared: number of shared experts S.
        num_per_task: number of experts of each task K.
        num_tasks: number of tasks T.
        shared_output: also return the shared representation (every PLE level but the last).
        dropout: dropout probability after each ReLU.
        batch_norm: whether each expert layer has a BatchNorm.

    Shape:
        input: one ``B x in`` tensor read by every expert and gate, or a list of
        T + 1 tensors (the tasks' inputs, then the shared input). Output: T
        tensors of ``B x hidden_dims[-1]``, plus the shared one with ``shared_output``.
    """

    def __init__(
        self,
        in_features: int,
        hidden_dims: Sequence[int],
        num_shared: int,
        num_per_task: int,
        num_tasks: int,
        *,
        shared_output: bool,
        dropout: float,
        batch_norm: bool,
    ) -> None:
        super().__init__()
        if num_shared < 1 or num_per_task < 1:
            raise ValueError(f"CGCLevel: need at least one shared and one per-task expert, got {num_shared}, {num_per_task}")
        self.num_tasks = num_tasks
        self.num_per_task = num_per_task
        # Task t's experts are indices t * K .. t * K + K - 1 of the group.
        self.task_experts = ExpertGroup(in_features, hidden_dims, num_tasks * num_per_task, dropout=dropout, batch_norm=batch_norm)
        self.shared_experts = ExpertGroup(in_features, hidden_dims, num_shared, dropout=dropout, batch_norm=batch_norm)
        self.task_gates = nn.ModuleList(nn.Linear(in_features, num_per_task + num_shared) for _ in range(num_tasks))
        self.shared_gate: Optional[nn.Linear] = (
            nn.Linear(in_features, num_tasks * num_per_task + num_shared) if shared_output else None
        )

    def forward(self, inputs) -> List[Tensor]:
        if isinstance(inputs, Tensor):
            task_inputs, shared_input = [inputs] * self.num_tasks, inputs
            # Every task expert reads the same input: one B x in matmul.
            task_outputs = self.task_experts(inputs)
        else:
            task_inputs, shared_input = list(inputs[:-1]), inputs[-1]
            per_expert = torch.stack(task_inputs, dim=1).repeat_interleave(self.num_per_task, dim=1)
            task_outputs = self.task_experts(per_expert)  # B x (T * K) x D
        shared_outputs = self.shared_experts(shared_input)  # B x S x D

        outputs = []
        for task, gate in enumerate(self.task_gates):
            own = task_outputs[:, task * self.num_per_task : (task + 1) * self.num_per_task]
            candidates = torch.cat([own, shared_outputs], dim=1)
            weights = torch.softmax(gate(task_inputs[task]), dim=-1).unsqueeze(1)  # B x 1 x (K + S)
            outputs.append(mix_experts(weights, candidates).squeeze(1))
        if self.shared_gate is not None:
            candidates = torch.cat([task_outputs, shared_outputs], dim=1)
            weights = torch.softmax(self.shared_gate(shared_input), dim=-1).unsqueeze(1)
            outputs.append(mix_experts(weights, candidates).squeeze(1))
        return outputs


class PLEOverArch(OverArch):
    """Progressive layered extraction: ``num_levels`` CGC levels; one level is CGC.

    Args:
        in_features: width F of the input.
        hidden_dims: widths of each expert MLP.
        num_shared: shared experts S per level.
        num_per_task: experts per task K per level.
        num_tasks: number of tasks T.
        num_levels: number of levels (1 for CGC, 2 for PLE).
        dropout: dropout probability after each ReLU.
        batch_norm: whether each expert layer has a BatchNorm.

    Shape:
        input ``B x F``; output T tensors of ``B x hidden_dims[-1]``.

    Example::

        ple = PLEOverArch(118, [128, 64], num_shared=4, num_per_task=2, num_tasks=2, num_levels=2)
        income, never_married = ple(torch.randn(32, 118))  # 32 x 64 each
    """

    def __init__(
        self,
        in_features: int,
        hidden_dims: Sequence[int],
        num_shared: int,
        num_per_task: int,
        num_tasks: int,
        *,
        num_levels: int,
        dropout: float = 0.2,
        batch_norm: bool = True,
    ) -> None:
        if num_levels < 1:
            raise ValueError(f"PLEOverArch: num_levels must be at least 1, got {num_levels}")
        super().__init__(in_features, num_tasks, hidden_dims[-1])
        widths = [in_features] + [hidden_dims[-1]] * (num_levels - 1)
        self.levels = nn.ModuleList(
            CGCLevel(
                width, hidden_dims, num_shared, num_per_task, num_tasks,
                shared_output=index < num_levels - 1, dropout=dropout, batch_norm=batch_norm,
            )
            for index, width in enumerate(widths)
        )

    def forward(self, features: Tensor) -> List[Tensor]:
        hidden = features
        for level in self.levels:
            hidden = level(hidden)
        return hidden


def split_experts(cfg: ModelConfig, num_tasks: int) -> Tuple[int, int]:
    """Return ``(S, K)``: shared experts and experts per task, with ``S + T * K = model.num_experts``.

    ``S`` is ``model.num_shared_experts``, by default half of ``model.num_experts``
    (rounded down); the other experts are split evenly over the tasks. Raises
    ConfigError when that leaves no shared expert, no expert per task, or a
    remainder.
    """
    total = cfg.num_experts
    shared = cfg.num_shared_experts if cfg.num_shared_experts is not None else total // 2
    rest = total - shared
    if shared < 1 or rest < num_tasks or rest % num_tasks:
        raise ConfigError(
            f"model.num_shared_experts={shared}: CGC and PLE need at least one shared expert and "
            f"model.num_experts - num_shared_experts = {rest} split evenly over {num_tasks} tasks, at least one each; "
            f"adjust model.num_experts ({total}) or model.num_shared_experts"
        )
    return shared, rest // num_tasks


def build_cgc(in_features: int, num_tasks: int, cfg: ModelConfig) -> PLEOverArch:
    shared, per_task = split_experts(cfg, num_tasks)
    return PLEOverArch(
        in_features, cfg.hidden_dims, shared, per_task, num_tasks,
        num_levels=1, dropout=cfg.dropout, batch_norm=cfg.batch_norm,
    )


def build_ple(in_features: int, num_tasks: int, cfg: ModelConfig) -> PLEOverArch:
    shared, per_task = split_experts(cfg, num_tasks)
    return PLEOverArch(
        in_features, cfg.hidden_dims, shared, per_task, num_tasks,
        num_levels=2, dropout=cfg.dropout, batch_norm=cfg.batch_norm,
    )


register_over_arch("cgc", build_cgc)
register_over_arch("ple", build_ple)
