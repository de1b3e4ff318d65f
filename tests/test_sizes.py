"""Byte counts and the size report against hand arithmetic."""

import pytest
import torch

from mome_rec.config import ModelConfig
from mome_rec.model import build_model
from mome_rec.modules import MoMEOverArch, Tower
from mome_rec.sizes import mlp_fp32_bytes, module_fp32_bytes, packed_mask_bytes, size_report


def test_mlp_fp32_bytes_of_a_tower():
    # 256*128 + 128 + 4*128 + 128*64 + 64 + 4*64 + 64*1 + 1 = 41985 values.
    assert mlp_fp32_bytes(256, [128, 64], batch_norm=True, output_dim=1) == 41985 * 4


def test_mlp_fp32_bytes_matches_tower_module():
    tower = Tower(256, [128, 64], dropout=0.2, batch_norm=True)
    assert module_fp32_bytes(tower) == mlp_fp32_bytes(256, [128, 64], batch_norm=True, output_dim=1)


def test_mmoe_at_paper_dimensions_is_39_4_mb():
    # Input 16 * 128 + 63 = 2111; 8 experts [512, 256] with BatchNorm; 2 gates Linear(2111, 8); 2 towers.
    # Expert: 2111*512 + 512 + 4*512 + 512*256 + 256 + 4*256 = 1215744 values, 8 of them 9725952.
    # Gates: 2 * (2111*8 + 8) = 33792. Towers: 2 * 41985 = 83970. Sum 9843714 values = 39374856 bytes.
    in_features = 16 * 128 + 63
    experts = 8 * mlp_fp32_bytes(in_features, [512, 256], batch_norm=True)
    gates = 2 * mlp_fp32_bytes(in_features, [], batch_norm=False, output_dim=8)
    towers = 2 * mlp_fp32_bytes(256, [128, 64], batch_norm=True, output_dim=1)
    assert experts == 1215744 * 8 * 4
    assert gates == 33792 * 4
    assert experts + gates + towers == 39374856
    assert round((experts + gates + towers) / 1e6, 1) == 39.4


def test_packed_mask_bytes():
    # 12 entries -> 2 bytes of bits; 3 fractional entries -> 3 * (4 + 4) bytes.
    mask = torch.tensor([0.0, 1.0, 0.5, 1.0, 0.0, 0.25, 1.0, 1.0, 0.0, 0.0, 0.75, 1.0])
    assert packed_mask_bytes(mask) == 2 + 24


def tiny_mome():
    over_arch = MoMEOverArch(4, [3, 2], 2, 2, lambda_neuron=0.1, lambda_expert=0.1)
    with torch.no_grad():
        over_arch.layers[0].neuron_mask_mu.copy_(torch.tensor([0.5, -1.0, 0.7, 2.0]))  # keeps 3 of 4
        over_arch.layers[1].neuron_mask_mu.copy_(torch.tensor([0.3, -0.2, 1.5]))  # keeps 2 of 3
    return over_arch


def test_mome_dense_fp32_bytes():
    # Layer 0: W 12 + b 3 + BN 4*3*2 experts 24 + neuron mask 4 + expert masks 2*3*4 = 24 -> 67 values.
    # Layer 1: W 6 + b 2 + BN 4*2*2 = 16 + neuron mask 3 + expert masks 2*2*3 = 12 -> 39 values.
    # Gates: 2 tasks * (4*2 + 2) = 20 values. Sum 126 values = 504 bytes, before and after pruning.
    over_arch = tiny_mome()
    assert over_arch.dense_fp32_bytes() == 504
    over_arch.start_expert_phase()
    assert over_arch.dense_fp32_bytes() == 504


def test_mome_deployable_bytes_in_neuron_phase():
    # As if pruned now, one network, gates unused.
    # Layer 0: 3 inputs -> 2 outputs: W 6 + b 2 + BN 4*2 = 16 values; layer 1: W 4 + b 2 + BN 8 = 14 values.
    # 30 values = 120 bytes, plus 3 int32 indices of kept input features = 12 bytes.
    assert tiny_mome().deployable_bytes() == 132


def test_mome_deployable_bytes_in_expert_phase():
    over_arch = tiny_mome()
    over_arch.start_expert_phase()
    with torch.no_grad():
        first = over_arch.layers[0].expert_mask_mu  # 2 x 2 x 3
        first.fill_(1.0)
        first[0, 0] = torch.tensor([0.5, -1.0, 0.2])
        first[1, 1, 2] = 0.9
        first[1, 0, 0] = -2.0
        second = over_arch.layers[1].expert_mask_mu  # 2 x 2 x 2
        second.fill_(0.0)
        second[1, 1, 0] = 0.25
    # Layer 0: W 6 + b 2 + BN 4*2*2 = 16 -> 24 values = 96 bytes; masks: 12 bits = 2 bytes, 3 fractional = 24.
    # Layer 1: W 4 + b 2 + BN 16 -> 22 values = 88 bytes; masks: 8 bits = 1 byte, 1 fractional = 8.
    # Kept-input index 3 * 4 = 12 bytes; gates 20 values = 80 bytes. Sum 96+26+88+9+12+80 = 311.
    assert over_arch.deployable_bytes() == 311


def test_base_deployable_equals_dense():
    base = MoMEOverArch(4, [3, 2], 2, 2, lambda_neuron=0.0, lambda_expert=0.0, use_neuron_masks=False, use_expert_masks=False)
    # (4*3 + 3 + 4*3) + (3*2 + 2 + 4*2) = 27 + 16 = 43 values.
    assert base.deployable_bytes() == 43 * 4
    assert base.dense_fp32_bytes() == 43 * 4
    assert base.dense_fp32_bytes() == mlp_fp32_bytes(4, [3, 2], batch_norm=True)


def test_size_report_of_ranking_model():
    cfg = ModelConfig(embedding_dim=4, over_arch="base", hidden_dims=[3, 2], tower_dims=[2])
    model = build_model(cfg, {"a": 10, "b": 5}, num_dense=3, num_tasks=2)
    # Over-arch on 2*4 + 3 = 11 inputs: (11*3 + 3 + 12) + (3*2 + 2 + 8) = 64 values.
    # Towers: 2 * ((2*2 + 2 + 8) + (2*1 + 1)) = 34 values. Tables: (10 + 5) * 4 = 60 values.
    report = size_report(model)
    assert report["deployable"] == pytest.approx((64 + 34) * 4 / 1e6)
    assert report["dense_fp32"] == pytest.approx((64 + 34) * 4 / 1e6)
    assert report["embeddings"] == pytest.approx(60 * 4 / 1e6)
    assert size_report(model, embeddings_mb=12.5)["embeddings"] == 12.5
