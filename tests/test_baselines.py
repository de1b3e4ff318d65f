"""Baseline over-arches: expert groups, MMoE, MoE, CGC, PLE and AITM against hand-computed values and sizes."""

import math

import pytest
import torch
from torch import nn

from mome_rec.config import ModelConfig
from mome_rec.errors import ConfigError
from mome_rec.model import build_model, multitask_loss
from mome_rec.modules import (
    OVER_ARCHS,
    AITMOverArch,
    AttentionTransfer,
    ExpertGroup,
    ExpertLayer,
    MixtureOverArch,
    PLEOverArch,
    SharedBottomOverArch,
    SingleTaskOverArch,
    build_over_arch,
)
from mome_rec.modules.ple import split_experts
from mome_rec.sizes import mlp_fp32_bytes, size_report

BASELINES = ("single_task", "shared_bottom", "moe", "mmoe", "cgc", "ple", "aitm")


def zero_linear(linear: nn.Linear) -> None:
    """Make a gate uniform: zero logits give softmax weights 1 / E."""
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()


# ------------------------------------------------------------- expert groups


def test_expert_layer_by_hand():
    # Expert 0: relu(1*1 + 2*(-1) + 0.5) = relu(-0.5) = 0; expert 1: relu(1*2 + 2*3 - 1) = 7.
    layer = ExpertLayer(2, 1, 2, dropout=0.0, batch_norm=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[[1.0, -1.0]], [[2.0, 3.0]]]))
        layer.bias.copy_(torch.tensor([[0.5], [-1.0]]))
    output = layer(torch.tensor([[1.0, 2.0]]))
    assert output.shape == (1, 2, 1)
    assert torch.equal(output, torch.tensor([[[0.0], [7.0]]]))


def test_expert_layer_per_expert_inputs_by_hand():
    # Expert 0 reads [1, 2] -> relu(-0.5) = 0; expert 1 reads [1, 1] -> relu(2 + 3 - 1) = 4.
    layer = ExpertLayer(2, 1, 2, dropout=0.0, batch_norm=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[[1.0, -1.0]], [[2.0, 3.0]]]))
        layer.bias.copy_(torch.tensor([[0.5], [-1.0]]))
    output = layer(torch.tensor([[[1.0, 2.0], [1.0, 1.0]]]))
    assert torch.equal(output, torch.tensor([[[0.0], [4.0]]]))


def test_expert_group_matches_separate_mlps():
    torch.manual_seed(0)
    group = ExpertGroup(5, [4, 3], 3, dropout=0.0, batch_norm=True).eval()
    with torch.no_grad():
        for layer in group.layers:
            layer.batch_norm.running_mean.uniform_(-1.0, 1.0)
            layer.batch_norm.running_var.uniform_(0.5, 2.0)
    features = torch.randn(6, 5)
    output = group(features)
    for expert in range(3):
        hidden = features
        for layer in group.layers:
            width = layer.out_features
            channels = slice(expert * width, (expert + 1) * width)
            norm = layer.batch_norm
            pre = hidden @ layer.weight[expert].T + layer.bias[expert]
            pre = (pre - norm.running_mean[channels]) / torch.sqrt(norm.running_var[channels] + norm.eps)
            hidden = torch.relu(pre * norm.weight[channels] + norm.bias[channels])
        assert torch.allclose(output[:, expert], hidden, atol=1e-6)


def test_expert_layer_initialisation_bound():
    torch.manual_seed(0)
    layer = ExpertLayer(24, 50, 4, dropout=0.0, batch_norm=False)
    bound = math.sqrt(6.0 / 24)
    assert layer.weight.abs().max() <= bound
    assert layer.weight.abs().max() > 0.9 * bound
    assert torch.equal(layer.bias, torch.zeros(4, 50))


def test_expert_layer_rejects_wrong_input():
    layer = ExpertLayer(3, 2, 2, dropout=0.0, batch_norm=False)
    with pytest.raises(ValueError, match="expected input B x 3 or B x 2 x 3"):
        layer(torch.zeros(4, 3, 3))


# ---------------------------------------------------------------- mixtures


def set_identity_experts(group: ExpertGroup, scales) -> None:
    """One layer, in 1 -> out 1: expert e computes relu(scales[e] * x)."""
    with torch.no_grad():
        group.layers[0].weight.copy_(torch.tensor(scales, dtype=torch.float32).view(-1, 1, 1))
        group.layers[0].bias.zero_()


def test_mmoe_uniform_gates_average_experts():
    # Experts 1x, 2x, 3x on x = 2 give 2, 4, 6; uniform gates give 4 for every task.
    mmoe = MixtureOverArch(1, [1], 3, 2, gate_per_task=True, dropout=0.0, batch_norm=False)
    set_identity_experts(mmoe.experts, [1.0, 2.0, 3.0])
    zero_linear(mmoe.gates.linear)
    outputs = mmoe(torch.tensor([[2.0]]))
    assert len(outputs) == 2
    for output in outputs:
        assert torch.allclose(output, torch.tensor([[4.0]]))


