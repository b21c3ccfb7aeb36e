"""scripts/search_curriculum.py: the sequential schedule search, its ledger, its proxy runs and outputs."""
import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction

import pytest

import main as main_mod
from curriculum import build_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'search_curriculum.py')
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import search_curriculum as sc  # noqa: E402
from fault_inject import _descendants  # noqa: E402

# fake-objective searches: candidates whose costs (1/16, 1/4, 1) split a budget of 3 over 3
# segments into whole data epochs, so every proxy run's compute is exactly the budget
FAKE = ['--model', 'test_resnet', '--data_set', 'SYNTH', '--base_input_size', '128', '--device', 'cpu',
        '--segments', '3', '--candidates', '32,64,128', '--proxy_epochs', '3']

# per-segment penalties (top-1 points) of each B: the fake accuracy is 80 minus their sum
PENALTY = [{32: 0.2, 64: 0.1, 128: 0.0}, {32: 0.5, 64: 0.25, 128: 0.0}, {32: 2.0, 64: 0.1, 128: 0.0}]


def fake_accuracy(sizes):
    return 80.0 - sum(PENALTY[k][b] for k, b in enumerate(sizes))


class FakeRunner:
    """Stands in for main.py: reads the proxy run's curriculum file as main.py would, and writes
    a log.txt whose accuracy is a known function of each segment's B."""

    def __init__(self, objective=fake_accuracy, stop_at=None):
        self.objective, self.stop_at, self.runs = objective, stop_at, []

    def run(self, argv, log_path, timeout=None):
        if self.stop_at is not None and len(self.runs) == self.stop_at:
            raise KeyboardInterrupt
        args = main_mod.get_args_parser().parse_args(argv)
        plan = build_plan(args)
        k_total = 3
        sizes, start = [], Fraction(0)
        ends = []
        for s in plan.stages:
            start += s.epochs * Fraction(s.size, plan.base_size) ** 2
            ends.append((start, s.size))
        for k in range(k_total):
            mid = Fraction(args.epochs) * (2 * k + 1) / (2 * k_total)
            sizes.append(next(b for end, b in ends if mid < end))
        acc = self.objective(sizes)
        self.runs.append((tuple(sizes), plan.total_compute, plan))
        last = plan.stages[-1].size
        with open(os.path.join(args.output_dir, 'log.txt'), 'w') as f:
            f.write(json.dumps({'epoch': plan.num_epochs - 1, 'test_acc1': acc if last == plan.base_size else 0.0,
                                'input_size': last}) + '\n')
            if last != plan.base_size:
                f.write(json.dumps({'final_test_at_base': {'acc1': acc, 'input_size': plan.base_size}}) + '\n')
        return 0


def ledger(out):
    with open(os.path.join(out, sc.LEDGER)) as f:
        lines = [json.loads(line) for line in f]
    return lines[0], lines[1:]


def test_search_follows_the_rule_on_a_fake_objective(tmp_path):
    out = str(tmp_path / 'out')
    runner = FakeRunner()
    assert sc.main(FAKE + ['--output_dir', out], runner=runner) == 0
    # segment 1: 79.8 / 79.9 / 80 -> 32 is within 0.3 of the best; segment 2 (from 32): 79.3 /
    # 79.55 / 79.8 -> 64; segment 3 (from 64): 79.45 / 79.55 -> 64
    with open(os.path.join(out, sc.CURRICULUM)) as f:
        spec = json.load(f)
    assert [(s['size'], s['share']) for s in spec['stages']] == [(32, pytest.approx(1 / 3)), (64, pytest.approx(2 / 3))]
    _, records = ledger(out)
    # the try at 128 of segments 2 and 3 is the previous segment's chosen run: not made again
    assert [(r['segment'], r['candidate']) for r in records] == [(0, 32), (0, 64), (0, 128), (1, 32), (1, 64),
                                                                  (2, 64)]
    for r in records:
        assert r['compute'] == 3 and r['budget'] == 3  # as main.py's plan measures it
        # the segment being decided never goes below the previous segment's B
        sched = [b for b, _ in r['schedule']]
        assert sched == sorted(sched)
    for sizes, compute, _ in runner.runs:
        assert compute == 3
    # the run the search made is the one the ledger describes
    assert [tuple(b for b, _ in r['schedule']) for r in records] == [s for s, _, _ in runner.runs]
    assert os.path.getsize(os.path.join(out, sc.PLOT)) > 0
    # the curriculum file as main.py reads it: 1/3 of the compute at 32, 2/3 at 64
    args = main_mod.get_args_parser().parse_args(['--curriculum_file', os.path.join(out, sc.CURRICULUM),
                                                  '--base_input_size', '128', '--epochs', '30'])
    plan = build_plan(args)
    assert [(s.size, s.epochs) for s in plan.stages] == [(32, 160), (64, 80)]


