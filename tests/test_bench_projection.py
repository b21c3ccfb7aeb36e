"""bench_e2e.py's steady-state rates, switch costs and projection of the full published run."""
import argparse
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import bench_e2e  # noqa: E402
from common import plan_for, train_args  # noqa: E402

ARGV = ['--model', 'resnet50', '--curriculum', 'etpp', '--epochs', '6', '--baseline_epochs', '9',
        '--batch_size', '256']


def test_projection_of_the_full_run_from_steady_rates():
    args = train_args(ARGV)
    rates = {(96, 0, 1): 4000.0, (96, 1, 1): 4000.0, (160, 2, 1): 2000.0}  # m=3..5 at 160: the same B's rate
    base_rate = 1000.0
    pr = bench_e2e.project(args, argparse.Namespace(project_epochs=200), rates, base_rate, [2.0, 4.0])
    full = plan_for(train_args(ARGV[:5] + ['200'] + ARGV[6:]))
    expect = sum(s.epochs * bench_e2e.IMAGENET_TRAIN / {96: 4000.0, 160: 2000.0, 224: 1000.0}[s.size]
                 for s in full.stages) + 2 * 3.0  # two changes of B at the median switch cost
    assert pr['baseline_epochs'] == 300  # the published comparison, not --baseline_epochs
    assert pr['curriculum_h'] * 3600 == pytest.approx(expect)
    assert pr['baseline_h'] * 3600 == pytest.approx(300 * bench_e2e.IMAGENET_TRAIN / base_rate)
    assert pr['speedup'] == pytest.approx(pr['baseline_h'] / pr['curriculum_h'])


def test_projection_says_what_is_missing():
    args = train_args(ARGV)
    pr = bench_e2e.project(args, argparse.Namespace(project_epochs=200), {(96, 0, 1): 1.0}, None, [])
    assert 'speedup' not in pr and pr['missing_stages']


def test_steady_rates_and_table():
    recs = [{'input_size': 96, 'magnitude': 0, 'replay_times': 1, 'train_steady_img_s': r} for r in (10.0, 30.0, 20.0)]
    assert bench_e2e.steady_rates(recs) == {(96, 0, 1): 20.0}
    res = {'plan': 'p', 'equivalent_epochs': 2.0, 'base_size': 224, 'baseline_epochs': 3, 'baseline_run_epochs': 3,
           'argv': [], 'host': {'cpu': 'x', 'cpu_count': 1}, 'curriculum_s': 10.0, 'baseline_s': 12.0,
           'baseline_epoch_s': 4.0, 'measured': 1.2, 'theoretical': 1.5, 'baseline_steady_img_s': 50.0,
           'epoch_start_s': 0.3,
           'projection': {'epochs': 200, 'switches': 2, 'curriculum_h': 10.0, 'baseline_h': 15.0, 'speedup': 1.5,
                          'baseline_epochs': 300, 'theoretical': 1.5},
           'stages': [{'index': 0, 'size': 96, 'magnitude': 0, 'batch': '256 x 1', 'epochs': 1, 'replay': 1,
                       'per_epoch': 2.0, 'relative': 0.5, 'compute_ratio': 0.18, 'seconds': 2.0,
                       'steady_img_s': 123.4, 'switch_s': 1.25}]}
    text = bench_e2e.table(res)
    assert '123.4' in text and '1.25' in text and 'steady 50.0 img/s' in text
    assert 'projected full run' in text and '1.50x' in text and 'measured in this short run 1.20x' in text
