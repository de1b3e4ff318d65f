"""mome-rec compare: argument parsing, the lambda search, the table, reuse of runs, peers and the command end to end."""

import json
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import run_cli
from mome_rec import compare as compare_module
from mome_rec.compare import Comparison, lambda_candidates, parse_lambda_grid, parse_models, parse_peers, shown_lambdas
from mome_rec.config import Config
from mome_rec.data.preprocess import Arrays, Preprocessor
from mome_rec.config import SchemaConfig
from mome_rec.errors import ConfigError
from mome_rec.peers import feature_dict, rechub_version
from mome_rec.results_table import Row, csv_table, format_cell, markdown_table, mean_std, summarize_row

TASKS = ["click", "conversion"]


# ------------------------------------------------------------------ arguments


def test_parse_models():
    assert parse_models("all")[-4:] == ["base", "mome_n", "mome_w", "mome"]
    assert len(parse_models("all")) == 11
    assert parse_models("mmoe, ple,mmoe") == ["mmoe", "ple"]
    with pytest.raises(ConfigError, match="--models: unknown over-arch 'mmo'"):
        parse_models("mmoe,mmo")


def test_parse_peers_and_grid():
    assert parse_peers("all") == ["shared_bottom", "mmoe", "ple", "aitm"]
    assert parse_peers("none") == []
    with pytest.raises(ConfigError, match="--peers: no torch-rechub peer for 'cgc'"):
        parse_peers("cgc")
    assert parse_lambda_grid("1e-2,1e-6") == [1e-2, 1e-6]
    with pytest.raises(ConfigError, match="--lambda-grid: 'x' is not a number"):
        parse_lambda_grid("1e-2,x")
    with pytest.raises(ConfigError, match="non-negative"):
        parse_lambda_grid("-1")


def test_lambda_candidates_per_model():
    config = Config()
    config.model.lambda_neuron, config.model.lambda_expert = 0.5, 0.25
    grid = [1e-2, 1e-6]
    assert lambda_candidates("mome", grid, config) == [(1e-2, 1e-2), (1e-6, 1e-6)]
    assert lambda_candidates("mome_n", grid, config) == [(1e-2, 0.25), (1e-6, 0.25)]
    assert lambda_candidates("mome_w", grid, config) == [(0.5, 1e-2), (0.5, 1e-6)]
    assert lambda_candidates("mmoe", grid, config) == [(0.5, 0.25)]
    assert lambda_candidates("mome", [], config) == [(0.5, 0.25)]
    assert shown_lambdas("mome_n", 1e-2, 0.25) == (1e-2, None)
    assert shown_lambdas("mmoe", 1e-2, 0.25) == (None, None)


# ---------------------------------------------------------------------- table


def test_mean_std_by_hand():
    # mean 0.92; deviations -0.02, 0, 0.02: sample variance (0.0004 + 0.0004) / 2 = 0.0004, std 0.02.
    mean, std = mean_std([0.90, 0.92, 0.94])
    assert mean == pytest.approx(0.92)
    assert std == pytest.approx(0.02)
    assert mean_std([0.5]) == (0.5, 0.0)
    assert mean_std([None, 0.5, float("nan")]) == (0.5, 0.0)
    assert mean_std([None]) is None


def test_format_cell():
    assert format_cell((0.91234, 0.00456), 4, seeds=3) == "0.9123 ± 0.0046"
    assert format_cell((0.91234, 0.00456), 4, seeds=1) == "0.9123"
    assert format_cell((1.5, 0.0), 3, seeds=3) == "1.500"


def make_record(auc_click, auc_conversion, size, seconds):
    return {
        "test": {"click": {"auc": auc_click, "logloss": 1.0 - auc_click}, "conversion": {"auc": auc_conversion, "logloss": 0.3}},
        "test_average_auc": (auc_click + auc_conversion) / 2,
        "size_mb": size,
        "train_seconds": seconds,
    }


def test_markdown_bolds_best_of_each_column():
    mmoe = summarize_row("mmoe", "mome_rec", [make_record(0.80, 0.70, 2.0, 10), make_record(0.82, 0.70, 2.0, 12)], TASKS)
    mome = summarize_row("mome", "mome_rec", [make_record(0.79, 0.74, 0.5, 20), make_record(0.79, 0.74, 0.5, 20)], TASKS,
                         lambda_neuron=1e-6, lambda_expert=1e-6)
    table = markdown_table([mmoe, mome], TASKS)
    lines = table.splitlines()
    assert lines[0].startswith("| model | source | λ1 | λ2 | click AUC | click logloss |")
    mmoe_cells = [cell.strip() for cell in lines[2].split("|")[1:-1]]
    mome_cells = [cell.strip() for cell in lines[3].split("|")[1:-1]]
    # mmoe: click AUC 0.81 ± 0.0141 (best), logloss 0.19 (best), conversion 0.70, average 0.755, 2 MB, 11 s (best).
    assert mmoe_cells[4] == "**0.8100 ± 0.0141**"
    assert mmoe_cells[5] == "**0.1900 ± 0.0141**"
    assert mmoe_cells[6] == "0.7000"
    assert mmoe_cells[10] == "**11 ± 1**"
    # mome: conversion 0.74 (best), average (0.79 + 0.74) / 2 = 0.765 (best), 0.5 MB (best).
    assert mome_cells[2:4] == ["1e-06", "1e-06"]
    assert mome_cells[6] == "**0.7400**"
    assert mome_cells[8] == "**0.7650**"
    assert mome_cells[9] == "**0.500**"
    # The conversion log loss ties at 0.3000: both bold.
    assert mmoe_cells[7] == mome_cells[7] == "**0.3000**"


