"""Gaussian-relaxed binary masks and their L0 penalty.

A binary mask entry m in {0, 1} is relaxed to a clipped Gaussian with a learned
mean mu and a fixed standard deviation sigma:

    m = clamp(mu + eps, 0, 1),   eps ~ N(0, sigma^2) in training, eps = 0 in evaluation.

The expected number of non-zero entries, sum_i P(mu_i + eps_i > 0) = sum_i Phi(mu_i / sigma),
is the L0 penalty, with Phi the standard normal CDF. After training, the hard
mask is clamp(mu, 0, 1): entries are exactly 0, exactly 1 or strictly between.
"""

import torch
from torch import Tensor


def relaxed_mask(mu: Tensor, sigma: float, training: bool) -> Tensor:
    """Return ``clamp(mu + eps, 0, 1)`` with ``eps ~ N(0, sigma^2)`` when training, else ``clamp(mu, 0, 1)``.

    Args:
        mu: mask means, any shape.
        sigma: standard deviation of the noise.
        training: whether to add noise. The noise comes from one ``randn`` call
            over the whole of ``mu``.

    Returns:
        A tensor shaped like ``mu``, differentiable with respect to ``mu`` where
        ``0 < mu + eps < 1``.
    """
    if training:
        mu = mu + sigma * torch.randn_like(mu)
    return mu.clamp(0.0, 1.0)


def l0_penalty(mu: Tensor, sigma: float) -> Tensor:
    """Return the expected number of non-zero mask entries, ``sum_i Phi(mu_i / sigma)``, as a scalar."""
    return torch.special.ndtr(mu / sigma).sum()


def hard_mask(mu: Tensor) -> Tensor:
    """Return the deterministic mask ``clamp(mu, 0, 1)`` used after training."""
    return mu.clamp(0.0, 1.0)
