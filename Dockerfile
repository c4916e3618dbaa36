# bam-megatron on NVIDIA's PyTorch image: CUDA, NCCL, cuDNN, Transformer Engine and apex, with
# the image's own torch build kept (setup.py's torch pin is for CPU machines and is not installed).
#
#   docker build -t bam-megatron .
#   docker build --build-arg PYTORCH_TAG=25.04 -t bam-megatron:25.04 .
#   docker run --gpus all --ipc=host --rm -v "$PWD/runs:/workspace/bam-megatron/runs" bam-megatron \
#       torchrun --nproc-per-node 8 pretrain_bam.py --variant bam --preset tiny --mock-data \
#       --vocab-size 512 --seq-length 64 --train-iters 20 --save runs/tiny-bam
#
# On Slurm with pyxis/enroot: docs/cluster.md (BAM_CONTAINER_IMAGE=... sbatch examples/slurm/...).
# Any 25.xx or later tag works (Python 3.12). BASE_IMAGE replaces the whole base: any image with
# `python` and `pip` on PATH and torch installed. tests/e2e/test_docker.py builds this file on a local
# CPU stand-in made by tools/ci/docker_base.sh (Debian, Python 3.11, CPU torch), from a wheelhouse:
#   docker build --network host --build-arg BASE_IMAGE=bam-megatron-base:bookworm-torch2.13.0-r1 \
#       --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=http://127.0.0.1:8000/ -t bam-megatron:cpu .
ARG PYTORCH_TAG=25.04
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:${PYTORCH_TAG}-py3
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONUNBUFFERED=1
WORKDIR /workspace/bam-megatron

# Dependencies first, in a layer that survives code changes: setup.py's pins except what the
# image provides (torch, numpy, and everything its pip constraints file pins). pip reads these
# two from the environment where given (an offline build from a wheelhouse); unset otherwise.
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
COPY setup.py ./
COPY tools/ci/image_requirements.py tools/ci/
RUN python -c "import torch; print(torch.__version__)" > /tmp/torch-version \
    && python tools/ci/image_requirements.py --keep numpy \
        --constraints "${PIP_CONSTRAINT:-/etc/pip/constraint.txt}" > /tmp/requirements.txt \
    && cat /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt

# The project itself, without dependencies; the build fails if the image's torch was replaced.
COPY . .
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e . \
    && python -c "import torch; print(torch.__version__)" | diff - /tmp/torch-version \
    && python -c "import bam_megatron.training.loop" \
    && python pretrain_bam.py --help > /dev/null
