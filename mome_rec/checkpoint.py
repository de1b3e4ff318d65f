"""Distributed checkpoints that become visible only once complete.

Every rank writes its shards with ``torch.distributed.checkpoint`` into a hidden
temporary folder; rank 0 then adds ``meta.json`` and renames the folder into
place. A job killed while writing leaves only the hidden folder, which the next
save removes, so the previous checkpoint stays usable.
"""

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from mome_rec.distributed import barrier
from mome_rec.errors import InputError

logger = logging.getLogger(__name__)

META_FILE = "meta.json"


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save_checkpoint(path: Path, state: Dict[str, Any], meta: Dict[str, Any]) -> None:
    """Write ``state`` (a DCP state dict) and ``meta`` (JSON) to the folder ``path``, atomically."""
    path = Path(path)
    staging = path.parent / f".{path.name}.tmp"
    previous = path.parent / f".{path.name}.old"
    if _is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    barrier()

    dcp.save(state, checkpoint_id=str(staging))
    barrier()

    if _is_main():
        meta_tmp = staging / f".{META_FILE}.tmp"
        meta_tmp.write_text(json.dumps(meta, indent=2))
        os.replace(meta_tmp, staging / META_FILE)
        shutil.rmtree(previous, ignore_errors=True)
        if path.exists():
            os.replace(path, previous)
        os.replace(staging, path)
        shutil.rmtree(previous, ignore_errors=True)
    barrier()


def read_meta(path: Path) -> Dict[str, Any]:
    """Return the metadata of the checkpoint at ``path``; InputError if it is missing or broken."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise InputError(f"{path}: not a complete checkpoint ({META_FILE} missing)")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{meta_path}: invalid JSON at line {error.lineno}") from error


def load_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """Load the checkpoint at ``path`` into ``state`` in place (any world size)."""
    read_meta(path)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as error:  # DCP raises several types for a damaged or foreign folder
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{path}: cannot load checkpoint: {first_line}") from error


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The run's ``latest`` checkpoint folder if one is complete, else None."""
    candidate = Path(run_dir) / "checkpoints" / "latest"
    return candidate if (candidate / META_FILE).is_file() else None
