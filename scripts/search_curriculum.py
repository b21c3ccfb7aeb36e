#!/usr/bin/env python3
"""Search a curriculum for a new model or dataset: B (and optionally m) per segment, by proxy runs.

    python scripts/search_curriculum.py --model resnet18 --data_set SYNTH --synth_classes 4 \\
        --synth_per_class 16 --synth_image_size 64 --base_input_size 64 --segments 3 \\
        --candidates 32,48,64 --proxy_epochs 2 --device cpu --output_dir OUT

EfficientTrain found its bandwidth schedule by a greedy search, stage by stage, and
EfficientTrain++ by a "computational-constrained sequential searching" of B and the
augmentation strength; the papers describe these searches only in words. This script is
this project's reading of that description:

1. The run is cut into --segments K segments of equal compute at the base size. Segment by
   segment, the search decides B: segments already decided keep their values, the segment
   being decided tries each of --candidates not below the previous segment's B, and the
   later segments are filled with the base size. With --magnitudes it then decides the
   segment's RandAugment magnitude the same way (B fixed, magnitudes not below the previous
   segment's, later segments at the largest magnitude).
2. Each try is one proxy run of main.py (--proxy_epochs equivalent epochs at the base size,
   same seed, on the data the flags name: SYNTH, or a class/image subset of an image folder
   with --proxy_classes / --proxy_train_per_class / --proxy_val_per_class). Its total compute
   is the budget, so a smaller B buys more data epochs (curriculum/plan.py's model: an image
   at B costs (B/base)^2 of one at the base size). Stages run whole data epochs, so the
   search picks the whole numbers whose total compute, as the plan measures it, is nearest
   the budget (exact whenever the sizes allow; the ledger records both).
3. The segment takes the smallest B (magnitude) whose proxy top-1 at the base size is within
   --tolerance of the best try of that segment.

Every proxy run is one line of OUTPUT_DIR/trials.jsonl; the same command continues a stopped
search without repeating finished runs (an interrupted run resumes from its checkpoint), and
a changed setting with an existing ledger is refused. The result is OUTPUT_DIR/curriculum.json
(main.py --curriculum_file), OUTPUT_DIR/search.png and a summary. At most K x candidates
proxy runs (plus K x (magnitudes - 1)); a try that rounds to a run already made is not made again.

Proxy runs are fresh `main.py` processes (--nproc_per_node N: torchrun, DDP), in sessions of
their own, ended with every process below them on every way out (Ctrl-C, SIGTERM,
--trial_timeout); --runner inprocess trains in this process instead (no interpreter start
per run: for tiny searches).
"""
import contextlib
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MAIN = os.path.join(ROOT, 'main.py')
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import main as train_main  # noqa: E402
import utils  # noqa: E402
from curriculum import PlanError, build_plan  # noqa: E402
from curriculum.adapt import check_input_size, input_size_grid, size_multiple  # noqa: E402
from curriculum.plan import split_rounded  # noqa: E402
from pipelines.datasets import IMG_EXTENSIONS  # noqa: E402
from runner.args import BOOL, ArgumentParser  # noqa: E402
from fault_inject import signal_run  # noqa: E402  (ends a run and every process below it)
from models import create_model  # noqa: E402
from utils import UserError  # noqa: E402

LEDGER = 'trials.jsonl'
CURRICULUM = 'curriculum.json'
PLOT = 'search.png'
TRIALS_DIR = 'trials'
SUBSET_DIR = 'proxy_data'
LEDGER_VERSION = 1
# Candidates of resolution-agnostic models lie on this grid (even, as the Fourier crop needs);
# models with a patch or window grid use theirs (curriculum.adapt.input_size_grid).
AGNOSTIC_STEP = 8
# A proxy run's compute may differ from the budget by whole data epochs; beyond this
# fraction the progress line says so.
COMPUTE_WARN = 0.05
# Seconds a stopped proxy run gets to save its recovery checkpoint before it is killed.
STOP_GRACE_S = 20.0
# main.py flags the search sets itself for every proxy run.
RESERVED = {'--curriculum', '--curriculum_file', '--epochs', '--output_dir', '--resume', '--eval',
            '--disable_eval', '--auto_resume', '--start_epoch'}
# main.py flags that change neither what a proxy run computes nor its result: a ledger may
# be continued with other values.
INERT = {'num_workers', 'print_freq', 'pin_mem', 'log_dir', 'dist_timeout', 'save_ckpt', 'save_ckpt_num',
         'save_ckpt_freq', 'save_ckpt_steps'}
