"""Helpers of benchmarks/gpu_suite.sh: the interpreter check, the end-to-end image folder, summary.md.

    python3 benchmarks/suite_tools.py check --mode gpu --out OUT --budget_s 540 --command '...'
    python3 benchmarks/suite_tools.py replicate --data_path DATA --copies 25 --out DIR --store STORE
    python3 benchmarks/suite_tools.py summary --out OUT [--summary OUT/summary.md]
    python3 benchmarks/suite_tools.py batches --json OUT/step_batches.json --batches 64,128 --run 'ARGS' ...

check: one line and exit 1 when the interpreter lacks torch, torchvision, timm, tensorboardX
(or, with --mode gpu, a CUDA device); else writes OUT/suite.json (the hardware and versions,
the suite's command and budget).  replicate: a folder of `copies` links to each image of
DATA (so a short run has enough steps per epoch) and its image store.  summary: reads the
steps' --json files and OUT/steps.tsv (name, limit, exit status, seconds, command per step)
and writes summary.md: the ratios README "Performance" is built from, a figure whose step
did not finish marked "not measured (step X rc=N)".  `summary` reads JSON only (no torch),
so the suite can rewrite it after every step and on its way out.  batches: bench_step.py
at several per-GPU micro-batches for each --run (its arguments), in one process (one
interpreter and CUDA start for all), into one JSON ({"runs": [bench_step.py results]},
rewritten after each run): scripts/project_scaling.py reads it.
"""
import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys

from common import ROOT, cpu_name  # the benchmarks' host description (imports no torch)

NEEDED = ('torch', 'torchvision', 'timm', 'tensorboardX')
CARRY_HINT = ('carry them as wheels: run `bash benchmarks/prepare_device.sh` where pip works, carry .whl '
              '(and data/imagenet-samples) and start the suite with `bash benchmarks/device_suite.sh`, '
              'which installs .whl/*.whl into /tmp/site (README "Performance"); or set PYTHON to an '
              'interpreter that has them')


# ---------------------------------------------------------------------------------------- check

def _pinned(name):
    try:
        with open(os.path.join(ROOT, 'requirements.txt'), encoding='utf-8') as f:
            for line in f:
                if line.strip().startswith(name + '=='):
                    return line.strip().split('==', 1)[1]
    except OSError:
        pass
    return None


