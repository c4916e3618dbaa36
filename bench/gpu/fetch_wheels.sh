#!/usr/bin/env bash
# Download the wheels of bench/gpu/wheels.txt for the lent GPU machine (Python 3.12, manylinux
# x86_64) into .whl/ (ignored by git; the device call carries it: docs/benchmarks.md, "GPU run").
# Run it here, where pip reaches a package index; the GPU machine reaches none.
#
#     bash bench/gpu/fetch_wheels.sh [DEST]    # default DEST: .whl
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=${1:-.whl}
python=${PYTHON:-python3}
mkdir -p "$dest"
mapfile -t pins < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' bench/gpu/wheels.txt | grep -v '^$')
# The platform flags of the lent machine (Python 3.12, manylinux x86_64; manylinux_2_24 added: megatron-core's wheel is tagged
# manylinux_2_24 / _2_28); --no-deps: each needed package is named in wheels.txt itself.
"$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$dest" "${pins[@]}"
for wheel in "$dest"/*.whl; do
    # what each wheel needs, for checking against the machine's package list (docs/benchmarks.md) (extras left out)
    echo "$(basename "$wheel"): $(unzip -p "$wheel" '*.dist-info/METADATA' | grep '^Requires-Dist' \
        | grep -v 'extra ==' | sed 's/^Requires-Dist: //' | paste -sd ';' -)"
done
du -sh "$dest"
