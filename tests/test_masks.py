"""Relaxed masks, the L0 penalty and hard masks against hand-computed values."""

import pytest
import torch

from mome_rec.modules.masks import apply_expert_masks, hard_mask, l0_penalty, relaxed_mask

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


def test_apply_expert_masks_by_hand():
    # clamp(mu) per expert: [0.5, 1, 1] and [0, 0.25, 0]; weight [2, -1, 3].
    weight = torch.tensor([[2.0, -1.0, 3.0]], requires_grad=True)
    mu = torch.tensor([[[0.5, 1.5, 1.0]], [[-0.2, 0.25, 0.0]]], requires_grad=True)
    masked = apply_expert_masks(weight, mu, 0.5, training=False)
    assert torch.equal(masked, torch.tensor([[[1.0, -1.0, 3.0]], [[0.0, -0.25, 0.0]]]))

    masked.sum().backward()
    # d/dmu = weight where 0 <= mu <= 1 (the bounds included, as torch.clamp), else 0.
    assert torch.equal(mu.grad, torch.tensor([[[2.0, 0.0, 3.0]], [[0.0, -1.0, 3.0]]]))
    # d/dweight = the sum of the masks over the experts.
    assert torch.equal(weight.grad, torch.tensor([[0.5, 1.25, 1.0]]))


def test_apply_expert_masks_matches_relaxed_mask_in_training():
    torch.manual_seed(0)
    weight = torch.randn(300, 900, requires_grad=True)
    mu = (torch.rand(3, 300, 900) * 1.6 - 0.3).requires_grad_(True)
    upstream = torch.randn(3, 300, 900)


    torch.manual_seed(1)
    expected = weight * relaxed_mask(mu, 0.5, training=True)
    expected_grads = torch.autograd.grad(expected, (weight, mu), upstream)
    torch.manual_seed(1)
    actual = apply_expert_masks(weight, mu, 0.5, training=True)
    actual_grads = torch.autograd.grad(actual, (weight, mu), upstream)

    assert torch.equal(actual, expected)
    assert torch.allclose(actual_grads[0], expected_grads[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(actual_grads[1], expected_grads[1])


def test_apply_expert_masks_without_autograd():
    torch.manual_seed(0)
    weight = torch.randn(4, 5, requires_grad=True)
    mu = torch.randn(2, 4, 5, requires_grad=True)
    with torch.no_grad():
        assert torch.equal(apply_expert_masks(weight, mu, 0.5, training=False), weight * hard_mask(mu))
        torch.manual_seed(2)
        noisy = apply_expert_masks(weight, mu, 0.5, training=True)
        torch.manual_seed(2)
        assert torch.equal(noisy, weight * relaxed_mask(mu, 0.5, training=True))


def test_apply_expert_masks_rejects_other_shapes():
    with pytest.raises(ValueError, match=r"mu \[2, 4, 6\] is not E x \[4, 5\]"):
        apply_expert_masks(torch.ones(4, 5), torch.ones(2, 4, 6), 0.5, training=False)


def test_l0_penalty_matches_ndtr_on_a_large_tensor():
    torch.manual_seed(0)
    mu = torch.randn(1 << 19, dtype=torch.float64, requires_grad=True)
    reference = mu.detach().clone().requires_grad_(True)
    penalty = l0_penalty(mu, 0.5)
    expected = torch.special.ndtr(reference / 0.5).sum()
    penalty.backward()
    expected.backward()
    assert abs(penalty.item() - expected.item()) < 1e-9 * expected.item()
    assert torch.allclose(mu.grad, reference.grad, rtol=1e-12, atol=1e-15)


def test_l0_penalty_under_fx_tracing():
    class Penalty(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mu = torch.nn.Parameter(torch.tensor([0.0, 0.5, -0.5]))

        def forward(self):
            return l0_penalty(self.mu, 0.5)

    traced = torch.fx.symbolic_trace(Penalty())
    assert abs(float(traced()) - (PHI_0 + PHI_1 + PHI_MINUS_1)) < 1e-6
