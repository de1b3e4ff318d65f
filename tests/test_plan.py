"""``mome-rec plan`` offline, the plan file, and the checks that refuse a plan that does not fit the job."""

import contextlib
import json
import logging
from pathlib import Path

import pytest

from mome_rec.cli import main
from mome_rec.data.synthetic import CARDINALITIES
from mome_rec.errors import InputError
from mome_rec.plan_io import check_table_rows, configured_table_rows, load_plan_for, read_plan
from mome_rec.planning import SPARSE_MODULE

REPO = Path(__file__).resolve().parents[1]
NL_CONFIG = str(REPO / "configs" / "aliexpress_nl.yaml")
SYNTHETIC_CONFIG = str(REPO / "configs" / "synthetic.yaml")
# Rows of the AliExpress NL tables: the vocabulary of each categorical column of the processed
# AliExpress data (the ids 0 .. cardinality - 1) plus the out-of-vocabulary row.
NL_TABLE_ROWS = {f"categorical_{index + 1}": cardinality + 1 for index, cardinality in enumerate(CARDINALITIES)}


@pytest.fixture(scope="module")
def nl_sizes(tmp_path_factory):
    path = tmp_path_factory.mktemp("sizes") / "nl_table_rows.json"
    path.write_text(json.dumps(NL_TABLE_ROWS))
    return path


@pytest.fixture(scope="module")
def nl_plans(nl_sizes, tmp_path_factory):
    """Plan the NL tables for 8, 16 and 64 GPUs (8 per host) and keep each plan file and printed report."""
    folder = tmp_path_factory.mktemp("plans")
    plans = {}
    for world_size in (8, 16, 64):
        out = folder / f"plan_{world_size}.json"
        capture = folder / f"report_{world_size}.txt"
        with open(capture, "w") as stdout:
            with contextlib.redirect_stdout(stdout):
                status = main(["plan", "--config", NL_CONFIG, "--world-size", str(world_size), "--local-world-size", "8",
                               "--device", "cuda", "--hbm-gb", "80", "--table-sizes", str(nl_sizes), "--out", str(out)])
        assert status == 0
        plans[world_size] = (json.loads(out.read_text()), capture.read_text(), out)
    return plans


@pytest.mark.parametrize("world_size", [8, 16, 64])
def test_nl_plan_places_every_table(nl_plans, world_size):
    plan, _, _ = nl_plans[world_size]
    assert plan["world_size"] == world_size
    assert plan["compute_device"] == "cuda"
    assert set(plan["tables"]) == {f"t_{column}" for column in NL_TABLE_ROWS}
    for name, table in plan["tables"].items():
        column = name[len("t_"):]
        assert table["rows"] == NL_TABLE_ROWS[column]
        assert table["dim"] == 128  # model.embedding_dim of the NL config
        assert table["ranks"] and all(0 <= rank < world_size for rank in table["ranks"])
        if table["sharding_type"] == "data_parallel":
            assert table["ranks"] == list(range(world_size))
        else:
            covered = sum(shard["sizes"][0] * shard["sizes"][1] for shard in table["shards"])
            assert covered == table["rows"] * table["dim"]


@pytest.mark.parametrize("world_size", [8, 16, 64])
def test_nl_plan_estimates_every_rank(nl_plans, world_size):
    plan, report, _ = nl_plans[world_size]
    estimates = plan["estimates"]
    assert [rank["rank"] for rank in estimates] == list(range(world_size))
    assert all(rank["table_hbm_bytes"] > 0 and rank["perf_ms"] > 0 for rank in estimates)
    # The printed report has one line per table and one per rank.
    lines = report.splitlines()
    for name, table in plan["tables"].items():
        assert any(line.startswith(f"{name} ") and table["sharding_type"] in line for line in lines), name
    rank_lines = [line for line in lines if line.strip() and line.split()[0].isdigit()]
    assert len(rank_lines) == world_size


def test_saved_plan_loads_for_matching_job(nl_plans):
    _, _, path = nl_plans[16]
    config = _nl_config()
    saved = load_plan_for(path, config, 16, device="cuda", local_world_size=8)
    assert saved.world_size == 16
    assert set(saved.sharding_plan.plan[SPARSE_MODULE]) == {f"t_{column}" for column in NL_TABLE_ROWS}
    check_table_rows(saved, NL_TABLE_ROWS)


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(world_size=8), "the plan is for world size 16, this job's world size is 8"),
        (dict(device="cpu"), "the plan is for cuda, this job runs on cpu"),
        (dict(local_world_size=4), "the plan is for 8 ranks per host, this job has 4"),
        (dict(overrides=["model.embedding_dim=64"]), "table t_categorical_1 has dim 128 in the plan, model.embedding_dim is 64"),
        (dict(overrides=["data.schema.sparse=[categorical_1]"]), "not in the config t_categorical_10, t_categorical_11"),
    ],
)
def test_mismatched_plan_is_refused(nl_plans, change, expected):
    _, _, path = nl_plans[16]
    config = _nl_config(change.get("overrides", []))
    with pytest.raises(InputError) as error:
        load_plan_for(path, config, change.get("world_size", 16), device=change.get("device", "cuda"),
                      local_world_size=change.get("local_world_size", 8))
    message = str(error.value)
    assert expected in message
    assert "\n" not in message
    assert message.startswith(str(path))


