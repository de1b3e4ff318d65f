"""Figures: the expert-mask histogram by hand and every PNG written from small inputs."""

import pytest
import torch

from mome_rec.figures import (
    ablation_figure,
    auc_size_figure,
    convergence_figure,
    expert_mask_histogram,
    mask_values_figure,
    write_run_figures,
)
from mome_rec.modules import MoMEOverArch, build_over_arch
from mome_rec.config import ModelConfig

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 5000


def mome_w_with_known_masks():
    """Expert masks of 2 experts over layers 3 x 2 (6 entries) and 1 x 3 (3 entries): 9 entries each."""
    over_arch = MoMEOverArch(2, [3, 1], 2, 2, lambda_neuron=0.0, lambda_expert=0.0, use_neuron_masks=False)
    first, second = over_arch.layers
    with torch.no_grad():
        # Expert 0: clamp gives 0, 0, 1, 1, 0.05, 0.55 | 1, 1, 1.  Expert 1: 0 x 6 | 0.95, 0, 0.
        first.expert_mask_mu.copy_(torch.tensor([
            [[-1.0, 0.0], [1.0, 2.0], [0.05, 0.55]],
            [[-0.2, -3.0], [0.0, 0.0], [-0.5, 0.0]],
        ]))
        second.expert_mask_mu.copy_(torch.tensor([[[1.0, 1.5, 1.0]], [[0.95, -1.0, 0.0]]]))
    return over_arch


def test_expert_mask_histogram_by_hand():
    histogram = expert_mask_histogram(mome_w_with_known_masks(), bins=10)
    # 18 entries: zeros 2 + 8 = 10, ones 5 + 0, between 0.05, 0.55, 0.95 in bins 0, 5 and 9.
    assert histogram["total"] == 18
    assert histogram["zero"] == 10
    assert histogram["one"] == 5
    assert histogram["between_counts"] == [1, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert histogram["between_edges"][0] == 0.0
    assert histogram["between_edges"][-1] == 1.0
    expert0, expert1 = histogram["per_expert"]
    assert expert0["zero"] == pytest.approx(2 / 9)
    assert expert0["one"] == pytest.approx(5 / 9)
    assert expert0["between"] == pytest.approx(2 / 9)
    assert expert1["zero"] == pytest.approx(8 / 9)
    assert expert1["one"] == 0.0
    assert expert1["between"] == pytest.approx(1 / 9)


def test_expert_mask_histogram_of_model_without_masks():
    assert expert_mask_histogram(build_over_arch("base", 4, 2, ModelConfig(hidden_dims=[3]))) is None
    assert expert_mask_histogram(build_over_arch("mmoe", 4, 2, ModelConfig(hidden_dims=[3], num_experts=2))) is None


def history(with_masks: bool):
    """Three epochs; with masks the first is the neuron phase and the L0 term dominates the objective."""
    records = []
    for epoch in (1, 2, 3):
        record = {"epoch": epoch, "phase": "none", "train_loss": 0.5 / epoch, "l0": 0.0, "validation": {}, "sparsity": {},
                  "seconds": 1.0}
        if with_masks:
            record["phase"] = "neuron" if epoch == 1 else "expert"
            record["train_loss"] = 20.0 / epoch
            record["l0"] = 18.0 / epoch
            expert = {"zero": 0.2 * epoch, "one": 0.1, "between": 0.7 - 0.2 * epoch}
            record["sparsity"] = {"neuron": {"layers.0": 0.1 * epoch}, "experts": [expert, expert]}
        records.append(record)
    return records


def test_write_run_figures_from_model(tmp_path):
    paths = write_run_figures(tmp_path, {"history": history(True)}, model=mome_w_with_known_masks())
    assert paths == [tmp_path / "figures" / "convergence.png", tmp_path / "figures" / "mask_values.png"]
    for path in paths:
        assert_png(path)
    assert not list((tmp_path / "figures").glob(".*.tmp"))


def test_write_run_figures_from_metrics_histogram(tmp_path):
    histogram = expert_mask_histogram(mome_w_with_known_masks())
    paths = write_run_figures(tmp_path, {"history": [], "mask_histogram": histogram})
    assert paths == [tmp_path / "figures" / "mask_values.png"]


def test_write_run_figures_without_masks(tmp_path):
    paths = write_run_figures(tmp_path, {"history": history(False)}, model=build_over_arch("base", 4, 2, ModelConfig()))
    assert paths == [tmp_path / "figures" / "convergence.png"]
    assert_png(paths[0])


def test_comparison_figures(tmp_path):
    ablation = {
        "census": {"base": (0.93, 0.001), "mome_n": (0.931, 0.002), "mome_w": (0.935, 0.0), "mome": (0.936, 0.001)},
        "synthetic": {"base": (0.70, 0.01), "mome": (0.72, 0.01)},
    }
    assert_png(ablation_figure(tmp_path / "ablation.png", ablation))
    points = {"mmoe": (0.78, 0.934, 0.001), "mome": (0.05, 0.936, 0.001), "torch-rechub MMOE": (0.8, 0.932, 0.002)}
    assert_png(auc_size_figure(tmp_path / "auc_size.png", points))
    assert_png(convergence_figure(tmp_path / "convergence.png", history(True)))
    assert_png(mask_values_figure(tmp_path / "mask.png", expert_mask_histogram(mome_w_with_known_masks())))
