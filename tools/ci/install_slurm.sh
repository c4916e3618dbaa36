#!/bin/bash
# Install Debian's Slurm and MUNGE for tests/e2e/test_slurm.py: best effort, quiet, idempotent.
# `make test` runs it before pytest. Nothing to do when slurmctld is already installed; where it
# cannot install (no apt-get, not root and no passwordless sudo, no network) it says why and
# exits 0, and tests/e2e/test_slurm.py skips its cluster tests with the reason. The test runs two
# nodes on this machine as two slurmd of Debian's build (which has multiple-slurmd support).
set -u
export PATH=$PATH:/usr/sbin:/sbin

if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    exit 0
fi
exec bash "$(dirname "$0")/apt_install.sh" "the Slurm tests" slurmctld slurmd slurm-client munge
