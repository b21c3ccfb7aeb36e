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
echo "suite done after $SECONDS s"
