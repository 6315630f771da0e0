#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one command: the CUDA tests (bf16 with the CLIP and SigLIP
# losses, the feature cache, inductor, gradient caching), then the GPU benchmark (ViT-B/16 +
# BERT-base, bf16: LiT cached, LiT, full). Run it in the repository root of a GPU machine whose
# Python already has torch with CUDA:
#
#   bash scripts/gpu_check.sh            # figures in output/gpu_check/, or in $OUT when it is set
#
# On a machine without package access, put the wheels it lacks (for example transformers 5.23)
# in .whl/ first; they are installed to /tmp/site and put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-output/gpu_check}"
mkdir -p "$out"
python="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$out/gpu.txt"

status=0
"$python" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_benchmarks_perf.py \
    2>&1 | tee "$out/tests.log" || status=1
"$python" -m benchmarks.bench_train --parts gpu "$@" >"$out/bench_gpu.json" 2>"$out/bench_gpu.log" || status=1
cat "$out/bench_gpu.json"
exit $status
