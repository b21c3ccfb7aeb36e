"""benchmarks/gpu_suite.sh and its device wrapper: every step runs (MODE=cpu-dry), summary.md is written
from the steps' results, no step calls a bare `python`, and the limits fit the 10-minute device command."""
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile

import pytest

from conftest import ROOT
from test_image_store import make_folder

SUITE = os.path.join(ROOT, 'benchmarks', 'gpu_suite.sh')
WRAPPER = os.path.join(ROOT, 'benchmarks', 'device_suite.sh')
TOOLS = os.path.join(ROOT, 'benchmarks', 'suite_tools.py')
pytestmark = pytest.mark.skipif(shutil.which('bash') is None or shutil.which('timeout') is None,
                                reason='needs bash and coreutils timeout')


def _plan(budget=None):
    env = dict(os.environ, MODE='plan')
    if budget is not None:
        env['BUDGET_S'] = str(budget)
    out = subprocess.run(['bash', SUITE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = dict(re.findall(r'^(\S+)\s+(\d+) s', out.stdout, re.M))
    total = int(rows.pop('total'))
    return {k: int(v) for k, v in rows.items()}, total


def _steps_in_script():
    with open(SUITE, encoding='utf-8') as f:
        return re.findall(r'^step (\w+) ', f.read(), re.M)


def test_limits_fit_the_device_command_and_scale_with_the_budget():
    limits, total = _plan()
    assert total == sum(limits.values()) <= 540
    # every step the suite runs has a row, in the table's order (the order of value)
    assert _steps_in_script() == list(limits)
    assert list(limits)[0] == 'cuda_tests' and limits['cuda_tests'] <= 60
    half, half_total = _plan(270)
    assert half_total <= 270 and all(half[k] <= (v + 1) // 2 for k, v in limits.items())
    out = subprocess.run(['bash', SUITE], env=dict(os.environ, MODE='plan', BUDGET_S='9m'), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and len(out.stdout.strip().splitlines()) == 1 and 'BUDGET_S' in out.stdout


def test_steps_runs_a_chosen_subset_within_the_budget():
    """STEPS: fewer steps when less device time is left; BUDGET_S is shared among them by their
    shares, the end-to-end steps bring their image folder along, and a name that is no step is one line."""
    env = dict(os.environ, MODE='plan', BUDGET_S='300', STEPS='cuda_tests e2e_fast_eager r50_eager')
    out = subprocess.run(['bash', SUITE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {k: int(v) for k, v in re.findall(r'^(\S+)\s+(\d+) s', out.stdout, re.M)}
    total = rows.pop('total')
    assert list(rows) == ['cuda_tests', 'e2e_data', 'e2e_fast_eager', 'r50_eager']
    assert 290 <= total == sum(rows.values()) <= 300
    full, _ = _plan()
    assert all(rows[k] > full[k] * 300 / 540 for k in rows)  # more each than at 300 s for all steps
    env['STEPS'] = 'r50_eager e2e_gpu'
    out = subprocess.run(['bash', SUITE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and len(out.stdout.strip().splitlines()) == 1 and "'e2e_gpu'" in out.stdout


def _code_lines(path):
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            code = line.split('#', 1)[0] if not line.lstrip().startswith('#!') else ''
            yield n, code


def test_no_bare_python_in_the_suite_or_what_it_starts():
    for script in ('gpu_suite.sh', 'device_suite.sh', 'prepare_device.sh'):
        path = os.path.join(ROOT, 'benchmarks', script)
        for n, code in _code_lines(path):
            code = code.replace('${PYTHON:-python3}', '')
            if re.match(r'\s*echo ', code):  # messages may name the interpreter
                continue
            assert not re.search(r'(?<![\w./-])python3?(?![\w.])', code), f'{script}:{n}: {code.strip()}'
    # the Python programs the suite runs start their own children with sys.executable, never a
    # 'python' element of a command list (the cpu-dry run below also fails any call of one on PATH)
    for rel in ('benchmarks/bench_e2e.py', 'benchmarks/bench_step.py', 'benchmarks/bench_data.py',
                'benchmarks/suite_tools.py', 'scripts/build_image_store.py', 'scripts/fault_inject.py'):
        with open(os.path.join(ROOT, rel), encoding='utf-8') as f:
            assert not re.search(r'''[\[(,]\s*['"]python3?['"]\s*[,\])]''', f.read()), rel


def _shims(tmp_path):
    """A PATH whose `python` and `python3` record that they were called and fail."""
    d = tmp_path / 'shims'
    d.mkdir()
    for name in ('python', 'python3'):
        p = d / name
        p.write_text(f'#!/bin/sh\necho "{name} $*" >> "{tmp_path}/bare_python_calls"\nexit 127\n')
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return f'{d}{os.pathsep}{os.environ.get("PATH", "")}'


@pytest.fixture(scope='module')
def dry_run(tmp_path_factory):
    """The suite through the device wrapper, MODE=cpu-dry on a tiny image folder, with `python` and
    `python3` on PATH failing: (its $OUT, the extracted per-step folder, the wrapper's result)."""
    tmp = tmp_path_factory.mktemp('suite')
    data = make_folder(str(tmp / 'images'), n=16)
    out = tmp / 'out'
    env = dict(os.environ, MODE='cpu-dry', OUT=str(out), DATA=data, PYTHON=sys.executable, PATH=_shims(tmp),
               TOTAL_S='550', SITE=str(tmp / 'site'), OMP_NUM_THREADS='1')
    env.pop('BUDGET_S', None)
    # within pytest's 600-s limit: the wrapper stops the suite before TOTAL_S
    proc = subprocess.run(['bash', WRAPPER], env=env, capture_output=True, text=True, timeout=580)
    steps = tmp / 'steps'
    if (out / 'suite.tar.gz').exists():
        with tarfile.open(out / 'suite.tar.gz') as t:
            t.extractall(steps, **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))
    return out, steps / 'suite', proc, tmp


def test_cpu_dry_runs_every_step_and_writes_the_summary(dry_run):
    out, steps, proc, tmp = dry_run
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert not (tmp / 'bare_python_calls').exists(), (tmp / 'bare_python_calls').read_text()
    # what comes back from a device machine: at most 8 files, summary.md beside the tarball
    assert sorted(os.listdir(out)) == ['suite.log', 'suite.tar.gz', 'summary.md']
    limits, _ = _plan()
    with open(steps / 'steps.tsv', encoding='utf-8') as f:
        ran = [line.split('\t') for line in f.read().splitlines()]
    assert [r[0] for r in ran] == list(limits)
    assert all(r[2] == '0' for r in ran), ran
    for name in limits:
        if name not in ('cuda_tests', 'e2e_data'):
            assert (steps / f'{name}.json').exists(), name
    # the CUDA tests are selected by their marker (and skip here)
    tests_out = (steps / 'cuda_tests.txt').read_text()
    assert int(re.search(r'(\d+) skipped', tests_out).group(1)) >= 7 and 'failed' not in tests_out
    summary = (out / 'summary.md').read_text()
    assert 'Hardware:' in summary and 'torch ' in summary and 'timm ' in summary and 'CPUs' in summary
    assert 'bash benchmarks/device_suite.sh' in summary and 'MODE=cpu-dry' in summary
    assert 'not measured' not in summary and 'could not be written' not in summary
    for figure in ('speedup measured / theoretical', 'projected full run', 'steady images/s per B',
                   'captured / reference captured', 'eager / reference eager', 'ms_per_batch',
                   'share of the captured resnet18 step', 'Steady state and switch cost per stage',
                   'mae_vit_tiny_patch16 pre-training (pixel target, mask 0.75) step per B'):
        assert figure in summary, figure
    # the MAE step per B of its plan at base 64 (32, 48, 64), the base row's ratio 1
    assert re.search(r'B=32: \d+ \(\d+\.\d\dx; \d+\.\d\dx; 4\.00x\).*B=64: \d+ \(1\.00x; 1\.00x; 1\.00x\)',
                     summary), summary
    e2e = json.loads((steps / 'e2e_gpu_graph.json').read_text())
    assert any('--cuda_graph: not captured' in n for n in e2e['notes']['curriculum'])
    assert (steps / 'e2e_gpu_graph_runs' / 'curriculum' / 'output.txt').exists()


def test_summary_marks_what_is_missing_and_prints_new_data_fields(dry_run, tmp_path):
    _, steps, _, _ = dry_run
    out = tmp_path / 'partial'
    shutil.copytree(steps, out)
    # r50_graph ran out of time, deit_eager never ran, mae_step was killed
    (out / 'r50_graph.json').unlink()
    (out / 'mae_step.json').unlink()
    (out / 'deit_eager.json').unlink()
    lines = [ln.split('\t') for ln in (out / 'steps.tsv').read_text().splitlines()]
    lines = [([*ln[:2], {'r50_graph': '124', 'mae_step': '137'}[ln[0]], *ln[3:]]
              if ln[0] in ('r50_graph', 'mae_step') else ln) for ln in lines if ln[0] != 'deit_eager']
    (out / 'steps.tsv').write_text(''.join('\t'.join(ln) + '\n' for ln in lines))
    # the device half grows fields (another augmentation order, nested timings)
    data = json.loads((out / 'data_gpu.json').read_text())
    for r in data['device_side']['stages']:
        r['ms_per_batch_base_order'] = 2 * r['ms_per_batch']
        r['orders'] = {'at_b_ms': 0.5 * r['ms_per_batch']}
    (out / 'data_gpu.json').write_text(json.dumps(data))
    rc = subprocess.run([sys.executable, TOOLS, 'summary', '--out', str(out)], capture_output=True, text=True,
                        timeout=60)
    assert rc.returncode == 0, rc.stderr
    summary = (out / 'summary.md').read_text()
    assert 'not measured (step r50_graph rc=124 timed out)' in summary
    assert 'not measured (step deit_eager not run)' in summary
    assert '| MAE pre-training step per B: images/s (ratio to the base B; MAE compute model; (base/B)^2) | ' \
           'not measured (step mae_step rc=137 killed: time limit or memory) | mae_step |' in summary
    assert 'in progress or stopped' in summary
    for field in ('ms_per_batch_base_order', 'orders.at_b_ms'):
        assert f'| {field} |' in summary
        # a per-batch time: its share of the step, against the eager step as the captured one is missing
        assert f'{field} as a share of the eager resnet18 step' in summary
        assert f'GPU data path, device half: {field} (share of the eager resnet18 step)' in summary


def test_interpreter_without_a_package_or_cuda_stops_in_one_line(tmp_path):
    fake = tmp_path / 'fake'
    fake.mkdir()
    (fake / 'tensorboardX.py').write_text('raise ModuleNotFoundError("No module named \'tensorboardX\'")\n')
    base = dict(os.environ, OUT=str(tmp_path / 'out'), DATA=str(tmp_path), PYTHON=sys.executable)
    runs = {
        'package': dict(base, MODE='cpu-dry', PYTHONPATH=str(fake)),
        'interpreter': dict(base, MODE='cpu-dry', PYTHON=str(tmp_path / 'no-such-python')),
    }
    import torch
    if not torch.cuda.is_available():
        runs['cuda'] = dict(base, MODE='gpu')
    for what, env in runs.items():
        proc = subprocess.run(['bash', SUITE], env=env, capture_output=True, text=True, timeout=120)
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, (what, lines)
        assert {'package': 'lacks tensorboardX', 'interpreter': 'no-such-python',
                'cuda': 'lacks CUDA'}[what] in lines[0]
        if what == 'package':
            assert '.whl' in lines[0] and 'prepare_device.sh' in lines[0]
    assert not (tmp_path / 'out' / 'steps.tsv').read_text()  # nothing ran
