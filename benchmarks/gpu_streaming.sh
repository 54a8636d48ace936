#!/usr/bin/env bash
# The StreamingLLM GPU study in two jobs of under 10 minutes each (run from the checkout on the GPU host after
# the .gpu loads; results land in $OUT, then are copied to benchmarks/results/ by hand):
#   bash benchmarks/gpu_streaming.sh A   # decode latency/memory to 1M tokens (8B-shaped), synthetic tasks next to
#                                        # kvpress's StreamingLLM presses (the perplexity sweep: benchmarks/streaming_ppl.py)
#   bash benchmarks/gpu_streaming.sh B   # token-by-token perplexity: kvpress DecodingPress(StreamingLLM) vs SinkWindow
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
out=${OUT:-/tmp/pressroom-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "${1:-A}" in
A)
  python3 benchmarks/sink_window_decode.py --output "$out/sink_window_decode.json"
  python3 -m pressroom.evaluation.cli run --press sink_window:n_sink=4 streaming_llm key_rerotation_streaming_llm \
    --ratio 0.25 0.5 0.75 --data-dir 4096 --n-samples 5 --output-dir /tmp/streaming-tasks
  cp /tmp/streaming-tasks/comparison.csv "$out/streaming_tasks.csv"
  cp /tmp/streaming-tasks/scores.png "$out/streaming_tasks.png"
  ;;
B)
  n=${TOKENS:-8192}
  python3 -m pressroom.evaluation.cli ppl --press "decoding_streaming_llm:target_size=1024,compression_interval=1" \
    --split all --max-tokens "$n" --mode streaming --output "$out/ppl_kvpress_decoding_streaming_llm.json"
  python3 -m pressroom.evaluation.cli ppl --press "sink_window:n_sink=4,window=1020" \
    --split all --max-tokens "$n" --mode streaming --output "$out/ppl_sink_window_token_by_token.json"
  ;;
*) echo "usage: $0 A|B" >&2; exit 2 ;;
esac
