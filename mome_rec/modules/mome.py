"""MoME, the Mixture-of-Masked-Experts over-arch, and its ablations.

MoME (Xu, Sun and Zhao, SIGIR 2024) replaces MMoE's separate expert networks by
one over-parameterised base MLP whose weights every expert shares. Expert ``e``
uses the weights ``W ⊙ (1 ⊗ z) ⊙ Z_e`` of each layer (see
:class:`~mome_rec.modules.mome_layer.MoMELayer`), and per-task softmax gates
mix the experts' outputs:

    y_t = sum_e g_t(x)_e h_e(x)

Training has two phases. In the neuron phase only the neuron masks ``z`` are
learned, every expert is the same network, and that network runs once. Then
:meth:`MoMEOverArch.start_expert_phase` freezes ``z`` at ``clamp(mu, 0, 1)``,
removes the input neurons whose mask is 0 from the weight matrices, and adds
the expert masks ``Z_e``, which are learned for the rest of training. The loss
adds the L0 penalty of the masks being learned:

    lambda_1 sum_i Phi(mu_i / sigma) + lambda_2 sum_e sum_ij Phi(mu_e,ij / sigma)

The ablations switch masks off: ``base`` (no masks, one network for every
task), ``mome_n`` (neuron masks only, learned throughout), ``mome_w`` (expert
masks only, from the start) and ``mome`` (both, in two phases).
"""

import functools
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from mome_rec.config import ModelConfig
from mome_rec.errors import InputError
from mome_rec.modules.gates import TaskGates
from mome_rec.modules.masks import hard_mask, l0_penalty
from mome_rec.modules.mome_layer import MoMELayer
from mome_rec.modules.over_arch import OverArch, register_over_arch
from mome_rec.sizes import FP32_BYTES, INT32_BYTES, module_fp32_bytes, packed_mask_bytes

logger = logging.getLogger(__name__)


