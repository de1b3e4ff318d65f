"""Run ``mome-rec`` as a user would and read what it wrote.

``run_cli`` calls the command-line entry point in this process (a child
process would spend most of its time importing torchrec); the train job's
one-process group is created and destroyed by the command itself.
"""

import dataclasses
import io
import json
import logging
import os
from pathlib import Path
from typing import List

from mome_rec.cli import main

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Result:
    returncode: int
    stderr: str


def run_cli(args: List[str], cache_dir: Path) -> Result:
    """Run ``mome-rec ARGS`` from the repository root with its own data cache; return the exit code and log."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    previous_level = root.level
    root.setLevel(logging.INFO)
    previous_cache = os.environ.get("MOME_REC_CACHE")
    previous_cwd = os.getcwd()
    os.environ["MOME_REC_CACHE"] = str(cache_dir)
    os.chdir(REPO)
    try:
        code = main(args)
    finally:
        os.chdir(previous_cwd)
        root.removeHandler(handler)
        root.setLevel(previous_level)
        if previous_cache is None:
            os.environ.pop("MOME_REC_CACHE", None)
        else:
            os.environ["MOME_REC_CACHE"] = previous_cache
    return Result(code, buffer.getvalue())


def read_metrics(out_dir: Path) -> dict:
    return json.loads((out_dir / "metrics.json").read_text())


def error_lines(result: Result) -> List[str]:
    """The ERROR log lines of a finished command."""
    return [line for line in result.stderr.splitlines() if " ERROR " in line]
