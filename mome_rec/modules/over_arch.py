"""The interface of the network between the embeddings and the task towers, and its registry.

An over-arch maps the concatenated features (pooled embeddings and dense
columns, ``B x F``) to one representation per task (``T`` tensors of
``B x output_dim``). MoME and its ablations implement it in
:mod:`mome_rec.modules.mome`. Another over-arch registers a builder under its
``model.over_arch`` name with :func:`register_over_arch`; the module defining it
must be imported by ``mome_rec/modules/__init__.py`` so the name is known.
"""

from typing import Any, Callable, Dict, List

import torch
from torch import Tensor, nn

from mome_rec.config import ModelConfig
from mome_rec.errors import ConfigError
from mome_rec.sizes import module_fp32_bytes


class OverArch(nn.Module):
    """Base class of every over-arch, with the defaults of an over-arch without masks or phases.

    Args:
        in_features: width F of the input.
        num_tasks: number of tasks T, so ``forward`` returns T tensors.
        output_dim: width of each task representation.

    Shape:
        ``forward`` takes ``B x F`` and returns a list of T tensors of ``B x output_dim``.
    """

    def __init__(self, in_features: int, num_tasks: int, output_dim: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_tasks = num_tasks
        self.output_dim = output_dim

    def forward(self, features: Tensor) -> List[Tensor]:
        raise NotImplementedError

    def regularization(self) -> Tensor:
        """Return the scalar added to the training loss; zero here."""
        parameter = next(self.parameters(), None)
        device = parameter.device if parameter is not None else None
        return torch.zeros((), device=device)

    @property
    def wants_phase_switch(self) -> bool:
        """Whether a neuron phase must be followed by a call to :meth:`start_expert_phase`."""
        return False

    @property
    def phase(self) -> str:
        """``neuron``, ``expert`` (which masks are learned) or ``none`` for an over-arch without masks."""
        return "none"

    def start_expert_phase(self) -> None:
        """End the neuron phase; a no-op here. Parameters may be replaced, so rebuild the optimizer after it."""

    def structure_state(self) -> Dict[str, Any]:
        """Return the JSON-serialisable shape information that a checkpoint needs besides the state dict."""
        return {}

    def load_structure_state(self, state: Dict[str, Any]) -> None:
        """Reshape this module as :meth:`structure_state` describes, so that a checkpoint's state dict fits."""

    def deployable_bytes(self) -> int:
        """Return the bytes of the network as deployed; here every floating parameter and buffer in fp32."""
        return module_fp32_bytes(self)

    def dense_fp32_bytes(self) -> int:
        """Return the bytes of the unpruned network with every parameter and BatchNorm statistic in fp32."""
        return module_fp32_bytes(self)

    def sparsity(self) -> Dict[str, Any]:
        """Return JSON-serialisable mask statistics; empty for an over-arch without masks."""
        return {}


OverArchBuilder = Callable[[int, int, ModelConfig], OverArch]
"""Builds an over-arch from ``(in_features, num_tasks, model_cfg)``."""

OVER_ARCHS: Dict[str, OverArchBuilder] = {}
"""``model.over_arch`` name -> builder."""


def register_over_arch(name: str, builder: OverArchBuilder) -> None:
    """Make ``build_over_arch(name, ...)`` call ``builder``; a name can be registered once."""
    if name in OVER_ARCHS:
        raise ValueError(f"over-arch {name!r} is already registered")
    OVER_ARCHS[name] = builder


def build_over_arch(name: str, in_features: int, num_tasks: int, model_cfg: ModelConfig) -> OverArch:
    """Build the over-arch registered as ``name``; ConfigError for an unknown name."""
    builder = OVER_ARCHS.get(name)
    if builder is None:
        known = ", ".join(sorted(OVER_ARCHS))
        raise ConfigError(f"model.over_arch: unknown over-arch {name!r} (known: {known})")
    return builder(in_features, num_tasks, model_cfg)
