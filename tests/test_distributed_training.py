"""The train job on 1 and 2 gloo ranks: same AUC, exact resume after a kill, checkpoints across world sizes.

Every run here uses the synthetic default config scaled down to 100,000
training, 20,000 validation and 40,000 test rows and 4 epochs (1 neuron epoch,
then the expert phase). The L0 weights are 1e-6 and the learning rates 5e-3
(dense) and 0.1 (tables), so that a model learns in about 390 steps. Both
runs train on the same rows with the same global batch of 1,024 rows per
step: 1 rank with batch 1,024, 2 ranks with 512 each, so they take the same
number of optimizer steps. ``categorical_7`` is constrained to table_wise and
``categorical_5`` to column_wise sharding, so the comparison covers the fused
table optimizer and the all-to-all lookups. The other tables are
data_parallel.

The runs still differ in which rows form a step's batch and in the random
streams of dropout and mask noise, so they are two samples of the same
training, and any change of floating-point path (even the thread count) draws
another sample. Measured on a 2-core machine, one thread per process: over
seeds 0, 1 and 2 and two versions of the mask code, 1 rank reached click AUC
0.6877 to 0.6906 in four runs, 2 ranks 0.6882 to 0.6904 in four runs. One
more 1-rank run with two threads reached 0.6830. With 10,000 validation rows
the best epoch was chosen less reliably, hence the 20,000. "2 ranks reach the 1-rank AUC within 0.005" is checked as: the 2-rank
click AUC is at most 0.005 below the 1-rank one, and the two differ by less
than 0.01 either way. The conversion AUC, with about 300 positive test rows,
moved by up to 0.02 between runs, so it is only checked to be learned.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from dist_helpers import failure_message, kill_after_checkpoint, read_steps, run_torchrun

SETTINGS = [
    "data.synthetic.train_rows=100000",
    "data.synthetic.validation_rows=20000",
    "data.synthetic.test_rows=40000",
    "train.epochs=4",
    "train.neuron_epochs=1",
    "model.lambda_neuron=1e-6",
    "model.lambda_expert=1e-6",
    "train.lr=0.005",
    "train.embedding_lr=0.1",
    "distributed.tables.categorical_7.sharding_types=[table_wise]",
    "distributed.tables.categorical_5.sharding_types=[column_wise]",
]
GLOBAL_BATCH = 1024
CHECKPOINT_EVERY = 60
STEPS_PER_EPOCH_2_RANKS = 50000 // 512  # each rank reads half the training rows and drops its last partial batch
CONFIG = "configs/synthetic.yaml"


def _train_args(out, world_size, *extra):
    return ["train", "--config", CONFIG, "--out", str(out), *SETTINGS,
            f"train.batch_size={GLOBAL_BATCH // world_size}", f"train.checkpoint_every_steps={CHECKPOINT_EVERY}", *extra]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("one_rank") / "run"
    result = run_torchrun(1, _train_args(out, 1), cache)
    assert result.returncode == 0, failure_message(result)
    return out


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("two_ranks") / "run"
    result = run_torchrun(2, _train_args(out, 2), cache)
    assert result.returncode == 0, failure_message(result)
    return out


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


def test_two_ranks_reach_one_rank_auc(one_rank_run, two_rank_run):
    one, two = _metrics(one_rank_run), _metrics(two_rank_run)
    assert one["world_size"] == 1
    assert two["world_size"] == 2
    assert one["global_steps"] == two["global_steps"]
    difference = two["test"]["click"]["auc"] - one["test"]["click"]["auc"]
    assert difference > -0.005
    assert abs(difference) < 0.01
    for metrics in (one, two):
        assert metrics["test"]["click"]["auc"] > 0.65
        assert metrics["test"]["conversion"]["auc"] > 0.65


def test_step_log_counts_trained_steps(two_rank_run):
    steps = read_steps(two_rank_run)
    assert [record["global_step"] for record in steps] == list(range(1, 4 * STEPS_PER_EPOCH_2_RANKS + 1))
    assert [record["step"] for record in steps[:STEPS_PER_EPOCH_2_RANKS]] == list(range(1, STEPS_PER_EPOCH_2_RANKS + 1))
    assert {record["phase"] for record in steps if record["epoch"] == 1} == {"neuron"}
    assert {record["phase"] for record in steps if record["epoch"] > 1} == {"expert"}
    assert all(np.isfinite(record["loss"]) for record in steps)


def test_resume_after_kill_matches_uninterrupted(two_rank_run, tmp_path, cache):
    """Kill both ranks after a mid-epoch checkpoint of the expert phase, resume, finish."""
    out = tmp_path / "run"
    args = _train_args(out, 2)
    meta = kill_after_checkpoint(2, args, cache, out, min_global_step=STEPS_PER_EPOCH_2_RANKS + 1,
                                 log_path=tmp_path / "killed.log")
    assert meta["structure"]["phase"] == "expert"
    assert 0 < meta["step"] < STEPS_PER_EPOCH_2_RANKS
    assert not (out / "metrics.json").exists()

    result = run_torchrun(2, args + ["--resume", str(out)], cache)
    assert result.returncode == 0, failure_message(result)

    uninterrupted = {record["global_step"]: record for record in read_steps(two_rank_run)}
    resumed = {record["global_step"]: record for record in read_steps(out)}
    assert sorted(resumed) == sorted(uninterrupted)
    first = meta["global_step"] + 1
    assert resumed[first]["loss"] == pytest.approx(uninterrupted[first]["loss"], rel=1e-6, abs=0)
    for step in range(first + 1, max(resumed) + 1):
        assert resumed[step]["loss"] == pytest.approx(uninterrupted[step]["loss"], rel=1e-6, abs=0), f"step {step}"
    assert abs(_metrics(out)["test"]["click"]["auc"] - _metrics(two_rank_run)["test"]["click"]["auc"]) < 0.002
    assert abs(_metrics(out)["test"]["conversion"]["auc"] - _metrics(two_rank_run)["test"]["conversion"]["auc"]) < 0.002
    assert not list((out / "checkpoints").glob(".*"))


def test_two_rank_checkpoint_loads_in_one_process(two_rank_run, cache, monkeypatch):
    """restore.load_trained_model rebuilds the 2-rank best model unsharded; it scores the test split alike."""
    from mome_rec.data.batches import BatchStream
    from mome_rec.data.sources import resolve_splits
    from mome_rec.metrics import task_metrics
    from mome_rec.restore import load_trained_model

    monkeypatch.setenv("MOME_REC_CACHE", str(cache))
    trained = load_trained_model(two_rank_run)
    assert trained.meta["world_size"] == 2
    splits = resolve_splits(trained.config.data)
    scores, labels = [], []
    with torch.no_grad():
        for batch in BatchStream(splits.test, trained.preprocessor, 8192, split="eval"):
            scores.append(torch.sigmoid(trained.model(batch.dense_features, batch.sparse_features)).numpy())
            labels.append(batch.labels.numpy())
    metrics = task_metrics(np.concatenate(scores), np.concatenate(labels), list(trained.preprocessor.schema.labels))
    for task, values in _metrics(two_rank_run)["test"].items():
        assert metrics[task]["auc"] == pytest.approx(values["auc"], abs=1e-6), task
        assert metrics[task]["logloss"] == pytest.approx(values["logloss"], abs=1e-5), task


def test_one_rank_checkpoint_resumes_on_two_ranks(one_rank_run, tmp_path, cache):
    """A 1-rank run's last checkpoint continues for a fifth epoch, of 5 steps, on 2 ranks."""
    out = tmp_path / "run"
    shutil.copytree(one_rank_run, out)
    before = _metrics(one_rank_run)
    result = run_torchrun(2, _train_args(out, 2, "train.epochs=5", "train.max_steps_per_epoch=5", "--resume", str(out)),
                          cache)
    assert result.returncode == 0, failure_message(result)
    assert "no random number generator state for this world size" in result.stderr

    after = _metrics(out)
    assert after["world_size"] == 2
    assert [record["epoch"] for record in after["history"]] == [1, 2, 3, 4, 5]
    assert after["global_steps"] == before["global_steps"] + 5
    assert read_steps(out)[-1]["global_step"] == before["global_steps"] + 5
    assert abs(after["test"]["click"]["auc"] - before["test"]["click"]["auc"]) < 0.01
