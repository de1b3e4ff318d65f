"""Run the benchmark suites, write one JSON file and print a short table.

From the repository root::

    python -m benchmarks.run                       # every suite at configs/aliexpress_nl.yaml's sizes
    python -m benchmarks.run --suites training,over_arch --repeats 3
    python -m benchmarks.run --quick --out /tmp/bench.json   # tiny sizes, 1 to 3 minutes (the smoke test)

Suites: ``training`` (samples/s of the dense step), ``train_job`` (samples/s of
``mome-rec train``, in child processes), ``over_arch`` (GFLOP/s next to torch.mm),
``pipeline`` (rows/s of the input pipeline), ``memory`` (peak RSS at several
row counts, in child processes) and ``scoring`` (rows/s of exported models).
Generated data goes to ``--work-dir`` (default ``/tmp/mome_rec_bench``) and is
reused by later runs; the full run writes about 8 GB there.
"""

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from benchmarks import memory, over_arch, pipeline, scoring, train_job, training
from benchmarks.common import PAPER, QUICK, SMALL, machine_info, ratio, write_json

logger = logging.getLogger("benchmarks")

SUITES = ("training", "train_job", "over_arch", "pipeline", "memory", "scoring")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark mome_rec against its MMoE and torch-rechub's MMOE.")
    parser.add_argument("--suites", default=",".join(SUITES), help=f"comma-separated suites to run (default: all of {', '.join(SUITES)})")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions, for a smoke test")
    parser.add_argument("--repeats", type=int, help="timed repetitions per candidate (default 7, quick 2)")
    parser.add_argument("--steps", type=int, help="training steps per timed repetition (default 2, quick 1)")
    parser.add_argument("--train-job-steps", type=int, help="training steps per train_job measurement (default 6, quick 2)")
    parser.add_argument("--pipeline-rows", type=int, help="parquet rows of the pipeline suite (default 1,000,000)")
    parser.add_argument("--csv-rows", type=int, help="CSV rows of the pipeline suite (default 262,144)")
    parser.add_argument("--memory-rows", help="comma-separated row counts of the memory suite (default 1000000,10000000)")
    parser.add_argument("--memory-tasks", default=",".join(memory.TASKS),
                        help=f"comma-separated probes of the memory suite (default: all of {', '.join(memory.TASKS)})")
    parser.add_argument("--scoring-batches", type=int, help="batches each model scores per repetition (default 8)")
    parser.add_argument("--keeps", default="1,0.7,0.5",
                        help="kept fractions of MoME's neurons in the scoring suite (default 1,0.7,0.5)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/mome_rec_bench"), help="folder for generated data")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/results.json"), help="JSON file to write")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace) -> Dict[str, Any]:
    """Return the sizes of this run: those of configs/aliexpress_nl.yaml, or tiny ones with ``--quick``.

    Explicit options override either.
    """
    quick = args.quick
    values = {
        "dims": QUICK if quick else PAPER,
        "repeats": args.repeats or (2 if quick else 7),
        "steps": args.steps or (1 if quick else 2),
        "train_job_steps": args.train_job_steps or (2 if quick else 6),
        "pipeline_rows": args.pipeline_rows or (4096 if quick else 1_000_000),
        "csv_rows": args.csv_rows or (2048 if quick else 262_144),
        "memory_rows": [int(value) for value in (args.memory_rows or ("2048,8192" if quick else "1000000,10000000")).split(",")],
        "scoring_batches": args.scoring_batches or (2 if quick else 8),
        "keeps": [float(value) for value in args.keeps.split(",")],
        "memory_tasks": [task.strip() for task in args.memory_tasks.split(",") if task.strip()],
    }
    return values


