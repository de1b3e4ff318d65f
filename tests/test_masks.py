"""Relaxed masks, the L0 penalty and hard masks against hand-computed values."""

import torch

from mome_rec.modules.masks import hard_mask, l0_penalty, relaxed_mask

PHI_0 = 0.5
PHI_1 = 0.841344746
PHI_MINUS_1 = 0.158655254
PHI_2 = 0.977249868
STANDARD_NORMAL_PDF_0 = 0.398942280


def test_relaxed_mask_without_noise_clamps():
    mu = torch.tensor([-0.3, 0.2, 1.4])
    assert torch.equal(relaxed_mask(mu, 0.5, training=False), torch.tensor([0.0, 0.2, 1.0]))


def test_relaxed_mask_gradient_is_zero_outside_unit_interval():
    mu = torch.tensor([-0.3, 0.2, 1.4], requires_grad=True)
    relaxed_mask(mu, 0.5, training=False).sum().backward()
    assert torch.equal(mu.grad, torch.tensor([0.0, 1.0, 0.0]))


def test_relaxed_mask_noise_has_sigma():
    # With mu = 0.5 and sigma = 0.5, P(mask = 0) = P(eps < -0.5) = Phi(-1), and P(mask = 1) = Phi(-1) too.
    torch.manual_seed(0)
    mu = torch.full((200_000,), 0.5)
    mask = relaxed_mask(mu, 0.5, training=True)
    assert float(mask.min()) == 0.0
    assert float(mask.max()) == 1.0
    assert abs(float((mask == 0).float().mean()) - PHI_MINUS_1) < 0.005
    assert abs(float((mask == 1).float().mean()) - PHI_MINUS_1) < 0.005


def test_relaxed_mask_training_differs_from_eval():
    torch.manual_seed(0)
    mu = torch.full((100,), 0.5)
    assert not torch.equal(relaxed_mask(mu, 0.5, training=True), relaxed_mask(mu, 0.5, training=False))


def test_l0_penalty_sums_normal_cdf():
    mu = torch.tensor([0.0, 0.5, -0.5])
    expected = PHI_0 + PHI_1 + PHI_MINUS_1
    assert abs(float(l0_penalty(mu, 0.5)) - expected) < 1e-6


def test_l0_penalty_divides_by_sigma():
    assert abs(float(l0_penalty(torch.tensor([1.0]), 0.5)) - PHI_2) < 1e-6
    assert abs(float(l0_penalty(torch.tensor([1.0]), 1.0)) - PHI_1) < 1e-6


def test_l0_penalty_is_a_sum_over_all_entries():
    penalty = l0_penalty(torch.zeros(2, 3, 4), 0.5)
    assert penalty.dim() == 0
    assert abs(float(penalty) - 24 * PHI_0) < 1e-5


def test_l0_penalty_gradient():
    # d/dmu Phi(mu / sigma) = pdf(mu / sigma) / sigma.
    mu = torch.tensor([0.0], requires_grad=True)
    l0_penalty(mu, 0.5).backward()
    assert abs(float(mu.grad[0]) - STANDARD_NORMAL_PDF_0 / 0.5) < 1e-6


def test_hard_mask_clamps():
    mu = torch.tensor([-1.0, 0.0, 0.3, 1.0, 2.5])
    assert torch.equal(hard_mask(mu), torch.tensor([0.0, 0.0, 0.3, 1.0, 1.0]))
