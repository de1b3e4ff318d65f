"""``mome-rec export``: write the deployable model file of a trained checkpoint."""

import argparse
import json
import logging
from pathlib import Path
from typing import Optional

from mome_rec.sizes import BYTES_PER_MB

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="write a compact model file (pruned weights, 1-bit masks, tables, preprocessing)"
    )
    parser.add_argument("--checkpoint", required=True,
                        help="run folder (its checkpoints/best is used) or checkpoint folder")
    parser.add_argument("--out", required=True, help="model file to write, e.g. model.mome")
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from mome_rec.export import export_model
    from mome_rec.restore import load_trained_model, resolve_checkpoint

    trained = load_trained_model(Path(args.checkpoint))
    summary = export_model(trained, Path(args.out))
    logger.info(
        "wrote %s: %.3f MB (model %.3f MB, vocabularies %.3f MB, header %.1f kB); BatchNorm %s; "
        "max probability difference to the checkpoint %.1e",
        summary.path,
        summary.file_bytes / BYTES_PER_MB,
        summary.model_bytes / BYTES_PER_MB,
        summary.vocabulary_bytes / BYTES_PER_MB,
        summary.header_bytes / 1e3,
        "folded" if summary.fold_batch_norm else "kept apart", summary.max_abs_difference,
    )
    expected = _expected_model_mb(resolve_checkpoint(Path(args.checkpoint)))
    if expected is not None:
        logger.info("the train job's metrics.json predicts %.3f MB (size_mb.deployable + size_mb.embeddings)", expected)
    return 0


def _expected_model_mb(checkpoint: Path) -> Optional[float]:
    """Return ``deployable + embeddings`` from the run's metrics.json (two folders above the checkpoint), if any."""
    metrics = checkpoint.parent.parent / "metrics.json"
    if not metrics.is_file():
        return None
    try:
        sizes = json.loads(metrics.read_text())["size_mb"]
        return float(sizes["deployable"]) + float(sizes["embeddings"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