def _driver():
    try:
        out = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def check(a):
    versions, missing = {}, []
    for name in NEEDED:
        try:
            versions[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - a package that fails to import is as missing as an absent one
            missing.append(name if isinstance(e, ModuleNotFoundError) else f'{name} ({type(e).__name__}: '
                           f'{str(e).splitlines()[0] if str(e) else ""})')
    problems = []
    if missing:
        problems.append(f'{", ".join(missing)}: {CARRY_HINT}')
    gpu = None
    if 'torch' in versions:
        import torch
        if torch.cuda.is_available() and torch.cuda.device_count():
            gpu = torch.cuda.get_device_name(0)
        elif a.mode == 'gpu':
            problems.append(f'CUDA (torch {versions["torch"]} sees no CUDA device; torch.version.cuda='
                            f'{torch.version.cuda}): run it on a GPU machine, or MODE=cpu-dry for the CPU check')
    if problems:
        print(f'gpu_suite: {sys.executable} lacks ' + '; '.join(problems), flush=True)
        return 1
    import torch
    host = {'python_version': platform.python_version(), 'executable': sys.executable, **versions,
            'cuda': torch.version.cuda, 'cpu': cpu_name(), 'cpu_count': os.cpu_count(),
            'cpus_usable': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}
    if gpu:
        props = torch.cuda.get_device_properties(0)
        host.update(gpu=gpu, gpu_count=torch.cuda.device_count(), gpu_memory_gib=props.total_memory / 2 ** 30,
                    cudnn=torch.backends.cudnn.version(), driver=_driver())
    pin = _pinned('timm')
    if pin and versions['timm'] != pin:
        host['timm_pin'] = pin
        print(f'gpu_suite: note: timm {versions["timm"]} here, requirements.txt pins {pin} '
              f'(to measure with {pin}: {CARRY_HINT})', flush=True)
    # SUITE_COMMIT: the commit as the caller knows it; a copied working tree (the lent machines get
    # the files, not necessarily the repository's current .git) can report a stale HEAD
    commit = os.environ.get('SUITE_COMMIT') or None
    if commit is None:
        try:
            commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                                    text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    suite = {'mode': a.mode, 'budget_s': a.budget_s, 'command': a.command, 'commit': commit}
    _write(os.path.join(a.out, 'suite.json'), json.dumps({'host': host, 'suite': suite}, indent=1))
    print('gpu_suite: ' + hardware_line(host), flush=True)
    return 0


def hardware_line(h):
    where = f'{h["gpu"]}' + (f' (x{h["gpu_count"]})' if h.get('gpu_count', 1) > 1 else '') + \
        (f', {h["gpu_memory_gib"]:.0f} GiB' if h.get('gpu_memory_gib') else '') + \
        (f', driver {h["driver"]}' if h.get('driver') else '') if h.get('gpu') else 'no GPU (CPU tensors)'
    cpus = f'{h.get("cpu_count")} CPUs' + (f' ({h["cpus_usable"]} usable)' if h.get('cpus_usable') not in
                                           (None, h.get('cpu_count')) else '')
    timm = h.get('timm', '?') + (f' (requirements.txt pins {h["timm_pin"]})' if h.get('timm_pin') else '')
    return (f'{where}; {cpus}, {h.get("cpu", "?")}; Python {h.get("python_version", "?")}, torch {h.get("torch", "?")} '
            f'(CUDA {h.get("cuda")}, cuDNN {h.get("cudnn")}), torchvision {h.get("torchvision", "?")}, timm {timm}, '
            f'tensorboardX {h.get("tensorboardX", "?")}')


# ------------------------------------------------------------------------------------ replicate

def replicate(a):
    import shutil
    src = os.path.realpath(a.data_path)
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d))) if os.path.isdir(src) else []
    if not classes:
        print(f'gpu_suite: DATA={a.data_path} holds no class folders of images: copy the samples there '
              f'(benchmarks/prepare_device.sh) or set DATA', flush=True)
        return 2
    if a.copies < 1:
        print('gpu_suite: replicate --copies must be at least 1', flush=True)
        return 2
    files = [(c, name) for c in classes for name in sorted(os.listdir(os.path.join(src, c)))]
    files = files[:a.max_images] if a.max_images else files
    shutil.rmtree(a.out, ignore_errors=True)
    for c, name in files:
        os.makedirs(os.path.join(a.out, c), exist_ok=True)
        for k in range(a.copies):
            os.symlink(os.path.join(src, c, name), os.path.join(a.out, c, f'r{k}_{name}'))
    print(f'{len(files) * a.copies} links to {len(files)} files of {a.data_path} in {a.out}', flush=True)
    if a.store:
        sys.path.insert(0, os.path.join(ROOT, 'scripts'))
        import build_image_store
        shutil.rmtree(a.store, ignore_errors=True)
        build_image_store.main(['--data_path', a.out, '--out', a.store, '--workers', str(a.workers)])
    return 0


# -------------------------------------------------------------------------------------- batches

def batches(a):
    import bench_step  # torch: only this subcommand needs it
    runs = []
    for text in a.run:
        argv = shlex.split(text) + ['--bench_batches', a.batches, '--reference', 'false']
        print(f'=== bench_step.py {" ".join(argv)}', flush=True)
        runs.append(bench_step.main(argv))
        _write(a.json, json.dumps({'runs': runs}, indent=1))  # a step cut short keeps the runs done
    return 0


# -------------------------------------------------------------------------------------- summary

E2E = (('e2e_gpu_graph', 'gpu data path, captured step'), ('e2e_fast_eager', 'fast path, eager step'))
STEP_MODELS = (('ResNet-50', 'r50'), ('DeiT-S', 'deit'))
KNOWN_DATA_FIELDS = ('batch', 'ms_per_batch', 'images_per_s', 'resample_ms', 'per_sample_interpolate_ms',
                     'memory_added_mib', 'step_ms', 'device_pct_of_step')


def _write(path, text):
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
    os.replace(tmp, path)


