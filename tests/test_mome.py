"""MoMEOverArch: forward against hand-computed values, the phase switch, gradients, noise and ablations."""

import math

import pytest
import torch

from mome_rec.config import ModelConfig
from mome_rec.errors import ConfigError, InputError
from mome_rec.modules import MoMEOverArch, build_over_arch

PHI_1 = 0.841344746


def make_mome(in_features=2, hidden_dims=(2, 1), num_experts=2, num_tasks=2, **overrides):
    arguments = dict(dropout=0.0, batch_norm=False, lambda_neuron=0.1, lambda_expert=0.01)
    arguments.update(overrides)
    return MoMEOverArch(in_features, list(hidden_dims), num_experts, num_tasks, **arguments)


def set_tiny_weights(over_arch):
    """W1 = [[1, 2], [3, -1]], b1 = [0.5, -0.5], W2 = [[2, -1]], b2 = [0.1]."""
    first, second = over_arch.layers
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
        first.bias.copy_(torch.tensor([0.5, -0.5]))
        second.weight.copy_(torch.tensor([[2.0, -1.0]]))
        second.bias.copy_(torch.tensor([0.1]))


TINY_INPUT = torch.tensor([[1.0, 2.0], [-1.0, 1.0]])


def tiny_mome_in_neuron_phase():
    over_arch = make_mome()
    set_tiny_weights(over_arch)
    with torch.no_grad():
        over_arch.layers[0].neuron_mask_mu.copy_(torch.tensor([1.2, 0.5]))  # z1 = [1, 0.5]
        over_arch.layers[1].neuron_mask_mu.copy_(torch.tensor([1.0, 1.0]))  # z2 = [1, 1]
    return over_arch.eval()


def test_neuron_phase_forward_by_hand():
    # W1 ⊙ z1 = [[1, 1], [3, -0.5]].
    # x = [1, 2]:  relu([1 + 2 + 0.5, 3 - 1 - 0.5]) = [3.5, 1.5];  2 * 3.5 - 1.5 + 0.1 = 5.6
    # x = [-1, 1]: relu([-1 + 1 + 0.5, -3 - 0.5 - 0.5]) = [0.5, 0];  2 * 0.5 + 0.1 = 1.1
    over_arch = tiny_mome_in_neuron_phase()
    outputs = over_arch(TINY_INPUT)
    assert len(outputs) == 2
    for output in outputs:
        assert torch.allclose(output, torch.tensor([[5.6], [1.1]]), atol=1e-6)


def test_expert_phase_forward_by_hand():
    over_arch = tiny_mome_in_neuron_phase()
    over_arch.start_expert_phase()
    first, second = over_arch.layers
    with torch.no_grad():
        first.expert_mask_mu.copy_(torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.5, 1.0], [0.0, 1.0]]]))
        second.expert_mask_mu.copy_(torch.tensor([[[1.0, 1.0]], [[1.0, 0.5]]]))
        over_arch.gates.linear.weight.zero_()
        # Task 0 gates softmax([0, ln 3]) = [0.25, 0.75]; task 1 gates [0.5, 0.5].
        over_arch.gates.linear.bias.copy_(torch.tensor([0.0, math.log(3.0), 0.0, 0.0]))

    # Expert 0: W1 ⊙ z1 ⊙ Z1_0 = [[1, 0], [3, -0.5]], W2 ⊙ Z2_0 = [[2, -1]].
    #   x = [1, 2]:  relu([1 + 0.5, 3 - 1 - 0.5]) = [1.5, 1.5];  3 - 1.5 + 0.1 = 1.6
    #   x = [-1, 1]: relu([-1 + 0.5, -3 - 0.5 - 0.5]) = [0, 0];   0.1
    # Expert 1: W1 ⊙ z1 ⊙ Z1_1 = [[0.5, 1], [0, -0.5]], W2 ⊙ Z2_1 = [[2, -0.5]].
    #   x = [1, 2]:  relu([0.5 + 2 + 0.5, -1 - 0.5]) = [3, 0];     6 + 0.1 = 6.1
    #   x = [-1, 1]: relu([-0.5 + 1 + 0.5, -0.5 - 0.5]) = [1, 0];  2 + 0.1 = 2.1
    # Task 0: 0.25 * [1.6, 0.1] + 0.75 * [6.1, 2.1] = [4.975, 1.6]; task 1: the mean = [3.85, 1.1].
    task_0, task_1 = over_arch(TINY_INPUT)
    assert torch.allclose(task_0, torch.tensor([[4.975], [1.6]]), atol=1e-6)
    assert torch.allclose(task_1, torch.tensor([[3.85], [1.1]]), atol=1e-6)


