"""RankingModel, build_model and multitask_loss."""

import math

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from mome_rec.config import ModelConfig
from mome_rec.errors import DataError
from mome_rec.model import RankingModel, build_model, multitask_loss
from mome_rec.modules import OverArch, Tower


class RecordingOverArch(OverArch):
    """Returns ``(t + 1) * features[:, :1]`` for task ``t`` and keeps the last input."""

    def __init__(self, in_features: int, num_tasks: int) -> None:
        super().__init__(in_features, num_tasks, output_dim=1)
        self.scale = nn.Parameter(torch.ones(()))
        self.seen = None

    def forward(self, features):
        self.seen = features
        return [features[:, :1] * self.scale * (task + 1) for task in range(self.num_tasks)]


def identity_tower() -> Tower:
    tower = Tower(1, [], dropout=0.0, batch_norm=False)
    with torch.no_grad():
        tower.mlp[0].weight.fill_(1.0)
        tower.mlp[0].bias.zero_()
    return tower


def small_batch():
    # Sample 0: a = [1], b = [0]; sample 1: a = [2, 3], b = [] (sum pooling).
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"], values=torch.tensor([1, 2, 3, 0]), lengths=torch.tensor([1, 2, 1, 0])
    )
    dense = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -2.0]])
    return dense, sparse


def test_forward_concatenates_pooled_embeddings_and_dense():
    tables = [
        EmbeddingBagConfig(name="t_a", embedding_dim=2, num_embeddings=4, feature_names=["a"]),
        EmbeddingBagConfig(name="t_b", embedding_dim=2, num_embeddings=3, feature_names=["b"]),
    ]
    over_arch = RecordingOverArch(2 + 2 + 3, num_tasks=2)
    model = RankingModel(tables, 3, over_arch, nn.ModuleList([identity_tower(), identity_tower()]))
    with torch.no_grad():
        model.sparse_arch.embedding_bags["t_a"].weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
        model.sparse_arch.embedding_bags["t_b"].weight.copy_(torch.tensor([[7.0, 8.0], [9.0, 9.0], [9.0, 9.0]]))
    dense, sparse = small_batch()

    logits = model(dense, sparse)

    expected = torch.tensor(
        [
            [1.0, 2.0, 7.0, 8.0, 0.5, -1.0, 2.0],
            [3.0 + 5.0, 4.0 + 6.0, 0.0, 0.0, 1.5, 0.0, -2.0],
        ]
    )
    assert torch.equal(over_arch.seen, expected)
    assert torch.equal(logits, torch.tensor([[1.0, 2.0], [8.0, 16.0]]))


def test_ranking_model_rejects_wrong_widths():
    tables = [EmbeddingBagConfig(name="t_a", embedding_dim=2, num_embeddings=4, feature_names=["a"])]
    with pytest.raises(ValueError, match="takes 9 features, the inputs give 5"):
        RankingModel(tables, 3, RecordingOverArch(9, 1), nn.ModuleList([identity_tower()]))
    with pytest.raises(ValueError, match="2 towers for 1 tasks"):
        RankingModel(tables, 3, RecordingOverArch(5, 1), nn.ModuleList([identity_tower(), identity_tower()]))


def test_build_model_tables():
    cfg = ModelConfig(embedding_dim=4, hidden_dims=[8, 4], num_experts=2, tower_dims=[4])
    model = build_model(cfg, {"a": 10, "b": 5}, num_dense=3, num_tasks=2)
    assert [table.name for table in model.tables] == ["t_a", "t_b"]
    assert [table.feature_names for table in model.tables] == [["a"], ["b"]]
    assert [table.num_embeddings for table in model.tables] == [10, 5]
    assert [table.embedding_dim for table in model.tables] == [4, 4]
    assert model.over_arch.in_features == 2 * 4 + 3
    assert len(model.towers) == 2


@pytest.mark.parametrize("name", ["mome", "base", "mome_n", "mome_w"])
def test_build_model_forward_and_backward(name):
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_dim=4, over_arch=name, hidden_dims=[8, 4], num_experts=2, tower_dims=[4])
    model = build_model(cfg, {"a": 10, "b": 5}, num_dense=3, num_tasks=2)
    dense, sparse = small_batch()
    logits = model(dense, sparse)
    assert logits.shape == (2, 2)
    loss = multitask_loss(logits, torch.tensor([[1.0, 0.0], [0.0, 1.0]])) + model.over_arch.regularization()
    loss.backward()
    assert model.towers[0].mlp[0].weight.grad is not None
    assert model.sparse_arch.embedding_bags["t_a"].weight.grad is not None


def test_build_model_meta_device():
    cfg = ModelConfig(embedding_dim=4, hidden_dims=[8, 4], num_experts=2, tower_dims=[4])
    model = build_model(cfg, {"a": 10}, num_dense=1, num_tasks=1, device=torch.device("meta"))
    assert model.sparse_arch.embedding_bags["t_a"].weight.is_meta
    assert model.over_arch.layers[0].weight.device.type == "cpu"
    assert model.towers[0].mlp[0].weight.device.type == "cpu"


def test_build_model_rejects_empty_table():
    with pytest.raises(DataError, match="sparse column b: the embedding table needs at least 1 row, got 0"):
        build_model(ModelConfig(embedding_dim=4), {"a": 3, "b": 0}, num_dense=1, num_tasks=1)


def test_multitask_loss_by_hand():
    # BCE(0, y) = ln 2; BCE(ln 3, 1) = -ln(3/4); BCE(ln 3, 0) = -ln(1/4) = ln 4.
    # Task 0: (ln 2 + ln 4) / 2 = 1.03972077; task 1: (ln 4/3 + ln 2) / 2 = 0.49041463.
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    labels = torch.tensor([[1, 1], [0, 0]])
    assert abs(float(multitask_loss(logits, labels)) - 0.76506770) < 1e-6


def test_multitask_loss_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        multitask_loss(torch.zeros(4, 2), torch.zeros(4, 3))