def read_steps(out):
    """{name: {'limit', 'rc', 'seconds', 'command'}} in the order the suite ran them (the last run of a name)."""
    steps = {}
    try:
        with open(os.path.join(out, 'steps.tsv'), encoding='utf-8') as f:
            for line in f:
                parts = line.rstrip('\n').split('\t')
                if len(parts) >= 5:
                    steps[parts[0]] = {'limit': parts[1], 'rc': parts[2], 'seconds': parts[3], 'command': parts[4]}
    except OSError:
        pass
    return steps


class Results:
    """The steps' JSON results, and why one is missing."""

    def __init__(self, out):
        self.out, self.steps, self.data, self.errors = out, read_steps(out), {}, {}

    def get(self, name):
        if name not in self.data and name not in self.errors:
            path = os.path.join(self.out, f'{name}.json')
            try:
                with open(path, encoding='utf-8') as f:
                    self.data[name] = json.load(f)
            except FileNotFoundError:
                self.errors[name] = None
            except (OSError, ValueError) as e:
                self.errors[name] = f'{name}.json unreadable: {type(e).__name__}'
        return self.data.get(name)

    def missing(self, *names):
        """'not measured (step X rc=N)' for the first of names without a result."""
        for name in names:
            if self.get(name) is None:
                st = self.steps.get(name)
                if self.errors.get(name):
                    return f'not measured ({self.errors[name]})'
                if st is None:
                    return f'not measured (step {name} not run)'
                return f'not measured (step {name} rc={st["rc"]}{_why(st["rc"])})'
        return None


def _why(rc):
    """What an exit status of a step means, where the suite gives it one."""
    return {'124': ' timed out', '137': ' killed: time limit or memory', '143': ' stopped by a signal'}.get(rc, '')


def _f(v, fmt='.1f', suffix=''):
    return '-' if v is None else f'{v:{fmt}}{suffix}'


def _table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(str(c) for c in r) + ' |' for r in rows]
    return lines


def _by_size(rows):
    return {r['size']: r for r in rows or []}


def _step_view(res, key):
    """Per model: {B: merged row} from the eager run (with the reference rows) and the captured run."""
    eager, graph = res.get(f'{key}_eager'), res.get(f'{key}_graph')
    er, gr = _by_size(eager and eager.get('rows')), _by_size(graph and graph.get('rows'))
    return eager, graph, er, gr, sorted(set(er) | set(gr))


def _data_view(res):
    """({B: {field: mean over the stages of that B}}, field order) from data_gpu's device half."""
    d = res.get('data_gpu')
    dev = (d or {}).get('device_side') or {}
    per_b, order = {}, []

    def flat(prefix, obj, into):
        for k, v in obj.items():
            key = f'{prefix}{k}'
            if isinstance(v, dict):
                flat(key + '.', v, into)
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and key not in ('index', 'size'):
                into[key] = v
                if key not in order:
                    order.append(key)

    for r in dev.get('stages') or []:
        f = {}
        flat('', r, f)
        per_b.setdefault(r['size'], []).append(f)
    means = {b: {k: statistics.mean(x[k] for x in rows if k in x) for k in order if any(k in x for x in rows)}
             for b, rows in per_b.items()}
    known = [k for k in KNOWN_DATA_FIELDS if k in order]
    return dev, means, known + [k for k in order if k not in KNOWN_DATA_FIELDS]


def _is_batch_time(field):
    """A per-batch device time that gets a share-of-the-step row (today's ms_per_batch, and the
    timings others add, e.g. per augmentation order): the name says ms, and it is not a part
    measured on its own (crop+resize, the per-sample alternative) or the step itself."""
    tokens = field.replace('.', '_').split('_')
    return 'ms' in tokens and field not in ('resample_ms', 'per_sample_interpolate_ms', 'step_ms')


def _step_ms(res, key, size, batch):
    """Milliseconds of the ResNet-50 training step (eager or captured) for `batch` images at B=size."""
    row = _by_size((res.get(key) or {}).get('rows')).get(size)
    return 1e3 * batch / row['img_s'] if row and row.get('img_s') else None


def _cell(rows, b, field):
    return rows.get(b, {}).get(field)


