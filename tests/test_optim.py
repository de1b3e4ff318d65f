"""The dense optimizer's learning rates: one for the weights, one for the mask means."""

import pytest
import torch

from mome_rec.optim import DenseOptimizer


def _step(mask_lr):
    weight = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    mask_mu = torch.nn.Parameter(torch.tensor([0.5, 0.5]))
    optimizer = DenseOptimizer([weight, mask_mu], lr=1e-3, mask_params=[mask_mu], mask_lr=mask_lr)
    weight.grad = torch.tensor([2.0, -4.0])
    mask_mu.grad = torch.tensor([3.0, -0.5])
    optimizer.step()
    return weight.detach(), mask_mu.detach()


def test_mask_means_own_learning_rate():
    # Adam's first step is lr * g / (|g| + 1e-8) (both moments bias-corrected): lr * sign(g) up to 1e-8.
    weight, mask_mu = _step(mask_lr=0.05)
    assert weight.tolist() == pytest.approx([1.0 - 1e-3, 1.0 + 1e-3], abs=1e-7)
    assert mask_mu.tolist() == pytest.approx([0.5 - 0.05, 0.5 + 0.05], abs=1e-7)


def test_mask_lr_none_means_lr():
    weight, mask_mu = _step(mask_lr=None)
    assert weight.tolist() == pytest.approx([1.0 - 1e-3, 1.0 + 1e-3], abs=1e-7)
    assert mask_mu.tolist() == pytest.approx([0.5 - 1e-3, 0.5 + 1e-3], abs=1e-7)
