"""TorchX components that launch ``mome-rec train``, ``score`` and ``plan`` on any TorchX scheduler.

Each component returns an AppDef with one role of ``NNODES`` replicas, each
running ``torch.distributed.run`` with ``NPROCS`` workers, as torchx's
``dist.ddp`` does: ``-j NNODESxNPROCS`` (or ``MIN:MAXxNPROCS`` for elastic
jobs), ``--image``, resources by ``-h NAMED_RESOURCE`` or ``--cpu/--gpu/--memMB``,
``--env``, ``--max_retries`` and ``--mounts``. Arguments after ``--`` go to the
``mome-rec`` sub-command.

Examples::

    # two CPU processes on this machine, from this checkout
    torchx run -s local_cwd launch/components.py:train -j 1x2 -- --config configs/synthetic.yaml --out runs/ddp

    # two nodes of 8 GPUs on Kubernetes (Volcano queue), from the image built with the Dockerfile
    torchx run -s kubernetes -cfg queue=default launch/components.py:train \\
        --image registry.example.com/mome-rec:0.1.0 -j 2x8 --gpu 8 --cpu 64 --memMB 480000 \\
        -- --config configs/aliexpress_nl.yaml --out /mnt/runs/nl

    # batch scoring, 4 ranks on one node; reruns skip finished parts
    torchx run -s local_cwd launch/components.py:score -j 1x4 -- --model model.mome --input data/ --out scores/

torchx reads this file with ``exec``, not as a module, so it imports only the
standard library and torchx.
"""

import os
import shlex
import sys
from typing import Dict, List, Optional, Tuple

import torchx.specs as specs
from torchx.components.dist import parse_nnodes


def train(
    *script_args: str,
    image: Optional[str] = None,
    j: str = "1x2",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    rdzv_backend: str = "c10d",
    local_addr: Optional[str] = None,
    mounts: Optional[List[str]] = None,
    name: str = "mome-rec-train",
) -> specs.AppDef:
    """Train a config on NNODES x NPROCS ranks (DistributedModelParallel over all of them).

    Args:
        script_args: arguments of ``mome-rec train``, e.g. ``--config configs/synthetic.yaml --out runs/x``
        image: container image with mome_rec installed; unset (or a local folder) runs from this checkout
        j: [{min_nnodes}:]{nnodes}x{nproc_per_node}; on GPU hosts nproc_per_node is at most the GPUs per host
        h: a registered named resource; takes precedence over cpu, gpu and memMB
        cpu: CPUs per replica (node)
        gpu: GPUs per replica (node)
        memMB: memory per replica in MB
        env: environment variables of the job, e.g. MOME_REC_CACHE=/mnt/cache,NCCL_DEBUG=WARN
        max_retries: times the scheduler restarts the whole job after a failure
        rdzv_port: port on rank 0's host for the c10d rendezvous store (multi-node jobs only)
        rdzv_backend: torch.distributed.run rendezvous backend (multi-node jobs only)
        local_addr: address this node's workers use for the rendezvous and the process group, e.g. 127.0.0.1
        mounts: mounts for container schedulers, e.g. type=bind,src=/data,dst=/data
        name: job name
    """
    return _mome_rec_app(
        "train", script_args, image=image, j=j, h=h, cpu=cpu, gpu=gpu, memMB=memMB, env=env,
        max_retries=max_retries, rdzv_port=rdzv_port, rdzv_backend=rdzv_backend, local_addr=local_addr,
        mounts=mounts, name=name,
    )


def score(
    *script_args: str,
    image: Optional[str] = None,
    j: str = "1x2",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 2,
    rdzv_port: int = 29500,
    rdzv_backend: str = "c10d",
    local_addr: Optional[str] = None,
    mounts: Optional[List[str]] = None,
    name: str = "mome-rec-score",
) -> specs.AppDef:
    """Score files with an exported model; rank r of N takes every N-th part, so a retry resumes.

    Args:
        script_args: arguments of ``mome-rec score``, e.g. ``--model model.mome --input data/ --out scores/``
        image: container image with mome_rec installed; unset (or a local folder) runs from this checkout
        j: [{min_nnodes}:]{nnodes}x{nproc_per_node}; the world size is nnodes * nproc_per_node
        h: a registered named resource; takes precedence over cpu, gpu and memMB
        cpu: CPUs per replica (node)
        gpu: GPUs per replica (node); scoring runs on the CPU
        memMB: memory per replica in MB
        env: environment variables of the job
        max_retries: times the scheduler restarts the job; finished parts are skipped on a restart
        rdzv_port: port on rank 0's host for the c10d rendezvous store (multi-node jobs only)
        rdzv_backend: torch.distributed.run rendezvous backend (multi-node jobs only)
        local_addr: address this node's workers use for the rendezvous, e.g. 127.0.0.1
        mounts: mounts for container schedulers, e.g. type=bind,src=/data,dst=/data
        name: job name
    """
    return _mome_rec_app(
        "score", script_args, image=image, j=j, h=h, cpu=cpu, gpu=gpu, memMB=memMB, env=env,
        max_retries=max_retries, rdzv_port=rdzv_port, rdzv_backend=rdzv_backend, local_addr=local_addr,
        mounts=mounts, name=name,
    )


