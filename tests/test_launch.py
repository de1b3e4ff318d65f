"""The TorchX components: the AppDefs they build, and a real two-process run with local_cwd."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torchx import specs
from torchx.specs.file_linter import validate

from test_export import TINY_MOME

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = REPO / "launch" / "components.py"


def load_components():
    spec = importlib.util.spec_from_file_location("mome_rec_launch_components", COMPONENTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["train", "score", "plan"])
def test_component_passes_torchx_linter(name):
    assert validate(str(COMPONENTS), name) == []


def test_local_train_uses_this_interpreter():
    components = load_components()
    app = components.train("--config", "configs/synthetic.yaml", j="1x2")
    role = app.roles[0]
    assert role.entrypoint == "bash"
    assert role.image == os.getcwd()
    command = role.args[1]
    assert command.startswith(f"{sys.executable} -m torch.distributed.run ")
    assert "--nnodes 1 --nproc_per_node 2" in command
    assert "--rdzv_endpoint localhost:0" in command
    assert command.endswith("-m mome_rec train --config configs/synthetic.yaml")
    assert role.num_replicas == 1


def test_image_train_uses_torchrun_on_many_nodes():
    components = load_components()
    app = components.train(
        "--config", "configs/aliexpress_nl.yaml", image="registry.example.com/mome-rec:0.1.0", j="2x8",
        gpu=8, cpu=64, memMB=480000, max_retries=3, env={"NCCL_DEBUG": "WARN"}, rdzv_port=29400,
    )
    role = app.roles[0]
    # What a scheduler runs once torchx has filled in its macros.
    values = specs.macros.Values(img_root="", app_id="job-1", replica_id="0", rank0_env="TORCHX_RANK0_HOST")
    command = values.apply(role).args[1]
    assert command.startswith("torchrun ")
    assert "--nnodes 2 --nproc_per_node 8" in command
    # Rank 0's host comes from the scheduler at run time, so bash must expand the variable.
    assert "--rdzv_endpoint ${TORCHX_RANK0_HOST:=localhost}:29400 --rdzv_id 'job-1' " in command
    assert (role.num_replicas, role.min_replicas, role.max_retries) == (2, 2, 3)
    assert (role.resource.gpu, role.resource.cpu, role.resource.memMB) == (8, 64, 480000)
    assert role.env["NCCL_DEBUG"] == "WARN"
    assert role.port_map == {"c10d": 29400}


def test_elastic_score_and_single_process_plan():
    components = load_components()
    score = components.score("--model", "model.mome", image="mome-rec:0.1.0", j="1:4x2").roles[0]
    assert (score.min_replicas, score.num_replicas) == (1, 4)
    assert "--nnodes 1:4 --nproc_per_node 2" in score.args[1]
    assert score.max_retries == 2
    plan = components.plan("--config", "configs/synthetic.yaml").roles[0]
    assert "--nnodes 1 --nproc_per_node 1" in plan.args[1]
    assert plan.args[1].endswith("-m mome_rec plan --config configs/synthetic.yaml")


def test_arguments_with_spaces_are_quoted():
    components = load_components()
    command = components.train("--out", "runs/my run", "model.hidden_dims=[16, 8]").roles[0].args[1]
    assert command.endswith("train --out 'runs/my run' 'model.hidden_dims=[16, 8]'")


def torchx_executable() -> str:
    beside = Path(sys.executable).parent / "torchx"
    if beside.is_file():
        return str(beside)
    found = shutil.which("torchx")
    if found is None:
        pytest.skip("the torchx command-line tool is not installed")
    return found


def test_torchx_local_cwd_trains_on_two_ranks(tmp_path):
    torchx = torchx_executable()
    out = tmp_path / "run"
    job_env = f"MOME_REC_CACHE={tmp_path / 'cache'},GLOO_SOCKET_IFNAME=lo"
    command = [
        torchx, "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}",
        "launch/components.py:train", "-j", "1x2", "--local_addr", "127.0.0.1", "--env", job_env,
        "--", "--config", "configs/synthetic.yaml", "--out", str(out), *TINY_MOME,
    ]
    # No virtual environment on PATH: the launcher must not need one.
    env = {"HOME": os.environ.get("HOME", str(tmp_path)), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert "rank 1 of 2" in result.stdout + result.stderr
