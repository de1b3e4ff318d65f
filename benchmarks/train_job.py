"""Samples/s of the whole train job: TrainModule through DistributedModelParallel on one process.

Each measurement is one ``python -m benchmarks.probe train`` process running
``mome-rec train`` on synthetic data for one epoch of a few steps, at the
dimensions of the run. The figure covers what the over-arch benchmark leaves
out: the input pipeline, the sharded embedding lookups and their fused
optimizer, and TorchRec's train pipeline. The set-up (data, planning,
sharding) and the evaluation after the epoch are not timed, but the epoch's
first step includes the train pipeline's tracing of the model, alike for every
candidate. The candidates alternate, one process each, ``repeats`` times.
"""

import logging
from pathlib import Path
from typing import Any, Dict, List

from benchmarks.common import Dimensions, ratio, summary
from benchmarks.memory import probe
from mome_rec.modules.over_arch import OVER_ARCHS

logger = logging.getLogger(__name__)

CANDIDATES = {
    "mome_expert_phase": ["model.over_arch=mome", "train.neuron_epochs=0"],
    "mome_neuron_phase": ["model.over_arch=mome", "train.neuron_epochs=1"],
    "mmoe": ["model.over_arch=mmoe", "train.neuron_epochs=0"],
}


def overrides(dims: Dimensions, work_dir: Path, steps: int) -> List[str]:
    """Return the config overrides shared by every candidate."""
    batch = dims.batch_size
    return [
        f"model.embedding_dim={dims.embedding_dim}",
        f"model.hidden_dims=[{', '.join(map(str, dims.hidden_dims))}]",
        f"model.tower_dims=[{', '.join(map(str, dims.tower_dims))}]",
        f"model.num_experts={dims.num_experts}",
        f"train.batch_size={batch}",
        f"train.eval_batch_size={batch}",
        f"train.max_steps_per_epoch={steps}",
        f"data.synthetic.train_rows={batch * (steps + 1)}",
        f"data.synthetic.validation_rows={batch}",
        f"data.synthetic.test_rows={batch}",
        f"data.cache_dir={Path(work_dir) / 'train-job-cache'}",
    ]


def run_train_job(dims: Dimensions, work_dir: Path, steps: int, repeats: int) -> Dict[str, Any]:
    """Run every candidate ``repeats`` times in turn; return samples/s and the ratios to MMoE."""
    names = [name for name in CANDIDATES if name != "mmoe" or "mmoe" in OVER_ARCHS]
    shared = overrides(dims, work_dir, steps)
    seconds: Dict[str, List[float]] = {name: [] for name in names}
    rows = dims.batch_size * steps
    for _ in range(repeats):
        for name in names:
            arguments = [f"--override={value}" for value in shared + CANDIDATES[name]]
            result = probe("train", str(Path(work_dir) / f"train-job-{name}"), *arguments)
            seconds[name].append(result["seconds"])
    rates = {name: summary(values, rows) for name, values in seconds.items()}
    mmoe = rates.get("mmoe", {}).get("median")
    return {
        "samples_per_second": rates,
        "ratios_vs_mmoe": {name: ratio(rate["median"], mmoe) for name, rate in rates.items()},
        "steps": steps,
    }


def describe(result: Dict[str, Any]) -> List[List[str]]:
    rows = []
    for name, rate in result["samples_per_second"].items():
        relative = result["ratios_vs_mmoe"].get(name)
        rows.append([f"train job {name}", f"{rate['median']:.0f} samples/s", "" if relative is None else f"{relative:.2f}x mmoe"])
    return rows