def targets(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Return each target of the performance work with its measured ratio and whether it is met."""
    rows: List[Dict[str, Any]] = []

    def add(name: str, measured: Optional[float], goal: float, higher_is_better: bool = True) -> None:
        if measured is None:
            met = None
        elif higher_is_better:
            met = measured >= goal
        else:
            met = measured <= goal
        rows.append({"target": name, "measured": measured, "goal": goal, "met": met})

    train = results.get("training")
    if train:
        add("training: MoME expert phase / mome_rec MMoE samples/s", train["ratios"]["mome_expert_phase_vs_mmoe"], 1.0)
        add(f"training: whole MoME job ({train['schedule']['neuron_epochs']} neuron + "
            f"{train['schedule']['epochs'] - train['schedule']['neuron_epochs']} expert epochs) / mome_rec MMoE samples/s",
            train["ratios"]["mome_schedule_vs_mmoe"], 1.0)
        add("training: MoME mask noise share of the expert-phase step", train["mome_expert_step_shares"]["noise"], 0.10, False)
    score = results.get("scoring")
    if score and "ratios_vs_mmoe" in score:
        for name, value in score["ratios_vs_mmoe"].items():
            if name.startswith("mome"):
                add(f"scoring: exported {name} / mome_rec MMoE rows/s", value, 2.0)
    job = results.get("train_job")
    if job:
        add("train job: MoME expert phase / mome_rec MMoE samples/s", job["ratios_vs_mmoe"].get("mome_expert_phase"), 1.0)
    arch = results.get("over_arch")
    if arch:
        for name in ("mome_expert_phase_forward", "mome_expert_phase_training"):
            add(f"over-arch {name} / torch.mm GFLOP/s", arch["fraction_of_torch_mm"].get(name), 0.60)
    if score and "over_arch_gflops" in score:
        for name, values in score["over_arch_gflops"].items():
            if name.startswith("mome"):
                add(f"exported over-arch {name} / torch.mm GFLOP/s", values["fraction"], 0.60)
    flow = results.get("pipeline")
    if flow and train:
        fastest = max(rate["median"] for name, rate in train["samples_per_second"].items() if name.startswith("mome"))
        add("pipeline: parquet -> batches rows/s / fastest MoME training samples/s",
            ratio(flow["rows_per_second"]["parquet_to_batches"]["median"], fastest), 5.0)
    mem = results.get("memory")
    if mem:
        for task, value in mem["peak_ratio_largest_vs_smallest"].items():
            add(f"memory: {task} peak RSS at {max(mem['row_counts']):,} / {min(mem['row_counts']):,} rows", value, 1.2, False)
    return rows


def table(results: Dict[str, Any]) -> str:
    """Return the figures and the targets as a plain-text table."""
    describers: Dict[str, Callable[[Dict[str, Any]], List[List[str]]]] = {
        "training": training.describe,
        "train_job": train_job.describe,
        "over_arch": over_arch.describe,
        "pipeline": pipeline.describe,
        "memory": memory.describe,
        "scoring": scoring.describe,
    }
    lines: List[List[str]] = []
    for suite, describe in describers.items():
        if suite in results:
            lines.extend(describe(results[suite]))
    for row in results["targets"]:
        measured = "n/a" if row["measured"] is None else f"{row['measured']:.2f}"
        status = {True: "met", False: "MISSED", None: "n/a"}[row["met"]]
        lines.append([f"target {row['target']}", measured, f"goal {row['goal']:g}: {status}"])
    widths = [max(len(line[column]) for line in lines) for column in range(3)]
    text = "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)
    if results.get("quick"):
        text += "\n--quick uses tiny sizes to check that every suite runs: its figures and targets mean nothing."
    return text


def main(argv: Optional[List[str]] = None) -> int:
    """Run the suites that ``argv`` selects; return the exit status (2 for an unknown suite)."""
    args = parse_args(argv)
    suites = [suite.strip() for suite in args.suites.split(",") if suite.strip()]
    unknown = [suite for suite in suites if suite not in SUITES]
    if unknown:
        logger.error("unknown suite %s (known: %s)", ", ".join(unknown), ", ".join(SUITES))
        return 2
    values = settings(args)
    dims = values["dims"]
    work_dir = args.work_dir / ("quick" if args.quick else "full")

    results: Dict[str, Any] = {
        "machine_before": machine_info(),
        "quick": args.quick,
        "command": " ".join(["python -m benchmarks.run"] + (sys.argv[1:] if argv is None else argv)),
        "dimensions": dims.to_dict(),
        "settings": {key: value for key, value in values.items() if key != "dims"},
    }
    started = time.perf_counter()
    torch.manual_seed(0)
    runners: Dict[str, Callable[[], Dict[str, Any]]] = {
        "training": lambda: training.run_training(dims, values["repeats"], values["steps"]),
        "train_job": lambda: train_job.run_train_job(dims, work_dir, values["train_job_steps"], min(values["repeats"], 3)),
        "over_arch": lambda: over_arch.run_over_arch(dims, values["repeats"]),
        "pipeline": lambda: pipeline.run_pipeline(dims, work_dir, values["pipeline_rows"], values["csv_rows"], values["repeats"]),
        "memory": lambda: memory.run_memory(work_dir, values["memory_rows"], dims.batch_size,
                                            score_dims=dims if args.quick else SMALL, tasks=values["memory_tasks"]),
        "scoring": lambda: scoring.run_scoring(dims, work_dir, values["keeps"], values["scoring_batches"], values["repeats"]),
    }
    for suite in SUITES:
        if suite in suites:
            suite_started = time.perf_counter()
            results[suite] = runners[suite]()
            logger.info("suite %s took %.0f s", suite, time.perf_counter() - suite_started)
    results["seconds"] = time.perf_counter() - started
    results["machine_after"] = machine_info()
    results["targets"] = targets(results)

    write_json(args.out, results)
    print(table(results))
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    sys.exit(main())
