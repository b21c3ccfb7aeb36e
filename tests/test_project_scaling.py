"""scripts/project_scaling.py: hand-computed projections from made-up step times, the zero-communication
limit (the plan's theoretical speedup), and bad input (one line, exit 2)."""
import json
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import project_scaling  # noqa: E402

# etpp at base 64 on test_resnet, E=2: one data epoch each at B = 32, 48, 64 (test_cli's plan)
PLAN = ['--model', 'test_resnet', '--curriculum', 'etpp', '--base_input_size', '64', '--epochs', '2',
        '--baseline_epochs', '4', '--batch_size', '16', '--global_batch_size', '64', '--train_images', '256',
        '--plot', 'none']
# two GPUs per node, one GB/s between nodes, a 1 MB gradient: a ring over 4 GPUs (2 nodes) takes
# 2 x 3/4 x 1e6 / 1e9 s = 1.5 ms, plus 0.5 ms of latency
NET = ['--gpus_per_node', '2', '--ib_gbps', '8', '--ib_latency_ms', '0.5', '--latency_ms', '0',
       '--nvlink_gbs', '1000', '--grad_bytes', '1000000']


def step_json(path, ms, model='test_resnet', sizes=(32, 48, 64), batches=(16, 32, 64), skip=()):
    rows = [{'size': b, 'batch_size': m, 'update_freq': 1, 'ms_per_step': ms(b, m), 'img_s': 1e3 * m / ms(b, m)}
            for b in sizes for m in batches if (b, m) not in skip]
    with open(path, 'w') as f:
        json.dump({'model': model, 'base_size': 64, 'device': 'cuda:0', 'host': {'gpu': 'made up'}, 'rows': rows}, f)
    return str(path)


def affine(b, m):
    """1 ms per step + 0.5 ms per image at the base size, (B/64)^2 of it at B."""
    return 1.0 + 0.5 * m * (b / 64) ** 2


def run(argv):
    return project_scaling.main(PLAN + list(argv))


def test_projection_reproduces_hand_computed_times(tmp_path, capsys):
    # (48, 32) left out: interpolated between 16 and 64, exactly, as the times are affine
    path = step_json(tmp_path / 's.json', affine, skip={(48, 32)})
    res = run(['--step_json', path, '--gpus', '1,4'] + NET)
    one, four = res['gpus'][1], res['gpus'][4]
    # 1 GPU, 16 x 4 per step everywhere (256 images per data epoch: 4 steps), no all-reduce:
    #   published: 4 x (4 x 3) + 4 x (4 x 5.5) + 4 x (4 x 9) = 280 ms; baseline 4 epochs x 4 x (4 x 9) = 576 ms
    #   large: B=32 at 4x the global batch, 64 x 4 (1 step): 4 x 9 = 36; B=48 at 2x, 32 x 4 (2 steps): 2 x 4 x 10
    #   = 80; B=64: 144; 260 ms
    assert one['baseline']['seconds'] == pytest.approx(0.576)
    assert one['published']['seconds'] == pytest.approx(0.280)
    assert one['large']['seconds'] == pytest.approx(0.260)
    assert [(s['batch_size'], s['update_freq'], s['lr_scale']) for s in one['large']['stages']] == \
        [(64, 4, 4.0), (32, 4, 2.0), (16, 4, 1.0)]
    # 4 GPUs on 2 nodes, 16 x 1 per GPU, 2 ms of all-reduce per step:
    #   published: 4 steps x (3 + 2) + 4 x (5.5 + 2) + 4 x (9 + 2) = 94 ms; baseline 16 x 11 = 176 ms
    #   large: 1 step x (9 + 2) + 2 x (10 + 2) + 44 = 79 ms
    assert four['baseline']['seconds'] == pytest.approx(0.176)
    assert four['published']['seconds'] == pytest.approx(0.094)
    assert four['large']['seconds'] == pytest.approx(0.079)
    assert four['published']['speedup'] == pytest.approx(176 / 94)
    assert four['large']['speedup'] == pytest.approx(176 / 79)
    assert four['large']['comm_share'] == pytest.approx((2 + 2 * 2 + 4 * 2) / 79)
    # the plan's theoretical speedup: 4 epochs over 0.25 + 0.5625 + 1 equivalent epochs
    assert four['published']['theoretical'] == pytest.approx(4 / 1.8125)
    text = capsys.readouterr().out
    assert 'measured on made up' in text and '2.23x' in text and 'Table 13' in text


def test_overlap_hides_the_all_reduce_behind_the_backward(tmp_path):
    path = step_json(tmp_path / 's.json', affine)
    four = run(['--step_json', path, '--gpus', '4', '--overlap', '1'] + NET)['gpus'][4]
    # the backward of a micro-batch (2/3 of its step: 2, 3.67, 6 ms) covers the 2 ms: 4 x (3 + 5.5 + 9)
    assert four['published']['seconds'] == pytest.approx(0.070)
    assert four['baseline']['seconds'] == pytest.approx(0.144)


