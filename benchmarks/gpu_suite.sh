#!/usr/bin/env bash
# The GPU measurements behind README "Performance", in priority order (each step has its
# own time limit, so a slow step does not cost the ones after it).  From the repository
# root:  OUT=out/gpu DATA=/path/to/imagenet-samples bash benchmarks/gpu_suite.sh
set -u
OUT=${OUT:-out/gpu_suite}
DATA=${DATA:-../shared/data/imagenet-samples}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

step() {  # step NAME LIMIT_S ARGS...: one benchmark, its output kept in $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" python "$@" > "$OUT/$name.txt" 2>&1
    echo "rc=$? after $((SECONDS - t0)) s"
    grep -v -E '^(W|I)[0-9]{4} ' "$OUT/$name.txt" | tail -n 25
}

python -c 'import torch, timm, torchvision, PIL; print("torch", torch.__version__, "timm", timm.__version__,
  "torchvision", torchvision.__version__, "PIL", PIL.__version__, torch.cuda.get_device_name())'

R50=(--model resnet50 --curriculum etpp --batch_size 512 --data_pipeline fast --device cuda)
DEIT=(--model deit_small_patch16_224 --curriculum etpp --batch_size 256 --update_freq 2 --data_pipeline fast
      --device cuda)
# BUDGET=short: only what README needs, for a short device allowance
if [ "${BUDGET:-full}" = short ]; then
    step r50_amp_cl 90 benchmarks/bench_step.py "${R50[@]}" --amp true --channels_last true --bench_steps 15 \
        --json "$OUT/r50_amp_cl.json"
    step deit_amp 90 benchmarks/bench_step.py "${DEIT[@]}" --bench_steps 15 --json "$OUT/deit_amp.json"
    step data_r50 90 benchmarks/bench_data.py --data_path "$DATA" --model resnet50 --curriculum etpp --rounds 1 \
        --json "$OUT/data_r50.json"
    step r50_amp 60 benchmarks/bench_step.py "${R50[@]}" --amp true --bench_steps 15 --json "$OUT/r50_amp.json"
    TORCH_LOGS=recompiles step r50_compile 200 benchmarks/bench_step.py "${R50[@]}" --amp true --channels_last true \
        --compile true --bench_warmup 2 --bench_steps 15 --json "$OUT/r50_compile.json"
    echo "suite done after $SECONDS s"
    exit 0
fi
step r50_amp_cl 120 benchmarks/bench_step.py "${R50[@]}" --amp true --channels_last true --json "$OUT/r50_amp_cl.json"
step r50_amp 120 benchmarks/bench_step.py "${R50[@]}" --amp true --json "$OUT/r50_amp.json"
step deit_amp 120 benchmarks/bench_step.py "${DEIT[@]}" --json "$OUT/deit_amp.json"
step data_r50 150 benchmarks/bench_data.py --data_path "$DATA" --model resnet50 --curriculum etpp --rounds 2 \
    --json "$OUT/data_r50.json"
TORCH_LOGS=recompiles step r50_compile 240 benchmarks/bench_step.py "${R50[@]}" --amp true --channels_last true \
    --compile true --bench_warmup 2 --json "$OUT/r50_compile.json"
TORCH_LOGS=recompiles step deit_compile 240 benchmarks/bench_step.py "${DEIT[@]}" --compile true --bench_warmup 2 \
    --json "$OUT/deit_compile.json"
step data_deit 150 benchmarks/bench_data.py --data_path "$DATA" --model deit_small_patch16_224 --curriculum etpp \
    --rounds 2 --json "$OUT/data_deit.json"
step r50_amp_cl_bench 120 benchmarks/bench_step.py "${R50[@]}" --amp true --channels_last true \
    --cudnn_benchmark true --json "$OUT/r50_amp_cl_bench.json"
step r50_fp32_cl 120 benchmarks/bench_step.py "${R50[@]}" --amp recipe --channels_last true \
    --json "$OUT/r50_fp32_cl.json"
# End to end (bench_e2e.py): etpp at E=6 against a 9-epoch baseline (3 epochs run, the rest
# extrapolated), ResNet-50 with AMP, on 25 links to each sample image (5000 files),
# the fast path reading an image store, the host's CPUs as loader workers.
e2e_data() {
    local rep=$OUT/e2e_folder f c r
    rm -rf "$rep"
    for f in "$DATA"/*/*; do
        c=$(basename "$(dirname "$f")")
        mkdir -p "$rep/$c"
        for r in $(seq 1 25); do ln -s "$(realpath "$f")" "$rep/$c/r${r}_$(basename "$f")"; done
    done
    python scripts/build_image_store.py --data_path "$rep" --out "$OUT/e2e_store" | tail -n 1
}
E2E=(--data_set image_folder --data_path "$OUT/e2e_folder" --eval_data_path "$OUT/e2e_folder" --model resnet50
     --curriculum etpp --epochs 6 --baseline_epochs 9 --baseline_run_epochs 3 --batch_size 256 --use_amp true
     --channels_last true --data_pipeline fast --image_store "$OUT/e2e_store" --num_workers "$(nproc)"
     --device cuda)
e2e_data
step e2e_r50 480 benchmarks/bench_e2e.py "${E2E[@]}" --json "$OUT/e2e_r50.json"
echo "suite done after $SECONDS s"

# issue 13: GPU data path
# --data_pipeline gpu: the worker half per CPU-second next to the fast path (both reading a
# store built for the run), the device half per batch at each B with the GPU memory it adds
# (bench_data.py), then end to end against the same baseline as e2e_r50 above (the folder of
# links and its store from e2e_data; built here when the steps above did not run).
[ -d "$OUT/e2e_store" ] || e2e_data
# next to the step of r50_amp_cl above (batch 512 there; its images/s scaled to the same batch)
STEP_JSON=()
[ -f "$OUT/r50_amp_cl.json" ] && STEP_JSON=(--step_json "$OUT/r50_amp_cl.json")
step data_gpu 240 benchmarks/bench_data.py --data_path "$DATA" --model resnet50 --curriculum etpp \
    --pipelines fast-store,gpu-store --rounds 1 --device cuda --device_batch 192 --device_batches 3 \
    ${STEP_JSON[@]+"${STEP_JSON[@]}"} --json "$OUT/data_gpu.json"
step e2e_r50_gpu 480 benchmarks/bench_e2e.py "${E2E[@]}" --data_pipeline gpu --json "$OUT/e2e_r50_gpu.json"
echo "issue 13 steps done after $SECONDS s"
