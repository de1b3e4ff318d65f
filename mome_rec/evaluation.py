"""Evaluation over a whole split, with every rank running the same number of steps."""

import logging
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from mome_rec.distributed import DistEnv, all_gather_objects, all_reduce_int
from mome_rec.metrics import task_metrics

logger = logging.getLogger(__name__)


def predict_split(model: torch.nn.Module, stream, env: DistEnv, desc: str) -> Tuple[np.ndarray, np.ndarray]:
    """Return sigmoid scores and labels (``N x T``) of the whole split, gathered from every rank.

    Sharded embedding lookups are collective, so a rank that runs out of batches
    repeats its last one and drops the result until the longest rank is done.
    Runs under ``torch.no_grad`` because gathering inside ``torch.inference_mode``
    fails on gloo.
    """
    steps = all_reduce_int(len(stream), "max")
    scores: List[np.ndarray] = []
    labels: List[np.ndarray] = []
    was_training = model.training
    model.eval()
    last = None
    iterator = iter(stream)
    with torch.no_grad():
        for _ in tqdm(range(steps), desc=desc, disable=not env.is_main, leave=False):
            batch = next(iterator, None)
            keep = batch is not None
            if batch is None:
                batch = last
            if batch is None:
                raise RuntimeError(f"rank {env.rank} holds no rows of the {desc} split while other ranks do")
            last = batch
            _, (_, logits, batch_labels) = model(batch.to(env.device))
            if keep:
                scores.append(torch.sigmoid(logits).float().cpu().numpy())
                labels.append(batch_labels.float().cpu().numpy())
    model.train(was_training)

    local_scores = np.concatenate(scores) if scores else np.zeros((0, 0), dtype=np.float32)
    local_labels = np.concatenate(labels) if labels else np.zeros((0, 0), dtype=np.float32)
    gathered = all_gather_objects((local_scores, local_labels))
    parts = [part for part in gathered if part[0].size]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def evaluate_split(
    model: torch.nn.Module, stream, env: DistEnv, tasks: List[str], desc: str
) -> Dict[str, Dict[str, Optional[float]]]:
    """AUC and log loss per task over the whole split."""
    scores, labels = predict_split(model, stream, env, desc)
    return task_metrics(scores, labels, tasks)
