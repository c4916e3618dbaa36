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
# Any 25.xx or later tag works (Python 3.12); this image was not built in CI (no registry access).
ARG PYTORCH_TAG=25.04
FROM nvcr.io/nvidia/pytorch:${PYTORCH_TAG}-py3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONUNBUFFERED=1
WORKDIR /workspace/bam-megatron

# Dependencies first, in a layer that survives code changes: setup.py's pins except what the
# image provides (torch, numpy, and everything its pip constraints file pins).
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
