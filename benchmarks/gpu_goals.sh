#!/usr/bin/env bash
# The three speed goals on one GPU, in one run of under 8 minutes (figures go to docs/benchmarks.md),
# after `ituning doctor` (each fast path's first-use check on a tiny model, in doctor.json):
#   beam-5 decoding of 5,000 images          goal >= 1,000 images/s   (compiled static-cache step)
#   one COCO-sized training epoch            goal <= 45 s             (data on the device, compiled step,
#                                                                      micro-batch measured: auto)
#   the feature cache of 123,287 JPEGs       goal <= 45 s             (nvJPEG decoding on the device)
#
#   bash benchmarks/gpu_goals.sh wheels      # here, with the registries: the packages a bare GPU
#                                            # machine lacks, as wheels for Python 3.12 in .whl/
#   bash benchmarks/gpu_goals.sh run OUT     # on the GPU machine: JSON results and logs in OUT
#
# The GPU machine has torch, torchvision, timm, h5py and an older transformers; .whl/ carries the
# rest at this project's versions (constraints.txt). Each benchmark has its own time limit, so one
# that overruns leaves the others' figures; the cheapest runs first.
set -euo pipefail
cd "$(dirname "$0")/.."

wheels() {
  grep -qx /.whl/ .git/info/exclude || echo /.whl/ >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl \
    open_clip_torch==3.3.0 ftfy wcwidth transformers==5.23.0 tokenizers==0.23.3 huggingface_hub==2.4.0 \
    duckdb==1.5.6 orjson httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 click==8.5.1
}

run() {
  local out=${1:?usage: gpu_goals.sh run OUT}
  mkdir -p "$out"
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  fi
  export PYTHONUNBUFFERED=1 PYTHONPATH=.:${PYTHONPATH:-}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv"
  python3 -c "import torch, torchvision, transformers; print(torch.__version__, torchvision.__version__, transformers.__version__)" \
    > "$out/versions.txt"
  timeout 120 python3 -c "import json; from pipeline.doctor import as_dicts, diagnose; \
print(json.dumps(as_dicts(diagnose(device='cuda')), indent=1))" > "$out/doctor.json" 2> "$out/doctor.log" \
    || echo "doctor: exit $?"
  timeout 140 python3 benchmarks/beam_decoding.py --device cuda --images 5000 --batch 500 --bf16 \
    --paths cached,compiled > "$out/beam_decoding.txt" 2> "$out/beam_decoding.log" || echo "beam decoding: exit $?"
  timeout 220 python3 benchmarks/training_epoch.py --device cuda --micro-batch auto --data-on-device auto \
    --compile auto > "$out/training_epoch.json" 2> "$out/training_epoch.log" || echo "training epoch: exit $?"
  timeout 120 python3 benchmarks/feature_cache.py --device cuda --images 123287 --distinct 4000 \
    --image-size 640x480 --textured --batch-size 256 --workers 15 --rounds 1 --only pipeline \
    > "$out/feature_cache.json" 2> "$out/feature_cache.log" || echo "feature cache: exit $?"
  grep -h -A2 '"fast path' "$out/doctor.json" || true
  grep -h "fell back to the plain path" "$out"/*.log || echo "no fast path fell back"
  tail -n 3 "$out"/*.txt "$out"/*.json
}

"${1:?usage: gpu_goals.sh wheels | run OUT}" "${@:2}"
