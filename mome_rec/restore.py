"""Rebuild a trained model in one process from a checkpoint written by any number of ranks."""

import dataclasses
import logging
from pathlib import Path
from typing import Any, Dict

import torch
import torch.distributed.checkpoint as dcp

from mome_rec.checkpoint import META_FILE, read_meta
from mome_rec.config import Config, config_from_dict
from mome_rec.data.preprocess import Preprocessor
from mome_rec.errors import InputError, first_line
from mome_rec.model import RankingModel, build_model
from mome_rec.train_module import TrainModule

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainedModel:
    """An unsharded model on the CPU in eval mode, with what it needs to read new data."""

    model: RankingModel
    preprocessor: Preprocessor
    config: Config
    meta: Dict[str, Any]


def resolve_checkpoint(path: Path) -> Path:
    """Accept a checkpoint folder or a run folder (whose ``checkpoints/best`` is used)."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    best = path / "checkpoints" / "best"
    if (best / META_FILE).is_file():
        return best
    raise InputError(f"{path}: no checkpoint found (expected {META_FILE} here or in checkpoints/best)")


def load_trained_model(path: Path) -> TrainedModel:
    """Load the model weights of a DCP checkpoint into a fresh, unsharded model.

    torch.distributed.checkpoint reassembles tables that were sharded over
    several ranks, so this works whatever world size wrote the checkpoint.
    """
    checkpoint = resolve_checkpoint(path)
    meta = read_meta(checkpoint)
    try:
        config = config_from_dict(meta["config"], source=str(checkpoint / META_FILE), check_files=False)
        preprocessor = Preprocessor.from_dict(meta["preprocessor"])
        structure = meta["structure"]
    except KeyError as error:
        raise InputError(f"{checkpoint / META_FILE}: missing key {error.args[0]}") from error

    model = build_model(
        config.model,
        preprocessor.table_sizes(),
        len(preprocessor.schema.dense),
        len(preprocessor.schema.labels),
        device=torch.device("cpu"),
    )
    model.over_arch.load_structure_state(structure)
    module = TrainModule(model)
    state = {"model": module.state_dict()}
    try:
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    except (Exception, dcp.CheckpointException) as error:  # CheckpointException derives from BaseException
        raise InputError(f"{checkpoint}: cannot load checkpoint: {first_line(error)}") from error
    module.load_state_dict(state["model"])
    model.eval()
    logger.info("loaded %s (phase %s)", checkpoint, structure.get("phase", "none"))
    return TrainedModel(model, preprocessor, config, meta)
