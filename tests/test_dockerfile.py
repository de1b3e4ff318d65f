"""The Dockerfile's pinned versions against setup.cfg and the README (no container engine runs here)."""

import configparser
import re
from pathlib import Path
from typing import Dict

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def dockerfile_args() -> Dict[str, str]:
    """Return the ``ARG NAME=DEFAULT`` defaults of the Dockerfile."""
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)\s*$", DOCKERFILE, flags=re.MULTILINE))


def pins(requirements: str) -> Dict[str, str]:
    """Return ``name -> version`` of the ``name==version`` lines of a setup.cfg requirement list."""
    found = {}
    for line in requirements.splitlines():
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)==([^\s;]+)\s*", line)
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    return parser


def test_torch_and_torchx_match_install_requires():
    required = pins(setup_cfg()["options"]["install_requires"])
    args = dockerfile_args()
    assert args["TORCH_VERSION"] == required["torch"]
    assert args["TORCHX_VERSION"] == required["torchx"]


def test_fbgemm_gpu_matches_the_cpu_extra():
    cpu_extra = pins(setup_cfg()["options.extras_require"]["cpu"])
    assert dockerfile_args()["FBGEMM_GPU_VERSION"] == cpu_extra["fbgemm-gpu-cpu"]


def test_torchrec_matches_the_readme_install_lines():
    readme = (REPO / "README.md").read_text()
    versions = set(re.findall(r"--no-deps torchrec==(\S+)", readme))
    assert versions, "README.md: no 'pip install --no-deps torchrec==VERSION' line"
    assert versions == {dockerfile_args()["TORCHREC_VERSION"]}


def test_python_version_fits_python_requires():
    python_requires = setup_cfg()["options"]["python_requires"]
    assert python_requires == ">=3.11,<3.12"
    assert dockerfile_args()["PYTHON_VERSION"] == "3.11"


def test_pinned_args_are_what_pip_installs():
    assert '"torch==${TORCH_VERSION}"' in DOCKERFILE
    assert '"fbgemm-gpu==${FBGEMM_GPU_VERSION}"' in DOCKERFILE
    assert 'pip install --no-deps "torchrec==${TORCHREC_VERSION}"' in DOCKERFILE
    assert '"torchx==${TORCHX_VERSION}"' in DOCKERFILE
    assert "https://download.pytorch.org/whl/${CUDA_WHEELS}" in DOCKERFILE


def test_cuda_runtime_base_and_entry_point():
    args = dockerfile_args()
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", args["CUDA_IMAGE"])
    # The CUDA wheel index matches the base image's CUDA major and minor version: 12.8 -> cu128.
    major, minor = re.match(r"nvidia/cuda:(\d+)\.(\d+)", args["CUDA_IMAGE"]).groups()
    assert args["CUDA_WHEELS"] == f"cu{major}{minor}"
    assert 'ENTRYPOINT ["mome-rec"]' in DOCKERFILE


def test_dockerignore_keeps_local_state_out():
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "runs", "*.egg-info", "**/__pycache__"):
        assert entry in ignored