def _per_b(sizes, value, fmt):
    """'B=96: ..., B=160: ...' with '-' where a B has no value."""
    out = []
    for b in sizes:
        v = value(b)
        out.append(f'B={b}: {fmt(v)}' if v is not None else f'B={b}: -')
    return ', '.join(out)


def mae_row(res):
    """The MAE pre-training step (bench_step.py --task mae): images/s per B, its ratio to the base B,
    and what the MAE compute model and (base/B)^2 predict that ratio to be."""
    m = res.get('mae_step')
    what = 'step per B: images/s (ratio to the base B; MAE compute model; (base/B)^2)'
    if not m:
        return (f'MAE pre-training {what}', res.missing('mae_step'), 'mae_step')
    by = _by_size(m.get('rows'))

    def cell(b):
        r = by[b]
        ratio = f'{r["ratio"]:.2f}x' if r.get('ratio') else 'no base row'
        return f'{r["img_s"]:.0f} ({ratio}; {r["compute_model"]:.2f}x; {r["area"]:.2f}x)'
    return (f'{m["model"]} pre-training ({m.get("target")} target, mask {m.get("mask_ratio")}) {what}',
            ', '.join(f'B={b}: {cell(b)}' for b in sorted(by)), 'mae_step')


def ratios_table(res):
    """The one table of ratios README "Performance" is built from."""
    rows = []
    for name, label in E2E:
        e = res.get(name)
        if e:
            pr = e.get('projection') or {}
            notes = sorted({x for v in (e.get('notes') or {}).values() for x in v})
            rows += [(f'end to end, {label}: speedup measured / theoretical (E={_epochs(e)} vs the '
                      f'{e["baseline_epochs"]}-epoch baseline)',
                      f'{e["measured"]:.2f}x / {e["theoretical"]:.2f}x = {e["measured"] / e["theoretical"]:.2f}'
                      + (f' ({"; ".join(notes)})' if notes else ''), name),
                     (f'end to end, {label}: projected full run (E={pr.get("epochs", 200):g} on ImageNet-1k, '
                      f'steady rates)',
                      f'{pr["speedup"]:.2f}x (theoretical {pr["theoretical"]:.2f}x)' if 'speedup' in pr else
                      f'no steady rate for stages {pr.get("missing_stages")}', name)]
        else:
            rows.append((f'end to end, {label}: speedup measured / theoretical', res.missing(name), name))
    g, f = res.get('e2e_gpu_graph'), res.get('e2e_fast_eager')
    what = 'end to end: steady images/s per B, gpu + captured over fast + eager'
    if g and f:
        gs, fs = _steady_by_size(g), _steady_by_size(f)
        cells = _per_b(sorted(set(gs) | set(fs)), lambda b: _div(gs.get(b), fs.get(b)), lambda v: f'{v:.2f}x')
        base = _div(g.get('baseline_steady_img_s'), f.get('baseline_steady_img_s'))
        cells = ', '.join(c for c in (cells, f'baseline {base:.2f}x' if base else '') if c)
        rows.append((what, cells or 'no steady rates (too few steps per epoch)', 'e2e_gpu_graph, e2e_fast_eager'))
    else:
        rows.append((what, res.missing('e2e_gpu_graph', 'e2e_fast_eager'), 'e2e_gpu_graph, e2e_fast_eager'))
    for label, key in STEP_MODELS:
        eager, graph, er, gr, sizes = _step_view(res, key)
        model = (eager or graph or {}).get('model', label)
        e_name, g_name = f'{key}_eager', f'{key}_graph'
        specs = (
            ('captured images/s (ratio to the base B; theory (base/B)^2)', (g_name,),
             lambda b: _cell(gr, b, 'img_s'),
             lambda b, v: f'{v:.0f} ({_cell(gr, b, "ratio") or 0:.2f}x; {_cell(gr, b, "theory") or 0:.2f}x)'),
            ('captured / reference captured (target >= 0.95)', (g_name, e_name),
             lambda b: _div(_cell(gr, b, 'img_s'), _cell(er, b, 'ref_graph_img_s')), None),
            ('eager / reference eager', (e_name,),
             lambda b: _div(_cell(er, b, 'img_s'), _cell(er, b, 'ref_eager_img_s')), None),
            ('captured / eager', (g_name, e_name),
             lambda b: _div(_cell(gr, b, 'img_s'), _cell(er, b, 'img_s')), None),
        )
        # a --cuda_graph run whose capture did not happen measured the eager step: said so beside it
        fallback = sorted({r.get('graph_note') or 'no graph' for r in gr.values() if not r.get('graphs_captured')})
        for what, need, value, fmt in specs:
            miss = res.missing(*need)
            text = miss or ', '.join(f'B={b}: ' + ('-' if value(b) is None else
                                                   fmt(b, value(b)) if fmt else f'{value(b):.2f}') for b in sizes)
            if not miss and g_name in need and fallback:
                text += f' (NOT captured: {"; ".join(fallback)})'
            rows.append((f'{model} step per B: {what}', text, ', '.join(need)))
    rows.append(mae_row(res))
    _, means, fields = _data_view(res)
    miss = res.missing('data_gpu')
    if miss or not means:
        rows.append(('GPU data path, device half: ms per batch (share of the training step)',
                     miss or 'no device rows in data_gpu.json', 'data_gpu'))
    else:
        key = 'r50_graph' if res.get('r50_graph') else 'r50_eager'
        which = {'r50_graph': 'captured', 'r50_eager': 'eager'}[key]
        for field in [x for x in fields if _is_batch_time(x)]:
            def fmt(b, ms):
                step = _step_ms(res, key, b, means[b].get('batch', 0))
                return f'{ms:.1f} ms' + (f' ({100 * ms / step:.0f}%)' if step else '')
            cells = ', '.join(f'B={b}: ' + ('-' if means[b].get(field) is None else fmt(b, means[b][field]))
                              for b in sorted(means))
            share = f'share of the {which} {res.get(key)["model"]} step' if res.get(key) else res.missing(key)
            rows.append((f'GPU data path, device half: {field} ({share})', cells, f'data_gpu, {key}'))
    return _table(('ratio', 'value', 'step'), rows)