class MoMEOverArch(OverArch):
    """The MoME over-arch: masked experts over one shared base MLP, mixed per task by softmax gates.

    Args:
        in_features: width F of the input (pooled embeddings and dense columns).
        hidden_dims: widths of the base MLP's layers. The last is the expert output width.
        num_experts: number of experts E.
        num_tasks: number of tasks T.
        dropout: dropout probability after each ReLU.
        batch_norm: whether each layer has a BatchNorm (one per expert in the expert phase).
        sigma: standard deviation of the mask noise.
        mu_init: initial mean of every mask entry.
        lambda_neuron: lambda_1, the weight of the neuron masks' L0 penalty.
        lambda_expert: lambda_2, the weight of the expert masks' L0 penalty.
        use_neuron_masks: learn neuron masks.
        use_expert_masks: learn expert masks; with ``use_neuron_masks`` they
            come after the neuron phase, without it from the start.

    Shape:
        input ``B x F``; output a list of T tensors of ``B x hidden_dims[-1]``.

    Example::

        over_arch = MoMEOverArch(2111, [512, 256], 8, 2, lambda_neuron=1e-4, lambda_expert=1e-4)
        loss = task_loss + over_arch.regularization()
        ...
        over_arch.start_expert_phase()  # after M epochs, then rebuild the optimizer
    """

    def __init__(
        self,
        in_features: int,
        hidden_dims: Sequence[int],
        num_experts: int,
        num_tasks: int,
        *,
        dropout: float = 0.2,
        batch_norm: bool = True,
        sigma: float = 0.5,
        mu_init: float = 0.5,
        lambda_neuron: float,
        lambda_expert: float,
        use_neuron_masks: bool = True,
        use_expert_masks: bool = True,
    ) -> None:
        if in_features < 1 or not hidden_dims or min(hidden_dims) < 1:
            raise ValueError(f"MoMEOverArch: invalid widths in_features={in_features}, hidden_dims={list(hidden_dims)}")
        if num_experts < 1 or num_tasks < 1 or sigma <= 0:
            raise ValueError(f"MoMEOverArch: need num_experts, num_tasks >= 1 and sigma > 0, got {num_experts}, {num_tasks}, {sigma}")
        super().__init__(in_features, num_tasks, hidden_dims[-1])
        self.hidden_dims = list(hidden_dims)
        self.num_experts = num_experts
        self.has_batch_norm = batch_norm
        self.sigma = sigma
        self.lambda_neuron = lambda_neuron
        self.lambda_expert = lambda_expert
        self.use_neuron_masks = use_neuron_masks
        self.use_expert_masks = use_expert_masks

        widths = [in_features] + self.hidden_dims
        self.layers = nn.ModuleList(
            MoMELayer(
                widths[index],
                widths[index + 1],
                num_experts,
                dropout=dropout,
                batch_norm=batch_norm,
                sigma=sigma,
                mu_init=mu_init,
                neuron_mask=use_neuron_masks,
                expert_masks=use_expert_masks and not use_neuron_masks,
            )
            for index in range(len(self.hidden_dims))
        )
        # The gates see the whole input, also after the first layer's inputs are pruned.
        self.gates: Optional[TaskGates] = TaskGates(in_features, num_experts, num_tasks) if use_expert_masks else None
        # Indices of the input features the first layer keeps, set by the phase switch.
        self.register_buffer("kept_inputs", None)

    # ---------------------------------------------------------------- forward

    def forward(self, features: Tensor) -> List[Tensor]:
        if features.dim() != 2 or features.shape[1] != self.in_features:
            raise ValueError(f"MoMEOverArch: expected input B x {self.in_features}, got {list(features.shape)}")
        hidden = features
        if self.kept_inputs is not None:
            hidden = hidden.index_select(1, self.kept_inputs)
        for layer in self.layers:
            hidden = layer(hidden)

        if hidden.dim() == 2:
            # A single network: every expert is this network, so every task gets its output.
            return [hidden] * self.num_tasks
        weights = self.gates(features)  # B x T x E
        mixed = torch.bmm(weights, hidden)  # (B x T x E) @ (B x E x D) -> B x T x D
        return list(mixed.unbind(dim=1))

    def regularization(self) -> Tensor:
        """Return the L0 penalty of the masks being learned; frozen masks add nothing."""
        total = torch.zeros((), device=self.layers[0].weight.device)
        for layer in self.layers:
            if layer.neuron_mask_mu is not None:
                total = total + self.lambda_neuron * l0_penalty(layer.neuron_mask_mu, self.sigma)
            if layer.expert_mask_mu is not None:
                total = total + self.lambda_expert * l0_penalty(layer.expert_mask_mu, self.sigma)
        return total

    # ----------------------------------------------------------------- phases

    @property
    def wants_phase_switch(self) -> bool:
        """True for ``mome`` (both kinds of masks), also after the switch."""
        return self.use_neuron_masks and self.use_expert_masks

    @property
    def phase(self) -> str:
        if any(layer.neuron_mask_mu is not None for layer in self.layers):
            return "neuron"
        if any(layer.has_experts for layer in self.layers):
            return "expert"
        return "none"

    def start_expert_phase(self) -> None:
        """Freeze the neuron masks, remove pruned neurons and add the expert masks.

        For the first layer, the kept input features are gathered by index. For a later
        layer, dropping input neuron ``j`` drops column ``j`` of its ``W`` and row
        ``j`` of the previous layer's ``W``, with its bias entry and BatchNorm
        channel. The module gets new, smaller parameters, so an optimizer built
        before the call must be rebuilt. A no-op unless ``wants_phase_switch``
        and the neuron phase is running.
        """
        if not self.wants_phase_switch:
            logger.debug("start_expert_phase: no neuron phase to end in this over-arch")
            return
        if self.phase != "neuron":
            logger.warning("start_expert_phase: the expert phase has already started")
            return
        keeps = [_kept_neurons(layer.neuron_mask_mu.detach(), index) for index, layer in enumerate(self.layers)]
        self._enter_expert_phase(keeps)
        for index, (layer, width) in enumerate(zip(self.layers, self._input_widths())):
            logger.info("layers.%d keeps %d of %d input neurons", index, layer.in_features, width)

    @torch.no_grad()
    def _enter_expert_phase(self, keeps: List[Tensor]) -> None:
        """Freeze, prune layer ``i``'s inputs to ``keeps[i]`` and add the expert masks."""
        for layer in self.layers:
            layer.freeze_neuron_mask()
        self.kept_inputs = keeps[0].clone()
        self.layers[0].prune_inputs(keeps[0])
        for index in range(1, len(self.layers)):
            self.layers[index].prune_inputs(keeps[index])
            self.layers[index - 1].prune_outputs(keeps[index])
        for layer in self.layers:
            layer.add_expert_masks()

    def structure_state(self) -> Dict[str, Any]:
        """Return the phase and each layer's number of input neurons."""
        return {"phase": self.phase, "input_widths": [layer.in_features for layer in self.layers]}

    def load_structure_state(self, state: Dict[str, Any]) -> None:
        """Prune to the widths of ``state`` and add expert masks, so an expert-phase state dict fits.

        The kept indices, the frozen neuron masks and all weights get placeholder
        values here; loading the state dict overwrites them.
        """
        current = self.structure_state()
        if state == current:
            return
        widths = state.get("input_widths")
        reshapable = (
            state.get("phase") == "expert"
            and current["phase"] == "neuron"
            and self.wants_phase_switch
            and isinstance(widths, list)
            and len(widths) == len(self.layers)
            and all(isinstance(width, int) and 1 <= width <= full for width, full in zip(widths, self._input_widths()))
        )
        if not reshapable:
            raise InputError(f"checkpoint over-arch structure {state} does not fit this model ({current})")
        device = self.layers[0].weight.device
        self._enter_expert_phase([torch.arange(width, device=device) for width in widths])

    # ------------------------------------------------------------ reporting

    def sparsity(self) -> Dict[str, Any]:
        """Return mask statistics.

        ``neuron`` maps each layer with a neuron mask to the fraction of its
        original input neurons whose mask is 0, pruned ones included.
        ``kept_neurons`` maps the same layers to the number of non-zero masks.
        ``experts`` lists, per expert, the fractions of its current expert-mask
        entries (all layers) that are 0, 1 and strictly between.
        """
        neuron: Dict[str, float] = {}
        kept: Dict[str, int] = {}
        for index, (layer, width) in enumerate(zip(self.layers, self._input_widths())):
            mask = _neuron_mask_values(layer)
            if mask is None:
                continue
            nonzero = int((mask > 0).sum())
            neuron[f"layers.{index}"] = 1.0 - nonzero / width
            kept[f"layers.{index}"] = nonzero

        experts = []
        if self.layers[0].has_experts:
            masks = torch.cat(
                [hard_mask(layer.expert_mask_mu.detach()).reshape(self.num_experts, -1) for layer in self.layers], dim=1
            )
            for expert_mask in masks:
                zero = float((expert_mask == 0).float().mean())
                one = float((expert_mask == 1).float().mean())
                experts.append({"zero": zero, "one": one, "between": 1.0 - zero - one})
        return {"phase": self.phase, "neuron": neuron, "kept_neurons": kept, "experts": experts}

    def deployable_bytes(self) -> int:
        """Return the bytes of the network as deployed.

        Per layer: the weights and biases of the kept neurons in fp32 (the frozen
        neuron mask is folded into ``W``), BatchNorm scale, shift and running
        mean and variance in fp32, and the expert masks packed as by
        :func:`~mome_rec.sizes.packed_mask_bytes`. A neuron is kept when its
        neuron mask is non-zero, so before the switch this is the size the
        switch would give. An int32 index per kept input feature is added when
        the first layer drops some. The gates count in fp32 when they are used.

        NOTE: a neuron whose expert-mask rows are 0 in every expert could also be
        removed at deployment, but it is counted here.
        """
        keeps = [_kept_flags(layer) for layer in self.layers]
        total = 0
        for index, layer in enumerate(self.layers):
            in_keep = keeps[index]
            out_keep = keeps[index + 1] if index + 1 < len(self.layers) else None
            kept_in = int(in_keep.sum())
            kept_out = int(out_keep.sum()) if out_keep is not None else layer.out_features
            values = kept_out * kept_in + kept_out
            if layer.batch_norm is not None:
                values += 4 * kept_out * (self.num_experts if layer.has_experts else 1)
            total += values * FP32_BYTES
            if layer.has_experts:
                masks = hard_mask(layer.expert_mask_mu.detach())[:, :, in_keep]
                if out_keep is not None:
                    masks = masks[:, out_keep]
                total += packed_mask_bytes(masks)

        first_kept = int(keeps[0].sum())
        if first_kept < self.in_features:
            total += first_kept * INT32_BYTES
        if self.layers[0].has_experts:
            total += module_fp32_bytes(self.gates)
        return total

    def dense_fp32_bytes(self) -> int:
        """Return the bytes of the unpruned network in fp32: weights, biases, BatchNorm, every mask, gates."""
        experts = self.num_experts
        values = 0
        for width_in, width_out in zip(self._input_widths(), self.hidden_dims):
            values += width_in * width_out + width_out
            if self.has_batch_norm:
                values += 4 * width_out * (experts if self.use_expert_masks else 1)
            if self.use_neuron_masks:
                values += width_in
            if self.use_expert_masks:
                values += experts * width_out * width_in
        gates = module_fp32_bytes(self.gates) if self.gates is not None else 0
        return values * FP32_BYTES + gates

    def _input_widths(self) -> List[int]:
        """Return each layer's number of input neurons before pruning."""
        return [self.in_features] + self.hidden_dims[:-1]


