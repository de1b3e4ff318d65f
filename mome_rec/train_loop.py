"""One training epoch through TorchRec's TrainPipelineSparseDist, and the per-step loss log.

The pipeline overlaps the input distribution (the all-to-all of sparse ids)
of batch ``i + 1`` with the forward and backward pass of batch ``i``, so it
reads up to two batches ahead of the step it trains. Whatever counts progress
(the step log, checkpoints) therefore counts steps returned by
:meth:`~torchrec.distributed.train_pipeline.TrainPipelineSparseDist.progress`,
never batches read.
"""

import json
import logging
import os
from pathlib import Path
from typing import Callable, Dict, Iterable, List

import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm import tqdm

from mome_rec.distributed import all_reduce_mean

logger = logging.getLogger(__name__)


def train_epoch(
    model: torch.nn.Module,
    optimizer,
    batches: Iterable,
    device: torch.device,
    on_step: Callable[[float], None],
    progress: tqdm,
) -> List[float]:
    """Train on ``batches`` until they run out and return the loss of every step.

    Args:
        model: the DistributedModelParallel model; its forward returns ``(loss, (loss, logits, labels))``.
        optimizer: what the pipeline calls ``zero_grad`` and ``step`` on after each backward pass.
        batches: this rank's batches; every rank must yield the same number.
        device: where batches are copied.
        on_step: called after each trained step with the loss averaged over ranks.
        progress: a progress bar advanced once per step.
    """
    pipeline = TrainPipelineSparseDist(model, optimizer, device)
    model.train()
    iterator = iter(batches)
    losses: List[float] = []
    try:
        while True:
            try:
                loss, _, _ = pipeline.progress(iterator)
            except StopIteration:
                break
            value = all_reduce_mean(float(loss))
            losses.append(value)
            progress.update(1)
            on_step(value)
    finally:
        pipeline.detach()
    return losses


class StepLog:
    """The JSON-lines file ``steps.jsonl``: one object per trained step, written by rank 0.

    Each line contains ``epoch`` (1-based), ``step`` (steps trained in that epoch),
    ``global_step``, ``phase`` and ``loss``: the training loss of that step
    (task losses plus the L0 penalty) averaged over the ranks' batches.
    """

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def append(self, record: Dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")

    def truncate(self, global_step: int) -> None:
        """Drop the lines after ``global_step``: a resumed job trains those steps again."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["global_step"] <= global_step]
        tmp = self.path.parent / f".{self.path.name}.tmp"
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
