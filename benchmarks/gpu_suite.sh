#!/usr/bin/env bash
# The measurements behind README "Performance", within 9 minutes on one GPU, in priority
# order; each step has its own time limit (`timeout` sends SIGTERM, then SIGKILL 10 s
# later; bench_e2e.py ends its training processes on either), so a slow step does not
# cost the ones after it.  Every number stays under $OUT (one .txt and one .json per step).
#
#   OUT=out/gpu DATA=/path/to/imagenet-samples bash benchmarks/gpu_suite.sh
#   MODE=cpu-dry OUT=/tmp/dry bash benchmarks/gpu_suite.sh     # the same steps, tiny, on the CPU
#   EXTRA=1 ...                                                 # then the longer compile/data steps
#
# Before it, on the same machine (about 30 s): the CUDA-only tests of the captured step and
# the GPU data path, which the suite's numbers depend on:
#   python -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py tests/test_gpudata.py -k 'cuda or graph'
# DATA must be inside the checkout on a lent device machine (../shared beside it does not
# travel): copy the samples to data/imagenet-samples (ignored by git) and carry that path.
#
# Order: the step per B (issue 12), the GPU data path's two halves next to that step
# (issue 13), then end to end with --data_pipeline gpu reading an image store.
set -u
OUT=${OUT:-out/gpu_suite}
DATA=${DATA:-../shared/data/imagenet-samples}
MODE=${MODE:-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# A TERM or Ctrl-C to this script ends the running step too: `timeout` runs its command in a
# process group of its own (out of reach of the terminal's Ctrl-C) and passes a TERM it gets on
# to that group, so the script waits for it in the background, where a trap can run.
CHILD=
stop_suite() {
    trap - TERM INT
    if [ -n "$CHILD" ]; then kill -TERM "$CHILD" 2>/dev/null; wait "$CHILD" 2>/dev/null; fi
    echo "suite stopped by a signal after $SECONDS s"
    exit 143
}
trap stop_suite TERM INT

step() {  # step NAME LIMIT_S ARGS...: one benchmark, its output kept in $OUT/NAME.txt
    local name=$1 limit=$2 rc
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout -k 10 "$limit" python "$@" > "$OUT/$name.txt" 2>&1 &
    CHILD=$!
    wait "$CHILD"
    rc=$?
    CHILD=
    echo "rc=$rc after $((SECONDS - t0)) s"
    grep -v -E '^(W|I)[0-9]{4} ' "$OUT/$name.txt" | grep -v -E '^(Epoch|Test)' | tail -n 22
}

if [ "$MODE" = cpu-dry ]; then
    # Tiny models and steps on the CPU: checks that every step runs and reports, not speed.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    R50=(--model resnet18 --curriculum etpp --base_input_size 64 --batch_size 8 --device cpu --bench_steps 2
         --bench_warmup 1 --threads 1)
    DEIT=(--model deit_tiny_patch16_224 --curriculum etpp --base_input_size 64 --batch_size 8 --device cpu
          --bench_steps 2 --bench_warmup 1 --threads 1)
    E2E=(--data_set SYNTH --synth_classes 2 --synth_per_class 32 --synth_image_size 72 --model resnet18
         --curriculum etpp --base_input_size 64 --epochs 2 --baseline_epochs 3 --baseline_run_epochs 2
         --batch_size 8 --device cpu --num_workers 1 --pin_mem false --print_freq 2 --run_timeout 200)
    DATA_GPU=(--device cpu --device_batch 16 --device_batches 1 --base_input_size 64)
    MAE=(--model mae_vit_tiny_patch16 --base_input_size 64 --batch_size 8 --device cpu --bench_steps 2
         --bench_warmup 1 --threads 1)
    LIMIT_STEP=120
    LIMIT_DATA=120
    LIMIT_E2E=240
else
    python -c 'import torch, timm, torchvision, PIL; print("torch", torch.__version__, "timm", timm.__version__,
      "torchvision", torchvision.__version__, "PIL", PIL.__version__, torch.cuda.get_device_name())'
    R50=(--model resnet50 --curriculum etpp --batch_size 256 --data_pipeline fast --device cuda --amp true
         --channels_last true --cudnn_benchmark true --bench_steps 15 --bench_warmup 5)
    DEIT=(--model deit_small_patch16_224 --curriculum etpp --batch_size 256 --data_pipeline fast --device cuda
          --amp_dtype bfloat16 --bench_steps 15 --bench_warmup 5)
    # etpp at E=6 against a 9-epoch baseline (3 run, the rest extrapolated), ResNet-50, AMP,
    # on 25 links to each sample image (5000 files) with an image store, the GPU data path,
    # the host's CPUs as loader workers
    E2E=(--data_set image_folder --data_path "$OUT/e2e_folder" --eval_data_path "$OUT/e2e_folder" --model resnet50
         --curriculum etpp --epochs 6 --baseline_epochs 9 --baseline_run_epochs 3 --batch_size 256 --use_amp true
         --channels_last true --data_pipeline gpu --image_store "$OUT/e2e_store" --num_workers "$(nproc)"
         --device cuda --print_freq 5 --run_timeout 100)
    DATA_GPU=(--device cuda --device_batch 256 --device_batches 3)
    # MAE ViT-B, HOG target (the paper's ET++ MAE row), 256 x 4 per GPU at 224 (4096 on 4 GPUs),
    # the micro-batch grown at low B as --stage_batch auto does
    MAE=(--model mae_vit_base_patch16 --target hog --batch_size 256 --update_freq 4 --stage_batch auto --device cuda
         --bench_steps 6 --bench_warmup 2)
    LIMIT_STEP=70
    LIMIT_DATA=60
    LIMIT_E2E=200