def test_note_row_and_csv():
    rows = [
        summarize_row("mmoe", "mome_rec", [make_record(0.8, 0.7, 2.0, 10)], TASKS),
        Row("torch-rechub MMOE", "torch-rechub", note="not installed: pip install -e '.[bench]'"),
    ]
    table = markdown_table(rows, TASKS)
    assert "| torch-rechub MMOE | torch-rechub | — | — | not installed: pip install -e '.[bench]' |" in table
    lines = csv_table(rows, TASKS).splitlines()
    header = lines[0].split(",")
    assert header[:6] == ["model", "source", "lambda_neuron", "lambda_expert", "seeds", "note"]
    assert "average_auc_mean" in header
    assert "train_seconds_std" in header
    values = dict(zip(header, lines[1].split(",")))
    assert float(values["average_auc_mean"]) == pytest.approx(0.75)
    assert float(values["average_auc_std"]) == 0.0


# ----------------------------------------------------------------- comparison


def fake_metrics(config: Config, seed: int):
    """Validation favours lambda 1e-3 and test favours 1e-2, so a test-based choice would differ."""
    lam = config.model.lambda_expert if config.model.over_arch != "mome_n" else config.model.lambda_neuron
    base = {"mmoe": 0.80, "mome": 0.82, "mome_n": 0.81}.get(config.model.over_arch, 0.75)
    validation = base + (0.01 if lam == 1e-3 else 0.0)
    test = base + (0.02 if lam == 1e-2 else 0.0) + 0.001 * seed
    per_task = lambda auc: {"auc": auc, "logloss": 1.0 - auc}  # noqa: E731
    history = [{"epoch": 1, "phase": "none", "train_loss": 0.5, "l0": 0.0, "validation": {}, "sparsity": {}, "seconds": 2.0}]
    return {
        "test": {task: per_task(test) for task in TASKS},
        "validation": {task: per_task(validation) for task in TASKS},
        "size_mb": {"deployable": 1.0, "dense_fp32": 2.0, "embeddings": 0.5},
        "history": history,
        "wall_seconds": 3.0,
    }


class FakeTrainer:
    def __init__(self):
        self.calls = []

    def __call__(self, config, run_dir):
        self.calls.append((config.model.over_arch, config.train.seed, config.model.lambda_neuron, config.model.lambda_expert))
        return fake_metrics(config, config.train.seed)


def fake_config():
    config = Config()
    config.data.schema.labels = list(TASKS)
    return config


def test_lambda_chosen_by_validation_not_test(tmp_path):
    trainer = FakeTrainer()
    comparison = Comparison(fake_config(), tmp_path, ["mmoe", "mome"], 3, trainer, lambda_grid=[1e-2, 1e-3], peers=[],
                            run_figures=False)
    document = comparison.run()

    mome_calls = [call for call in trainer.calls if call[0] == "mome"]
    assert mome_calls == [("mome", 0, 1e-2, 1e-2), ("mome", 0, 1e-3, 1e-3), ("mome", 1, 1e-3, 1e-3), ("mome", 2, 1e-3, 1e-3)]
    assert [call for call in trainer.calls if call[0] == "mmoe"] == [("mmoe", seed, 1e-4, 1e-4) for seed in range(3)]

    rows = {row["model"]: row for row in document["rows"]}
    assert (rows["mome"]["lambda_neuron"], rows["mome"]["lambda_expert"]) == (1e-3, 1e-3)
    assert rows["mmoe"]["lambda_neuron"] is None
    # Test AUC of the chosen lambda: 0.82 + 0.001 * seed, mean over seeds 0, 1, 2 = 0.821.
    assert rows["mome"]["values"]["average_auc"]["mean"] == pytest.approx(0.821)
    assert rows["mome"]["values"]["average_auc"]["std"] == pytest.approx(0.001)
    assert [trial["lambda_expert"] for trial in document["lambda_search"]["mome"]] == [1e-2, 1e-3]
    assert document["peers"] == {"status": "not requested"}


