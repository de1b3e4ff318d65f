"""Peak memory of the input pipeline and of scoring at several row counts, each in a fresh process.

Each figure is the peak resident set size of one ``python -m benchmarks.probe``
process (see :mod:`benchmarks.probe`), so it includes the interpreter, torch
and pyarrow. The probes of one row count run side by side. The ``baseline`` probe measures that floor alone. Scoring uses
the model of configs/synthetic.yaml (``SMALL``). At the sizes of
configs/aliexpress_nl.yaml ten million rows would take hours on a CPU, and
the memory that could grow with the rows is in reading and writing, not in
the model.
"""

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from benchmarks.common import SMALL, Dimensions, synthetic_csv, synthetic_parquet
from mome_rec.config import Config
from mome_rec.data.preprocess import Preprocessor
from mome_rec.data.synthetic import aliexpress_schema

logger = logging.getLogger(__name__)

REPOSITORY = Path(__file__).resolve().parents[1]


def probe(task: str, *arguments: str) -> Dict[str, Any]:
    """Run one probe process and return its JSON line."""
    return probes({task: [task, *arguments]})[task]


def probes(commands: Dict[str, Sequence[str]]) -> Dict[str, Dict[str, Any]]:
    """Run several probe processes at once (``name -> probe arguments``) and return each one's JSON line.

    Each process's peak memory is its own, so running them side by side changes
    their rows/s but not their peaks.
    """
    running = {}
    for name, arguments in commands.items():
        command = [sys.executable, "-m", "benchmarks.probe", *arguments]
        logger.info("memory probe: %s", " ".join(command[2:]))
        # Files, not pipes: a process that writes more than the pipe buffer blocks until the parent reads.
        stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        running[name] = (subprocess.Popen(command, cwd=REPOSITORY, stdout=stdout, stderr=stderr, text=True), stdout, stderr)
    results = {}
    for name, (process, stdout, stderr) in running.items():
        process.wait()
        stdout.seek(0)
        stderr.seek(0)
        if process.returncode != 0:
            raise RuntimeError(f"probe {name} failed with exit status {process.returncode}: {stderr.read().strip()[-2000:]}")
        results[name] = json.loads(stdout.read().strip().splitlines()[-1])
        stdout.close()
        stderr.close()
    return results


def scoring_model(work_dir: Path, dims: Dimensions, fit_rows: int) -> Optional[Path]:
    """Export an untrained MoME of ``dims``, its preprocessor fit on ``fit_rows`` rows; None without export."""
    try:
        from benchmarks.scoring import build_untrained, export
    except ImportError:
        return None
    try:
        import mome_rec.export  # noqa: F401
        import mome_rec.scoring  # noqa: F401
    except ImportError:
        return None
    path = Path(work_dir) / f"memory-probe-{dims.embedding_dim}-{'-'.join(map(str, dims.hidden_dims))}.mome"
    if not path.is_file():
        source = synthetic_parquet(work_dir, fit_rows)
        preprocessor = Preprocessor.fit([source], aliexpress_schema())
        model = build_untrained(dims, "mome", preprocessor)
        export(model, preprocessor, Config(model=dims.model_config("mome")), path)
    return path


TASKS = ("batches", "convert", "score")


def run_memory(
    work_dir: Path, row_counts: Sequence[int], batch_size: int, score_dims: Dimensions = SMALL, tasks: Sequence[str] = TASKS
) -> Dict[str, Any]:
    """Measure each of ``tasks`` at every row count; the ratios compare the largest count with the smallest."""
    work_dir = Path(work_dir)
    model = scoring_model(work_dir, score_dims, min(row_counts)) if "score" in tasks else None
    results: Dict[str, Any] = {"baseline": probe("baseline"), "probes": {}}
    for rows in row_counts:
        commands: Dict[str, List[str]] = {}
        if "batches" in tasks:
            commands["batches"] = ["batches", str(synthetic_parquet(work_dir, rows)), "--batch-size", str(batch_size)]
        if "convert" in tasks:
            commands["convert"] = ["convert", str(synthetic_csv(work_dir, rows))]
        if model is not None:
            scores = str(work_dir / "memory-scores")
            commands["score"] = ["score", str(model), str(synthetic_parquet(work_dir, rows)), scores, "--batch-size", "65536"]
        results["probes"][str(rows)] = probes(commands)

    smallest, largest = str(min(row_counts)), str(max(row_counts))
    results["peak_ratio_largest_vs_smallest"] = {
        task: results["probes"][largest][task]["peak_rss_bytes"] / results["probes"][smallest][task]["peak_rss_bytes"]
        for task in results["probes"][smallest]
    } if smallest != largest else {}
    results["row_counts"] = list(row_counts)
    results["score_dimensions"] = score_dims.to_dict() if model is not None else None
    return results


def describe(result: Dict[str, Any]) -> List[List[str]]:
    rows = [["memory baseline (imports)", f"{result['baseline']['peak_rss_bytes'] / 2**20:.0f} MiB", ""]]
    for count, entry in result["probes"].items():
        for task, values in entry.items():
            rate = values["rows"] / values["seconds"] if values["seconds"] else 0.0
            rows.append([f"memory {task} {int(count):,} rows", f"{values['peak_rss_bytes'] / 2**20:.0f} MiB", f"{rate:.0f} rows/s"])
    for task, value in result["peak_ratio_largest_vs_smallest"].items():
        rows.append([f"memory {task} peak ratio", f"{value:.2f}x", "largest / smallest row count"])
    return rows