def _neuron_mask_values(layer: MoMELayer) -> Optional[Tensor]:
    """Return the layer's current hard neuron mask (frozen, or ``clamp(mu, 0, 1)``), or None."""
    if layer.neuron_mask is not None:
        return layer.neuron_mask
    if layer.neuron_mask_mu is not None:
        return hard_mask(layer.neuron_mask_mu.detach())
    return None


def _kept_flags(layer: MoMELayer) -> Tensor:
    """Return a boolean flag per current input neuron: True unless its neuron mask is 0."""
    mask = _neuron_mask_values(layer)
    if mask is None:
        return torch.ones(layer.in_features, dtype=torch.bool, device=layer.weight.device)
    return mask > 0


def _kept_neurons(mu: Tensor, index: int) -> Tensor:
    """Return the sorted indices of the neurons with ``clamp(mu, 0, 1) > 0``.

    When every mask is 0 the neuron with the largest ``mu`` stays, so the layer
    keeps a width of 1. Its mask is 0, so the outputs do not change.
    """
    keep = torch.nonzero(hard_mask(mu) > 0).flatten()
    if keep.numel() == 0:
        logger.warning("layers.%d: every neuron mask is 0, so one input neuron with mask 0 is kept", index)
        keep = mu.argmax().view(1)
    return keep


