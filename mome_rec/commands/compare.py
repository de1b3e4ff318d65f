"""``mome-rec compare``: train the baselines, the MoME ablations and the torch-rechub peers on one split."""

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from mome_rec.errors import InputError

logger = logging.getLogger(__name__)


def cmd_compare(args: argparse.Namespace) -> int:
    """Run the comparison of ``args`` in one process and write the table and figures."""
    from mome_rec.compare import Comparison, parse_lambda_grid, parse_models, parse_peers, trainer_function
    from mome_rec.config import load_config
    from mome_rec.distributed import init_distributed, shutdown_distributed

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("mome-rec compare runs in one process; start it without torchrun")
    config = load_config(args.config, args.overrides)
    models = parse_models(args.models)
    peers = parse_peers(args.peers)
    grid = parse_lambda_grid(args.lambda_grid)
    out = Path(args.out) if args.out else Path("runs") / f"compare-{Path(args.config).stem}"

    env = init_distributed(config.distributed.backend)
    try:
        Comparison(
            config, out, models, args.seeds, trainer_function(env),
            lambda_grid=grid, peers=peers, dataset=Path(args.config).stem,
            keep_checkpoints=args.keep_checkpoints, command=" ".join(["mome-rec"] + [shlex.quote(a) for a in sys.argv[1:]]),
        ).run()
    finally:
        shutdown_distributed()
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``compare`` on the ``mome-rec`` sub-command parser."""
    parser = subparsers.add_parser(
        "compare",
        help="train several over-arches and torch-rechub peers on one split and write the comparison table",
        description="Train every model for every seed on the config's split, choose MoME's L0 weights on the "
        "validation split, and write results.md, results.csv, results.json and figures/ to --out.",
    )
    parser.add_argument("--config", required=True, help="YAML config file, e.g. configs/census.yaml")
    parser.add_argument(
        "--models", default="all",
        help="'all' or comma-separated over-arches, e.g. mmoe,ple,mome (default: all)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per model: train.seed, train.seed + 1, ... (default: 3)")
    parser.add_argument("--out", help="output folder (default: runs/compare-CONFIG_NAME)")
    parser.add_argument(
        "--lambda-grid", default="1e-2,1e-3,1e-4,1e-6",
        help="comma-separated L0 weights searched for mome, mome_n and mome_w on the first seed (default: 1e-2,1e-3,1e-4,1e-6)",
    )
    parser.add_argument(
        "--peers", default="all",
        help="torch-rechub peers: 'all', 'none' or a subset of shared_bottom,mmoe,ple,aitm (default: all)",
    )
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints (deleted by default)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. train.epochs=8")
    parser.set_defaults(handler=cmd_compare)