def _epochs(e):
    argv = e.get('argv') or []
    return argv[argv.index('--epochs') + 1] if '--epochs' in argv[:-1] else '?'


def _steady_by_size(e):
    per = {}
    for s in e.get('stages') or []:
        if s.get('steady_img_s'):
            per.setdefault(s['size'], []).append(s['steady_img_s'])
    return {b: statistics.median(v) for b, v in per.items()}


def e2e_section(res):
    runs = [(n, l, res.get(n)) for n, l in E2E]
    argv = next((e['argv'] for _, _, e in runs if e and e.get('argv')), [])
    model = argv[argv.index('--model') + 1] if '--model' in argv[:-1] else 'resnet50'
    lines = [f'### End to end: etpp vs its baseline, {model} (bench_e2e.py)', '']
    head = ['', *(f'{l} ({n})' for n, l, _ in runs)]

    def cell(e, n, fn):
        if e is None:
            return res.missing(n)
        try:
            return fn(e)
        except (KeyError, TypeError, ZeroDivisionError):
            return '-'

    def proj(e):
        pr = e.get('projection') or {}
        return (f'{pr["speedup"]:.2f}x ({pr["curriculum_h"]:.1f} h vs {pr["baseline_h"]:.1f} h)' if 'speedup' in pr
                else f'no steady rate for stages {pr.get("missing_stages")}')

    figures = [
        ('speedup measured', lambda e: f'{e["measured"]:.2f}x'),
        ('speedup theoretical', lambda e: f'{e["theoretical"]:.2f}x'),
        ('measured / theoretical', lambda e: f'{e["measured"] / e["theoretical"]:.2f}'),
        ('training passes: curriculum / baseline s', lambda e: f'{e["curriculum_s"]:.1f} / {e["baseline_s"]:.1f} '
                                                                f'(baseline ran {e["baseline_run_epochs"]} of '
                                                                f'{e["baseline_epochs"]} epochs)'),
        ('projected full run (E=200, ImageNet-1k, one process)', proj),
        ('baseline steady images/s', lambda e: _f(e.get('baseline_steady_img_s'))),
        ('epoch start without a change of B, s (median)', lambda e: _f(e.get('epoch_start_s'), '.2f')),
        ('switch cost per change of B, s', lambda e: ', '.join(f'{v:.2f}' for v in e['switch_costs_s']) or '-'),
        ('--cuda_graph notes of the runs', lambda e: '; '.join(sorted({x for v in (e.get('notes') or {}).values()
                                                                      for x in v})) or '-'),
    ]
    lines += _table(head, [(name, *(cell(e, n, fn) for n, _, e in runs)) for name, fn in figures])
    lines += ['', 'Steady state and switch cost per stage:', '']
    stages = {}
    for n, _, e in runs:
        for s in (e or {}).get('stages') or []:
            stages.setdefault(s['index'], {'size': s['size'], 'magnitude': s['magnitude'], 'epochs': s['epochs']})[n] = s
    head = ['stage', 'B', 'm', 'data epochs', 'compute ratio']
    for n, l, _ in runs:
        head += [f'steady img/s, {l}', f'switch s, {l}', f'vs base epoch, {l}']
    body = []
    for i in sorted(stages):
        st = stages[i]
        row = [i, st['size'], '-' if st['magnitude'] is None else st['magnitude'], st['epochs'],
               _f(next((st[n]['compute_ratio'] for n, _, _ in runs if n in st), None), '.3f', 'x')]
        for n, _, e in runs:
            s = st.get(n)
            if s is None:
                row += [res.missing(n) or '-', '-', '-']
            else:
                row += [_f(s.get('steady_img_s')), _f(s.get('switch_s'), '.2f'), _f(s.get('relative'), '.3f', 'x')]
        body.append(row)
    if body:
        lines += _table(head, body)
    else:
        lines.append(res.missing('e2e_gpu_graph', 'e2e_fast_eager') or 'no stages')
    return lines


