"""The train job end to end, in a child process, on synthetic and real data."""

import math

import pytest

from cli_helpers import read_metrics, run_cli

SMALL_SYNTHETIC = [
    "data.synthetic.train_rows=40000",
    "data.synthetic.validation_rows=10000",
    "data.synthetic.test_rows=20000",
    "train.epochs=3",
    "train.batch_size=256",
    "train.lr=3e-3",
    "train.neuron_epochs=1",
    "model.lambda_neuron=1e-6",
    "model.lambda_expert=1e-6",
]


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "run"
    result = run_cli(["train", "--config", "configs/synthetic.yaml", "--out", str(out), *SMALL_SYNTHETIC],
                     tmp_path_factory.mktemp("cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, read_metrics(out), result


def test_synthetic_learns_both_tasks(synthetic_run):
    _, metrics, _ = synthetic_run
    assert metrics["test"]["click"]["auc"] > 0.6
    assert metrics["test"]["conversion"]["auc"] > 0.6


def test_metrics_json_has_required_keys(synthetic_run):
    _, metrics, _ = synthetic_run
    for task in ("click", "conversion"):
        assert math.isfinite(metrics["test"][task]["logloss"])
        assert metrics["validation"][task]["auc"] is not None
    assert set(metrics["size_mb"]) == {"deployable", "dense_fp32", "embeddings"}
    assert all(value > 0 for value in metrics["size_mb"].values())
    experts = metrics["sparsity"]["experts"]
    assert len(experts) == 4  # configs/synthetic.yaml: model.num_experts
    for expert in experts:
        assert expert["zero"] + expert["one"] + expert["between"] == pytest.approx(1.0)
    assert set(metrics["sparsity"]["neuron"]) == {"layers.0", "layers.1"}


def test_phase_switch_after_neuron_epochs(synthetic_run):
    _, metrics, _ = synthetic_run
    assert [epoch["phase"] for epoch in metrics["history"]] == ["neuron", "expert", "expert"]


def test_epoch_log_line_reports_auc_l0_sparsity(synthetic_run):
    _, _, result = synthetic_run
    lines = [line for line in result.stderr.splitlines() if "epoch 3/3 [expert]" in line]
    assert len(lines) == 1
    for piece in ("click AUC", "conversion AUC", "logloss", "L0", "expert zeros"):
        assert piece in lines[0]


def test_best_checkpoint_is_complete(synthetic_run):
    out, _, _ = synthetic_run
    assert (out / "checkpoints" / "best" / "meta.json").is_file()
    assert not list((out / "checkpoints").glob(".*.tmp"))


def test_census_end_to_end(shared_data, tmp_path):
    out = tmp_path / "census"
    result = run_cli(["train", "--config", "configs/census.yaml", "--out", str(out), "train.epochs=3", "train.neuron_epochs=1",
                      "model.lambda_neuron=1e-6", "model.lambda_expert=1e-6"], tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(out)
    # Three epochs are enough to be far above chance; the full config's figures are in the README.
    assert metrics["test"]["income"]["auc"] > 0.85
    assert metrics["test"]["never_married"]["auc"] > 0.93


def test_aliexpress_sample_end_to_end(shared_data, tmp_path):
    out = tmp_path / "sample"
    result = run_cli(["train", "--config", "configs/aliexpress_sample.yaml", "--out", str(out)], tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(out)
    assert set(metrics["test"]) == {"click", "conversion"}
    assert metrics["test"]["click"]["auc"] is not None  # 20 test rows hold both click classes
