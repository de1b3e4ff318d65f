"""The ``mome-rec`` command line: train, convert (and the commands registered in COMMANDS)."""

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from mome_rec.errors import InputError

logger = logging.getLogger("mome_rec")


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # torchrec and the planner log a lot at INFO on every rank; keep their warnings only.
    for name in ("torchrec", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # torchrec also warns through the root logger once per table ("Sharding spec not found");
    # only errors sent that way are shown.
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: record.name != "root" or record.levelno >= logging.ERROR)


def _default_out(config: str) -> Path:
    return Path("runs") / Path(config).stem


def cmd_train(args: argparse.Namespace) -> int:
    """Train one config (one process, or one rank of a torchrun/TorchX job)."""
    from mome_rec.config import load_config
    from mome_rec.distributed import init_distributed, shutdown_distributed
    from mome_rec.trainer import Trainer

    config = load_config(args.config, args.overrides)
    plan = None
    env = init_distributed(config.distributed.backend)
    try:
        if args.plan is not None:
            from mome_rec.plan_io import load_plan_for

            plan = load_plan_for(args.plan, config, env.world_size, device=env.device, local_world_size=env.local_world_size)
        out = Path(args.out) if args.out else _default_out(args.config)
        trainer = Trainer(config, out, env, plan=plan, resume=args.resume)
        metrics = trainer.run()
        if env.is_main:
            from mome_rec.figures import write_run_figures

            write_run_figures(out, metrics, model=trainer.ranking_model)  # logs each file it writes
    finally:
        shutdown_distributed()
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a CSV file to parquet once, so later reads are fast."""
    from mome_rec.data.convert import convert_csv_to_parquet

    source = Path(args.input)
    if not source.is_file():
        raise InputError(f"{source}: file not found")
    target = Path(args.out) if args.out else source.with_suffix(".parquet")
    rows = convert_csv_to_parquet(source, target, row_group_rows=args.row_group_rows)
    logger.info("wrote %d rows to %s", rows, target)
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="train a model from a YAML config")
    parser.add_argument("--config", required=True, help="YAML config file, e.g. configs/synthetic.yaml")
    parser.add_argument("--out", help="run folder for checkpoints and metrics.json (default: runs/CONFIG_NAME)")
    parser.add_argument("--plan", help="sharding plan JSON written by 'mome-rec plan'")
    parser.add_argument("--resume", help="run folder or checkpoint folder to continue from")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. train.epochs=2")
    parser.set_defaults(handler=cmd_train)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("convert", help="convert a CSV file to parquet")
    parser.add_argument("input", help="CSV file")
    parser.add_argument("--out", help="parquet file to write (default: the input with .parquet)")
    parser.add_argument("--row-group-rows", type=int, default=65536, help="rows per parquet row group")
    parser.set_defaults(handler=cmd_convert)


# Sub-commands defined in their own modules: name -> module with ``add_parser(subparsers)``.
EXTERNAL_COMMANDS: Dict[str, str] = {
    "plan": "mome_rec.commands.plan",
    "export": "mome_rec.commands.export",
    "score": "mome_rec.commands.score",
    "compare": "mome_rec.commands.compare",
}

COMMANDS: Dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "train": _add_train,
    "convert": _add_convert,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mome-rec", description="MoME multi-task ranking on TorchRec")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS.values():
        add(sub)
    for module_name in EXTERNAL_COMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue  # NOTE: a command whose module is not built yet is left out of the parser
        module.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    _setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except InputError as error:
        logger.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