def step_section(res):
    lines = ['### Training step per B, images/s per GPU (bench_step.py)', '']
    for model, key in STEP_MODELS:
        eager, graph, er, gr, sizes = _step_view(res, key)
        info = eager or graph
        desc = (f'{model} ({info["model"]}), batch {info["rows"][0]["batch_size"] if info["rows"] else "?"}, amp {info["amp"]}, '
                f'channels_last {info["channels_last"]}, cudnn.benchmark {info.get("cudnn_benchmark")}, input '
                f'{info["data_pipeline"]}') if info else model
        lines += [desc, '']
        if not sizes:
            lines += [res.missing(f'{key}_eager', f'{key}_graph') or 'no rows', '']
            continue
        head = ['B', '(base/B)^2', 'eager img/s', 'eager ratio', 'captured img/s', 'captured ratio',
                'ref eager img/s', 'ref captured img/s', 'eager / ref eager', 'captured / ref captured',
                'captured / eager', 'graphs', 'peak GiB eager / captured']
        body, notes = [], set()
        miss_e, miss_g = res.missing(f'{key}_eager'), res.missing(f'{key}_graph')
        for b in sizes:
            e, g = er.get(b, {}), gr.get(b, {})
            theory = e.get('theory') or g.get('theory')

            def rate(r, miss):
                return miss if miss else _f(r.get('img_s'))

            graphs = f'{g.get("graphs_captured")}' if g else '-'
            if g.get('graph_note'):
                notes.add(g['graph_note'])
            body.append([b, _f(theory, '.2f', 'x'), rate(e, miss_e), _f(e.get('ratio'), '.2f', 'x'),
                         rate(g, miss_g), _f(g.get('ratio'), '.2f', 'x'), _f(e.get('ref_eager_img_s')),
                         _f(e.get('ref_graph_img_s')),
                         _f(_div(e.get('img_s'), e.get('ref_eager_img_s')), '.2f'),
                         _f(_div(g.get('img_s'), e.get('ref_graph_img_s')), '.2f'),
                         _f(_div(g.get('img_s'), e.get('img_s')), '.2f'), graphs,
                         f'{_f(e.get("peak_mem_gb"), ".1f")} / {_f(g.get("peak_mem_gb"), ".1f")}'])
        lines += _table(head, body) + [''] + [f'Captured run: {n}' for n in sorted(notes)] + ([''] if notes else [])
    return lines


def _div(a, b):
    return a / b if a and b else None


