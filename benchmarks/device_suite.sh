#!/usr/bin/env bash
# The one command for a lent GPU machine: install the carried wheels, run benchmarks/gpu_suite.sh
# within the command's time, and leave in $OUT what comes back (at most 8 files): summary.md
# (rewritten after every step, so a cut-short run still returns its figures), suite.log (the
# whole console output) and suite.tar.gz (every step's .txt and .json, the end-to-end runs' logs).
#
# Prepared here first with `bash benchmarks/prepare_device.sh` (wheels into .whl, the sample
# images into data/imagenet-samples); then, through the device tool:
#   command: bash benchmarks/device_suite.sh     carry: .whl, data/imagenet-samples     timeout_s: 600
#
# TOTAL_S (default 590: a 600-s command less the copy back) bounds everything; the suite gets
# what is left after the install, at most its full 540 s, and is stopped (its summary written)
# before TOTAL_S runs out.  PYTHON (default python3), DATA and MODE (default gpu; cpu-dry checks
# this wrapper on a machine without a GPU) pass on to the suite, and so do STEPS (a subset of its
# steps) and SUITE_COMMIT (the commit summary.md names: a copied tree's .git can be stale).
set -u
T0=$SECONDS
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT=${OUT:-out/device}
TOTAL_S=${TOTAL_S:-590}
PYTHON=${PYTHON:-python3}
DATA=${DATA:-data/imagenet-samples}
MODE=${MODE:-gpu}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT" || exit 1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device_suite.XXXXXX") || exit 1
trap 'rm -rf "$WORK"' EXIT
SUITE_OUT=$WORK/suite   # the steps' outputs, tarred into $OUT at the end

run_all() {
    if compgen -G '.whl/*.whl' > /dev/null; then
        echo "device_suite: installing $(cd .whl && echo *.whl) into $SITE"
        # the device README's install: no index (nothing can be fetched there), no dependencies
        # (timm's and tensorboardX's are in the machine's image), ahead of its site-packages
        if PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$SITE" .whl/*.whl; then
            export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
        else
            echo "device_suite: the wheels in .whl did not install: the suite checks what $PYTHON has"
        fi
    else
        echo "device_suite: no .whl/*.whl here (run benchmarks/prepare_device.sh and carry .whl)"
    fi
    [ -d "$DATA" ] || echo "device_suite: no $DATA here (run benchmarks/prepare_device.sh and carry it)"
    # the suite's own time beyond its step limits: the interpreter check, the summaries, and
    # the 5-s kill grace of a step that ignores SIGTERM
    local left=$((TOTAL_S - (SECONDS - T0))) budget
    budget=$((left - 40))
    [ "$budget" -gt 540 ] && budget=540
    [ "$MODE" = cpu-dry ] && budget=$((2 * budget))   # as the suite's own cpu-dry default
    if [ "$budget" -lt 60 ]; then
        echo "device_suite: only ${left} s left of TOTAL_S=$TOTAL_S after the install: not enough for the suite"
        return 1
    fi
    local summary=$OUT/summary.md   # not in the assignments below, where OUT is already the suite's
    SUITE_CALLER="bash benchmarks/device_suite.sh (TOTAL_S=$TOTAL_S)" PYTHON="$PYTHON" MODE="$MODE" \
        BUDGET_S=$budget OUT="$SUITE_OUT" SUMMARY="$summary" DATA="$DATA" \
        timeout -k 5 $((left - 10)) bash benchmarks/gpu_suite.sh &
    CHILD=$!
    wait "$CHILD"
    local rc=$?
    CHILD=
    echo "device_suite: suite rc=$rc after $((SECONDS - T0)) s"
    return $rc
}

pack() {
    if [ -d "$SUITE_OUT" ] && tar -czf "$OUT/suite.tar.gz" -C "$WORK" suite; then
        echo "device_suite: $OUT/suite.tar.gz ($(du -k "$OUT/suite.tar.gz" | cut -f1) KiB)"
    fi
    if [ -f "$OUT/summary.md" ]; then echo "device_suite: $OUT/summary.md"
    else echo "device_suite: no summary.md (the suite stopped before its first step): see $OUT/suite.log"; fi
}

# A TERM or Ctrl-C stops the suite the way its own limit would (it ends its step and writes its
# summary), then packs what exists.
CHILD=
stop() {
    trap - TERM INT
    if [ -n "$CHILD" ]; then kill -TERM "$CHILD" 2>/dev/null; wait "$CHILD" 2>/dev/null; fi
    pack
    finish 143
}
finish() {  # all output through tee into suite.log, which must be complete when this returns
    exec 1>&- 2>&-
    wait "$TEE" 2>/dev/null
    exit "$1"
}
trap stop TERM INT
exec > >(tee "$OUT/suite.log") 2>&1
TEE=$!
run_all
rc=$?
pack
finish $rc