MATPLOTLIB_MISSING = ('search.png needs matplotlib: pip install matplotlib (curriculum.json and trials.jsonl '
                      'are written)')


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the search stops after the ledger is written."""

    def __init__(self, exit_code):
        super().__init__(f'signal {exit_code - 128}')
        self.exit_code = exit_code


class TrialFailed(Exception):
    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------

def get_args_parser():
    p = ArgumentParser(
        prog='search_curriculum.py', usage='%(prog)s --candidates B,B,... --proxy_epochs E --output_dir DIR '
                                           '[--flag value ...] [main.py flags]',
        description=__doc__.split('\n\n')[0],
        epilog='Every other flag is main.py\'s (--model, --data_set, --base_input_size, --device, --batch_size, '
               '--seed, ...: see python main.py --help) and goes to each proxy run, except the ones the search '
               'sets: ' + ', '.join(sorted(RESERVED)) + '.')
    g = p.add_argument_group('search')
    g.add_argument('--candidates', required=True, type=str,
                   help='B values to try, ascending, comma-separated, multiples of 8 (or of the model\'s patch/window '
                        'grid); --base_input_size is added when missing')
    g.add_argument('--segments', default=5, type=int,
                   help='K: segments of equal compute (5 for proxy searches; the released ET++ schedules have 10)')
    g.add_argument('--proxy_epochs', required=True, type=int,
                   help='compute of every proxy run, in equivalent epochs at --base_input_size (main.py --epochs)')
    g.add_argument('--tolerance', default='0.3', type=str,
                   help='a segment takes the smallest B within this many top-1 points of its best try, or, as N%%, '
                        'within N percent of the best try\'s accuracy')
    g.add_argument('--magnitudes', default='', type=str,
                   help='RandAugment magnitudes to search per segment after B, ascending (e.g. 0,3,6,9); empty: '
                        'not searched, --aa applies throughout')
    g.add_argument('--output_dir', required=True, type=str,
                   help=f'holds {LEDGER}, {CURRICULUM}, {PLOT} and the proxy runs ({TRIALS_DIR}/)')
    g.add_argument('--dry_run', default=False, **BOOL,
                   help='list the proxy runs the search would make and their compute; run and write nothing')
    g.add_argument('--runner', default='subprocess', choices=['subprocess', 'inprocess'],
                   help='subprocess: each proxy run is a fresh main.py process (torchrun with --nproc_per_node > 1); '
                        'inprocess: trained in this process (single process only)')
    g.add_argument('--nproc_per_node', default=1, type=int, help='processes (GPUs) per proxy run: DDP via torchrun')
    g.add_argument('--trial_timeout', default=None, type=float,
                   help='seconds one proxy run may take; then it is killed with all its processes and the search stops')
    g.add_argument('--keep_checkpoints', default=False, **BOOL,
                   help='keep each finished proxy run\'s checkpoints (default: only its log.txt, config and output)')
    g.add_argument('--proxy_classes', default=0, type=int,
                   help='image folder data (IMNET, image_folder): proxy runs use this many classes, evenly spaced '
                        'in sorted order (0: all)')
    g.add_argument('--proxy_train_per_class', default=0, type=int,
                   help='with an image folder: training images per class in proxy runs, the first in sorted order '
                        '(0: all)')
    g.add_argument('--proxy_val_per_class', default=0, type=int,
                   help='with an image folder: validation images per class in proxy runs (0: all)')
    return p


@dataclass(frozen=True)
class Tolerance:
    value: float
    relative: bool
    text: str

    @classmethod
    def parse(cls, text):
        t = text.strip()
        relative = t.endswith('%')
        try:
            value = float(t[:-1] if relative else t)
        except ValueError:
            raise UserError(f'--tolerance {text}: give top-1 points (e.g. 0.3) or a percentage of the best '
                            f'accuracy (e.g. 1%)') from None
        if not math.isfinite(value):
            raise UserError(f'--tolerance {text} is not a finite number: give e.g. 0.3 or 1%')
        if value < 0:
            raise UserError(f'--tolerance {text} is below 0: give 0 (only the best) or more, e.g. 0.3 or 1%')
        return cls(value, relative, t)

    def points(self, best):
        return best * self.value / 100.0 if self.relative else self.value


@dataclass(frozen=True)
class SearchConfig:
    segments: int
    candidates: Tuple[int, ...]  # ascending, the base size last
    base: int
    budget: int  # equivalent epochs at the base size
    tolerance: Tolerance
    magnitudes: Tuple[int, ...] = ()  # ascending; empty: not searched

    @property
    def fill_size(self):
        return self.base

    @property
    def fill_magnitude(self):
        return self.magnitudes[-1] if self.magnitudes else None


def _int_list(text, flag):
    try:
        values = [int(v) for v in text.split(',') if v.strip()]
    except ValueError:
        raise UserError(f'{flag} {text}: give integers separated by commas, e.g. 96,128,160') from None
    if len(set(values)) != len(values) or values != sorted(values):
        fixed = ','.join(map(str, sorted(set(values))))
        raise UserError(f'{flag} {text}: give distinct values in ascending order, e.g. {fixed}')
    return values


def candidate_sizes(text, base, model, model_name):
    """--candidates checked against the model's size grid, with the base size added when missing."""
    sizes = _int_list(text, '--candidates')
    if not sizes:
        raise UserError('--candidates is empty: give the B values to try, e.g. 96,128,160,192,224')
    k, what = input_size_grid(model)
    step, grid = (AGNOSTIC_STEP, f'a multiple of {AGNOSTIC_STEP}') if k == 1 else (k, what)
    for b in sizes:
        if b % step:
            below = max(step, b // step * step)
            raise UserError(f'--candidates: {b} is not {grid} for --model {model_name}: use e.g. '
                            f'{below} or {below + step}')
        if b > base:
            raise UserError(f'--candidates: {b} exceeds --base_input_size {base}: candidates lie at or below the '
                            f'base size')
        try:
            check_input_size(model, b)
        except ValueError as e:
            raise UserError(f'--candidates: {e}') from None
    added = sizes[-1] != base
    return tuple(sizes + [base] if added else sizes), added


def magnitude_list(text, aa):
    mags = _int_list(text, '--magnitudes')
    if mags and (mags[0] < 0 or mags[-1] > 30):
        raise UserError(f'--magnitudes {text}: RandAugment magnitudes run 0..30')
    if mags and not (aa or '').startswith('rand'):
        raise UserError(f'--magnitudes sets the RandAugment magnitude but --aa is {aa}: use a RandAugment policy '
                        f'such as rand-m9-mstd0.5-inc1, or drop --magnitudes')
    return tuple(mags)


def check_budget(cfg):
    """Every segment needs at least one data epoch at the smallest candidate."""
    smallest = cfg.segments * Fraction(cfg.candidates[0], cfg.base) ** 2
    if cfg.budget < smallest:
        need = math.ceil(smallest)
        raise UserError(f'--proxy_epochs {cfg.budget} is below the compute of the smallest schedule ({cfg.segments} '
                        f'segments of one data epoch at B={cfg.candidates[0]}: {float(smallest):.3g} equivalent '
                        f'epochs at {cfg.base}): use --proxy_epochs {need} or more, or fewer --segments')


# ---------------------------------------------------------------------------
# compute: whole data epochs per stage, total as the plan measures it
# ---------------------------------------------------------------------------

Schedule = Tuple[Tuple[int, Optional[int]], ...]  # (B, m) per segment


def stage_runs(schedule):
    """Consecutive segments with the same (B, m) as one stage: [(B, m, segments), ...]."""
    runs = []
    for b, m in schedule:
        if runs and runs[-1][0] == b and runs[-1][1] == m:
            runs[-1][2] += 1
        else:
            runs.append([b, m, 1])
    return [tuple(r) for r in runs]


@dataclass(frozen=True)
class Allocation:
    stages: Tuple[Tuple[int, Optional[int], int], ...]  # (B, m, data epochs)
    compute: Fraction  # equivalent epochs at the base size
    shares: Tuple[float, ...]  # the proxy curriculum file's shares, for main.py --epochs budget


# Partial allocations kept per stage (the nearest the stage's target boundary first).
_MAX_STATES = 4096


@functools.lru_cache(maxsize=4096)
def allocate(schedule, budget, base):
    """Whole data epochs per stage: total compute nearest the budget (under it on a tie), then
    stage boundaries nearest the equal-compute segment boundaries.

    An image at B costs (B/base)^2 (curriculum/plan.py), so a stage of n data epochs at B
    costs n (B/base)^2 equivalent epochs. Each stage ends within a data epoch or two of
    its exact boundary; the last one closes the budget.
    """
    runs = stage_runs(schedule)
    k_total = len(schedule)
    budget = Fraction(budget)
    costs = [Fraction(b, base) ** 2 for b, _, _ in runs]
    bounds, acc = [], 0
    for _, _, n in runs:
        acc += n
        bounds.append(budget * acc / k_total)
    states = {Fraction(0): (Fraction(0), ())}  # compute so far -> (boundary deviations, epochs)
    for j, (c, target) in enumerate(zip(costs, bounds)):
        last = j == len(runs) - 1
        grown = {}
        for done, (dev, ns) in states.items():
            f = (target - done) / c
            lo, hi = math.floor(f), math.ceil(f)
            if not last:
                lo, hi = lo - 1, hi + 1
            for n in range(max(1, lo), max(1, hi) + 1):
                reached = done + n * c
                d = dev + (0 if last else abs(reached - target))
                if reached not in grown or (d, ns + (n,)) < grown[reached]:
                    grown[reached] = (d, ns + (n,))
        if len(grown) > _MAX_STATES:
            grown = dict(sorted(grown.items(), key=lambda kv: (abs(kv[0] - target), kv[1]))[:_MAX_STATES])
        states = grown
    ranked = sorted(states.items(), key=lambda kv: (abs(kv[0] - budget), kv[0] > budget, kv[1]))
    for total, (_, ns) in ranked:
        shares = _shares_for(ns, costs, budget)
        if shares is not None:
            return Allocation(tuple((b, m, n) for (b, m, _), n in zip(runs, ns)), total, shares)
    # none of them can be written as a curriculum file (rare: a small budget, stages below the
    # base size): the equal-compute shares, rounded as the plan rounds them
    shares = tuple(n / k_total for _, _, n in runs)
    ns = split_rounded([s * float(budget) / float(c) for s, c in zip(shares, costs)])
    if min(ns) < 1:
        raise UserError(f'--proxy_epochs {budget} leaves a stage of {runs} without a data epoch: raise --proxy_epochs')
    return Allocation(tuple((b, m, n) for (b, m, _), n in zip(runs, ns)),
                      sum(n * c for n, c in zip(ns, costs)), shares)


def _shares_for(ns, costs, epochs):
    """Shares that make curriculum/presets.load_plan_file give exactly `ns` data epochs at --epochs `epochs`.

    load_plan_file takes share x epochs / cost data epochs per stage and rounds the running
    sums (plan.split_rounded). Shares must add up to 1, while the stages' compute sum C may
    differ from the budget: the difference is spread as offsets D_j (|D_j| < 0.5 epochs) of
    the running sums, which rounding then removes. None when no such offsets exist.
    """
    total = sum(n * c for n, c in zip(ns, costs))
    rest = Fraction(epochs) - total
    last = len(ns) - 1
    # moving running sum j by D_j changes compute by D_j (c_j - c_{j+1}), the last by D_J c_J
    weights = [costs[j] - costs[j + 1] for j in range(last)] + [costs[last]]
    limit = Fraction(49, 100)
    offsets = [Fraction(0)] * len(ns)
    for j in [last] + list(range(last - 1, -1, -1)):
        if rest == 0:
            break
        if weights[j]:
            offsets[j] = max(-limit, min(limit, rest / weights[j]))
            rest -= offsets[j] * weights[j]
    if rest != 0:
        return None
    shares = []
    for j, (n, c) in enumerate(zip(ns, costs)):
        x = n + offsets[j] - (offsets[j - 1] if j else 0)
        shares.append(float(x * c / epochs))
    if split_rounded([s * epochs / float(c) for s, c in zip(shares, costs)]) != list(ns):
        return None
    return tuple(shares)


def proxy_curriculum(schedule, alloc, lowfreq, name):
    """The proxy run's --curriculum_file content."""
    return {'name': name, 'progress': 'compute', 'lowfreq': lowfreq,
            'stages': [_stage_entry(b, m, share) for (b, m, _), share in zip(alloc.stages, alloc.shares)]}


def final_curriculum(schedule, lowfreq, name):
    """The searched curriculum: each stage's share is its number of segments / K."""
    k_total = len(schedule)
    return {'name': name, 'progress': 'compute', 'lowfreq': lowfreq,
            'stages': [_stage_entry(b, m, n / k_total) for b, m, n in stage_runs(schedule)]}


def _stage_entry(b, m, share):
    entry = {'share': share, 'size': b}
    if m is not None:
        entry['magnitude'] = m
    return entry


def data_passes_per_compute(schedule, base):
    """Data epochs per equivalent epoch: the theoretical speedup over a base-size run of as many data epochs."""
    return sum(Fraction(base, b) ** 2 for b, _ in schedule) / len(schedule)


# ---------------------------------------------------------------------------
# the search (pure: `evaluate` runs or looks up a proxy run)
# ---------------------------------------------------------------------------

@dataclass
class SegmentResult:
    segment: int
    sizes: List[Tuple[int, Optional[float]]] = field(default_factory=list)  # (B, top-1)
    size: Optional[int] = None
    magnitudes: List[Tuple[int, Optional[float]]] = field(default_factory=list)
    magnitude: Optional[int] = None


def choose(tried, tolerance):
    """The smallest value whose accuracy is within tolerance of the best; with an unknown
    accuracy (a dry run) the smallest value, the path that makes the most proxy runs."""
    if any(acc is None for _, acc in tried):
        return min(v for v, _ in tried)
    best = max(acc for _, acc in tried)
    # a hair of slack so that a try exactly at the threshold counts despite float rounding
    floor = best - tolerance.points(best) - 1e-9
    return min(v for v, acc in tried if acc >= floor)


def schedule_with(decided, value, cfg, magnitude=None):
    k = len(decided)
    m = cfg.fill_magnitude if magnitude is None else magnitude
    return tuple(decided) + ((value, m),) + ((cfg.fill_size, cfg.fill_magnitude),) * (cfg.segments - k - 1)


def search(cfg, evaluate: Callable[[int, str, int, Schedule], Optional[float]]):
    """Decide (B, m) segment by segment; returns (the schedule, [SegmentResult])."""
    decided, results = [], []
    for k in range(cfg.segments):
        res = SegmentResult(k)
        low = decided[-1][0] if decided else cfg.candidates[0]
        for b in (c for c in cfg.candidates if c >= low):
            res.sizes.append((b, evaluate(k, 'size', b, schedule_with(decided, b, cfg))))
        res.size = choose(res.sizes, cfg.tolerance)
        res.magnitude = cfg.fill_magnitude
        if cfg.magnitudes:
            # the size try at the fill magnitude is the try of that magnitude
            res.magnitudes.append((cfg.fill_magnitude, dict(res.sizes)[res.size]))
            low_m = decided[-1][1] if decided else cfg.magnitudes[0]
            for m in (v for v in cfg.magnitudes if low_m <= v < cfg.fill_magnitude):
                res.magnitudes.append((m, evaluate(k, 'magnitude', m, schedule_with(decided, res.size, cfg, m))))
            res.magnitudes.sort()
            res.magnitude = choose(res.magnitudes, cfg.tolerance)
        decided.append((res.size, res.magnitude))
        results.append(res)
    return tuple(decided), results


def remaining_runs(cfg, known):
    """How many proxy runs are still to come at most, given those already run ({stages: top-1})."""
    seen = set()

    def count(k, kind, value, schedule):
        stages = allocate(schedule, cfg.budget, cfg.base).stages
        if stages in known:
            return known[stages]
        seen.add(stages)
        return None

    search(cfg, count)
    return len(seen)


# ---------------------------------------------------------------------------
# the ledger: trials.jsonl
# ---------------------------------------------------------------------------

def schedule_key(schedule):
    return [[b, m] for b, m in schedule]


def stages_from(key):
    return tuple((int(b), None if m is None else int(m), int(n)) for b, m, n in key)


class Ledger:
    """trials.jsonl: a header with the search's settings, then one line per finished proxy run."""

    def __init__(self, path, settings, writable=True):
        self.path, self.settings, self.writable = path, settings, writable
        self.records = []
        if os.path.exists(path):
            self._load()
        elif writable:
            utils.atomic_write_text(path, json.dumps({'search': settings, 'version': LEDGER_VERSION}) + '\n')

    def _load(self):
        with open(self.path, encoding='utf-8') as f:
            lines = f.read().split('\n')
        kept, dropped = [], False
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                # a line cut by a kill is the last one; its run is simply made again
                if i < len(lines) - 2:
                    raise UserError(f'{self.path}: line {i + 1} is not JSON: repair or remove the file') from None
                dropped = True
                continue
            kept.append(rec)
        if not kept or 'search' not in kept[0]:
            raise UserError(f'{self.path} has no search header: it is not a ledger of this script; '
                            f'use another --output_dir')
        old = kept[0]['search']
        for key in sorted(set(old) | set(self.settings)):
            if old.get(key) != self.settings.get(key):
                raise UserError(f'{self.path} was written by a search with {key} = {_shown(old.get(key))}; this '
                                f'command has {_shown(self.settings.get(key))}: rerun with the same settings, '
                                f'or use another --output_dir')
        self.records = kept[1:]
        if dropped and self.writable:
            utils.atomic_write_text(self.path, ''.join(json.dumps(r) + '\n' for r in kept))

    def find(self, stages):
        """The record of the proxy run with these stages (B, m, data epochs): two schedules whose
        segments round to the same whole data epochs are one run."""
        return next((r for r in self.records if stages_from(r['stages']) == tuple(stages)), None)

    def known(self):
        return {stages_from(r['stages']): r['acc1'] for r in self.records}

    def append(self, record):
        self.records.append(record)
        with open(self.path, 'a', encoding='utf-8') as f:
            f.write(json.dumps(record) + '\n')
            f.flush()
            os.fsync(f.fileno())


def _shown(value):
    return 'unset' if value is None else json.dumps(value)


# ---------------------------------------------------------------------------
# proxy runs
# ---------------------------------------------------------------------------

class SubprocessRunner:
    """main.py in a fresh process (torchrun for DDP), in a session of its own."""

    def __init__(self, nproc=1):
        self.nproc = nproc

    def command(self, argv):
        if self.nproc > 1:
            # --standalone: torchrun picks a free rendezvous port on this node
            return [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                    f'--nproc_per_node={self.nproc}', MAIN] + list(argv)
        return [sys.executable, MAIN] + list(argv)

    def run(self, argv, log_path, timeout=None):
        cmd = self.command(argv)
        env = dict(os.environ, PYTHONUNBUFFERED='1')
        with open(log_path, 'a', encoding='utf-8') as log:
            log.write(' '.join(cmd) + '\n')
            log.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                try:
                    return proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    signal_run(proc, signal.SIGKILL)
                    proc.wait()
                    raise TrialFailed(f'still running after {timeout:g} s (--trial_timeout): killed with all its '
                                      f'processes') from None
                except (KeyboardInterrupt, Interrupted):
                    _stop(proc)
                    raise
            finally:
                if proc.returncode is None:
                    signal_run(proc, signal.SIGKILL)
                    proc.wait()


def _stop(proc):
    """SIGTERM to the run (main.py saves a recovery checkpoint; torchrun passes it to its workers),
    then, after STOP_GRACE_S or a second Ctrl-C, SIGKILL to it and every process below it."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=STOP_GRACE_S)
    except (subprocess.TimeoutExpired, KeyboardInterrupt, Interrupted):
        pass
    finally:
        if proc.returncode is None:
            signal_run(proc, signal.SIGKILL)
            proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # loader workers left in the run's process group
        except (ProcessLookupError, PermissionError):
            pass


class InProcessRunner:
    """main.main in this process: no interpreter start per run."""

    def run(self, argv, log_path, timeout=None):
        from engine import TrainingDiverged
        args = train_main.get_args_parser().parse_args(list(argv))
        with open(log_path, 'a', encoding='utf-8') as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            try:
                train_main.main(args)
            except UserError as e:
                print(f'error: {e}')
                return 2
            except TrainingDiverged as e:
                print(f'error: {e}')
                return 3
            except utils.TrainingInterrupted as e:
                print(str(e))
                raise Interrupted(e.exit_code) from None
            except (KeyboardInterrupt, Interrupted):  # before main.py's own handlers were installed
                raise
            except Exception:  # noqa: BLE001 - reported with the run's log
                traceback.print_exc()
                return 1
        return 0


def read_accuracy(trial_dir, base):
    """Top-1 at the base size: the final test of a plan that ends below it, else the last epoch's."""
    path = os.path.join(trial_dir, 'log.txt')
    try:
        with open(path, encoding='utf-8') as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise TrialFailed(f'{path} cannot be read ({e})') from None
    final = [r['final_test_at_base'] for r in records if 'final_test_at_base' in r]
    if final:
        return float(final[-1]['acc1'])
    epochs = [r for r in records if 'epoch' in r and 'test_acc1' in r]
    if not epochs or epochs[-1].get('input_size') != base:
        raise TrialFailed(f'{path} holds no test accuracy at the base size {base}')
    return float(epochs[-1]['test_acc1'])


def remove_checkpoints(trial_dir):
    for name in os.listdir(trial_dir):
        if name.endswith('.pth'):
            os.remove(os.path.join(trial_dir, name))


def _tail(path, n=15):
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            return ''.join(f.readlines()[-n:])
    except OSError:
        return ''


# ---------------------------------------------------------------------------
# a class/image subset of an image folder
# ---------------------------------------------------------------------------

def _images(folder):
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(IMG_EXTENSIONS))


