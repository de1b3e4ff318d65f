# GPU image of mome_rec: CUDA runtime, Python 3.11, the CUDA builds of torch and
# fbgemm-gpu, torchrec, torchx and mome_rec; the entry point is `mome-rec`.
#
#   docker build -t mome-rec:0.1.0 .
#   docker run --gpus all mome-rec:0.1.0 train --config configs/synthetic.yaml --out /runs/synthetic
#
# The versions below must match setup.cfg (torch, torchx, fbgemm-gpu-cpu in the
# cpu extra) and the README's torchrec install line; tests/test_dockerfile.py
# checks that they do. NOTE: the image has not been built on the project's
# machines, which run no container engine.

# The CUDA version of the base image and of the wheels (CUDA_WHEELS) go together.
# FBGEMM's release table lists CUDA 12.6, 12.8, 12.9 and 13.0 for its recent
# releases (1.4.0, 1.5.0). NOTE: that the PyTorch index serves cu128 wheels of
# torch 2.13.0 and fbgemm-gpu 1.8.0 was not checked; if it does not, change
# CUDA_IMAGE and CUDA_WHEELS together, e.g. to 13.0 and cu130.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.13.0
ARG FBGEMM_GPU_VERSION=1.8.0
ARG TORCHREC_VERSION=1.8.0
ARG TORCHX_VERSION=0.7.0
ARG CUDA_WHEELS=cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Ubuntu 22.04 ships Python 3.10; the deadsnakes archive provides current 3.11 releases.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gpg-agent software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-venv" \
    && apt-get purge -y software-properties-common gpg-agent \
    && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/*

# A virtual environment first on PATH: `python`, `torchrun` and `mome-rec` resolve
# there, which the TorchX components rely on inside the container.
RUN "python${PYTHON_VERSION}" -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}

# torchrec goes in with --no-deps: its metadata would pull fbgemm-gpu again from
# PyPI; its real requirements come with mome_rec's install_requires below.
RUN pip install --upgrade pip setuptools wheel \
    && pip install --index-url "https://download.pytorch.org/whl/${CUDA_WHEELS}" \
        "torch==${TORCH_VERSION}" "fbgemm-gpu==${FBGEMM_GPU_VERSION}" \
    && pip install --no-deps "torchrec==${TORCHREC_VERSION}"

WORKDIR /opt/mome_rec
COPY pyproject.toml setup.cfg README.md ./
COPY mome_rec ./mome_rec
COPY configs ./configs
COPY launch ./launch
# install_requires pins torch==2.13.0, which the CUDA build (2.13.0+cu128) satisfies,
# so pip keeps it and installs only what is missing.
RUN pip install "torchx==${TORCHX_VERSION}" . \
    && python -c "import torch, fbgemm_gpu, torchrec, torchx, mome_rec"

RUN useradd --create-home --uid 1000 mome \
    && mkdir -p /var/cache/mome_rec \
    && chown mome /var/cache/mome_rec
ENV MOME_REC_CACHE=/var/cache/mome_rec
USER mome

ENTRYPOINT ["mome-rec"]
CMD ["--help"]