def batches_section(res):
    """step_batches: ms per micro-batch step at each B and per-GPU batch (project_scaling.py's input)."""
    lines = ['### Step time at several per-GPU batches (bench_step.py --bench_batches; scripts/project_scaling.py)',
             '']
    d = res.get('step_batches')
    if not d or not d.get('runs'):
        return lines + [res.missing('step_batches') or 'no runs in step_batches.json']
    for run in d['runs']:
        rows = run.get('rows') or []
        sizes = sorted({r['size'] for r in rows})
        batches_ = sorted({r['batch_size'] for r in rows})
        cell = {(r['size'], r['batch_size']): r for r in rows}
        lines += [f'{run.get("model")}: ms per step of one micro-batch (images/s), amp {run.get("amp")}, '
                  f'channels_last {run.get("channels_last")}, gradients {run.get("grad_bytes", 0) / 1e6:.1f} MB '
                  f'all-reduced per step', '']
        body = [[b, *(f'{_f(cell[(b, m)]["ms_per_step"], ".2f")} ({_f(cell[(b, m)]["img_s"], ".0f")})'
                      if (b, m) in cell else '-' for m in batches_)] for b in sizes]
        lines += _table(['B', *(f'batch {m}' for m in batches_)], body) + ['']
    return lines


def data_section(res):
    lines = ['### GPU data path, device half per batch (bench_data.py, `--data_pipeline gpu`)', '']
    dev, means, fields = _data_view(res)
    miss = res.missing('data_gpu')
    if miss or not means:
        return lines + [miss or 'no device rows in data_gpu.json']
    sizes = sorted(means)
    where = f'{dev.get("device")} ({dev.get("gpu")})' if dev.get('gpu') else \
        f'CPU tensors, {dev.get("threads")} thread(s), not a GPU number'
    extra = {k: v for k, v in dev.items() if k not in ('device', 'gpu', 'threads', 'stages', 'step_json')
             and not isinstance(v, (list, dict))}
    lines += [f'On {where}; mean over the stages of each B; every numeric field of the rows'
              + (f'; {", ".join(f"{k}={v}" for k, v in extra.items())}' if extra else ''), '']
    body = [[f, *(_f(means[b].get(f), '.1f') for b in sizes)] for f in fields]
    for field in [x for x in fields if _is_batch_time(x)]:
        for key, label in (('r50_graph', 'captured'), ('r50_eager', 'eager')):
            cells = []
            for b in sizes:
                step = _step_ms(res, key, b, means[b].get('batch', 0))
                ms = means[b].get(field)
                cells.append(f'{100 * ms / step:.1f}%' if step and ms is not None else res.missing(key) or '-')
            model = (res.get(key) or {}).get('model', 'ResNet-50')
            body.append([f'{field} as a share of the {label} {model} step (same images)', *cells])
    # the worker half, per CPU-second of one worker, relative to the plain 224 pipeline
    d = res.get('data_gpu')
    for name in d.get('pipelines') or []:
        cells = []
        for b in sizes:
            vals = [s[f'{name}_ratio'] for s in d.get('stages') or [] if s['size'] == b and f'{name}_ratio' in s]
            cells.append(f'{statistics.mean(vals):.2f}x' if vals else '-')
        body.append([f'worker half {name}: images per CPU-second vs plain {d.get("base_size")} '
                     f'({d.get("plain224", 0):.0f} img/s)', *cells])
    return lines + _table(['per batch', *(f'B={b}' for b in sizes)], body)