def test_mmoe_gates_differ_per_task():
    # Gate logits: task 0 favours expert 0 by log 3 (weights 3/4, 1/4), task 1 is uniform.
    # Experts 1x and 5x on x = 1: task 0 gets 0.75 + 1.25 = 2, task 1 gets 3.
    mmoe = MixtureOverArch(1, [1], 2, 2, gate_per_task=True, dropout=0.0, batch_norm=False)
    set_identity_experts(mmoe.experts, [1.0, 5.0])
    with torch.no_grad():
        mmoe.gates.linear.weight.zero_()
        mmoe.gates.linear.bias.copy_(torch.tensor([math.log(3.0), 0.0, 0.0, 0.0]))
    task0, task1 = mmoe(torch.tensor([[1.0]]))
    assert torch.allclose(task0, torch.tensor([[2.0]]))
    assert torch.allclose(task1, torch.tensor([[3.0]]))


def test_moe_one_gate_for_every_task():
    moe = MixtureOverArch(4, [3], 2, 3, gate_per_task=False, dropout=0.0, batch_norm=False)
    assert moe.gates.linear.out_features == 2
    outputs = moe(torch.randn(5, 4))
    assert len(outputs) == 3
    assert outputs[0] is outputs[1] is outputs[2]


def test_shared_bottom_and_single_task():
    torch.manual_seed(0)
    features = torch.randn(5, 4)
    shared = SharedBottomOverArch(4, [3, 2], 2, dropout=0.0, batch_norm=False)
    first, second = shared(features)
    assert first is second
    assert first.shape == (5, 2)

    single = SingleTaskOverArch(4, [3], 2, dropout=0.0, batch_norm=False)
    with torch.no_grad():
        single.networks.layers[0].weight[0].fill_(1.0)
        single.networks.layers[0].weight[1].fill_(-1.0)
    positive = torch.ones(1, 4)
    task0, task1 = single(positive)
    assert torch.allclose(task0, torch.full((1, 3), 4.0))
    assert torch.equal(task1, torch.zeros(1, 3))


# -------------------------------------------------------------- CGC and PLE


def test_cgc_task_mixes_own_and_shared_experts():
    # S = 1 shared expert (10x), K = 1 per task (task 0: 1x, task 1: 3x); uniform gates over 2 experts.
    # x = 1: task 0 gets (1 + 10) / 2 = 5.5, task 1 gets (3 + 10) / 2 = 6.5.
    cgc = PLEOverArch(1, [1], 1, 1, 2, num_levels=1, dropout=0.0, batch_norm=False)
    level = cgc.levels[0]
    set_identity_experts(level.task_experts, [1.0, 3.0])
    set_identity_experts(level.shared_experts, [10.0])
    for gate in level.task_gates:
        zero_linear(gate)
    assert level.shared_gate is None
    task0, task1 = cgc(torch.tensor([[1.0]]))
    assert torch.allclose(task0, torch.tensor([[5.5]]))
    assert torch.allclose(task1, torch.tensor([[6.5]]))


def test_ple_second_level_reads_task_and_shared_outputs():
    # Level 1 as above plus a shared gate over all 3 experts: (1 + 3 + 10) / 3 = 14/3.
    # Level 2 experts: task 0 2x, task 1 1x, shared 1x, uniform gates.
    # Task 0: (2 * 5.5 + 14/3) / 2; task 1: (6.5 + 14/3) / 2.
    ple = PLEOverArch(1, [1], 1, 1, 2, num_levels=2, dropout=0.0, batch_norm=False)
    first, second = ple.levels
    set_identity_experts(first.task_experts, [1.0, 3.0])
    set_identity_experts(first.shared_experts, [10.0])
    set_identity_experts(second.task_experts, [2.0, 1.0])
    set_identity_experts(second.shared_experts, [1.0])
    for gate in list(first.task_gates) + [first.shared_gate] + list(second.task_gates):
        zero_linear(gate)
    assert second.shared_gate is None
    task0, task1 = ple(torch.tensor([[1.0]]))
    assert torch.allclose(task0, torch.tensor([[(11.0 + 14.0 / 3.0) / 2.0]]))
    assert torch.allclose(task1, torch.tensor([[(6.5 + 14.0 / 3.0) / 2.0]]))


def test_split_experts():
    assert split_experts(ModelConfig(num_experts=8), 2) == (4, 2)
    assert split_experts(ModelConfig(num_experts=8, num_shared_experts=2), 2) == (2, 3)
    assert split_experts(ModelConfig(num_experts=5), 3) == (2, 1)


@pytest.mark.parametrize("experts, shared, tasks", [(8, 3, 2), (8, 0, 2), (4, 3, 2), (2, None, 2)])
def test_split_experts_rejects_uneven(experts, shared, tasks):
    with pytest.raises(ConfigError, match="model.num_shared_experts"):
        split_experts(ModelConfig(num_experts=experts, num_shared_experts=shared), tasks)


# --------------------------------------------------------------------- AITM