def test_plan_rows_must_match_data(nl_plans):
    _, _, path = nl_plans[8]
    saved = read_plan(path)
    rows = dict(NL_TABLE_ROWS, categorical_7=52)
    with pytest.raises(InputError, match="table t_categorical_7 has 51 rows in the plan, the data gives 52"):
        check_table_rows(saved, rows)


def test_configured_table_rows_checked_against_plan(nl_plans):
    _, _, path = nl_plans[8]
    overrides = [f"distributed.table_rows.{column}={rows}" for column, rows in NL_TABLE_ROWS.items()]
    config = _nl_config(overrides)
    assert configured_table_rows(config) == NL_TABLE_ROWS
    load_plan_for(path, config, 8)
    config = _nl_config(overrides[:-1] + ["distributed.table_rows.categorical_16=9"])
    with pytest.raises(InputError, match="t_categorical_16 has 3 rows in the plan, the data gives 9"):
        load_plan_for(path, config, 8)


def test_table_rows_must_cover_every_column():
    config = _nl_config(["distributed.table_rows.categorical_1=12"])
    with pytest.raises(InputError, match="distributed.table_rows: no size for categorical_2"):
        configured_table_rows(config)


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "invalid JSON at line 1"),
        ('{"format": "other"}', "not a mome-rec plan file"),
        ('{"format": "mome_rec.sharding_plan/1", "world_size": 2}', "missing key tables"),
    ],
)
def test_broken_plan_file_is_refused(tmp_path, content, expected):
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(InputError, match=expected):
        read_plan(path)


def test_table_sizes_file_errors(tmp_path, caplog):
    sizes = tmp_path / "sizes.json"
    sizes.write_text(json.dumps({**NL_TABLE_ROWS, "categorical_3": 0}))
    with caplog.at_level(logging.ERROR, logger="mome_rec"):
        status = main(["plan", "--config", NL_CONFIG, "--world-size", "8", "--table-sizes", str(sizes),
                       "--out", str(tmp_path / "plan.json")])
    assert status == 2
    errors = _mome_rec_errors(caplog)
    assert errors == [f"{sizes}: categorical_3 must be a positive integer number of rows, got 0"]
    assert not (tmp_path / "plan.json").exists()


def test_train_refuses_plan_for_other_world_size(tmp_path, monkeypatch, caplog):
    """``train --plan`` stops with exit status 2 before reading any data when the world size differs."""
    from mome_rec.distributed import free_port

    plan_path = tmp_path / "plan2.json"
    sizes = tmp_path / "sizes.json"
    sizes.write_text(json.dumps(NL_TABLE_ROWS))
    assert main(["plan", "--config", SYNTHETIC_CONFIG, "--world-size", "2", "--device", "cpu",
                 "--table-sizes", str(sizes), "--out", str(plan_path)]) == 0

    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MOME_REC_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.ERROR, logger="mome_rec"):
        status = main(["train", "--config", SYNTHETIC_CONFIG, "--out", str(tmp_path / "run"), "--plan", str(plan_path)])
    assert status == 2
    errors = _mome_rec_errors(caplog)
    assert errors == [f"{plan_path}: the plan is for world size 2, this job's world size is 1"]
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "run").exists()


def _mome_rec_errors(caplog):
    """Return the ERROR lines that mome_rec logged (TorchRec logs its own errors too)."""
    return [record.getMessage() for record in caplog.records
            if record.levelno >= logging.ERROR and record.name.startswith("mome_rec")]


def _nl_config(overrides=()):
    from mome_rec.config import load_config

    return load_config(NL_CONFIG, list(overrides), check_files=False)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("distributed.tables.categorical_1.sharding_types=[tablewise]", "unknown sharding type 'tablewise'"),
        ("distributed.tables.categorical_1.compute_kernels=[fast]", "unknown compute kernel 'fast'"),
        ("distributed.tables.categorical_99.sharding_types=[table_wise]", "categorical_99 is not a sparse column"),
    ],
)
def test_bad_table_constraint_is_refused(override, expected):
    from mome_rec.planning import table_constraints

    config = _nl_config([override])
    with pytest.raises(InputError, match=expected):
        table_constraints(config, list(NL_TABLE_ROWS))


def test_table_constraint_reaches_planner():
    from mome_rec.planning import table_constraints

    config = _nl_config(["distributed.tables.categorical_7.sharding_types=[column_wise]",
                         "distributed.tables.categorical_7.compute_kernels=[fused]"])
    constraints = table_constraints(config, list(NL_TABLE_ROWS))
    assert set(constraints) == {"t_categorical_7"}
    assert constraints["t_categorical_7"].sharding_types == ["column_wise"]
    assert constraints["t_categorical_7"].compute_kernels == ["fused"]


def test_row_wise_on_cpu_fails_in_one_line(nl_sizes, tmp_path, caplog):
    """fbgemm-gpu-cpu 1.8.0 has no CPU kernel for row_wise sharding, so the planner finds no option."""
    with caplog.at_level(logging.ERROR, logger="mome_rec"):
        status = main(["plan", "--config", NL_CONFIG, "--world-size", "2", "--device", "cpu", "--table-sizes", str(nl_sizes),
                       "--out", str(tmp_path / "plan.json"), "distributed.tables.categorical_7.sharding_types=[row_wise]"])
    assert status == 2
    errors = _mome_rec_errors(caplog)
    assert len(errors) == 1
    assert errors[0].startswith("sharding planner failed for 2 x cpu: No available sharding type and compute kernel")
    assert "t_categorical_7" in errors[0]