# --------------------------------------------------------------- registration

MOME_VARIANTS: Dict[str, Tuple[bool, bool]] = {
    "mome": (True, True),
    "base": (False, False),
    "mome_n": (True, False),
    "mome_w": (False, True),
}
"""``model.over_arch`` name -> (use_neuron_masks, use_expert_masks)."""


def build_mome_variant(name: str, in_features: int, num_tasks: int, model_cfg: ModelConfig) -> MoMEOverArch:
    """Build the MoME variant ``name`` (a key of :data:`MOME_VARIANTS`) from the model config."""
    use_neuron_masks, use_expert_masks = MOME_VARIANTS[name]
    return MoMEOverArch(
        in_features,
        model_cfg.hidden_dims,
        model_cfg.num_experts,
        num_tasks,
        dropout=model_cfg.dropout,
        batch_norm=model_cfg.batch_norm,
        sigma=model_cfg.sigma,
        mu_init=model_cfg.mu_init,
        lambda_neuron=model_cfg.lambda_neuron,
        lambda_expert=model_cfg.lambda_expert,
        use_neuron_masks=use_neuron_masks,
        use_expert_masks=use_expert_masks,
    )


for _variant in MOME_VARIANTS:
    register_over_arch(_variant, functools.partial(build_mome_variant, _variant))
