"""``mome-rec score``: score CSV or parquet files with an exported model, on one rank or many."""

import argparse
import logging
import os
from pathlib import Path
from typing import Tuple

import torch

from mome_rec.errors import InputError

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score",
        help="score files with a model from 'mome-rec export'; under torchrun each rank takes a share of the parts",
    )
    parser.add_argument("--model", required=True, help="model file written by 'mome-rec export'")
    parser.add_argument("--input", required=True, nargs="+", metavar="PATH",
                        help="CSV or parquet files, or folders of them")
    parser.add_argument("--out", required=True, help="output folder for the parquet parts")
    parser.add_argument("--batch-rows", type=int, default=65536, help="rows read and scored at once (default 65536)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op CPU threads per rank (default: torch's, 1 per rank under torchrun)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=run_score)


def run_score(args: argparse.Namespace) -> int:
    from mome_rec.scoring import score_files

    rank, world_size = _rank_from_environment()
    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    score_files(
        Path(args.model),
        [Path(path) for path in args.input],
        Path(args.out),
        rank=rank,
        world_size=world_size,
        batch_rows=args.batch_rows,
        progress=not args.no_progress,
    )
    return 0


def _rank_from_environment() -> Tuple[int, int]:
    """Return ``(RANK, WORLD_SIZE)`` as torchrun sets them, ``(0, 1)`` when unset."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise InputError(f"RANK={os.environ.get('RANK')!r} and WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} "
                         "must be integers") from None
    return rank, world_size
