#!/bin/bash
# Install Debian's Docker engine and debootstrap for tests/e2e/test_docker.py: best effort, quiet,
# idempotent. `make test` runs it before pytest. Nothing to do when dockerd, docker and
# debootstrap are already installed; where it cannot install, it says why and exits 0, and
# tests/e2e/test_docker.py skips with the reason. The test starts its own dockerd.
set -u
export PATH=$PATH:/usr/sbin:/sbin

if command -v dockerd >/dev/null && command -v docker >/dev/null && command -v debootstrap >/dev/null; then
    exit 0
fi
exec bash "$(dirname "$0")/apt_install.sh" "the Docker test" docker.io debootstrap
