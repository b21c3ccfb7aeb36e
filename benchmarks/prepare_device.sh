#!/usr/bin/env bash
# Run here (where PyPI is reachable) before a device call: puts into the checkout, ignored by git,
# what a lent GPU machine lacks and cannot fetch (nothing outside it can be reached):
#   .whl/                 timm (as requirements.txt pins it) and tensorboardX (as installed here)
#                         as wheels for Python 3.12 on x86-64; their own dependencies (torch,
#                         torchvision, pyyaml, huggingface_hub, safetensors; numpy, packaging,
#                         protobuf) are in the machine's image
#   data/imagenet-samples the 200 sample images (../shared does not travel)
# Then, through the device tool:  command: bash benchmarks/device_suite.sh
#                                 carry: .whl, data/imagenet-samples     timeout_s: 600
#
#   bash benchmarks/prepare_device.sh
#   SAMPLES=/path/to/imagenet-samples PYTHON=python3 bash benchmarks/prepare_device.sh
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PYTHON=${PYTHON:-python3}
SAMPLES=${SAMPLES:-../shared/data/imagenet-samples}

if [ ! -d "$SAMPLES" ]; then
    echo "prepare_device: SAMPLES=$SAMPLES is not a folder: set SAMPLES to the sample image folder"
    exit 2
fi
exclude=$(git rev-parse --git-path info/exclude 2>/dev/null) || {
    echo "prepare_device: not inside a git checkout: run it from the repository"
    exit 2
}
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"

timm=$(sed -n 's/^timm==//p' requirements.txt)
tbx=$("$PYTHON" -c 'import tensorboardX; print(tensorboardX.__version__)' 2>/dev/null)
wheels=("timm${timm:+==$timm}" "tensorboardX${tbx:+==$tbx}")
mkdir -p .whl
rm -f .whl/timm-*.whl .whl/tensorboardX-*.whl .whl/tensorboardx-*.whl   # one version of each
# the device README's download: binary wheels for CPython 3.12 on manylinux x86-64 (pure-Python
# wheels match too), without dependencies
if ! "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${wheels[@]}"; then
    echo "prepare_device: pip download of ${wheels[*]} failed (PyPI reachable?)"
    exit 1
fi
# what the wheels need, against what the machine's image holds (its package list, 2026-11)
"$PYTHON" - <<'EOF' || exit 1
import glob, re, sys, zipfile
image = {'torch', 'torchvision', 'pyyaml', 'huggingface-hub', 'safetensors', 'numpy', 'packaging', 'protobuf'}
bad = []
for path in sorted(glob.glob('.whl/*.whl')):
    with zipfile.ZipFile(path) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith('.dist-info/METADATA'))).decode()
    reqs = [ln.split(':', 1)[1].strip() for ln in meta.splitlines() if ln.startswith('Requires-Dist:')]
    reqs = [r for r in reqs if 'extra ==' not in r]
    names = {re.split(r'[ ;<>=!~\[(]', r, 1)[0].lower().replace('_', '-') for r in reqs}
    bad += [f'{path}: {n}' for n in sorted(names - image)]
    print(f'{path}: needs {", ".join(sorted(names)) or "nothing"}')
if bad:
    print('prepare_device: not in the machine\'s image, download these too: ' + '; '.join(bad))
    sys.exit(1)
EOF

mkdir -p data
rm -rf data/imagenet-samples.tmp
# writable copies (the shared samples are read-only), so the next run can replace them
{ cp -rL "$SAMPLES" data/imagenet-samples.tmp && chmod -R u+w data/imagenet-samples.tmp \
    && rm -rf data/imagenet-samples && mv data/imagenet-samples.tmp data/imagenet-samples; } \
    || { echo "prepare_device: copy of $SAMPLES to data/imagenet-samples failed"; exit 1; }
for p in .whl data/imagenet-samples; do
    git check-ignore -q "$p" || echo "prepare_device: warning: $p is not ignored by git (it would travel uncarried)"
done
echo "prepare_device: .whl ($(du -sm .whl | cut -f1) MiB: $(cd .whl && echo *.whl)), data/imagenet-samples" \
     "($(find data/imagenet-samples -type f | wc -l) files, $(du -sm data/imagenet-samples | cut -f1) MiB)"
echo "device tool: command 'bash benchmarks/device_suite.sh', carry ['.whl', 'data/imagenet-samples'], timeout_s 600"
