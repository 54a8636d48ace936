#!/usr/bin/env bash
# Source on the offline GPU host after the .gpu loads are installed (see ../shared/OFFLINE.md and the README):
# makes `import pressroom.*` work from this checkout without building a wheel (no network there), and exports
# the embedded model's GGUF path. Usage: source benchmarks/gpu_env.sh
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
site=/tmp/pressroom-site/pressroom
mkdir -p "$site"
for d in presses kernels training evaluation; do ln -sfn "$top/$d" "$site/$d"; done
export PYTHONPATH="/tmp/pressroom-site${PYTHONPATH:+:$PYTHONPATH}"
[ -f /root/pressroom-gpu/SmolLM2-135M-Instruct.Q4_1.gguf ] && \
  export PRESSROOM_SMOLLM2_GGUF=/root/pressroom-gpu/SmolLM2-135M-Instruct.Q4_1.gguf
export TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
