"""``mome-rec plan``: run TorchRec's sharding planner offline and save the plan as JSON.

Needs no process group and no accelerator. The table sizes come, in this
order, from ``--table-sizes FILE`` (a JSON object: sparse column or table name
-> rows), from ``distributed.table_rows`` in the config, or from the training
data (fitting the preprocessor, as ``train`` does).
"""

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Dict, List

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan", help="plan the embedding tables' sharding for a cluster, offline, and write it as JSON"
    )
    parser.add_argument("--config", required=True, help="YAML config file, e.g. configs/aliexpress_nl.yaml")
    parser.add_argument("--world-size", type=int, required=True, help="number of ranks (processes) of the train job")
    parser.add_argument("--local-world-size", type=int,
                        help="ranks per host (default: the world size, at most 8)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="compute device of every rank")
    parser.add_argument("--hbm-gb", type=float, help="accelerator memory per rank in GiB (default: TorchRec's)")
    parser.add_argument("--ddr-gb", type=float, help="host memory per rank in GiB (default: TorchRec's)")
    parser.add_argument("--batch-size", type=int, help="batch size per rank (default: train.batch_size)")
    parser.add_argument("--table-sizes", help="JSON file mapping each sparse column (or table t_COLUMN) to its rows")
    parser.add_argument("--out", default="plan.json", help="plan file to write (default: plan.json)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. model.embedding_dim=64")
    parser.set_defaults(handler=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from mome_rec.config import load_config
    from mome_rec.errors import InputError
    from mome_rec.plan_io import config_schema, save_plan
    from mome_rec.planning import format_report, plan_offline

    # The planner warns about its own defaults at every call; its errors still show.
    logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)
    if args.world_size < 1:
        raise InputError(f"--world-size must be at least 1, got {args.world_size}")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    local_world_size = args.local_world_size or min(args.world_size, 8)

    config = load_config(args.config, args.overrides, check_files=False)  # the plan may not need the data
    schema = config_schema(config)
    table_sizes = _table_sizes(args, config, schema.sparse)
    plan, report = plan_offline(
        config, table_sizes, len(schema.dense), len(schema.labels), args.world_size, local_world_size, args.device,
        batch_size=args.batch_size, hbm_gb=args.hbm_gb, ddr_gb=args.ddr_gb,
    )
    sys.stdout.write(format_report(report) + "\n")
    save_plan(Path(args.out), plan, report)
    logger.info("wrote %s", args.out)
    return 0


def _table_sizes(args: argparse.Namespace, config, columns: List[str]) -> Dict[str, int]:
    from mome_rec.plan_io import configured_table_rows

    if args.table_sizes:
        return read_table_sizes(Path(args.table_sizes), columns)
    configured = configured_table_rows(config)
    if configured is not None:
        return configured
    return _fit_table_sizes(args)


def read_table_sizes(path: Path, columns: List[str]) -> Dict[str, int]:
    """Read ``{column or t_column: rows}`` from ``path``; InputError naming the key for a bad entry."""
    from mome_rec.errors import InputError
    from mome_rec.planning import table_name

    if not path.is_file():
        raise InputError(f"{path}: table sizes file not found")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: invalid JSON at line {error.lineno}") from error
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a JSON object mapping sparse columns to rows")
    by_table = {table_name(column): column for column in columns}
    sizes: Dict[str, int] = {}
    for key, rows in raw.items():
        column = key if key in columns else by_table.get(key)
        if column is None:
            raise InputError(f"{path}: {key} is not a sparse column of the config")
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
            raise InputError(f"{path}: {key} must be a positive integer number of rows, got {rows!r}")
        sizes[column] = rows
    missing = [column for column in columns if column not in sizes]
    if missing:
        raise InputError(f"{path}: no size for {', '.join(missing)}")
    return {column: sizes[column] for column in columns}


def _fit_table_sizes(args: argparse.Namespace) -> Dict[str, int]:
    """Size the tables from the training data, as the train job's preprocessor will."""
    from mome_rec.config import load_config
    from mome_rec.data.preprocess import Preprocessor
    from mome_rec.data.sources import resolve_splits
    from mome_rec.errors import ConfigError, DataError

    hint = "; to plan without the data pass --table-sizes FILE or set distributed.table_rows"
    try:
        config = load_config(args.config, args.overrides)
        splits = resolve_splits(config.data)
    except ConfigError as error:
        raise ConfigError(f"{error}{hint}") from error
    except DataError as error:
        raise DataError(f"{error}{hint}") from error
    preprocessor = Preprocessor.fit(splits.train, splits.schema, holdout=splits.holdout, read_rows=config.data.read_batch_rows)
    return preprocessor.table_sizes()
