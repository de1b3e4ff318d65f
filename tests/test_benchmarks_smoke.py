"""The benchmark entry point at tiny sizes: it runs every suite and writes JSON of the documented shape.

Timings are never checked, only that each figure is there and positive.
"""

import json
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_benchmarks(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(REPOSITORY))
    from benchmarks.run import main

    def run(*arguments):
        out = tmp_path / "results.json"
        status = main(["--quick", "--repeats", "1", "--work-dir", str(tmp_path / "work"), "--out", str(out), *arguments])
        assert status == 0
        return json.loads(out.read_text())

    return run


def assert_rates(rates, names, repeats=1):
    for name in names:
        assert rates[name]["median"] > 0, name
        assert len(rates[name]["samples"]) == repeats, name


def test_benchmark_suites_json_shape(run_benchmarks, capsys):
    results = run_benchmarks("--suites", "training,over_arch,pipeline,scoring", "--keeps", "1,0.5")

    assert results["dimensions"]["in_features"] == 16 * 4 + 63
    assert len(results["machine_before"]["load_average"]) == 3

    training = results["training"]
    assert_rates(training["samples_per_second"], ["mome_expert_phase", "mome_neuron_phase", "mmoe"])
    assert training["ratios"]["mome_expert_phase_vs_mmoe"] > 0
    assert set(training["mome_expert_step_shares"]) == {"noise", "masks", "l0"}
    assert all(share > 0 for share in training["mome_expert_step_shares"].values())

    gflops = results["over_arch"]["gflops"]
    for name in ("torch_mm_forward", "torch_mm_training", "mome_expert_phase_forward", "mome_expert_phase_training"):
        assert gflops[name] > 0, name
    # Layer 0 reads the shared 127-wide input for both experts at once; layer 1 is one bmm over the 2 experts.
    assert results["over_arch"]["gemms"][:2] == [
        {"m": 64, "k": 127, "n": 2 * 16, "groups": 0},
        {"m": 64, "k": 16, "n": 8, "groups": 2},
    ]

    assert_rates(results["pipeline"]["rows_per_second"], ["csv_to_parquet", "fit_parquet", "parquet_to_batches", "csv_to_batches"])

    scoring = results["scoring"]
    assert_rates(scoring["rows_per_second"], ["mome_keep_1", "mome_keep_0.5", "mmoe"])
    assert scoring["ratios_vs_mmoe"]["mmoe"] == pytest.approx(1.0)
    # Half of 127 inputs (rounded) and of the 16 hidden neurons are pruned; the last layer keeps its 8 outputs.
    assert scoring["layer_widths"]["mome_keep_0.5"] == [[64, 8], [8, 8]]
    assert scoring["layer_widths"]["mome_keep_1"] == [[127, 16], [16, 8]]

    for row in results["targets"]:
        assert set(row) == {"target", "measured", "goal", "met"}
    assert "target training: MoME expert phase" in capsys.readouterr().out


def test_benchmark_memory_json_shape(run_benchmarks):
    results = run_benchmarks("--suites", "memory", "--memory-rows", "1024,2048", "--memory-tasks", "convert")

    memory = results["memory"]
    assert memory["baseline"]["peak_rss_bytes"] > 0
    assert set(memory["probes"]) == {"1024", "2048"}
    for rows in (1024, 2048):
        probe = memory["probes"][str(rows)]["convert"]
        assert probe["rows"] == rows
        assert probe["peak_rss_bytes"] > 0
    assert set(memory["peak_ratio_largest_vs_smallest"]) == {"convert"}


def test_schedule_rate_weights_phase_epochs():
    from benchmarks.training import schedule_rate

    # 1 epoch at 1000 samples/s and 2 at 500: 3 epochs of N rows take N/1000 + 2N/500 = 0.005 N s, so 600 samples/s.
    assert schedule_rate(1000.0, 500.0, 1, 3) == pytest.approx(600.0)
    assert schedule_rate(None, 500.0, 1, 3) is None


def test_profile_step_groups_sum_to_total(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(REPOSITORY))
    from benchmarks.profile_step import GROUPS, main

    out = tmp_path / "profile.json"
    assert main(["--quick", "--steps", "1", "--out", str(out)]) == 0
    columns = json.loads(out.read_text())["milliseconds_per_step"]
    for name in ("mome_expert_phase", "mmoe"):
        groups = columns[name]
        assert groups["total"] == pytest.approx(sum(groups[group] for group in GROUPS)), name
        assert groups["matrix products"] > 0, name
    assert columns["mome_expert_phase"]["mask noise"] > 0
    assert columns["mmoe"]["mask noise"] == 0
    assert "mask noise" in capsys.readouterr().out