fi

# 1-4: the step per B, this project eager and captured, with the plain reference (eager and
# one CUDA graph) in the same run
step r50_eager "$LIMIT_STEP" benchmarks/bench_step.py "${R50[@]}" --json "$OUT/r50_eager.json"
step r50_graph "$LIMIT_STEP" benchmarks/bench_step.py "${R50[@]}" --cuda_graph true --reference false \
    --json "$OUT/r50_graph.json"
step deit_eager "$LIMIT_STEP" benchmarks/bench_step.py "${DEIT[@]}" --json "$OUT/deit_eager.json"
step deit_graph "$LIMIT_STEP" benchmarks/bench_step.py "${DEIT[@]}" --cuda_graph true --reference false \
    --json "$OUT/deit_graph.json"

# 4b: the MAE pre-training step per B of its ET++ plan (issue 19), beside the supervised ones
step mae_step "$LIMIT_STEP" benchmarks/bench_step.py --task mae "${MAE[@]}" --json "$OUT/mae_step.json"

# 5: --data_pipeline gpu: the worker half per CPU-second next to the fast path's (both reading
# an image store), the device half per batch at each B with the GPU memory it adds, as a share
# of the ResNet-50 step measured in step 1 (its images/s scaled to the same batch)
STEP_JSON=()
[ -f "$OUT/r50_eager.json" ] && STEP_JSON=(--step_json "$OUT/r50_eager.json")
step data_gpu "$LIMIT_DATA" benchmarks/bench_data.py --data_path "$DATA" --model resnet50 --curriculum etpp \
    --pipelines fast-store,gpu-store --rounds 1 "${DATA_GPU[@]}" ${STEP_JSON[@]+"${STEP_JSON[@]}"} \
    --json "$OUT/data_gpu.json"

# 6: end to end, steady state per stage, switch costs, projection of the full run
e2e_data() {  # 25 links to each sample image (5000 files) and their image store
    local rep=$OUT/e2e_folder f c r
    rm -rf "$rep" "$OUT/e2e_store"
    for f in "$DATA"/*/*; do
        c=$(basename "$(dirname "$f")")
        mkdir -p "$rep/$c"
        for r in $(seq 1 25); do ln -s "$(realpath "$f")" "$rep/$c/r${r}_$(basename "$f")"; done
    done
    # bounded too (not one of the step limits: 5000 small files on the host's cores take seconds)
    timeout -k 5 45 python scripts/build_image_store.py --data_path "$rep" --out "$OUT/e2e_store" \
        --workers "$(nproc)" | tail -n 1
}
[ "$MODE" != cpu-dry ] && e2e_data
step e2e_r50 "$LIMIT_E2E" benchmarks/bench_e2e.py "${E2E[@]}" --json "$OUT/e2e_r50.json" --keep "$OUT/e2e_runs"
echo "suite done after $SECONDS s"

if [ "${EXTRA:-0}" = 1 ] && [ "$MODE" != cpu-dry ]; then
    # beyond the 9 minutes: where torch.compile's time goes (compile seconds and frames per B)
    TORCH_LOGS=recompiles step r50_compile 240 benchmarks/bench_step.py "${R50[@]}" --compile true --bench_warmup 2 \
        --reference false --json "$OUT/r50_compile.json"
    step data_r50 150 benchmarks/bench_data.py --data_path "$DATA" --model resnet50 --curriculum etpp --rounds 2 \
        --json "$OUT/data_r50.json"
    # the same end-to-end comparison with the CPU fast path reading the store
    FAST=("${E2E[@]}")
    for i in "${!FAST[@]}"; do [ "${FAST[$i]}" = gpu ] && FAST[$i]=fast; done
    step e2e_r50_fast 200 benchmarks/bench_e2e.py "${FAST[@]}" --json "$OUT/e2e_r50_fast.json"
    echo "extra steps done after $SECONDS s"
fi