def build_subset(train_root, val_root, dest, classes=0, train_per_class=0, val_per_class=0):
    """dest/train and dest/val: links to a class/image subset (classes evenly spaced in sorted
    order, the first images of each); made in a temporary folder, then renamed."""
    if os.path.isdir(dest):
        return os.path.join(dest, 'train'), os.path.join(dest, 'val')
    for root, what in ((train_root, 'training'), (val_root, 'validation')):
        if not root or not os.path.isdir(root):
            raise UserError(f'the {what} folder {root} is not a directory: check --data_path/--eval_data_path')
    names = sorted(d for d in os.listdir(train_root) if os.path.isdir(os.path.join(train_root, d)))
    if classes:
        if classes > len(names):
            raise UserError(f'--proxy_classes {classes}: {train_root} has only {len(names)} classes')
        names = [names[(i * len(names)) // classes] for i in range(classes)]
    tmp = dest + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    for split, root, per in (('train', train_root, train_per_class), ('val', val_root, val_per_class)):
        for name in names:
            src = os.path.join(root, name)
            if not os.path.isdir(src):
                raise UserError(f'class {name} is in {train_root} but not in {root}: both must hold the same classes')
            files = _images(src)
            files = files[:per] if per else files
            os.makedirs(os.path.join(tmp, split, name))
            for f in files:
                os.symlink(os.path.abspath(os.path.join(src, f)), os.path.join(tmp, split, name, f))
    os.replace(tmp, dest)
    return os.path.join(dest, 'train'), os.path.join(dest, 'val')


def data_roots(args):
    if args.data_set == 'IMNET':
        if not args.data_path:
            raise UserError('--data_set IMNET needs --data_path holding train/ and val/')
        return os.path.join(args.data_path, 'train'), args.eval_data_path or os.path.join(args.data_path, 'val')
    return args.data_path, args.eval_data_path


def without_flags(argv, names):
    """argv less the given flags and their values (`--x v` and `--x=v`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif not any(a.startswith(n + '=') for n in names):
            out.append(a)
    return out


# ---------------------------------------------------------------------------
# the whole search: settings, proxy runs, outputs
# ---------------------------------------------------------------------------

def _duration(seconds):
    seconds = int(round(seconds))
    return f'{seconds // 3600}h{seconds // 60 % 60:02d}m' if seconds >= 3600 else \
        f'{seconds // 60}m{seconds % 60:02d}s' if seconds >= 60 else f'{seconds}s'


def _sizes_text(schedule):
    return ' '.join(str(b) if m is None else f'{b}/m{m}' for b, m in schedule)


def _stages_text(alloc):
    return ', '.join(f'{b}{"" if m is None else f"/m{m}"} x {n}' for b, m, n in alloc.stages)


def _compute_note(compute, budget):
    dev = (float(compute) - budget) / budget
    return '' if abs(dev) < 1e-12 else f' ({100 * dev:+.1f}% vs the budget: whole data epochs)'


class SearchRun:
    """Proxy runs for the search: ledger lookups, runs, progress lines."""

    def __init__(self, cfg, own, main_argv, main_args, model, ledger, runner, dry):
        self.cfg, self.own, self.main_argv, self.main_args = cfg, own, main_argv, main_args
        self.model, self.ledger, self.runner, self.dry = model, ledger, runner, dry
        self.out = own.output_dir
        self.lowfreq = main_args.lowfreq if main_args.lowfreq != 'auto' else 'lanczos'
        self.listed, self.walls, self.started = [], [], time.time()
        self.segment_best = {}

    # the plan main.py will build for a proxy run, and its compute
    def plan_for(self, path):
        args = train_main.get_args_parser().parse_args(
            self.main_argv + ['--curriculum_file', path, '--epochs', str(self.cfg.budget)])
        try:
            return build_plan(args, size_multiple(self.model))
        except PlanError as e:
            raise UserError(str(e)) from None

    def evaluate(self, k, kind, value, schedule):
        alloc = allocate(schedule, self.cfg.budget, self.cfg.base)
        rec = self.ledger.find(alloc.stages)
        if rec is not None:
            self._best(k, value, rec['acc1'])
            return rec['acc1']
        if any(a.stages == alloc.stages for _, a in self.listed):
            return None  # a dry run lists a run once
        if self.dry:
            self.listed.append((schedule, alloc))
            note = _compute_note(alloc.compute, self.cfg.budget)
            print(f'{len(self.listed):>5} {k:>7} {kind:>9} {value:>5}  {_sizes_text(schedule):<28} '
                  f'{_stages_text(alloc):<30} {float(alloc.compute):.3f}{note}')
            return None
        return self._run(k, kind, value, schedule, alloc)

    def _run(self, k, kind, value, schedule, alloc):
        name = f'seg{k}-B{schedule[k][0]}' + (f'-m{value}' if kind == 'magnitude' else '')
        trial_dir = os.path.join(self.out, TRIALS_DIR, name)
        os.makedirs(trial_dir, exist_ok=True)
        spec_path = os.path.join(trial_dir, 'proxy_curriculum.json')
        spec = proxy_curriculum(schedule, alloc, self.lowfreq, f'proxy {name}')
        utils.atomic_write_text(spec_path, json.dumps(spec, indent=1) + '\n')
        plan = self.plan_for(spec_path)
        got = tuple(s.epochs for s in plan.stages)
        if got != tuple(n for _, _, n in alloc.stages):
            raise UserError(f'{spec_path}: the plan has data epochs {got}, the search expected '
                            f'{[n for _, _, n in alloc.stages]}: report this as a bug')
        argv = self.main_argv + ['--curriculum_file', spec_path, '--epochs', str(self.cfg.budget),
                                 '--output_dir', trial_dir]
        log = os.path.join(trial_dir, 'run.log')
        start = time.time()
        try:
            code = self.runner.run(argv, log, self.own.trial_timeout)
        except TrialFailed as e:
            raise TrialFailed(f'proxy run {name} {e}; its output: {log}') from None
        wall = time.time() - start
        if code != 0:
            raise TrialFailed(f'proxy run {name} failed (exit {code}); its output, {log}, ends:\n{_tail(log)}',
                              2 if code == 2 else 1)
        acc = read_accuracy(trial_dir, self.cfg.base)
        record = {'trial': len(self.ledger.records), 'segment': k, 'kind': kind, 'candidate': value,
                  'schedule': schedule_key(schedule), 'stages': [list(s) for s in alloc.stages],
                  'acc1': acc, 'compute': plan.total_compute, 'budget': self.cfg.budget,
                  'data_epochs': plan.num_epochs, 'wall_s': round(wall, 3), 'seed': self.main_args.seed,
                  'dir': os.path.relpath(trial_dir, self.out)}
        self.ledger.append(record)
        if not self.own.keep_checkpoints:
            remove_checkpoints(trial_dir)
        self.walls.append(wall)
        self._best(k, value, acc)
        self._progress(record, alloc)
        return acc

    def _best(self, k, value, acc):
        if acc is not None and (k not in self.segment_best or acc > self.segment_best[k][1]):
            self.segment_best[k] = (value, acc)

    def _progress(self, rec, alloc):
        left = remaining_runs(self.cfg, self.ledger.known())
        eta = f'ETA {_duration(left * sum(self.walls) / len(self.walls))} ({left} more run{"s" if left > 1 else ""} ' \
            f'at most)' if left else 'last run'
        best_v, best_acc = self.segment_best[rec['segment']]
        what = 'B' if rec['kind'] == 'size' else 'm'
        print(f'[run {len(self.ledger.records)}] segment {rec["segment"] + 1}/{self.cfg.segments}, '
              f'{what}={rec["candidate"]}: top-1 {rec["acc1"]:.2f}% | segment best {best_acc:.2f}% ({what}={best_v}) | '
              f'compute {rec["compute"]:.3f}/{self.cfg.budget}{_compute_note(alloc.compute, self.cfg.budget)} | '
              f'{_duration(rec["wall_s"])} | elapsed {_duration(time.time() - self.started)} | {eta}', flush=True)


def settings_of(own, cfg, main_args):
    """What a ledger's proxy runs depend on: the search's settings and main.py's non-default flags."""
    defaults = vars(utils.plain_args(train_main.get_args_parser().parse_args([])))
    given = vars(utils.plain_args(main_args))
    main_settings = {k: v for k, v in sorted(given.items()) if k not in INERT and v != defaults.get(k)}
    return {'segments': cfg.segments, 'candidates': list(cfg.candidates), 'magnitudes': list(cfg.magnitudes),
            'proxy_epochs': cfg.budget, 'tolerance': cfg.tolerance.text, 'nproc_per_node': own.nproc_per_node,
            'proxy_classes': own.proxy_classes, 'proxy_train_per_class': own.proxy_train_per_class,
            'proxy_val_per_class': own.proxy_val_per_class, 'main': main_settings}


def parse(argv):
    own, rest = get_args_parser().parse_known_args(argv)
    for a in rest:
        name = a.split('=', 1)[0]
        if name in RESERVED:
            raise UserError(f'{name} is set by the search for each proxy run: drop it (the budget is --proxy_epochs, '
                            f'the output --output_dir)')
    main_args = train_main.get_args_parser(prog='search_curriculum.py').parse_args(rest)
    if own.segments < 1:
        raise UserError(f'--segments must be >= 1, got {own.segments}')
    if own.proxy_epochs < 1:
        raise UserError(f'--proxy_epochs must be >= 1, got {own.proxy_epochs}')
    if own.nproc_per_node < 1:
        raise UserError(f'--nproc_per_node must be >= 1, got {own.nproc_per_node}')
    if own.runner == 'inprocess' and (own.nproc_per_node > 1 or own.trial_timeout):
        raise UserError('--runner inprocess trains in this one process: drop --nproc_per_node / --trial_timeout, '
                        'or use --runner subprocess')
    if own.trial_timeout is not None and own.trial_timeout <= 0:
        raise UserError(f'--trial_timeout must be > 0 seconds, got {own.trial_timeout:g}')
    if min(own.proxy_classes, own.proxy_train_per_class, own.proxy_val_per_class) < 0:
        raise UserError('--proxy_classes, --proxy_train_per_class and --proxy_val_per_class must be >= 0 (0: all)')
    subset = own.proxy_classes or own.proxy_train_per_class or own.proxy_val_per_class
    if subset and main_args.data_set not in ('IMNET', 'image_folder'):
        raise UserError(f'--proxy_classes/--proxy_*_per_class pick a subset of an image folder; --data_set '
                        f'{main_args.data_set} has none (SYNTH: use --synth_classes/--synth_per_class)')
    if subset and main_args.image_store:
        raise UserError('--image_store holds copies of the whole folder, not of the proxy subset: drop --image_store '
                        'or the --proxy_* subset flags')
    return own, rest, main_args


def build_model(main_args):
    try:
        # only the size grid is needed: on the meta device even a large model allocates nothing
        with torch.device('meta'):
            return create_model(main_args.model, num_classes=main_args.nb_classes or 1000)
    except (ValueError, RuntimeError) as e:
        raise UserError(f'--model {main_args.model}: {e}') from None


def run(argv=None, runner=None):
    """The search; `runner` (an object with run(argv, log_path, timeout) -> exit status) replaces
    the one --runner names."""
    own, rest, main_args = parse(argv)
    model = build_model(main_args)
    base = main_args.base_input_size
    candidates, added = candidate_sizes(own.candidates, base, model, main_args.model)
    cfg = SearchConfig(own.segments, candidates, base, own.proxy_epochs, Tolerance.parse(own.tolerance),
                       magnitude_list(own.magnitudes, main_args.aa))
    check_budget(cfg)
    if added:
        print(f'note: --base_input_size {base} added to --candidates (later segments are filled with it)')
    out = own.output_dir
    ledger_path = os.path.join(out, LEDGER)
    settings = settings_of(own, cfg, main_args)
    if not own.dry_run:
        if not os.path.exists(ledger_path) and os.path.isdir(os.path.join(out, TRIALS_DIR)) and \
                os.listdir(os.path.join(out, TRIALS_DIR)):
            raise UserError(f'{os.path.join(out, TRIALS_DIR)} holds proxy runs but {ledger_path} is missing: use '
                            f'another --output_dir, or remove {TRIALS_DIR}/')
        utils.check_writable_dir(out)
    ledger = Ledger(ledger_path, settings, writable=not own.dry_run)

    main_argv = list(rest)
    if not any(a.split('=', 1)[0] == '--log_dir' for a in rest):
        main_argv += ['--log_dir', 'none']  # no TensorBoard file per proxy run unless asked for
    if not any(a.split('=', 1)[0] == '--save_ckpt_num' for a in rest):
        main_argv += ['--save_ckpt_num', '1']  # only the newest epoch checkpoint: enough to resume
    if own.proxy_classes or own.proxy_train_per_class or own.proxy_val_per_class:
        train_root, val_root = data_roots(main_args)
        dest = os.path.join(out, SUBSET_DIR)
        if own.dry_run:
            train_root, val_root = os.path.join(dest, 'train'), os.path.join(dest, 'val')
        else:
            train_root, val_root = build_subset(train_root, val_root, dest, own.proxy_classes,
                                                own.proxy_train_per_class, own.proxy_val_per_class)
        main_argv = without_flags(main_argv, {'--data_set', '--data_path', '--eval_data_path'}) + [
            '--data_set', 'image_folder', '--data_path', train_root, '--eval_data_path', val_root]

    runner = runner or (InProcessRunner() if own.runner == 'inprocess' else SubprocessRunner(own.nproc_per_node))
    srun = SearchRun(cfg, own, main_argv, main_args, model, ledger, runner, own.dry_run)
    bound = cfg.segments * len(cfg.candidates) + cfg.segments * max(len(cfg.magnitudes) - 1, 0)
    if own.dry_run:
        print(f'Dry run: the proxy runs of a search over {cfg.segments} segments, B in {list(cfg.candidates)}'
              f'{f", m in {list(cfg.magnitudes)}" if cfg.magnitudes else ""}, each of {cfg.budget} equivalent '
              f'epochs at {base} (data epochs per stage: B x n);\n{len(ledger.records)} already in {ledger_path}; '
              f'later segments assume each segment picks its smallest value (the most runs).')
        print(f'{"run":>5} {"segment":>7} {"tries":>9} {"value":>5}  {"B per segment":<28} {"stages":<30} compute')
        search(cfg, srun.evaluate)
        print(f'{len(srun.listed)} proxy runs to make at most (the bound K x candidates'
              f'{" + K x (magnitudes - 1)" if cfg.magnitudes else ""} is {bound}); nothing was run or written.')
        return 0
    left = remaining_runs(cfg, ledger.known())
    print(f'Search: {cfg.segments} segments, B in {list(cfg.candidates)}'
          f'{f", m in {list(cfg.magnitudes)}" if cfg.magnitudes else ""}, tolerance {cfg.tolerance.text}'
          f'{"" if cfg.tolerance.relative else " points"}, proxy runs of {cfg.budget} equivalent epochs at {base}; '
          f'{len(ledger.records)} in {ledger_path}, at most {left} to make', flush=True)
    schedule, results = search(cfg, srun.evaluate)
    return finish(cfg, own, srun, schedule, results, main_args)


def finish(cfg, own, srun, schedule, results, main_args):
    out = own.output_dir
    name = f'searched: {main_args.model}, {cfg.segments} segments, {main_args.data_set}'
    spec = final_curriculum(schedule, srun.lowfreq, name)
    path = os.path.join(out, CURRICULUM)
    utils.atomic_write_text(path, json.dumps(spec, indent=1) + '\n')
    print(f'\nSearch done: {len(srun.ledger.records)} proxy runs in {os.path.join(out, LEDGER)} '
          f'({len(srun.walls)} made now, {_duration(sum(srun.walls))})')
    print(f'{"segment":>7} {"B":>4} {"m":>3}  tries (B: top-1 %)')
    for r in results:
        tries = ', '.join(f'{b}: {acc:.2f}' for b, acc in r.sizes)
        if r.magnitudes:
            tries += ' | ' + ', '.join(f'm{m}: {acc:.2f}' for m, acc in r.magnitudes)
        print(f'{r.segment:>7} {r.size:>4} {"-" if r.magnitude is None else r.magnitude:>3}  {tries}')
    plan = srun.plan_for(path)
    print(f'\n{path} (main.py --curriculum_file), at --epochs {cfg.budget} (the proxy budget; a full run sets '
          f'its own):')
    device = torch.device(main_args.device)
    print(plan.table(pipeline=main_args.data_pipeline, world=own.nproc_per_node,
                     per='GPU' if device.type == 'cuda' else 'process'))
    speed = data_passes_per_compute(schedule, cfg.base)
    print(f'theoretical speedup: {float(speed):.2f}x (the schedule passes over the data {float(speed):.2f} times '
          f'per equivalent epoch at {cfg.base}: 1/{float(speed):.2f} of the compute of a base-size run with as many '
          f'data epochs)')
    try:
        plot(results, schedule, cfg, os.path.join(out, PLOT))
    except ImportError:
        print(MATPLOTLIB_MISSING, file=sys.stderr)
        return 1
    print(f'{os.path.join(out, PLOT)}: top-1 against B per segment, the chosen path marked')
    return 0


def plot(results, schedule, cfg, path):
    import matplotlib
    matplotlib.use('Agg')  # no display needed
    import matplotlib.pyplot as plt

    rows = 2 if cfg.magnitudes else 1
    fig, axes = plt.subplots(rows, cfg.segments, figsize=(2.6 * cfg.segments + 1, 2.8 * rows), squeeze=False,
                             sharey=True)
    for r in results:
        for row, (tries, chosen, label) in enumerate([(r.sizes, r.size, 'B'), (r.magnitudes, r.magnitude, 'm')][:rows]):
            ax = axes[row][r.segment]
            xs, ys = [v for v, _ in tries], [a for _, a in tries]
            ax.plot(xs, ys, 'o-', color='tab:blue')
            best = max(ys)
            ax.axhspan(best - cfg.tolerance.points(best), best, color='tab:green', alpha=0.15)
            ax.plot([chosen], [dict(tries)[chosen]], '*', color='tab:red', markersize=14)
            every = cfg.candidates if row == 0 else cfg.magnitudes
            pad = (every[-1] - every[0]) * 0.08 or 1
            ax.set_xlim(every[0] - pad, every[-1] + pad)  # the same axis in every segment
            ax.set_xticks(every)
            ax.set_xlabel(label)
            ax.set_title(f'segment {r.segment + 1}' if row == 0 else f'segment {r.segment + 1}: m', fontsize=9)
            if r.segment == 0:
                ax.set_ylabel('proxy top-1 (%)')
            ax.grid(alpha=0.3)
    fig.suptitle(f'chosen (red stars): {_sizes_text(schedule)}; green band: within tolerance {cfg.tolerance.text} '
                 f'of the best', fontsize=9)
    fig.tight_layout()
    tmp = path + '.tmp.png'
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def _raise_on_sigterm(signum, frame):
    raise Interrupted(128 + signum)


def main(argv=None, runner=None):
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        return run(argv, runner)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return 2
    except TrialFailed as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return e.exit_code
    except (KeyboardInterrupt, Interrupted) as e:
        code = e.exit_code if isinstance(e, Interrupted) else 130
        print(f'stopped ({"Ctrl-C" if code == 130 else "SIGTERM"}): finished proxy runs are in the ledger; run the '
              f'same command to continue', file=sys.stderr, flush=True)
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == '__main__':
    sys.exit(main())