def test_attention_transfer_by_hand():
    # D = 1 with Q = K = V = 1: scores own^2 = 1 and transferred^2 = 4, so
    # z = (e^1 * 1 + e^4 * 2) / (e^1 + e^4).
    unit = AttentionTransfer(1)
    for linear in (unit.query, unit.key, unit.value):
        nn.init.ones_(linear.weight)
    output = unit(torch.tensor([[1.0]]), torch.tensor([[2.0]]))
    expected = (math.e * 1.0 + math.e**4 * 2.0) / (math.e + math.e**4)
    assert torch.allclose(output, torch.tensor([[expected]]))


def test_aitm_transfers_from_first_task_only():
    torch.manual_seed(0)
    aitm = AITMOverArch(4, [3], 2, dropout=0.0, batch_norm=False).eval()
    features = torch.randn(5, 4)
    click, conversion = aitm(features)
    networks = aitm.networks(features)
    assert torch.equal(click, networks[:, 0])
    transferred = aitm.transfers[0](networks[:, 0])
    assert torch.allclose(conversion, aitm.attention[0](networks[:, 1], transferred))


# -------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "name, values",
    [
        # Expert 4 -> [3, 2] with BatchNorm: 4*3 + 3 + 4*3 + 3*2 + 2 + 4*2 = 43 values.
        ("shared_bottom", 43),
        ("single_task", 2 * 43),
        # 2 experts + one gate Linear(4, 2) = 10 values.
        ("moe", 2 * 43 + 10),
        # 2 experts + 2 gates Linear(4, 2).
        ("mmoe", 2 * 43 + 20),
        # 3 experts split as S = 1, K = 1 for T = 2; 3 experts + 2 task gates Linear(4, 2).
        ("cgc", 3 * 43 + 20),
        # Level 1: 3 experts + task gates 20 + shared gate Linear(4, 3) = 15.
        # Level 2: experts 2 -> [3, 2]: 2*3 + 3 + 12 + 16 = 37, 3 of them, + task gates 2 * Linear(2, 2) = 12.
        ("ple", 3 * 43 + 20 + 15 + 3 * 37 + 12),
        # 2 networks + transfer Linear(2, 2) with BatchNorm (6 + 8) + Q, K, V (3 * 4).
        ("aitm", 2 * 43 + 14 + 12),
    ],
)
def test_deployable_bytes_by_hand(name, values):
    num_experts = 3 if name in ("cgc", "ple") else 2
    over_arch = build_over_arch(name, 4, 2, ModelConfig(hidden_dims=[3, 2], num_experts=num_experts))
    assert over_arch.deployable_bytes() == values * 4
    assert over_arch.dense_fp32_bytes() == values * 4


def test_mmoe_at_paper_dimensions_is_39_4_mb():
    # 16 sparse features x 128 + 63 dense = 2111 inputs; 8 experts [512, 256]; towers [128, 64].
    cfg = ModelConfig(embedding_dim=128, over_arch="mmoe", hidden_dims=[512, 256], num_experts=8, tower_dims=[128, 64])
    model = build_model(cfg, {f"c{index}": 2 for index in range(16)}, num_dense=63, num_tasks=2)
    sizes = size_report(model)
    experts = 8 * mlp_fp32_bytes(2111, [512, 256], batch_norm=True)
    gates = 2 * mlp_fp32_bytes(2111, [], batch_norm=False, output_dim=8)
    towers = 2 * mlp_fp32_bytes(256, [128, 64], batch_norm=True, output_dim=1)
    assert sizes["deployable"] * 1e6 == pytest.approx(experts + gates + towers)
    assert round(sizes["deployable"], 1) == 39.4
    assert sizes["embeddings"] == pytest.approx(16 * 2 * 128 * 4 / 1e6)


# ----------------------------------------------------------------- training


def test_every_baseline_is_registered():
    assert set(BASELINES) <= set(OVER_ARCHS)


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_learns_a_fixed_batch(name):
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_dim=4, over_arch=name, hidden_dims=[16, 8], num_experts=4, tower_dims=[8], dropout=0.0)
    over_arch = build_over_arch(name, 6, 2, cfg)
    towers = nn.ModuleList(nn.Linear(8, 1) for _ in range(2))
    features = torch.randn(64, 6)
    labels = torch.stack([(features[:, 0] > 0), (features[:, 1] + features[:, 2] > 0)], dim=1).float()
    parameters = list(over_arch.parameters()) + list(towers.parameters())
    optimizer = torch.optim.Adam(parameters, lr=1e-2)

    def loss_value():
        outputs = over_arch(features)
        logits = torch.cat([tower(output) for tower, output in zip(towers, outputs)], dim=1)
        return multitask_loss(logits, labels)

    first = float(loss_value().detach())
    for _ in range(30):
        optimizer.zero_grad()
        loss = loss_value()
        loss.backward()
        optimizer.step()
    assert float(loss_value().detach()) < 0.5 * first
    assert all(parameter.grad is not None for parameter in parameters)
