"""The benchmark scripts run end to end on tiny inputs and report consistent numbers (no timing is asserted)."""
import json
import os
import sys

import pytest

from conftest import ROOT
from test_image_store import make_folder

sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import bench_data  # noqa: E402
import bench_e2e  # noqa: E402


@pytest.fixture
def restore_threads():
    import torch
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_bench_data_measures_every_stage_and_pipeline(tmp_path, capsys, restore_threads):
    data = make_folder(str(tmp_path / 'train'), n=16)
    out = str(tmp_path / 'data.json')
    res = bench_data.main(['--data_path', data, '--rounds', '1', '--batch', '8', '--pipelines',
                           'published,fast,fast-store,decode', '--json', out, '--model', 'resnet18',
                           '--curriculum', 'etpp', '--base_input_size', '64'])
    printed = capsys.readouterr().out
    assert 'mean ratio at B=32' in printed and 'fast-store' in printed
    assert json.load(open(out))['stages'] == json.loads(json.dumps(res['stages']))
    sizes = sorted({r['size'] for r in res['stages']})
    assert sizes[-1] == 64 and sizes[0] < 64
    for row in res['stages']:
        for name in ('published', 'fast', 'fast-store', 'decode'):
            assert row[name] > 0 and row[f'{name}_ratio'] == pytest.approx(row[name] / res['plain224'])



def test_bench_data_device_half_with_one_batch_per_epoch(tmp_path, restore_threads):
    """The GPU suite's case: --device_batch as large as the folder (one batch per epoch, and the first
    batch only warms up): the stage's epoch is read again for the timed batches, every stage has a row."""
    data = make_folder(str(tmp_path / 'train'), n=8)
    res = bench_data.main(['--data_path', data, '--rounds', '1', '--batch', '4', '--pipelines', 'gpu',
                           '--device_batch', '8', '--device_batches', '1', '--device', 'cpu', '--model', 'resnet18',
                           '--curriculum', 'etpp', '--base_input_size', '64'])
    rows = res['device_side']['stages']
    assert [r['index'] for r in rows] == [s['index'] for s in res['stages']]
    assert all(r['batch'] == 8 and r['ms_per_batch'] > 0 for r in rows)

def test_bench_e2e_trains_both_and_extrapolates_the_baseline(tmp_path, capsys):
    keep = str(tmp_path / 'runs')
    res = bench_e2e.main(['--baseline_run_epochs', '2', '--keep', keep, '--data_set', 'SYNTH',
                          '--synth_classes', '2', '--synth_per_class', '8', '--synth_val_per_class', '2',
                          '--synth_image_size', '72', '--model', 'resnet18', '--curriculum', 'etpp',
                          '--base_input_size', '64', '--epochs', '1', '--baseline_epochs', '3',
                          '--batch_size', '8', '--device', 'cpu', '--num_workers', '0', '--pin_mem', 'false'])
    assert 'speedup: measured' in capsys.readouterr().out
    curriculum = [json.loads(line) for line in open(os.path.join(keep, 'curriculum', 'log.txt'))]
    baseline = [json.loads(line) for line in open(os.path.join(keep, 'baseline', 'log.txt'))]
    assert len(baseline) == 2 and {r['input_size'] for r in baseline} == {64}
    assert sum(s['epochs'] for s in res['stages']) == len(curriculum)
    assert res['curriculum_s'] == pytest.approx(sum(r['train_time_s'] for r in curriculum), abs=1e-6)
    per_epoch = baseline[1]['train_time_s']
    assert res['baseline_s'] == pytest.approx(baseline[0]['train_time_s'] + 2 * per_epoch)
    assert res['measured'] == pytest.approx(res['baseline_s'] / res['curriculum_s'])
    assert res['theoretical'] == pytest.approx(3 / res['equivalent_epochs'])
    assert not any('test_acc1' in r for r in curriculum + baseline)  # evaluation off


def test_bench_e2e_baseline_drops_the_curriculum_file():
    argv = ['--model', 'resnet18', '--curriculum_file', 'c.json', '--epochs', '3', '--curriculum_file=d.json']
    assert bench_e2e.without_curriculum_file(argv) == ['--model', 'resnet18', '--epochs', '3']