@pytest.mark.parametrize('source', ['json', 'model'])
def test_without_communication_both_settings_give_the_theoretical_speedup(tmp_path, source):
    if source == 'json':
        steps = ['--step_json', step_json(tmp_path / 's.json', lambda b, m: 0.5 * m * (b / 64) ** 2,
                                          batches=(4, 8, 16, 32, 64))]
    else:
        steps = ['--step_model', '0.5,0']
    res = run(steps + ['--gpus', '1,2,4,8,16', '--grad_bytes', '0', '--latency_ms', '0', '--ib_latency_ms', '0',
                       '--gpus_per_node', '2'])
    for n, row in res['gpus'].items():
        for setting in ('published', 'large'):
            assert row[setting]['speedup'] == pytest.approx(4 / 1.8125), (n, setting)
            assert row[setting]['comm_share'] == 0


def test_the_suites_combined_file_and_a_plot(tmp_path):
    one = json.load(open(step_json(tmp_path / 'a.json', affine)))
    other = dict(one, model='deit_small_patch16_224')
    path = tmp_path / 'step_batches.json'
    path.write_text(json.dumps({'runs': [other, one]}))
    plot = tmp_path / 'scaling.png'
    res = project_scaling.main([a for a in PLAN if a not in ('--plot', 'none')] +
                               ['--step_json', str(path), '--gpus', '1,4', '--plot', str(plot)] + NET)
    assert res['gpus'][4]['large']['seconds'] == pytest.approx(0.079)
    assert plot.stat().st_size > 1000
    assert not [p for p in os.listdir(tmp_path) if 'tmp' in p]


def bad(argv, capsys):
    with pytest.raises(SystemExit) as e:
        project_scaling.cli(PLAN + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err and '\n' not in err and 'Traceback' not in err, err
    return err


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    other = step_json(tmp_path / 'other.json', affine, model='resnet50')
    assert 'measures --model resnet50, not test_resnet' in bad(['--step_json', other], capsys)
    short = step_json(tmp_path / 'short.json', affine, sizes=(48, 64))
    assert 'no step time at B=32' in bad(['--step_json', short], capsys)
    ok = step_json(tmp_path / 'ok.json', affine)
    assert '--overlap' in bad(['--step_json', ok, '--overlap', '2'], capsys)
    assert 'give the step times' in bad([], capsys)
    assert 'does not divide among 3 GPUs' in bad(['--step_json', ok, '--gpus', '1,3'], capsys)
    assert '--step_model' in bad(['--step_model', 'fast'], capsys)
    (tmp_path / 'junk.json').write_text('{"rows": 3}')
    assert 'no "rows"' in bad(['--step_json', str(tmp_path / 'junk.json')], capsys)


def test_bench_step_batches_feed_the_projection(tmp_path, capsys):
    """bench_step.py --bench_batches through the suite's `batches` (one process, one JSON) on the CPU:
    every B at every micro-batch, the gradient bytes, and a projection from them."""
    import torch
    sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
    import suite_tools
    threads = torch.get_num_threads()
    path = str(tmp_path / 'step_batches.json')
    try:
        suite_tools.main(['batches', '--json', path, '--batches', '8,4', '--run',
                          '--model test_resnet --curriculum etpp --base_input_size 64 --batch_size 8 --device cpu '
                          '--bench_steps 1 --bench_warmup 1 --threads 1 --amp false'])
    finally:
        torch.set_num_threads(threads)
    run_ = json.load(open(path))['runs'][0]
    assert sorted((r['size'], r['batch_size'], r['update_freq']) for r in run_['rows']) == \
        [(b, m, 1) for b in (32, 48, 64) for m in (4, 8)]
    assert run_['bench_batches'] == [4, 8] and run_['grad_bytes'] == 4 * run_['n_parameters'] > 0
    res = project_scaling.main(['--model', 'test_resnet', '--curriculum', 'etpp', '--base_input_size', '64',
                                '--epochs', '2', '--batch_size', '8', '--global_batch_size', '32', '--gpus', '1,4',
                                '--step_json', path, '--plot', 'none'])
    assert res['grad_bytes'] == run_['grad_bytes'] and res['gpus'][4]['large']['speedup'] > 0
    assert 'extrapolated' in capsys.readouterr().out  # B=32 at 32 x 1 (large on 1 GPU): beyond 4 and 8
    with pytest.raises(SystemExit) as e:
        suite_tools.main(['batches', '--json', path, '--batches', '8,x', '--run', '--model test_resnet'])
    assert e.value.code == 2