def test_segment_choice_is_the_smallest_within_tolerance():
    tol = sc.Tolerance.parse('0.3')
    assert sc.choose([(32, 79.0), (48, 79.75), (64, 80.0)], tol) == 48
    assert sc.choose([(32, 79.7), (48, 80.0), (64, 79.9)], tol) == 32
    assert sc.choose([(32, 79.69), (64, 80.0)], sc.Tolerance.parse('0')) == 64
    # relative: within 1% of the best accuracy (0.8 points of 80)
    assert sc.choose([(32, 79.25), (64, 80.0)], sc.Tolerance.parse('1%')) == 32
    assert sc.choose([(32, 79.1), (64, 80.0)], sc.Tolerance.parse('1%')) == 64


def test_search_driver_against_an_objective_of_the_schedule():
    """search() alone: with magnitudes, each decision takes the smallest value within tolerance,
    tries never go below the previous segment's value, undecided segments hold the fill values."""
    cfg = sc.SearchConfig(4, (32, 48, 64), 64, 4, sc.Tolerance.parse('0.5'), (0, 5, 9))

    def objective(schedule):
        # smaller B costs more late in training; weaker augmentation costs more late
        return 90.0 - sum((k + 1) * (64 - b) / 32 + (k + 1) * (9 - m) / 9 * 0.4 for k, (b, m) in enumerate(schedule))

    seen = []

    def evaluate(k, kind, value, schedule):
        seen.append((k, kind, value, schedule))
        assert schedule[:k] == tuple(decided_so_far(seen, k))
        assert all(s == (64, 9) for s in schedule[k + 1:])
        return objective(schedule)

    def decided_so_far(calls, k):
        return [result_at(j) for j in range(k)]

    results = {}

    def result_at(j):
        return results[j]

    # replay the rule by hand, segment by segment, with the same objective
    expected, low_b, low_m = [], 32, 0
    for k in range(4):
        fill = [(64, 9)] * (4 - k - 1)
        sizes = [(b, objective(tuple(expected) + ((b, 9),) + tuple(fill))) for b in (32, 48, 64) if b >= low_b]
        best = max(a for _, a in sizes)
        b_k = min(b for b, a in sizes if a >= best - 0.5 - 1e-9)
        mags = [(m, objective(tuple(expected) + ((b_k, m),) + tuple(fill))) for m in (0, 5, 9) if m >= low_m]
        best = max(a for _, a in mags)
        m_k = min(m for m, a in mags if a >= best - 0.5 - 1e-9)
        expected.append((b_k, m_k))
        results[k] = (b_k, m_k)
        low_b, low_m = b_k, m_k
    schedule, segs = sc.search(cfg, evaluate)
    assert schedule == tuple(expected)
    for k, kind, value, sched in seen:
        if k:
            assert sched[k][0] >= schedule[k - 1][0] and sched[k][1] >= schedule[k - 1][1]
    assert [r.size for r in segs] == [b for b, _ in expected]


def test_allocation_hits_the_budget_as_the_plan_measures_it(tmp_path):
    # representable: 1/3 of 3 epochs at 32 (cost 1/16) is 16 data epochs
    for schedule in [((32, None),) * 3, ((32, None), (64, None), (128, None)), ((64, 3), (64, 6), (128, 9))]:
        alloc = sc.allocate(schedule, 3, 128)
        assert alloc.compute == 3
        path = tmp_path / 'p.json'
        path.write_text(json.dumps(sc.proxy_curriculum(schedule, alloc, 'lanczos', 'x')))
        args = main_mod.get_args_parser().parse_args(['--curriculum_file', str(path), '--base_input_size', '128',
                                                      '--epochs', '3'])
        plan = build_plan(args)
        assert [s.epochs for s in plan.stages] == [n for _, _, n in alloc.stages]
        assert plan.total_compute == 3
    # not representable in whole data epochs (48 at 64 costs 9/16): the nearest total, and the
    # file still gives exactly the data epochs the search counted
    schedule = ((48, None), (64, None), (64, None))
    alloc = sc.allocate(schedule, 2, 64)
    assert alloc.stages == ((48, None, 2), (64, None, 1)) and alloc.compute == Fraction(17, 8)
    path = tmp_path / 'q.json'
    path.write_text(json.dumps(sc.proxy_curriculum(schedule, alloc, 'lanczos', 'x')))
    args = main_mod.get_args_parser().parse_args(['--curriculum_file', str(path), '--base_input_size', '64',
                                                  '--epochs', '2'])
    assert [s.epochs for s in build_plan(args).stages] == [2, 1]
    # a larger budget splits finer: within 1% at the sizes of a real search
    for b in (96, 128, 160, 192):
        alloc = sc.allocate(((b, None),) * 2 + ((224, None),) * 3, 30, 224)
        assert abs(float(alloc.compute) - 30) / 30 < 0.01


