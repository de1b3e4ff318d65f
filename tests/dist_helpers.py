"""Run real multi-process jobs for the distributed tests: torchrun for the CLI, spawn for workers.

Every process group binds 127.0.0.1 on a free port and uses gloo, so the tests
run on any CPU machine. A failed child shows its stderr (torchrun) or its
traceback (spawn) in the assertion message.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]

_DIST_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def child_env(cache_dir: Path) -> Dict[str, str]:
    """Return the environment of a child job: its own data cache, one thread per process, no inherited ranks.

    One thread keeps every run on the same floating-point path whatever the
    machine's core count, so a run repeats itself exactly.
    """
    env = dict(os.environ, MOME_REC_CACHE=str(cache_dir), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for name in _DIST_VARIABLES:
        env.pop(name, None)
    return env


def torchrun_command(nproc: int, args: List[str]) -> List[str]:
    """Return the command that runs ``mome-rec ARGS`` as ``nproc`` local ranks on a free loopback port."""
    from mome_rec.distributed import free_port

    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "mome_rec", *args,
    ]


def run_torchrun(nproc: int, args: List[str], cache_dir: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``mome-rec ARGS`` on ``nproc`` ranks and wait for it."""
    return subprocess.run(
        torchrun_command(nproc, args), cwd=REPO, env=child_env(cache_dir), capture_output=True, text=True, timeout=timeout,
    )


def failure_message(result: subprocess.CompletedProcess) -> str:
    """Return the end of a failed job's stderr for an assertion message."""
    return f"exit status {result.returncode}; stderr tail:\n{result.stderr[-4000:]}"


def kill_after_checkpoint(nproc: int, args: List[str], cache_dir: Path, out_dir: Path, min_global_step: int,
                          log_path: Path, timeout: float = 900) -> dict:
    """Start a job, SIGKILL all its processes once ``checkpoints/latest`` has ``global_step >= min_global_step``.

    Returns that checkpoint's meta.json as read right before the kill. torchrun
    starts each rank in a session of its own, so a signal to torchrun's process
    group misses them: the kill goes to every descendant process by pid, ranks
    first, so that none keeps training and writing into ``out_dir``.
    """
    meta_path = out_dir / "checkpoints" / "latest" / "meta.json"
    started = time.time()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            torchrun_command(nproc, args), cwd=REPO, env=child_env(cache_dir), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            while True:
                meta = _read_json(meta_path)
                if meta is not None and meta["global_step"] >= min_global_step:
                    break
                if process.poll() is not None:
                    raise AssertionError(
                        f"the job ended (status {process.returncode}) before a checkpoint at step {min_global_step}; "
                        f"log tail:\n{log_path.read_text()[-4000:]}"
                    )
                if time.time() - started > timeout:
                    raise AssertionError(f"no checkpoint at step {min_global_step} after {timeout} s")
                time.sleep(0.05)
        finally:
            kill_tree(process.pid)
            process.wait()
    return meta


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants, deepest first, and wait until the descendants are gone."""
    victims = _descendants(pid)
    for victim in reversed(victims):
        _kill(victim)
    _kill(pid)
    deadline = time.time() + 30
    while any(Path(f"/proc/{victim}").exists() and not _is_zombie(victim) for victim in victims):
        if time.time() > deadline:
            raise AssertionError(f"processes {victims} still alive 30 s after SIGKILL")
        time.sleep(0.05)


def _descendants(pid: int) -> List[int]:
    """Return the descendants of ``pid``, parents before children, read from /proc."""
    children: Dict[int, List[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_steps(out_dir: Path) -> List[dict]:
    """Return the records of ``out_dir/steps.jsonl``."""
    return [json.loads(line) for line in (out_dir / "steps.jsonl").read_text().splitlines() if line]


# ---------------------------------------------------------------- spawned workers


def spawn(worker: Callable, world_size: int, *args) -> None:
    """Run ``worker(rank, world_size, port, *args)`` in ``world_size`` fresh processes.

    A worker that raises makes this raise ``ProcessRaisedException`` with the
    worker's traceback in its message.
    """
    from mome_rec.distributed import free_port

    mp.spawn(worker, args=(world_size, free_port(), *args), nprocs=world_size, join=True)


def init_worker(rank: int, world_size: int, port: int) -> None:
    """Join a gloo process group of ``world_size`` processes on 127.0.0.1:``port``."""
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