def warmed_up_mome(seed=0):
    """A MoME with BatchNorm and non-trivial running statistics, in the neuron phase."""
    torch.manual_seed(seed)
    over_arch = make_mome(6, (5, 4, 3), num_experts=3, batch_norm=True, dropout=0.2)
    over_arch.train()
    for _ in range(3):
        over_arch(torch.randn(16, 6))
    with torch.no_grad():
        for layer in over_arch.layers:
            layer.bias.uniform_(-0.5, 0.5)
            layer.batch_norm.weight.uniform_(0.5, 1.5)
            layer.batch_norm.bias.uniform_(-0.5, 0.5)
    return over_arch


def test_pruning_keeps_eval_outputs():
    over_arch = warmed_up_mome()
    with torch.no_grad():
        over_arch.layers[0].neuron_mask_mu.copy_(torch.tensor([0.5, -0.2, 0.8, 1.3, -1.0, 0.1]))
        over_arch.layers[1].neuron_mask_mu.copy_(torch.tensor([0.9, -0.4, 0.6, 0.0, 0.7]))
        over_arch.layers[2].neuron_mask_mu.copy_(torch.tensor([-0.3, 0.4, 0.5, 0.6]))
    features = torch.randn(10, 6)
    over_arch.eval()
    before = over_arch(features)

    over_arch.start_expert_phase()
    with torch.no_grad():
        for layer in over_arch.layers:
            layer.expert_mask_mu.fill_(1.0)  # every expert equals the single network
    after = over_arch(features)

    assert over_arch.kept_inputs.tolist() == [0, 2, 3, 5]
    assert over_arch.layers[0].weight.shape == (3, 4)
    assert over_arch.layers[1].weight.shape == (3, 3)
    assert over_arch.layers[2].weight.shape == (3, 3)
    assert over_arch.layers[0].expert_mask_mu.shape == (3, 3, 4)
    assert over_arch.layers[0].batch_norm.num_features == 3 * 3
    assert over_arch.layers[2].batch_norm.num_features == 3 * 3
    for task in range(2):
        assert torch.allclose(before[task], after[task], atol=1e-6)


def test_pruning_every_neuron_of_a_layer_keeps_one():
    over_arch = warmed_up_mome()
    with torch.no_grad():
        over_arch.layers[1].neuron_mask_mu.fill_(-1.0)
        over_arch.layers[1].neuron_mask_mu[3] = -0.5
    features = torch.randn(4, 6)
    over_arch.eval()
    before = over_arch(features)

    over_arch.start_expert_phase()
    with torch.no_grad():
        for layer in over_arch.layers:
            layer.expert_mask_mu.fill_(1.0)

    assert over_arch.layers[1].weight.shape == (4, 1)
    assert over_arch.layers[0].weight.shape == (1, 6)
    assert torch.allclose(before[0], over_arch(features)[0], atol=1e-6)


def test_start_expert_phase_replaces_parameters():
    over_arch = warmed_up_mome()
    over_arch.start_expert_phase()
    names = {name for name, _ in over_arch.named_parameters()}
    assert not any("neuron_mask_mu" in name for name in names)
    assert {f"layers.{index}.expert_mask_mu" for index in range(3)} <= names
    assert over_arch.layers[0].neuron_mask.requires_grad is False
    assert torch.allclose(over_arch.layers[0].neuron_mask, torch.full((6,), 0.5))


def test_gradients_reach_neuron_masks():
    over_arch = warmed_up_mome()
    torch.manual_seed(1)
    outputs = over_arch(torch.randn(16, 6))
    (sum(output.pow(2).sum() for output in outputs) + over_arch.regularization()).backward()
    for layer in over_arch.layers:
        assert layer.neuron_mask_mu.grad is not None
        assert bool((layer.neuron_mask_mu.grad != 0).any())


