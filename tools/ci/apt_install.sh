#!/bin/bash
# apt_install.sh WHO PACKAGE...: install Debian packages for a test, best effort and quiet.
# Where it cannot (no apt-get, not root and no passwordless sudo, no network) it says why and
# exits 0: WHO (e.g. "the Docker test") is then skipped by its test with the reason.
set -u
who=$1
shift
packages=("$@")
skip() {
    echo "$(basename "$0"): $* - $who will be skipped"
    exit 0
}
command -v apt-get >/dev/null || skip "no apt-get (install ${packages[*]} by hand)"
if [[ $(id -u) == 0 ]]; then
    sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    skip "not root and no passwordless sudo"
fi
log=$(mktemp)
echo "$(basename "$0"): installing ${packages[*]} for $who (log: $log)"
install() {
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${packages[@]}" >>"$log" 2>&1
}
if ! install; then
    "${sudo[@]}" apt-get update -qq >>"$log" 2>&1 || true
    install || skip "apt-get install failed (see $log)"
fi
rm -f "$log"
