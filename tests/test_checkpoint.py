"""Atomic checkpoints, rank-local state, optimizer state by name and the step log, in one process."""

import json

import pytest
import torch

import mome_rec.checkpoint as checkpoint
from mome_rec.checkpoint import (
    capture_rng_state,
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    read_rank_state,
    restore_rng_state,
    save_checkpoint,
)
from mome_rec.errors import InputError
from mome_rec.optim import initialize_state, optimizer_state
from mome_rec.train_loop import StepLog


def _save(path, value: float, step: int) -> None:
    save_checkpoint(path, {"weights": {"w": torch.full((3,), value)}}, {"step": step}, rank_state={"marker": torch.tensor([step])})


def _load(path) -> torch.Tensor:
    state = {"weights": {"w": torch.zeros(3)}}
    load_checkpoint(path, state)
    return state["weights"]["w"]


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "checkpoints" / "latest"
    _save(path, 1.5, step=7)
    assert read_meta(path) == {"step": 7}
    assert torch.equal(_load(path), torch.full((3,), 1.5))
    assert int(read_rank_state(path, 0)["marker"]) == 7
    assert read_rank_state(path, 1) is None
    assert latest_checkpoint(tmp_path) == path


def test_crash_while_writing_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "latest"
    _save(path, 1.0, step=1)
    real_save = checkpoint.dcp.save

    def save_then_die(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(checkpoint.dcp, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _save(path, 2.0, step=2)
    monkeypatch.setattr(checkpoint.dcp, "save", real_save)

    staging = tmp_path / "checkpoints" / ".latest.tmp"
    assert staging.is_dir()
    assert find_checkpoint(path) == path
    assert read_meta(path) == {"step": 1}
    assert torch.equal(_load(path), torch.ones(3))

    _save(path, 3.0, step=3)
    assert not staging.exists()
    assert read_meta(path) == {"step": 3}


def test_kill_between_renames_finds_previous(tmp_path):
    path = tmp_path / "checkpoints" / "latest"
    _save(path, 1.0, step=1)
    previous = tmp_path / "checkpoints" / ".latest.old"
    path.rename(previous)  # what a kill right after the first rename leaves

    assert find_checkpoint(path) == previous
    assert latest_checkpoint(tmp_path) == previous
    assert torch.equal(_load(find_checkpoint(path)), torch.ones(3))

    _save(path, 2.0, step=2)
    assert read_meta(path) == {"step": 2}
    assert not previous.exists()


def test_missing_checkpoint_is_none(tmp_path):
    assert find_checkpoint(tmp_path / "nothing") is None
    assert latest_checkpoint(tmp_path) is None


def test_read_meta_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="meta.json missing"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{\n  broken")
    with pytest.raises(InputError, match=r"meta.json: invalid JSON at line 2"):
        read_meta(tmp_path)


def test_load_rejects_missing_key_unless_partial(tmp_path):
    path = tmp_path / "ckpt"
    _save(path, 1.0, step=1)
    state = {"weights": {"w": torch.zeros(3), "extra": torch.full((2,), 5.0)}}
    with pytest.raises(InputError, match="cannot load checkpoint: Missing key in checkpoint state_dict: weights.extra"):
        load_checkpoint(path, state)
    load_checkpoint(path, state, partial=True)
    assert torch.equal(state["weights"]["w"], torch.ones(3))
    assert torch.equal(state["weights"]["extra"], torch.full((2,), 5.0))


def test_rng_state_round_trip():
    torch.manual_seed(3)
    saved = capture_rng_state()
    expected = torch.rand(4)
    torch.rand(10)
    restore_rng_state(saved)
    assert torch.equal(torch.rand(4), expected)


def test_initialize_state_moves_no_weight():
    layer = torch.nn.Linear(3, 2)
    before = [param.detach().clone() for param in layer.parameters()]
    adam = torch.optim.Adam(layer.parameters(), lr=0.1)
    initialize_state(adam)
    for param, old in zip(layer.parameters(), before):
        assert torch.equal(param, old)
        assert param.grad is None
        assert torch.equal(adam.state[param]["exp_avg"], torch.zeros_like(param))


def test_optimizer_state_by_name_loads_in_place(tmp_path):
    layer = torch.nn.Linear(3, 2)
    adam = torch.optim.Adam(layer.parameters(), lr=0.1)
    layer(torch.ones(1, 3)).sum().backward()
    adam.step()
    named = dict(layer.named_parameters())
    state = optimizer_state(adam, named)
    assert set(state) == {"weight", "bias"}
    assert set(state["weight"]) == {"step", "exp_avg", "exp_avg_sq"}
    # After one step from zero moments: exp_avg = (1 - beta1) * g with g = 1 for every weight.
    assert torch.allclose(state["weight"]["exp_avg"], torch.full((2, 3), 0.1))
    save_checkpoint(tmp_path / "ckpt", {"dense": state}, {})

    fresh = torch.optim.Adam(layer.parameters(), lr=0.1)
    load_checkpoint(tmp_path / "ckpt", {"dense": optimizer_state(fresh, named)})
    assert torch.allclose(fresh.state[named["weight"]]["exp_avg"], torch.full((2, 3), 0.1))
    assert float(fresh.state[named["weight"]]["step"]) == 1.0


def test_step_log_truncate_drops_later_steps(tmp_path):
    log = StepLog(tmp_path / "steps.jsonl", enabled=True)
    for step in range(1, 6):
        log.append({"global_step": step, "loss": float(step)})
    log.truncate(3)
    lines = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [line["global_step"] for line in lines] == [1, 2, 3]


def test_step_log_disabled_writes_nothing(tmp_path):
    log = StepLog(tmp_path / "steps.jsonl", enabled=False)
    log.append({"global_step": 1, "loss": 0.5})
    assert not (tmp_path / "steps.jsonl").exists()