def test_gradients_reach_every_expert_mask():
    over_arch = warmed_up_mome()
    over_arch.start_expert_phase()
    over_arch.train()
    torch.manual_seed(1)
    outputs = over_arch(torch.randn(16, 6))
    (outputs[0].pow(2).sum() + outputs[1].sum() + over_arch.regularization()).backward()
    for layer in over_arch.layers:
        grad = layer.expert_mask_mu.grad
        assert grad is not None
        for expert in range(3):
            assert bool((grad[expert] != 0).any()), f"expert {expert} of a layer got no gradient"
    assert bool((over_arch.gates.linear.weight.grad != 0).any())


def count_noise_draws(monkeypatch):
    """Record the shape of every tensor that ``Tensor.normal_`` fills, the masks' one source of noise."""
    calls = []
    original = torch.Tensor.normal_

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.shape)
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "normal_", counting)
    return calls


def test_one_noise_draw_per_layer(monkeypatch):
    over_arch = warmed_up_mome()
    calls = count_noise_draws(monkeypatch)
    over_arch(torch.randn(8, 6))
    assert calls == [torch.Size([6]), torch.Size([5]), torch.Size([4])]

    over_arch.start_expert_phase()
    calls.clear()
    over_arch(torch.randn(8, 6))
    assert calls == [torch.Size([3, 5, 6]), torch.Size([3, 4, 5]), torch.Size([3, 3, 4])]


@pytest.mark.parametrize("switch", [False, True])
def test_noise_only_in_training(switch):
    over_arch = make_mome(6, (5, 4), num_experts=3, batch_norm=True, dropout=0.0)
    if switch:
        over_arch.start_expert_phase()
    features = torch.randn(8, 6)
    over_arch.train()
    first, second = over_arch(features)[0], over_arch(features)[0]
    assert not torch.allclose(first, second)
    over_arch.eval()
    assert torch.equal(over_arch(features)[0], over_arch(features)[0])


def test_regularization_by_hand():
    # Every mu is 0.5 and sigma 0.5, so each entry adds Phi(1).
    over_arch = make_mome(3, (2, 2), num_experts=2, lambda_neuron=0.1, lambda_expert=0.01)
    assert abs(float(over_arch.regularization().detach()) - 0.1 * (3 + 2) * PHI_1) < 1e-6
    over_arch.start_expert_phase()
    # The frozen neuron masks add nothing; expert masks have 2 * (2 * 3 + 2 * 2) = 20 entries.
    assert abs(float(over_arch.regularization().detach()) - 0.01 * 20 * PHI_1) < 1e-6


def test_regularization_of_ablations():
    mome_w = make_mome(3, (2, 2), use_neuron_masks=False, lambda_expert=0.01)
    assert abs(float(mome_w.regularization().detach()) - 0.01 * 20 * PHI_1) < 1e-6
    mome_n = make_mome(3, (2, 2), use_expert_masks=False, lambda_neuron=0.1)
    assert abs(float(mome_n.regularization().detach()) - 0.1 * 5 * PHI_1) < 1e-6
    base = make_mome(3, (2, 2), use_neuron_masks=False, use_expert_masks=False)
    assert float(base.regularization()) == 0.0


@pytest.mark.parametrize(
    "name, phase, wants_switch, has_gates, has_neuron_masks, has_expert_masks",
    [
        ("mome", "neuron", True, True, True, False),
        ("base", "none", False, False, False, False),
        ("mome_n", "neuron", False, False, True, False),
        ("mome_w", "expert", False, True, False, True),
    ],
)
def test_ablation_flags(name, phase, wants_switch, has_gates, has_neuron_masks, has_expert_masks):
    cfg = ModelConfig(hidden_dims=[4, 3], num_experts=2)
    over_arch = build_over_arch(name, 5, 2, cfg)
    assert over_arch.phase == phase
    assert over_arch.wants_phase_switch is wants_switch
    assert (over_arch.gates is not None) is has_gates
    assert (over_arch.layers[0].neuron_mask_mu is not None) is has_neuron_masks
    assert (over_arch.layers[0].expert_mask_mu is not None) is has_expert_masks
    assert over_arch.output_dim == 3


