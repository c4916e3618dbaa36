#!/bin/bash
# docker_base.sh: a small local stand-in for NVIDIA's PyTorch image, for building the Dockerfile
# where nvcr.io is out of reach (tests/e2e/test_docker.py; docs/cluster.md). It holds what the
# Dockerfile relies on the base for: `python` and `pip` on PATH (a venv, /opt/venv) and setup.py's
# torch pin, here the CPU build. Debian bookworm (Python 3.11) from Debian's packages with
# debootstrap, then `docker import`. No CUDA, NCCL, Transformer Engine or apex.
#
#   tools/ci/docker_base.sh            # prints the image name: bam-megatron-base:bookworm-torch2.13.0-r1
#   docker build --build-arg BASE_IMAGE=bam-megatron-base:bookworm-torch2.13.0-r1 -t bam-megatron .
#
# Cached in $BAM_DOCKER_CACHE (default ~/.cache/bam-megatron/docker), so that reruns take seconds:
#   wheels-HASH/     the wheelhouse: torch and the Dockerfile's requirements, `pip download`ed with
#                    $PYTHON's pip (this machine's index settings), for the base and for the build
#   IMAGE.tar.gz     the root filesystem, imported again whenever the daemon lacks the image
#   tools/ci/docker_base.sh --wheels   # makes (if needed) and prints the wheelhouse directory only
# A cold run needs root (debootstrap, chroot). DOCKER (default docker) and DOCKER_HOST choose the
# daemon; BAM_DEBIAN_MIRROR the Debian mirror.
set -euo pipefail

RECIPE=r1 # bump when the base's recipe below changes: a new name, a new cached tarball
SUITE=bookworm
MIRROR=${BAM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${BAM_DOCKER_CACHE:-$HOME/.cache/bam-megatron/docker}
PYTHON=${PYTHON:-python3}
DOCKER=${DOCKER:-docker}
BASE_TOOLS=(pip==26.3 setuptools==84.2.1) # the versions the project's venv is tested with
HERE=$(cd "$(dirname "$0")" && pwd)
export PATH=$PATH:/usr/sbin:/sbin

log() { echo "docker_base.sh: $*" >&2; }

mapfile -t torch_pin < <("$PYTHON" "$HERE/image_requirements.py" --base)
mapfile -t image_reqs < <("$PYTHON" "$HERE/image_requirements.py")
image=bam-megatron-base:$SUITE-${torch_pin[0]/==/}-$RECIPE

# The wheelhouse, named by what it holds; downloaded into a temporary directory, then renamed.
wanted=("${torch_pin[@]}" "${BASE_TOOLS[@]}" "${image_reqs[@]}")
wheels=$CACHE/wheels-$(printf '%s\n' "${wanted[@]}" | sha256sum | cut -c1-12)
if [[ ! -d $wheels ]]; then
    mkdir -p "$CACHE"
    log "downloading ${wanted[*]} into $wheels"
    partial=$(mktemp -d "$wheels.partial.XXXXXX")
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
        --dest "$partial" "${wanted[@]}" >&2
    mv -T "$partial" "$wheels"
    for stale in "$CACHE"/wheels-*; do # earlier requirement lists' wheelhouses
        [[ $stale == "$wheels" || $stale == *.partial.* ]] || rm -rf "$stale"
    done
fi
if [[ ${1:-} == --wheels ]]; then
    echo "$wheels"
    exit 0
fi

if "$DOCKER" image inspect "$image" >/dev/null 2>&1; then
    echo "$image"
    exit 0
fi

tarball=$CACHE/$image.tar.gz
tarball=${tarball/:/_}
if [[ ! -f $tarball ]]; then
    [[ $(id -u) == 0 ]] || { log "making the base needs root (debootstrap, chroot)"; exit 1; }
    root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    trap 'rm -rf "$root" "$tarball".partial.*' EXIT
    log "debootstrap $SUITE from $MIRROR into $root (minutes)"
    debootstrap --variant=minbase --include=python3,python3-venv "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 ||
        { tail -20 "$root.log" >&2; log "debootstrap failed (log: $root.log)"; exit 1; }
    rm -f "$root.log"
    cp -r "$wheels" "$root/tmp/wheels"
    # a clean environment: the host's PIP_* settings name paths that do not exist in the chroot
    in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }
    in_root python3 -m venv /opt/venv
    in_root /opt/venv/bin/pip install --quiet --no-cache-dir --disable-pip-version-check --no-index \
        --find-links /tmp/wheels "${BASE_TOOLS[@]}" "${torch_pin[@]}" >&2
    in_root /opt/venv/bin/python -c "import torch; print('docker_base.sh: torch', torch.__version__)" >&2
    # small: no package cache or lists, docs or translations
    rm -rf "$root"/tmp/wheels "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/usr/share/info/*
    partial=$(mktemp "$tarball.partial.XXXXXX")
    tar --numeric-owner -C "$root" -c . | gzip -1 >"$partial"
    mv "$partial" "$tarball"
    rm -rf "$root"
    trap - EXIT
fi
log "importing $tarball as $image"
"$DOCKER" import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["bash"]' \
    "$tarball" "$image" >/dev/null
echo "$image"
