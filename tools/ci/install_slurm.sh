#!/bin/bash
# Install Debian's Slurm and MUNGE for tests/test_slurm.py: best effort, quiet, idempotent.
# `make test` runs it before pytest. Nothing to do when slurmctld is already installed; where it
# cannot install (no apt-get, not root and no passwordless sudo, no network) it says why and
# exits 0, and tests/test_slurm.py skips its cluster tests with the reason. The test runs two
# nodes on this machine as two slurmd of Debian's build (which has multiple-slurmd support).
set -u
export PATH=$PATH:/usr/sbin:/sbin

if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    exit 0
fi
skip() {
    echo "install_slurm.sh: $* - the Slurm tests will be skipped"
    exit 0
}
command -v apt-get >/dev/null || skip "no apt-get (install slurmctld, slurmd and munge by hand)"
if [[ $(id -u) == 0 ]]; then
    sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    skip "not root and no passwordless sudo"
fi
log=$(mktemp)
packages=(slurmctld slurmd slurm-client munge)
echo "install_slurm.sh: installing ${packages[*]} (log: $log)"
install() {
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${packages[@]}" >>"$log" 2>&1
}
if ! install; then
    "${sudo[@]}" apt-get update -qq >>"$log" 2>&1 || true
    install || skip "apt-get install failed (see $log)"
fi
rm -f "$log"