@pytest.mark.parametrize("name", ["base", "mome_n", "mome_w"])
def test_ablations_ignore_phase_switch(name):
    over_arch = build_over_arch(name, 5, 2, ModelConfig(hidden_dims=[4, 3], num_experts=2))
    shapes = {name: tuple(tensor.shape) for name, tensor in over_arch.state_dict().items()}
    phase = over_arch.phase
    over_arch.start_expert_phase()
    assert over_arch.phase == phase
    assert {name: tuple(tensor.shape) for name, tensor in over_arch.state_dict().items()} == shapes


def test_mome_switches_phase():
    over_arch = build_over_arch("mome", 5, 2, ModelConfig(hidden_dims=[4, 3], num_experts=2))
    over_arch.start_expert_phase()
    assert over_arch.phase == "expert"
    assert over_arch.wants_phase_switch is True


@pytest.mark.parametrize("name", ["base", "mome_n"])
def test_single_network_gives_every_task_the_same_output(name):
    over_arch = build_over_arch(name, 5, 3, ModelConfig(hidden_dims=[4, 3], num_experts=2)).eval()
    outputs = over_arch(torch.randn(7, 5))
    assert len(outputs) == 3
    assert outputs[0].shape == (7, 3)
    assert torch.equal(outputs[0], outputs[2])


def test_unknown_over_arch():
    with pytest.raises(ConfigError, match=r"model.over_arch: unknown over-arch 'nope' \(known: .*mome.*\)"):
        build_over_arch("nope", 5, 2, ModelConfig())


def test_wrong_input_width():
    with pytest.raises(ValueError, match="expected input B x 2"):
        make_mome()(torch.randn(3, 4))


def test_sparsity_by_hand():
    over_arch = make_mome(4, (3, 2), num_experts=2)
    with torch.no_grad():
        over_arch.layers[0].neuron_mask_mu.copy_(torch.tensor([0.5, -1.0, 0.7, 2.0]))
        over_arch.layers[1].neuron_mask_mu.copy_(torch.tensor([0.3, -0.2, 1.5]))
    before = over_arch.sparsity()
    assert before["phase"] == "neuron"
    assert before["neuron"] == {"layers.0": 0.25, "layers.1": pytest.approx(1 / 3)}
    assert before["experts"] == []

    over_arch.start_expert_phase()
    with torch.no_grad():
        # Expert 0 has 2 * 3 + 2 * 2 = 10 entries: 4 zeros, 4 ones, 2 between. Expert 1: all 0.5.
        first = over_arch.layers[0].expert_mask_mu
        first[0].fill_(1.0)
        first[0, 0, :3] = torch.tensor([-1.0, 0.0, 0.25])
        first[1].fill_(0.5)
        second = over_arch.layers[1].expert_mask_mu
        second[0] = torch.tensor([[2.0, 0.75], [-0.5, -3.0]])
        second[1].fill_(0.5)
    after = over_arch.sparsity()
    assert after["phase"] == "expert"
    assert after["neuron"] == {"layers.0": 0.25, "layers.1": pytest.approx(1 / 3)}
    assert after["kept_neurons"] == {"layers.0": 3, "layers.1": 2}
    assert after["experts"][0] == pytest.approx({"zero": 0.4, "one": 0.4, "between": 0.2})
    assert after["experts"][1] == pytest.approx({"zero": 0.0, "one": 0.0, "between": 1.0})


def test_structure_state_restores_expert_phase():
    source = warmed_up_mome()
    with torch.no_grad():
        source.layers[0].neuron_mask_mu.copy_(torch.tensor([0.5, -0.2, 0.8, 1.3, -1.0, 0.1]))
        source.layers[1].neuron_mask_mu.copy_(torch.tensor([0.9, -0.4, 0.6, 0.0, 0.7]))
    source.start_expert_phase()
    with torch.no_grad():
        for layer in source.layers:
            layer.expert_mask_mu.uniform_(-0.5, 1.5)
    structure = source.structure_state()
    assert structure == {"phase": "expert", "input_widths": [4, 3, 4]}

    target = warmed_up_mome(seed=1)
    target.load_structure_state(structure)
    target.load_state_dict(source.state_dict())
    features = torch.randn(5, 6)
    source.eval()
    target.eval()
    for expected, actual in zip(source(features), target(features)):
        assert torch.equal(expected, actual)


def test_structure_state_mismatch():
    over_arch = warmed_up_mome()
    with pytest.raises(InputError, match="does not fit"):
        over_arch.load_structure_state({"phase": "expert", "input_widths": [7, 3, 4]})
