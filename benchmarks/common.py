"""Shared pieces of the benchmarks: dimensions, interleaved timing, machine facts and synthetic files.

Every comparison is a ratio of medians taken in one process run: the
candidates are timed in turn within each repetition, so a change in machine
load affects all of them alike.
"""

import dataclasses
import json
import os
import platform
import resource
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import torch

from mome_rec.config import ModelConfig, SyntheticConfig
from mome_rec.data.synthetic import (
    CARDINALITIES,
    DENSE_COLUMNS,
    GENERATOR_VERSION,
    LABEL_COLUMNS,
    NUM_DENSE,
    SPARSE_COLUMNS,
    generate_synthetic_table,
    write_synthetic,
)


@dataclasses.dataclass(frozen=True)
class Dimensions:
    """Model and batch sizes of one benchmark run, on the AliExpress layout (16 sparse, 63 dense, 2 tasks)."""

    embedding_dim: int = 128
    hidden_dims: Sequence[int] = (512, 256)
    tower_dims: Sequence[int] = (128, 64)
    num_experts: int = 8
    batch_size: int = 2048
    num_tasks: int = 2

    @property
    def in_features(self) -> int:
        """Width of the over-arch input: pooled embeddings and dense features."""
        return len(SPARSE_COLUMNS) * self.embedding_dim + NUM_DENSE

    def model_config(self, over_arch: str) -> ModelConfig:
        return ModelConfig(
            embedding_dim=self.embedding_dim,
            over_arch=over_arch,
            hidden_dims=list(self.hidden_dims),
            num_experts=self.num_experts,
            tower_dims=list(self.tower_dims),
        )

    def to_dict(self) -> Dict[str, Any]:
        values = dataclasses.asdict(self)
        values["in_features"] = self.in_features
        return values


PAPER = Dimensions()
"""The sizes of configs/aliexpress_nl.yaml: embedding 128, experts [512, 256], towers [128, 64], 8 experts, batch 2048."""

QUICK = Dimensions(embedding_dim=4, hidden_dims=(16, 8), tower_dims=(8,), num_experts=2, batch_size=64)
"""Tiny sizes for the smoke test; the figures mean nothing."""

SMALL = Dimensions(embedding_dim=16, hidden_dims=(128, 64), tower_dims=(32,), num_experts=4, batch_size=2048)
"""configs/synthetic.yaml's model, for the scoring memory probes over millions of rows."""


# ------------------------------------------------------------------ timing


def time_interleaved(
    candidates: Dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> Dict[str, List[float]]:
    """Time each candidate ``repeats`` times, in turn within each repetition; return seconds per call.

    Each candidate runs ``warmup`` untimed calls first. The order inside a
    repetition rotates, so no candidate always runs right after the same other.
    """
    for run in candidates.values():
        for _ in range(warmup):
            run()
    names = list(candidates)
    seconds: Dict[str, List[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            candidates[name]()
            seconds[name].append(time.perf_counter() - started)
    return seconds


def summary(samples: Sequence[float], scale: float = 1.0) -> Dict[str, Any]:
    """Return the median and the best (largest) of the rates ``scale / sample``, and every rate rounded.

    On a shared machine the best repetition is the one least slowed by other
    processes, so it is kept beside the median.
    """
    rates = [scale / value for value in samples]
    return {"median": statistics.median(rates), "best": max(rates), "samples": [round(rate, 3) for rate in rates]}


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def median_seconds(samples: Sequence[float]) -> Dict[str, Any]:
    """Return the median and the best (smallest) of durations in seconds, and every value rounded."""
    return {"median": statistics.median(samples), "best": min(samples), "samples": [round(value, 6) for value in samples]}


# ------------------------------------------------------------------ machine


def machine_info() -> Dict[str, Any]:
    """Return the facts that figures depend on: CPU, threads, versions and the current load average."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: Dict[str, Any] = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
    }
    try:
        import importlib.metadata

        info["torch_rechub"] = importlib.metadata.version("torch-rechub")
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        info["torch_rechub"] = None
    return info


def peak_rss_bytes() -> int:
    """Return this process's peak resident set size (``VmHWM``), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------ data


def synthetic_batch(dims: Dimensions, seed: int = 0):
    """Return one training batch as the over-arch receives it: ``B x in_features`` features and ``B x 2`` labels.

    The rows are synthetic AliExpress rows. Each sparse id picks a row of a
    random ``N(0, 0.05)`` embedding table, the role of the pooled embeddings,
    and the dense columns are standardised over the batch.
    """
    table = generate_synthetic_table(dims.batch_size, seed)
    generator = torch.Generator().manual_seed(seed)
    pooled = []
    for column, cardinality in zip(SPARSE_COLUMNS, CARDINALITIES):
        weights = torch.randn(cardinality, dims.embedding_dim, generator=generator) * 0.05
        ids = torch.from_numpy(np.array(table.column(column).to_numpy()))
        pooled.append(weights[ids])
    dense = np.stack([table.column(column).to_numpy() for column in DENSE_COLUMNS], axis=1).astype(np.float32)
    dense = (dense - dense.mean(axis=0)) / np.where(dense.std(axis=0) > 0, dense.std(axis=0), 1.0)
    features = torch.cat(pooled + [torch.from_numpy(dense.astype(np.float32))], dim=1)
    labels = torch.from_numpy(np.stack([table.column(column).to_numpy() for column in LABEL_COLUMNS], axis=1)).float()
    return features.contiguous(), labels


def synthetic_parquet(work_dir: Path, rows: int, seed: int = 0) -> Path:
    """Return a parquet file of ``rows`` synthetic rows under ``work_dir``, writing it once (row groups of 16,384 rows)."""
    path = Path(work_dir) / f"synthetic-v{GENERATOR_VERSION}-seed{seed}-{rows}.parquet"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.with_name(f".{path.name}.parts-{os.getpid()}")
    written = write_synthetic(folder, SyntheticConfig(train_rows=rows, validation_rows=0, test_rows=0, seed=seed))
    os.replace(written["train"], path)
    shutil.rmtree(folder, ignore_errors=True)
    return path


def synthetic_csv(work_dir: Path, rows: int, seed: int = 0) -> Path:
    """Return a CSV copy of :func:`synthetic_parquet`'s file of ``rows`` rows, writing it once."""
    path = Path(work_dir) / f"synthetic-v{GENERATOR_VERSION}-seed{seed}-{rows}.csv"
    if path.is_file():
        return path
    source = pq.ParquetFile(synthetic_parquet(work_dir, rows, seed))
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with pa_csv.CSVWriter(str(temporary), source.schema_arrow) as writer:
        for batch in source.iter_batches(batch_size=65536):
            writer.write_batch(batch)
    os.replace(temporary, path)
    return path


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON to a temporary name in the same folder, then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(temporary, path)
