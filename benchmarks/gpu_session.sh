#!/usr/bin/env bash
# The GPU session of issue 12, as ONE prepared command for the device machine (it has
# torch but not optree nor the peers: run benchmarks/gpu_wheels.sh here first, and
# carry .whl).  Logs go to $OUT (they come back); the whole run aims at under 9 min.
#
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# Steps: install the wheels into /tmp/site (torch-secorder 0.0.1 apart, as
# setup_peers.sh does), our package from src/; the CUDA tests; the memory check on a
# 16 GiB cap; the benchmark table (ms per probe against the peers, the exact diagonal
# against BackPACK, TF32's accuracy).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site $(ls .whl/*.whl | grep -v torch_secorder-0.0.1) || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target benchmarks/.peer_site/secorder001 .whl/torch_secorder-0.0.1-*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch, torch_secorder; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' | tee -a "$OUT/gpu.txt"
python3 benchmarks/_peers.py --check 2>&1 | tail -5 | tee -a "$OUT/gpu.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" -k "cuda or gpu or device" \
    tests/test_inputs_batch.py tests/test_chunk_policy.py tests/test_memory_reader.py \
    2>&1 | tail -5 | tee "$OUT/tests.txt"
timeout 150 python3 benchmarks/gpu_memory_check.py --cap-gib 16 2>&1 | tee "$OUT/memory.txt"
timeout 300 python3 benchmarks/bench_gpu.py --device cuda 2>&1 | tee "$OUT/bench_gpu.txt"