def test_outputs_and_reuse(tmp_path):
    trainer = FakeTrainer()
    models = ["mmoe", "base", "mome"]
    Comparison(fake_config(), tmp_path, models, 2, trainer, lambda_grid=[1e-2, 1e-3], peers=[], run_figures=False).run()
    for name in ("results.md", "results.csv", "results.json", "figures/ablation.png", "figures/auc_size.png",
                 "figures/convergence_mome.png", "runs/mmoe/seed1/record.json",
                 "runs/mome/lambda1-0.001-lambda2-0.001/seed1/record.json"):
        assert (tmp_path / name).is_file(), name
    markdown = (tmp_path / "results.md").read_text()
    assert "| mome | mome_rec | 0.001 | 0.001 |" in markdown
    assert "## L0 weights chosen on the validation split (grid 0.01, 0.001, seed 0)" in markdown

    again = FakeTrainer()
    Comparison(fake_config(), tmp_path, models, 2, again, lambda_grid=[1e-2, 1e-3], peers=[], run_figures=False).run()
    assert again.calls == []

    changed = fake_config()
    changed.train.epochs = 3
    retrained = FakeTrainer()
    Comparison(changed, tmp_path, ["mmoe"], 1, retrained, lambda_grid=[], peers=[], run_figures=False).run()
    assert retrained.calls == [("mmoe", 0, 1e-4, 1e-4)]


def test_seeds_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="--seeds must be at least 1"):
        Comparison(fake_config(), tmp_path, ["mmoe"], 0, FakeTrainer())


def test_peer_not_installed_row(tmp_path, monkeypatch):
    monkeypatch.setattr(compare_module, "rechub_version", lambda: None)
    comparison = Comparison(fake_config(), tmp_path, ["mmoe"], 1, FakeTrainer(), peers=["mmoe", "aitm"], run_figures=False)
    document = comparison.run()
    assert document["peers"]["status"] == "not installed"
    markdown = (tmp_path / "results.md").read_text()
    assert "| torch-rechub MMOE | torch-rechub | — | — | not installed: pip install -e '.[bench]' |" in markdown
    assert "torch-rechub is not installed, so there is no peer block" in markdown


def test_peer_rows_follow_the_models(tmp_path, monkeypatch):
    monkeypatch.setattr(compare_module, "rechub_version", lambda: "0.9.0")
    peer_calls = []

    def fake_peer(name, config):
        peer_calls.append((name, config.train.seed))
        return fake_metrics(config, config.train.seed)

    document = Comparison(fake_config(), tmp_path, ["mmoe"], 2, FakeTrainer(), peers=["ple"], peer_fn=fake_peer,
                          run_figures=False).run()
    assert peer_calls == [("ple", 0), ("ple", 1)]
    rows = [row["model"] for row in document["rows"]]
    assert rows == ["mmoe", "torch-rechub PLE"]
    assert document["rows"][1]["source"] == "torch-rechub 0.9.0"
    assert (tmp_path / "peers" / "ple" / "seed1" / "record.json").is_file()


# ---------------------------------------------------------------------- peers


def test_feature_dict_splits_columns():
    schema = SchemaConfig(sparse=["a", "b"], dense=["x"], labels=["y"])
    preprocessor = Preprocessor(schema, {"a": [1, 2], "b": [5]}, {"x": 0.0}, {"x": 1.0})
    arrays = Arrays(sparse=np.array([[0, 1], [2, 0]]), dense=np.array([[0.5], [-1.0]], dtype=np.float32))
    features = feature_dict(arrays, preprocessor, device="cpu")
    assert list(features) == ["a", "b", "x"]
    assert features["a"].tolist() == [0, 2]
    assert features["b"].tolist() == [1, 0]
    assert features["x"].tolist() == [0.5, -1.0]


# ----------------------------------------------------------------- end to end


TINY = [
    "data.synthetic.train_rows=3000",
    "data.synthetic.validation_rows=1000",
    "data.synthetic.test_rows=1000",
    "train.epochs=2",
    "train.neuron_epochs=1",
    "train.batch_size=500",
    "model.embedding_dim=4",
    "model.hidden_dims=[16,8]",
    "model.tower_dims=[8]",
]


def test_compare_command_end_to_end(tmp_path):
    out = tmp_path / "compare"
    peers = "mmoe" if rechub_version() is not None else "none"
    result = run_cli(
        ["compare", "--config", "configs/synthetic.yaml", "--models", "mmoe,mome", "--seeds", "1",
         "--lambda-grid", "1e-6", "--peers", peers, "--out", str(out), *TINY],
        tmp_path / "cache",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    document = json.loads((out / "results.json").read_text())
    models = [row["model"] for row in document["rows"]]
    assert models[:2] == ["mmoe", "mome"]
    if peers == "mmoe":
        assert models[2] == "torch-rechub MMOE"
        assert document["rows"][2]["values"]["size_mb"]["mean"] > 0
    assert document["tasks"] == ["click", "conversion"]
    for name in ("results.md", "results.csv", "figures/convergence_mome.png", "figures/mask_values_mome.png"):
        assert (out / name).is_file(), name
    assert not (out / "runs" / "mmoe" / "seed0" / "checkpoints").exists()
    assert (out / "runs" / "mmoe" / "seed0" / "metrics.json").is_file()
    assert (out / "runs" / "mome" / "lambda1-1e-06-lambda2-1e-06" / "seed0" / "figures" / "mask_values.png").is_file()
