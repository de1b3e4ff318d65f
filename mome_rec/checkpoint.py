"""Distributed checkpoints that become visible only once complete.

A checkpoint is a folder: the ``torch.distributed.checkpoint`` (DCP) files of
every rank, one ``rank_states/rank_R.pt`` per rank (random number generator
states, which differ between ranks), and ``meta.json``.

Saving writes everything into the hidden folder ``.NAME.tmp`` beside the
target, rank 0 writes ``meta.json`` last, then renames the old checkpoint to
``.NAME.old``, the new one into place and deletes the old one. So:

* a job killed while writing leaves only ``.NAME.tmp``, which readers ignore
  and the next save deletes;
* a job killed between the two renames leaves ``.NAME.old``, which
  :func:`find_checkpoint` returns and the next save moves back first.

Every rank must see the same folder (a shared file system), as DCP's file
writer requires.
"""

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Set

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from mome_rec.distributed import barrier
from mome_rec.errors import InputError, first_line

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
RANK_STATES = "rank_states"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _staging(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp"


def _previous(path: Path) -> Path:
    return path.parent / f".{path.name}.old"


def save_checkpoint(
    path: Path, state: Dict[str, Any], meta: Dict[str, Any], rank_state: Optional[Dict[str, Any]] = None
) -> None:
    """Write a checkpoint folder at ``path`` atomically; every rank calls this.

    Args:
        path: the checkpoint folder, e.g. ``RUN/checkpoints/latest``.
        state: the DCP state dict (tensors, ShardedTensors and small objects).
        meta: JSON-serialisable metadata, written by rank 0.
        rank_state: this rank's own objects (saved with ``torch.save``), or None.
    """
    path = Path(path)
    staging = _staging(path)
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        _recover(path)
        shutil.rmtree(staging, ignore_errors=True)
        (staging / RANK_STATES).mkdir(parents=True)
    barrier()

    dcp.save(state, checkpoint_id=str(staging))
    if rank_state is not None:
        _write_atomically(staging / RANK_STATES / f"rank_{_rank()}.pt", lambda tmp: torch.save(rank_state, tmp))
    barrier()

    if _rank() == 0:
        _write_atomically(staging / META_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2, default=float)))
        previous = _previous(path)
        shutil.rmtree(previous, ignore_errors=True)
        if path.exists():
            os.replace(path, previous)
        os.replace(staging, path)
        shutil.rmtree(previous, ignore_errors=True)
    barrier()


def _write_atomically(target: Path, write) -> None:
    tmp = target.parent / f".{target.name}.tmp"
    write(tmp)
    os.replace(tmp, target)


def _recover(path: Path) -> None:
    """Move ``.NAME.old`` back to ``path`` if a save died between its two renames."""
    previous = _previous(path)
    if not path.exists() and (previous / META_FILE).is_file():
        logger.warning("%s is missing; restoring the previous checkpoint %s", path, previous)
        os.replace(previous, path)


def find_checkpoint(path: Path) -> Optional[Path]:
    """Return the complete checkpoint at ``path``, or the previous one a killed save left, or None."""
    path = Path(path)
    for candidate in (path, _previous(path)):
        if (candidate / META_FILE).is_file():
            return candidate
    return None


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """Return the run's complete ``checkpoints/latest`` folder, or None."""
    return find_checkpoint(Path(run_dir) / "checkpoints" / "latest")


def read_meta(path: Path) -> Dict[str, Any]:
    """Return the metadata of the checkpoint at ``path``; InputError if it is missing or broken."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise InputError(f"{path}: not a complete checkpoint ({META_FILE} missing)")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{meta_path}: invalid JSON at line {error.lineno}") from error


def checkpoint_keys(path: Path) -> Set[str]:
    """Return the flattened DCP keys stored at ``path``, e.g. ``model.model.task_arch.towers.0.net.0.weight``."""
    try:
        return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    except (Exception, CheckpointException) as error:  # DCP raises several types for a damaged folder
        raise InputError(f"{path}: cannot read checkpoint metadata: {first_line(error)}") from error


def load_checkpoint(path: Path, state: Dict[str, Any], partial: bool = False) -> None:
    """Load the checkpoint at ``path`` into ``state`` in place, resharding to this job's world size.

    With ``partial`` the entries of ``state`` that the checkpoint lacks keep
    their values; the caller checks which ones it needs.
    """
    read_meta(path)
    try:
        dcp.load(state, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=partial))
    except (Exception, CheckpointException) as error:
        # DCP raises several types for a damaged or foreign folder; CheckpointException is a BaseException.
        raise InputError(f"{path}: cannot load checkpoint: {first_line(error)}") from error


def read_rank_state(path: Path, rank: int) -> Optional[Dict[str, Any]]:
    """Return what rank ``rank`` saved with :func:`save_checkpoint`, or None if it saved nothing."""
    file = Path(path) / RANK_STATES / f"rank_{rank}.pt"
    if not file.is_file():
        return None
    return torch.load(file, weights_only=True)


def capture_rng_state() -> Dict[str, Any]:
    """Return this process's torch random number generator states (CPU, and CUDA when present)."""
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Set the generators saved by :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