def test_dry_run_lists_runs_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / 'out'
    assert sc.main(FAKE + ['--output_dir', str(out), '--dry_run', 'true'], runner=FakeRunner()) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    rows = [line for line in text.splitlines() if line.strip()[:1].isdigit() and 'size' in line]
    # segment 1 tries 3 sizes; later segments assume the smallest was picked: 3 + 2 + 2 new runs
    # at most (the try at 128 of a later segment is the previous segment's run); bound K x 3 = 9
    assert len(rows) == 7 and 'bound K x candidates is 9' in text
    assert all(line.rstrip().endswith('3.000') for line in rows)


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ')
    return err[0]


@pytest.mark.parametrize('extra, needle', [
    (['--candidates', '30,64'], '30 is not a multiple of 8'),
    (['--model', 'tiny_vit_p16', '--base_input_size', '64', '--candidates', '24,64'],
     '24 is not a multiple of the patch size 16 for --model tiny_vit_p16'),
    (['--candidates', '64,32'], 'ascending'),
    (['--segments', '5', '--candidates', '32,64', '--base_input_size', '64', '--proxy_epochs', '1'],
     'below the compute of the smallest schedule'),
    (['--tolerance', '-0.1'], 'below 0'),
    (['--epochs', '5'], '--epochs is set by the search'),
    (['--magnitudes', '0,5', '--aa', 'none'], 'RandAugment'),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, needle):
    import tiny_models  # noqa: F401  (registers tiny_vit_p16)
    out = tmp_path / 'out'
    assert sc.main(FAKE + extra + ['--output_dir', str(out)], runner=FakeRunner()) == 2
    assert needle in _error_line(capsys)
    assert not out.exists()


def test_changed_setting_is_refused_and_a_cut_line_is_dropped(tmp_path, capsys):
    out = str(tmp_path / 'out')
    assert sc.main(FAKE + ['--output_dir', out], runner=FakeRunner()) == 0
    with open(os.path.join(out, sc.LEDGER)) as f:
        before = f.read()
    assert sc.main(FAKE + ['--output_dir', out, '--tolerance', '0.5'], runner=FakeRunner()) == 2
    assert 'tolerance = "0.3"; this command has "0.5"' in _error_line(capsys)
    assert sc.main(FAKE + ['--output_dir', out, '--seed', '1'], runner=FakeRunner()) == 2
    assert 'main' in _error_line(capsys)
    with open(os.path.join(out, sc.LEDGER)) as f:
        assert f.read() == before
    # a run killed while writing its line: the line is dropped and only that run is made again
    with open(os.path.join(out, sc.LEDGER), 'w') as f:
        f.write(before[:-20])
    again = FakeRunner()
    assert sc.main(FAKE + ['--output_dir', out], runner=again) == 0
    assert len(again.runs) == 1
    with open(os.path.join(out, sc.LEDGER)) as f:
        assert f.read().count('\n') == before.count('\n')


TRAIN = ['--model', 'test_resnet', '--data_set', 'SYNTH', '--synth_classes', '4', '--synth_per_class', '8',
         '--synth_val_per_class', '4', '--synth_image_size', '64', '--base_input_size', '64', '--batch_size', '16',
         '--num_workers', '0', '--warmup_epochs', '0', '--print_freq', '1000', '--device', 'cpu']
TINY = TRAIN + ['--segments', '3', '--candidates', '32,48,64', '--proxy_epochs', '1']


class CountingRunner:
    """The in-process runner, counting runs; raises KeyboardInterrupt (a Ctrl-C) before run `stop_at`."""

    def __init__(self, stop_at=None):
        self.inner, self.stop_at, self.runs = sc.InProcessRunner(), stop_at, []

    def run(self, argv, log_path, timeout=None):
        if self.stop_at is not None and len(self.runs) == self.stop_at:
            raise KeyboardInterrupt
        self.runs.append(argv[argv.index('--output_dir') + 1])
        return self.inner.run(argv, log_path, timeout)


def test_real_tiny_search_resumes_and_its_curriculum_trains(tmp_path, one_intra_op_thread):
    out = str(tmp_path / 'out')
    first = CountingRunner(stop_at=2)
    assert sc.main(TINY + ['--output_dir', out, '--runner', 'inprocess'], runner=first) == 130
    _, records = ledger(out)
    assert len(records) == 2 and not os.path.exists(os.path.join(out, sc.CURRICULUM))
    again = CountingRunner()
    assert sc.main(TINY + ['--output_dir', out, '--runner', 'inprocess'], runner=again) == 0
    _, after = ledger(out)
    assert after[:2] == records  # finished runs kept, not made again
    assert not set(again.runs) & set(first.runs) and len(after) == 2 + len(again.runs)
    for r in after:
        assert 0.0 <= r['acc1'] <= 100.0 and r['seed'] == 0
        assert not [n for n in os.listdir(os.path.join(out, r['dir'])) if n.endswith('.pth')]
    assert os.path.getsize(os.path.join(out, sc.PLOT)) > 0
    # the result trains with main.py as it is
    run_dir = str(tmp_path / 'train')
    args = main_mod.get_args_parser().parse_args(
        TRAIN + ['--curriculum_file', os.path.join(out, sc.CURRICULUM), '--epochs', '3', '--output_dir', run_dir])
    main_mod.main(args)
    with open(os.path.join(run_dir, 'log.txt')) as f:
        assert [json.loads(line) for line in f][-1]


def _search_process(argv, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **(env_extra or {}))
    return subprocess.Popen([sys.executable, SCRIPT] + argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(predicate, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_ctrl_c_ends_the_proxy_run_and_keeps_the_ledger(tmp_path):
    """A real Ctrl-C (SIGINT to the search) while a proxy run trains: the run and every process
    below it end, the search says how to continue and exits 130."""
    out = str(tmp_path / 'out')
    proc = _search_process(TRAIN + ['--segments', '3', '--candidates', '32,64', '--proxy_epochs', '6',
                                    '--output_dir', out])
    log = os.path.join(out, 'trials', 'seg0-B32', 'run.log')
    try:
        assert _wait_for(lambda: os.path.exists(log) and 'Epoch: [' in open(log).read(), 120), \
            proc.stderr.read() if proc.poll() is not None else 'no training step within 120 s'
        below = _descendants(proc.pid)
        assert below
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130 and 'run the same command to continue' in err
    assert _wait_for(lambda: not [p for p in below if os.path.exists(f'/proc/{p}')], 10)
    ledger(out)  # intact


def test_trial_timeout_kills_the_run(tmp_path, capsys):
    out = str(tmp_path / 'out')
    assert sc.main(TINY + ['--output_dir', out, '--trial_timeout', '2']) == 1
    assert '--trial_timeout' in _error_line(capsys)
    ps = subprocess.run(['ps', '-eo', 'pid,args'], capture_output=True, text=True).stdout
    assert os.path.join(out, 'trials') not in ps


def test_ddp_command_and_subset(tmp_path):
    cmd = sc.SubprocessRunner(2).command(['--model', 'x'])
    assert cmd[:4] == [sys.executable, '-m', 'torch.distributed.run', '--standalone'] and \
        '--nproc_per_node=2' in cmd and cmd[-2:] == ['--model', 'x']
    assert sc.SubprocessRunner(1).command(['--model', 'x'])[:2] == [sys.executable, sc.MAIN]
    # a class/image subset of an image folder, as links
    for split in ('train', 'val'):
        for c in range(10):
            d = tmp_path / 'data' / split / f'c{c}'
            d.mkdir(parents=True)
            for i in range(5):
                (d / f'{i}.jpg').write_bytes(b'x')
    train, val = sc.build_subset(str(tmp_path / 'data' / 'train'), str(tmp_path / 'data' / 'val'),
                                 str(tmp_path / 'sub'), classes=4, train_per_class=2, val_per_class=3)
    assert sorted(os.listdir(train)) == ['c0', 'c2', 'c5', 'c7'] == sorted(os.listdir(val))
    assert sorted(os.listdir(os.path.join(train, 'c2'))) == ['0.jpg', '1.jpg']
    assert len(os.listdir(os.path.join(val, 'c7'))) == 3
    assert os.path.realpath(os.path.join(train, 'c2', '0.jpg')) == str(tmp_path / 'data' / 'train' / 'c2' / '0.jpg')
