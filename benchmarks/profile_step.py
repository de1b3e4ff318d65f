"""Show where a training step's time goes: MoME's expert phase next to mome_rec's MMoE.

    python -m benchmarks.profile_step                 # the MoME paper's AliExpress dimensions, 2 steps each
    python -m benchmarks.profile_step --quick --out /tmp/profile.json

Both models run the dense step of :mod:`benchmarks.training` under
``torch.profiler``. The self CPU time of every ATen operator is summed into
the groups of :data:`GROUPS`, per step. Apart from run-to-run noise, the two
columns differ where MoME does work that MMoE does not. This is a profile, not a benchmark: the
profiler adds overhead of its own, and the rates in ``benchmarks.run`` are the
figures to compare.
"""

import argparse
import logging
import sys
from typing import Dict, List, Optional

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import PAPER, QUICK, Dimensions, synthetic_batch, write_json
from benchmarks.training import task_arch, training_step

logger = logging.getLogger("benchmarks.profile_step")

GROUPS: Dict[str, List[str]] = {
    "matrix products": ["aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"],
    "dropout masks": ["aten::bernoulli_"],
    "mask noise": ["aten::normal_"],
    "L0 penalty (erf, exp)": ["aten::erf_", "aten::exp_"],
    "BatchNorm": ["aten::native_batch_norm", "aten::native_batch_norm_backward"],
    "other elementwise and reductions": [],
}
"""Group name -> ATen operators; the last group takes every operator not listed."""


def profile_milliseconds(dims: Dimensions, over_arch: str, expert_phase: bool, steps: int) -> Dict[str, float]:
    """Return the self CPU milliseconds per step of each group of :data:`GROUPS`, and ``total``."""
    features, labels = synthetic_batch(dims)
    features.requires_grad_(True)
    torch.manual_seed(0)
    run = training_step(task_arch(dims, over_arch, expert_phase=expert_phase), features, labels, steps)
    run()  # warm-up: allocations and Adam's state
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        run()
    listed = {name: group for group, names in GROUPS.items() for name in names}
    rest = list(GROUPS)[-1]
    totals = {group: 0.0 for group in GROUPS}
    for event in profiler.key_averages():
        if event.key.startswith("aten::"):
            totals[listed.get(event.key, rest)] += event.self_cpu_time_total / 1000.0 / steps
    totals["total"] = sum(totals.values())
    return totals


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Profile one training step of MoME's expert phase and of MMoE.")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps per model (default 2)")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    dims = QUICK if args.quick else PAPER
    columns = {
        "mome_expert_phase": profile_milliseconds(dims, "mome", True, args.steps),
        "mmoe": profile_milliseconds(dims, "mmoe", False, args.steps),
    }
    width = max(len(group) for group in columns["mmoe"])
    lines = [f"{'ms per step (self CPU)':{width}}  {'MoME expert phase':>17}  {'MMoE':>9}  {'difference':>10}"]
    for group in columns["mmoe"]:
        mome, mmoe = columns["mome_expert_phase"][group], columns["mmoe"][group]
        lines.append(f"{group:{width}}  {mome:17.1f}  {mmoe:9.1f}  {mome - mmoe:+10.1f}")
    print("\n".join(lines))
    if args.out:
        write_json(args.out, {"dimensions": dims.to_dict(), "steps": args.steps, "milliseconds_per_step": columns})
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    sys.exit(main())
