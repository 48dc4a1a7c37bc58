#!/usr/bin/env bash
# The GPU tests (`pytest -m gpu`) in six shards run side by side on one GPU: most of their
# time is kernel compilation on the CPU, so the whole suite takes ~4.5 minutes instead of ~17.
# Usage: bash tests/gpu_shards.sh [log folder] (default gpu-test-logs); exits non-zero if a shard failed.
set -u
cd "$(dirname "$0")/.."
logs=${1:-gpu-test-logs}
mkdir -p "$logs"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
shard() {  # name, pytest arguments...
  local name=$1
  shift
  python3 -m pytest -m gpu -q -p no:cacheprovider "$@" > "$logs/gpu_tests_$name.txt" 2>&1 &
}
shard matmul_paths tests/test_matmul_4bit.py -k "test_gpu_each_path"
shard matmul_formats tests/test_matmul_4bit.py -k "test_gpu_formats or test_gpu_sweep_m"
shard matmul_rest tests/test_matmul_4bit.py -k "not (test_gpu_each_path or test_gpu_formats or test_gpu_sweep_m)"
shard wgmma tests/test_wgmma_4bit.py
shard tiled_adapter tests/test_tiled_4bit.py tests/torch_adapter
shard rest tests --ignore=tests/test_matmul_4bit.py --ignore=tests/test_wgmma_4bit.py \
  --ignore=tests/test_tiled_4bit.py --ignore=tests/torch_adapter
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
tail -n 1 "$logs"/gpu_tests_*.txt
exit $status
