#!/usr/bin/env bash
# The offline demo, from a fresh machine: set up .venv, generate the demo data and tiny towers,
# then train with train_args/demo.json (LiT, then the image tower unlocks on a recall plateau).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ ! -f demo_workdir/test.csv ]; then
    .venv/bin/python scripts/make_demo_data.py --output demo_workdir
fi
exec .venv/bin/python train_clip.py --train_args_file train_args/demo.json
