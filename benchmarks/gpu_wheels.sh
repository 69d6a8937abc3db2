#!/usr/bin/env bash
# Download, HERE (a machine with PyPI), the wheels a GPU machine needs for the GPU session:
# optree (our dependency, not in the device image) and the peers of bench_gpu.py,
# all --no-deps, for the device's Python 3.12 on x86-64.  They land in .whl/ (ignored
# by git; about 1 MiB), which the device call carries.
#
#   bash benchmarks/gpu_wheels.sh
#   then, with the device tool: run(command="bash benchmarks/gpu_session.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PY="${PYTHON:-python3}"
optree_version="$("$PY" -c 'import optree; print(optree.__version__)' 2>/dev/null || echo 0.20.0)"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl \
    "optree==${optree_version}" curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 \
    unfoldNd==0.2.3 einconv==0.1.0 linear_operator==0.6.1 hessian-eigenthings==1.0.0a5 \
    torch-secorder==0.0.1
"$PY" -m pip download -q --no-deps -d .whl PyHessian==0.1
ls .whl
