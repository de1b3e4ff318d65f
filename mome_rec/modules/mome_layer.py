"""One layer of the MoME base network, shared by every expert through masks.

Expert ``e`` of a layer computes

    h_e = Dropout(ReLU(BN_e(x_e (W ⊙ (1 ⊗ z) ⊙ Z_e)^T + b)))

with ``W`` the shared ``out x in`` weight, ``b`` the shared bias, ``z`` the
neuron mask over the layer's input neurons (column ``j`` of ``W`` is scaled by
``z_j``) and ``Z_e`` expert ``e``'s weight mask, shaped like ``W``. Each mask
entry is a clipped Gaussian ``clamp(mu + eps, 0, 1)`` (see
:mod:`mome_rec.modules.masks`).

A layer works in one of two modes:

* single network (no expert masks): ``B x in -> B x out`` with one BatchNorm over
  ``out`` channels. Every expert would compute the same function, so it is
  computed once.
* experts (expert masks present): ``B x in`` (shared input) or ``B x E x in``
  -> ``B x E x out`` with one BatchNorm over ``E * out`` channels, channel
  ``e * out + o`` belonging to expert ``e``. A ``B x in`` input takes one matmul
  against the masked weights viewed as ``(E * out) x in``, and a ``B x E x in``
  input takes one ``bmm`` over the experts.

The expert weights ``W ⊙ (1 ⊗ z) ⊙ Z_e`` of all experts are built in one fused
step per forward (:func:`~mome_rec.modules.masks.apply_expert_masks`), with one
``normal_`` call for the noise of the whole layer.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mome_rec.modules.masks import apply_expert_masks, hard_mask, relaxed_mask


class MoMELayer(nn.Module):
    """A masked linear layer with BatchNorm, ReLU and dropout, shared by ``num_experts`` experts.

    Args:
        in_features: number of input neurons.
        out_features: number of output neurons of each expert.
        num_experts: number of experts E.
        dropout: dropout probability after the ReLU.
        batch_norm: whether to normalise the pre-activations.
        sigma: standard deviation of the mask noise.
        mu_init: initial mean of every mask entry.
        neuron_mask: learn a neuron mask over the input neurons.
        expert_masks: start with expert masks, that is, in the experts mode.

    Attributes:
        weight: ``out x in`` shared weight ``W``, Kaiming-uniform initialised.
        bias: shared bias ``b`` of width ``out``, zero-initialised.
        neuron_mask_mu: means of the neuron mask while it is learned (``in``), else None.
        neuron_mask: the frozen neuron mask ``clamp(mu, 0, 1)`` (``in``) after
            :meth:`freeze_neuron_mask`, else None.
        expert_mask_mu: means of the expert masks (``E x out x in``), or None in
            the single-network mode.
        batch_norm: BatchNorm1d over ``out`` or ``E * out`` channels, or None.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        *,
        dropout: float,
        batch_norm: bool,
        sigma: float,
        mu_init: float,
        neuron_mask: bool,
        expert_masks: bool,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.sigma = sigma
        self.mu_init = mu_init
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        if neuron_mask:
            self.neuron_mask_mu = nn.Parameter(torch.empty(in_features))
        else:
            self.register_parameter("neuron_mask_mu", None)
        self.register_buffer("neuron_mask", None)
        if expert_masks:
            self.expert_mask_mu = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        else:
            self.register_parameter("expert_mask_mu", None)
        channels = out_features * (num_experts if expert_masks else 1)
        self.batch_norm: Optional[nn.BatchNorm1d] = nn.BatchNorm1d(channels) if batch_norm else None
        self.dropout = nn.Dropout(dropout, inplace=True)
        self.reset_parameters()

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def has_experts(self) -> bool:
        """Whether the layer is in the experts mode (expert masks present)."""
        return self.expert_mask_mu is not None

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")
        nn.init.zeros_(self.bias)
        with torch.no_grad():
            if self.neuron_mask_mu is not None:
                self.neuron_mask_mu.fill_(self.mu_init)
            if self.expert_mask_mu is not None:
                self.expert_mask_mu.fill_(self.mu_init)
        if self.batch_norm is not None:
            self.batch_norm.reset_parameters()

    def masked_weight(self) -> Tensor:
        """Return ``W ⊙ (1 ⊗ z)`` (``out x in``) or, in the experts mode, ``W ⊙ (1 ⊗ z) ⊙ Z_e`` (``E x out x in``).

        In training the learned masks are drawn with noise, one ``normal_`` call per mask.
        """
        weight = self.weight
        if self.neuron_mask_mu is not None:
            weight = weight * relaxed_mask(self.neuron_mask_mu, self.sigma, self.training)
        elif self.neuron_mask is not None:
            weight = weight * self.neuron_mask
        if self.expert_mask_mu is not None:
            weight = apply_expert_masks(weight, self.expert_mask_mu, self.sigma, self.training)
        return weight

    def forward(self, features: Tensor) -> Tensor:
        """Apply the layer.

        Shape:
            single network: ``B x in -> B x out``; experts: ``B x in`` or ``B x E x in`` -> ``B x E x out``.
        """
        weight = self.masked_weight()
        batch = features.shape[0]
        if not self.has_experts:
            hidden = F.linear(features, weight, self.bias)
        elif features.dim() == 2:
            # Row e * out + o of the (E * out) x in view is expert e's neuron o. The view
            # costs no copy because the matmul reads it transposed.
            experts, out_features, in_features = weight.shape
            stacked = weight.view(experts * out_features, in_features)
            hidden = F.linear(features, stacked, self.bias.repeat(experts))
        else:
            # (E x B x in) @ (E x in x out) -> E x B x out, then B x (E * out) for the BatchNorm.
            hidden = torch.baddbmm(self.bias.view(1, 1, -1), features.transpose(0, 1), weight.transpose(1, 2))
            hidden = hidden.transpose(0, 1).reshape(batch, -1)

        if self.batch_norm is not None:
            hidden = self.batch_norm(hidden)
        # Dropout(ReLU(h)) == ReLU(Dropout(h)) because dropout scales by 0 or 1 / (1 - p) > 0. In this
        # order both run in place on the fresh pre-activations, which no backward pass reads.
        hidden = F.relu_(self.dropout(hidden))
        if self.has_experts:
            hidden = hidden.view(batch, self.num_experts, self.out_features)
        return hidden

    # ------------------------------------------------------------ phase switch

    @torch.no_grad()
    def freeze_neuron_mask(self) -> Tensor:
        """Replace the learned neuron mask by the frozen buffer ``clamp(mu, 0, 1)`` and return it."""
        if self.neuron_mask_mu is None:
            raise RuntimeError("freeze_neuron_mask: this layer learns no neuron mask")
        self.neuron_mask = hard_mask(self.neuron_mask_mu.detach()).clone()
        self.neuron_mask_mu = None
        return self.neuron_mask

    @torch.no_grad()
    def prune_inputs(self, keep: Tensor) -> None:
        """Keep only the input neurons ``keep`` (sorted indices): columns of ``W`` and entries of the neuron mask."""
        self._require_single_network("prune_inputs")
        self.weight = nn.Parameter(self.weight.index_select(1, keep).clone())
        if self.neuron_mask_mu is not None:
            self.neuron_mask_mu = nn.Parameter(self.neuron_mask_mu.index_select(0, keep).clone())
        if self.neuron_mask is not None:
            self.neuron_mask = self.neuron_mask.index_select(0, keep).clone()

    @torch.no_grad()
    def prune_outputs(self, keep: Tensor) -> None:
        """Keep only the output neurons ``keep``: rows of ``W``, entries of ``b`` and BatchNorm channels."""
        self._require_single_network("prune_outputs")
        self.weight = nn.Parameter(self.weight.index_select(0, keep).clone())
        self.bias = nn.Parameter(self.bias.index_select(0, keep).clone())
        if self.batch_norm is not None:
            self.batch_norm = _select_channels(self.batch_norm, keep)

    @torch.no_grad()
    def add_expert_masks(self) -> None:
        """Switch to the experts mode: expert masks at ``mu_init`` and one copy of the BatchNorm per expert.

        The BatchNorm's parameters and running statistics are copied to every
        expert, so with all expert masks at 1 the outputs equal the single network's.
        """
        self._require_single_network("add_expert_masks")
        shape = (self.num_experts, self.out_features, self.in_features)
        self.expert_mask_mu = nn.Parameter(self.weight.new_full(shape, self.mu_init))
        if self.batch_norm is not None:
            channels = torch.arange(self.out_features, device=self.weight.device).repeat(self.num_experts)
            self.batch_norm = _select_channels(self.batch_norm, channels)

    def _require_single_network(self, operation: str) -> None:
        if self.has_experts:
            raise RuntimeError(f"{operation}: the layer already has expert masks")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_experts={self.num_experts}, sigma={self.sigma}, mu_init={self.mu_init}"
        )


def _select_channels(batch_norm: nn.BatchNorm1d, channels: Tensor) -> nn.BatchNorm1d:
    """Return a BatchNorm1d whose channel ``i`` copies channel ``channels[i]`` of ``batch_norm``."""
    reference = batch_norm.weight if batch_norm.affine else batch_norm.running_mean
    selected = nn.BatchNorm1d(
        len(channels),
        eps=batch_norm.eps,
        momentum=batch_norm.momentum,
        affine=batch_norm.affine,
        track_running_stats=batch_norm.track_running_stats,
        device=channels.device,
        dtype=reference.dtype if reference is not None else None,
    )
    selected.train(batch_norm.training)
    if batch_norm.affine:
        selected.weight.copy_(batch_norm.weight.index_select(0, channels))
        selected.bias.copy_(batch_norm.bias.index_select(0, channels))
    if batch_norm.track_running_stats:
        selected.running_mean.copy_(batch_norm.running_mean.index_select(0, channels))
        selected.running_var.copy_(batch_norm.running_var.index_select(0, channels))
        selected.num_batches_tracked.copy_(batch_norm.num_batches_tracked)
    return selected
