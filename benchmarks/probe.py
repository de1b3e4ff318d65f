"""One measured task in a fresh process, for peak memory: ``python -m benchmarks.probe TASK ...``.

Prints one JSON line: the rows handled, the wall seconds and the process's
peak resident set size (``VmHWM``). Tasks:

* ``baseline``: only the imports the other tasks need, the floor of every figure.
* ``batches FILE BATCH_SIZE``: fit the preprocessor on FILE, then build every
  batch of one shuffled epoch, as training reads its input.
* ``convert CSV``: convert CSV to parquet beside it, then remove the copy.
* ``score MODEL FILE OUT_DIR``: score FILE with an exported model into OUT_DIR.
* ``train OUT_DIR --override KEY=VALUE ...``: the train job of configs/synthetic.yaml
  with the overrides, for one epoch. ``rows`` and ``seconds`` then count the
  epoch's training steps alone: DistributedModelParallel on one process,
  TorchRec's train pipeline and the embedding tables, without the set-up and
  the evaluation.
"""

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import List, Tuple

from benchmarks.common import peak_rss_bytes
from mome_rec.data.convert import convert_csv_to_parquet
from mome_rec.data.preprocess import Preprocessor
from mome_rec.data.synthetic import aliexpress_schema

REPOSITORY = Path(__file__).resolve().parents[1]


def train_epoch(out_dir: Path, overrides: List[str]) -> Tuple[int, float]:
    """Run the train job for one epoch and return the rows it trained on and the epoch's training seconds."""
    from mome_rec.config import load_config
    from mome_rec.distributed import init_distributed
    from mome_rec.trainer import Trainer

    config = load_config(str(REPOSITORY / "configs" / "synthetic.yaml"), ["train.epochs=1", *overrides])
    shutil.rmtree(out_dir, ignore_errors=True)
    metrics = Trainer(config, out_dir, init_distributed()).run()
    shutil.rmtree(out_dir, ignore_errors=True)
    epoch = metrics["history"][0]
    steps = config.train.max_steps_per_epoch
    return steps * config.train.batch_size, epoch["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=["baseline", "batches", "convert", "score", "train"])
    parser.add_argument("paths", nargs="*", help="the task's files, as in the module doc")
    parser.add_argument("--batch-size", type=int, default=2048, help="rows per batch")
    parser.add_argument("--override", action="append", default=[], help="train: a config override KEY=VALUE")
    args = parser.parse_args()

    started = time.perf_counter()
    rows = 0
    if args.task == "batches":
        from benchmarks.pipeline import read_all_batches

        path = Path(args.paths[0])
        preprocessor = Preprocessor.fit([path], aliexpress_schema())
        rows = read_all_batches(path, preprocessor, args.batch_size)
    elif args.task == "convert":
        source = Path(args.paths[0])
        target = source.with_name(f"{source.stem}.probe.parquet")
        rows = convert_csv_to_parquet(source, target)
        target.unlink()
    elif args.task == "score":
        from mome_rec.scoring import score_files

        out_dir = Path(args.paths[2])
        shutil.rmtree(out_dir, ignore_errors=True)
        rows = score_files(Path(args.paths[0]), [Path(args.paths[1])], out_dir, batch_rows=args.batch_size, progress=False).rows
        shutil.rmtree(out_dir, ignore_errors=True)
    elif args.task == "train":
        rows, train_seconds = train_epoch(Path(args.paths[0]), args.override)
    seconds = time.perf_counter() - started if args.task != "train" else train_seconds
    print(json.dumps({"task": args.task, "rows": rows, "seconds": seconds, "peak_rss_bytes": peak_rss_bytes()}))


if __name__ == "__main__":
    main()
