#!/usr/bin/env bash
# The GPU checks in one short run (about 6 minutes on one H100/H200): the `gpu` tests, encoder throughput
# (ViT-S/B/L: bare forward, transform, end to end from zarr, waiting share, utilisation), and every registered
# foundation encoder at full size in bf16. Results go to $OUT (or ./gpu_check) as text and JSON lines.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check}"
mkdir -p "$out"
PY="${PY:-.venv/bin/python}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
"$PY" -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name())" >> "$out/gpu.txt" 2>&1
timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider > "$out/pytest_gpu.txt" 2>&1
timeout 300 "$PY" benchmarks/throughput.py --devices cuda --parts vit > "$out/throughput_cuda.jsonl" 2> "$out/throughput_cuda.txt"
timeout 240 "$PY" benchmarks/encoders.py --device cuda --n 256 > "$out/encoders_cuda.jsonl" 2> "$out/encoders_cuda.txt"
tail -n 3 "$out"/*.txt