def summary(a):
    res = Results(a.out)
    try:
        with open(os.path.join(a.out, 'suite.json'), encoding='utf-8') as f:
            meta = json.load(f)
    except (OSError, ValueError):
        meta = {'host': {}, 'suite': {}}
    suite = meta.get('suite') or {}
    lines = ['# GPU suite summary', '',
             f'- Hardware: {hardware_line(meta.get("host") or {})}',
             f'- Command: `{suite.get("command") or "unknown"}`' + (f' (commit {suite["commit"]})'
                                                                     if suite.get('commit') else ''),
             f'- Mode {suite.get("mode", "?")}, budget {suite.get("budget_s", "?")} s; '
             f'{"finished" if a.final else "in progress or stopped"}; every figure below comes from this run; '
             f'each step\'s full output and JSON are in the same folder.',
             '', '## Steps', '']
    body = []
    for name, st in res.steps.items():
        body.append([name, st['limit'], st['rc'] + (f' ({_why(st["rc"]).strip()})' if _why(st['rc']) else ''),
                     st['seconds'], _result_line(a.out, name, st['rc'])])
    lines += _table(['step', 'limit s', 'rc', 's', 'result'], body) if body else ['no step has run']
    lines += ['', '## Ratios for README "Performance"', ''] + ratios_table(res)
    for section in (e2e_section, step_section, batches_section, data_section):
        lines.append('')
        try:
            lines += section(res)
        except Exception as e:  # noqa: BLE001 - one malformed result must not cost the other sections
            lines.append(f'(section {section.__name__} could not be written: {type(e).__name__}: {e})')
    known = {n for n, _ in E2E} | {f'{k}_{v}' for _, k in STEP_MODELS for v in ('eager', 'graph')} | \
        {'data_gpu', 'mae_step', 'step_batches'}
    others = [n for n in res.steps if n not in known and os.path.exists(os.path.join(a.out, f'{n}.json'))]
    if others:
        lines += ['', '### Other steps', '', 'Not tabulated here; their tables are in their .txt output:',
                  ''] + [f'- `{n}.json`, `{n}.txt`' for n in others]
    lines += ['', '## Exact commands', '']
    lines += [f'- {name}: `{st["command"].strip()}`' for name, st in res.steps.items()]
    _write(a.summary or os.path.join(a.out, 'summary.md'), '\n'.join(lines) + '\n')
    return 0


def _result_line(out, name, rc):
    """For the steps table: pytest's totals, else NAME.json when the step wrote it, else its last line."""
    try:
        with open(os.path.join(out, f'{name}.txt'), encoding='utf-8', errors='replace') as f:
            text = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
    except OSError:
        text = []
    for ln in reversed(text[-3:]):
        if re.search(r'\d+ (passed|failed|skipped|errors?|deselected)|no tests ran', ln):
            return ln.strip('= ').replace('|', '/')
    if rc == '0' and os.path.exists(os.path.join(out, f'{name}.json')):
        return f'{name}.json'
    return text[-1][:300].replace('|', '/') if text else '-'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False)
    sub = p.add_subparsers(dest='cmd', required=True)
    c = sub.add_parser('check', help='the interpreter has what the suite needs; writes OUT/suite.json')
    c.add_argument('--mode', choices=['gpu', 'cpu-dry'], default='gpu', help='gpu also needs a CUDA device')
    c.add_argument('--out', required=True, help='the suite\'s output folder')
    c.add_argument('--budget_s', type=int, default=None, help='the suite\'s budget (recorded)')
    c.add_argument('--command', default=None, help='the suite\'s command line (recorded)')
    r = sub.add_parser('replicate', help='a folder of links to each image of DATA, and its image store')
    r.add_argument('--data_path', required=True, help='an image folder (class folders of images)')
    r.add_argument('--copies', type=int, default=25, help='links per image')
    r.add_argument('--max_images', type=int, default=None, help='link only the first N files (class by class)')
    r.add_argument('--out', required=True, help='the folder of links (replaced)')
    r.add_argument('--store', default=None, help='also build its image store here (replaced)')
    r.add_argument('--workers', type=int, default=os.cpu_count() or 1, help='processes of the store build')
    s = sub.add_parser('summary', help='write summary.md from the steps\' JSON files')
    s.add_argument('--out', required=True, help='the suite\'s output folder')
    s.add_argument('--summary', default=None, help='where to write it (default: OUT/summary.md)')
    s.add_argument('--final', action='store_true', help='the suite has finished (said in the summary)')
    b = sub.add_parser('batches', help='bench_step.py at several per-GPU batches for each --run, into one JSON')
    b.add_argument('--json', required=True, help='where the results go ({"runs": [...]})')
    b.add_argument('--batches', required=True, help='per-GPU micro-batches, comma-separated')
    b.add_argument('--run', action='append', required=True,
                   help='one bench_step.py run: its arguments in one string (repeat for more models)')
    a = p.parse_args(argv)
    return {'check': check, 'replicate': replicate, 'summary': summary, 'batches': batches}[a.cmd](a)


if __name__ == '__main__':
    sys.exit(main())