def plan(
    *script_args: str,
    image: Optional[str] = None,
    j: str = "1x1",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    rdzv_backend: str = "c10d",
    local_addr: Optional[str] = None,
    mounts: Optional[List[str]] = None,
    name: str = "mome-rec-plan",
) -> specs.AppDef:
    """Plan the embedding tables' sharding offline with ``mome-rec plan``, by default in one process.

    Args:
        script_args: arguments of ``mome-rec plan``
        image: container image with mome_rec installed; unset (or a local folder) runs from this checkout
        j: [{min_nnodes}:]{nnodes}x{nproc_per_node}
        h: a registered named resource; takes precedence over cpu, gpu and memMB
        cpu: CPUs per replica (node)
        gpu: GPUs per replica (node)
        memMB: memory per replica in MB
        env: environment variables of the job
        max_retries: times the scheduler restarts the job after a failure
        rdzv_port: port on rank 0's host for the c10d rendezvous store (multi-node jobs only)
        rdzv_backend: torch.distributed.run rendezvous backend (multi-node jobs only)
        local_addr: address this node's workers use for the rendezvous, e.g. 127.0.0.1
        mounts: mounts for container schedulers, e.g. type=bind,src=/data,dst=/data
        name: job name
    """
    return _mome_rec_app(
        "plan", script_args, image=image, j=j, h=h, cpu=cpu, gpu=gpu, memMB=memMB, env=env,
        max_retries=max_retries, rdzv_port=rdzv_port, rdzv_backend=rdzv_backend, local_addr=local_addr,
        mounts=mounts, name=name,
    )


def launcher_command(image: Optional[str]) -> List[str]:
    """Return the command that starts ``torch.distributed.run`` for a job from ``image``.

    torchx's ``dist.ddp`` calls ``torchrun`` by name, so a job started with
    ``.venv/bin/torchx`` from a shell without the virtual environment on PATH
    fails with "torchrun: command not found". A job that runs from a local
    folder (no image, or an existing directory, as with the ``local_cwd``,
    ``local_dir`` and ``slurm`` schedulers) therefore uses the interpreter that
    runs torchx, ``sys.executable -m torch.distributed.run``: the same
    environment, whatever PATH holds. A container image has its own Python, so
    there ``torchrun`` comes from the image's PATH (the Dockerfile puts its
    virtual environment first on PATH).
    """
    if image is None or os.path.isdir(image):
        return [sys.executable, "-m", "torch.distributed.run"]
    return ["torchrun"]


class _Unquoted(str):
    """A shell word left unquoted, so that bash expands the variable in it on the node."""


def _mome_rec_app(
    command: str,
    script_args: Tuple[str, ...],
    *,
    image: Optional[str],
    j: str,
    h: Optional[str],
    cpu: int,
    gpu: int,
    memMB: int,
    env: Optional[Dict[str, str]],
    max_retries: int,
    rdzv_port: int,
    rdzv_backend: str,
    local_addr: Optional[str],
    mounts: Optional[List[str]],
    name: str,
) -> specs.AppDef:
    """Build the AppDef that runs ``python -m mome_rec COMMAND SCRIPT_ARGS`` under torch.distributed.run."""
    min_nnodes, max_nnodes, nproc_per_node, nnodes = parse_nnodes(j)
    if max_nnodes == 1:
        # One node: one agent starts every worker, so a free port chosen by the agent is enough.
        endpoint = "localhost:0"
    else:
        # Schedulers put rank 0's host in this variable; "$$" escapes torchx's own macro substitution.
        endpoint = _Unquoted(f"$${{{specs.macros.rank0_env}:=localhost}}:{rdzv_port}")

    job_env = dict(env or {})
    job_env.setdefault("LOGLEVEL", os.environ.get("LOGLEVEL", "WARNING"))
    launch = launcher_command(image) + [
        "--rdzv_backend", rdzv_backend,
        "--rdzv_endpoint", endpoint,
        "--rdzv_id", specs.macros.app_id,
        "--nnodes", nnodes,
        "--nproc_per_node", str(nproc_per_node),
        "--tee", "3",
    ]
    if local_addr:
        launch += ["--local_addr", local_addr]
    launch += ["-m", "mome_rec", command, *script_args]
    shell = " ".join(word if isinstance(word, _Unquoted) else shlex.quote(word) for word in launch)

    return specs.AppDef(
        name=name,
        roles=[
            specs.Role(
                name=command,
                image=image if image is not None else os.getcwd(),
                entrypoint="bash",
                args=["-c", shell],
                num_replicas=int(max_nnodes),
                min_replicas=int(min_nnodes),
                resource=specs.resource(cpu=cpu, gpu=gpu, memMB=memMB, h=h),
                env=job_env,
                port_map={"c10d": rdzv_port},
                max_retries=max_retries,
                mounts=specs.parse_mounts(mounts) if mounts else [],
            )
        ],
    )
