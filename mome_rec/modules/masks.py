"""Gaussian-relaxed binary masks and their L0 penalty.

A binary mask entry m in {0, 1} is relaxed to a clipped Gaussian with a learned
mean mu and a fixed standard deviation sigma:

    m = clamp(mu + eps, 0, 1),   eps ~ N(0, sigma^2) in training, eps = 0 in evaluation.

The expected number of non-zero entries, sum_i P(mu_i + eps_i > 0) = sum_i Phi(mu_i / sigma),
is the L0 penalty, with Phi the standard normal CDF. After training, the hard
mask is clamp(mu, 0, 1): entries are exactly 0, exactly 1 or strictly between.
"""

import math
import torch
from torch import Tensor



def relaxed_mask(mu: Tensor, sigma: float, training: bool) -> Tensor:
    """Return ``clamp(mu + eps, 0, 1)`` with ``eps ~ N(0, sigma^2)`` when training, else ``clamp(mu, 0, 1)``.

    Args:
        mu: mask means, any shape.
        sigma: standard deviation of the noise.
        training: whether to add noise. The noise comes from one ``normal_`` call
            over the whole of ``mu``.

    Returns:
        A tensor shaped like ``mu``, differentiable with respect to ``mu`` where
        ``0 < mu + eps < 1``.
    """
    return _noisy_means(mu, sigma, training).clamp(0.0, 1.0)


def l0_penalty(mu: Tensor, sigma: float) -> Tensor:
    """Return the expected number of non-zero mask entries, ``sum_i Phi(mu_i / sigma)``, as a scalar.

    The gradient is ``phi(mu / sigma) / sigma`` with ``phi`` the standard normal
    density. A custom autograd function computes each with a few whole-tensor
    operations, in place after the first.
    """
    if isinstance(mu, torch.fx.Proxy):
        # TorchRec's train pipeline traces the train module with torch.fx, which records this expression instead.
        return torch.special.ndtr(mu / sigma).sum()
    return _L0Penalty.apply(mu, sigma)


def hard_mask(mu: Tensor) -> Tensor:
    """Return the deterministic mask ``clamp(mu, 0, 1)`` used after training."""
    return mu.clamp(0.0, 1.0)


def apply_expert_masks(weight: Tensor, mu: Tensor, sigma: float, training: bool) -> Tensor:
    """Return ``weight ⊙ clamp(mu + eps, 0, 1)``, the weights of every expert, in one fused step.

    The result and its gradients equal those of ``weight * relaxed_mask(mu,
    sigma, training)``; the backward pass computes

        d/dmu = grad ⊙ weight ⊙ 1[0 <= mu + eps <= 1],   d/dweight = sum_e grad_e ⊙ clamp(mu_e + eps_e, 0, 1)

    (the indicator as in the backward of :func:`torch.clamp`). The noise comes
    from one ``normal_`` call and becomes ``mu + eps`` in place, which is
    all that is saved besides ``weight``. Every step is one whole-tensor
    operation, in place where it can be, so the ``E x out x in`` tensors
    allocated are the noise and the result in the forward pass and two in the
    backward pass.

    Args:
        weight: ``out x in``, shared by the experts (the neuron mask already applied).
        mu: ``E x out x in`` expert-mask means.
        sigma: standard deviation of the noise.
        training: whether to add noise.

    Returns:
        ``E x out x in``: expert ``e``'s weights at index ``e``.
    """
    if isinstance(mu, torch.fx.Proxy):
        return weight * relaxed_mask(mu, sigma, training)
    if mu.dim() != 3 or mu.shape[1:] != weight.shape:
        raise ValueError(f"apply_expert_masks: mu {list(mu.shape)} is not E x {list(weight.shape)}")
    if torch.is_grad_enabled() and (weight.requires_grad or mu.requires_grad):
        return _ExpertMaskedWeight.apply(weight, mu, sigma, training)
    noisy = _noisy_means(mu, sigma, training)
    mask = noisy.clamp_(0.0, 1.0) if training else noisy.clamp(0.0, 1.0)
    return mask.mul_(weight)


def _noisy_means(mu: Tensor, sigma: float, training: bool) -> Tensor:
    """Return ``mu + eps`` in a new tensor (``mu`` itself when not training), with one ``normal_`` call.

    ``normal_`` scales by ``sigma`` while drawing, which saves a pass over the
    ``E x out x in`` entries against ``randn_like(mu) * sigma``.
    """
    if not training:
        return mu
    return torch.empty_like(mu).normal_(0.0, sigma).add_(mu)


class _ExpertMaskedWeight(torch.autograd.Function):
    """The autograd function behind :func:`apply_expert_masks`."""

    @staticmethod
    def forward(ctx, weight: Tensor, mu: Tensor, sigma: float, training: bool) -> Tensor:
        noisy = _noisy_means(mu, sigma, training)
        ctx.save_for_backward(weight, noisy)
        return noisy.clamp(0.0, 1.0).mul_(weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, noisy = ctx.saved_tensors
        mask = noisy.clamp(0.0, 1.0)
        grad_weight = grad_mu = None
        if ctx.needs_input_grad[1]:
            # 1.0 where 0 <= mu + eps <= 1 (the clamp left the entry as it was), else 0.0
            grad_mu = torch.eq(mask, noisy, out=torch.empty_like(noisy))
            grad_mu.mul_(grad).mul_(weight)
        if ctx.needs_input_grad[0]:
            grad_weight = mask.mul_(grad).sum(dim=0)
        return grad_weight, grad_mu, None, None


class _L0Penalty(torch.autograd.Function):
    """The autograd function behind :func:`l0_penalty`."""

    @staticmethod
    def forward(ctx, mu: Tensor, sigma: float) -> Tensor:
        ctx.save_for_backward(mu)
        ctx.sigma = sigma
        # sum_i Phi(x_i) = N / 2 + sum_i erf(x_i / sqrt(2)) / 2; erf has a vectorised CPU kernel, ndtr does not.
        erf = torch.mul(mu, 1.0 / (sigma * math.sqrt(2.0))).erf_()
        return erf.sum(dtype=mu.dtype).mul_(0.5).add_(0.5 * mu.numel())

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mu,) = ctx.saved_tensors
        sigma = ctx.sigma
        # phi(mu / sigma) / sigma = exp(-mu^2 / (2 sigma^2)) / (sigma sqrt(2 pi))
        density = torch.mul(mu, mu).mul_(-0.5 / sigma**2).exp_()
        return density.mul_(grad / (sigma * math.sqrt(2.0 * math.pi))), None
