"""Curriculum runs through main.py on SYNTH: scaled-down 96->160->224-style plans on CPU."""
import json
import os
import shutil

import pytest
import timm
import torch

import main as main_mod
import tiny_models  # noqa: F401  (registers tiny_vit_p16 and tiny_swin_p4 with timm)
from utils import load_checkpoint_file

SYNTH = ['--data_set', 'SYNTH', '--synth_classes', '4', '--synth_per_class', '48', '--synth_val_per_class', '8',
         '--device', 'cpu', '--num_workers', '0', '--print_freq', '1000', '--warmup_epochs', '1',
         '--save_ckpt_num', '100', '--reprob', '0']


def run(argv):
    return main_mod.main(main_mod.get_args_parser().parse_args(argv))


def read_log(out):
    with open(os.path.join(out, 'log.txt')) as f:
        return [json.loads(line) for line in f if '"epoch"' in line]


def etpp_argv(model, base, out, extra=()):
    return SYNTH + ['--model', model, '--curriculum', 'etpp', '--base_input_size', str(base),
                    '--synth_image_size', str(base + base // 8), '--epochs', '3', '--batch_size', '32',
                    '--output_dir', out] + list(extra)


@pytest.fixture(scope='module')
def vit_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('vit'))
    run(etpp_argv('tiny_vit_p16', 64, out, ['--model_ema', 'true', '--model_ema_eval', 'true',
                                              '--model_ema_decay', '0.9']))
    return out


def test_cnn_etpp_scaled_sizes_and_final_shapes(tmp_path, capsys):
    out = str(tmp_path / 'cnn')
    run(etpp_argv('test_resnet', 64, out))
    text = capsys.readouterr().out
    assert 'Training plan: EfficientTrain++' in text and 'theoretical speedup' in text
    log = read_log(out)
    assert [r['input_size'] for r in log] == sorted(r['input_size'] for r in log)
    assert {r['input_size'] for r in log} == {32, 48, 64}
    assert [r['magnitude'] for r in log] == sorted(r['magnitude'] for r in log)
    assert log[-1]['progress'] == pytest.approx(log[-1]['progress'] / log[-1]['progress_frac'])
    ckpt = load_checkpoint_file(os.path.join(out, f'checkpoint-{log[-1]["epoch"]}.pth'))
    assert ckpt['input_size'] == 64


def test_vit_etpp_adapts_and_ends_with_standard_shapes(vit_run):
    log = read_log(vit_run)
    assert {r['input_size'] for r in log} == {32, 48, 64}
    assert all('test_ema_acc1' in r for r in log)
    last = log[-1]['epoch']
    ckpt = load_checkpoint_file(os.path.join(vit_run, f'checkpoint-{last}.pth'))
    fresh = timm.create_model('tiny_vit_p16', num_classes=4, img_size=64)
    fresh.load_state_dict(ckpt['model'], strict=True)
    fresh.load_state_dict(ckpt['model_ema'], strict=True)
    assert ckpt['model']['pos_embed'].shape == (1, 1 + 16, 48)
    # a checkpoint from the B=32 stage holds the 2x2 grid
    first = load_checkpoint_file(os.path.join(vit_run, 'checkpoint-0.pth'))
    assert first['input_size'] == 32 and first['model']['pos_embed'].shape == (1, 1 + 4, 48)
    exp_avg = first['optimizer']['state']
    assert any(tuple(s['exp_avg'].shape) == (1, 5, 48) for s in exp_avg.values())


def test_resume_mid_stage_reproduces_next_stage_settings(vit_run, tmp_path):
    full = read_log(vit_run)
    # resume from inside the B=32 stages and from inside the B=48 ones
    for k in (0, next(r['epoch'] for r in full if r['input_size'] == 48)):
        out = str(tmp_path / f'resume{k}')
        os.makedirs(out)
        shutil.copy(os.path.join(vit_run, f'checkpoint-{k}.pth'), out)
        run(etpp_argv('tiny_vit_p16', 64, out, ['--model_ema', 'true', '--model_ema_eval', 'true',
                                                  '--model_ema_decay', '0.9']))
        resumed = read_log(out)
        assert resumed[0]['epoch'] == k + 1
        for a, b in zip(resumed, full[k + 1:]):
            for key in ('epoch', 'stage', 'input_size', 'magnitude', 'batch_size', 'progress'):
                assert a[key] == b[key], key
            assert a['train_lr'] == pytest.approx(b['train_lr'], rel=1e-12)
            assert a['train_wd'] == pytest.approx(b['train_wd'], rel=1e-12)


def test_swin_etpp_windows_follow_b(tmp_path):
    out = str(tmp_path / 'swin')
    run(etpp_argv('tiny_swin_p4', 128, out, ['--epochs', '2']))
    log = read_log(out)
    assert {r['input_size'] for r in log} == {64, 96, 128}
    ckpt = load_checkpoint_file(os.path.join(out, f'checkpoint-{log[-1]["epoch"]}.pth'))
    fresh = timm.create_model('tiny_swin_p4', num_classes=4)
    fresh.load_state_dict(ckpt['model'], strict=True)
    first = load_checkpoint_file(os.path.join(out, 'checkpoint-0.pth'))
    table = first['model']['layers.0.blocks.0.attn.relative_position_bias_table']
    assert table.shape[0] == (2 * 2 - 1) ** 2  # window 64/32 = 2


def test_et_fourier_path_on_device(tmp_path):
    out = str(tmp_path / 'et')
    run(SYNTH + ['--model', 'test_resnet', '--curriculum', 'et', '--base_input_size', '64', '--synth_image_size', '72',
                 '--epochs', '5', '--batch_size', '16', '--update_freq', '2', '--output_dir', out])
    log = read_log(out)
    # 160 and 192 both land on 48 on the 16-pixel grid at base 64
    assert [r['input_size'] for r in log] == [48, 48, 48, 48, 64]
    assert [r['magnitude'] for r in log] == [1, 3, 5, 7, 9]
    # doubled micro-batch while B < base, same global batch
    assert [(r['batch_size'], r['update_freq']) for r in log] == [(32, 1)] * 4 + [(16, 2)]


def test_replay_run(tmp_path):
    out = str(tmp_path / 'replay')
    # E=3: the drivers' cut leaves the replayed (B < 64) segments of E=2 without an epoch
    run(etpp_argv('test_resnet', 64, out, ['--batch_size', '64', '--replay_times', '2', '--epochs', '3',
                                         '--replay_buffer_size', '2', '--synth_per_class', '64']))
    log = read_log(out)
    low = [r for r in log if r['input_size'] < 64]
    assert low and all(r['replay_times'] == 2 for r in low)
    assert all(r['replay_times'] == 1 for r in log if r['input_size'] == 64)


def test_invalid_bandwidth_refused_before_training(tmp_path, capsys):
    spec = {'stages': [{'share': 0.5, 'size': 48}, {'share': 0.5, 'size': 128}]}
    path = tmp_path / 'c.json'
    path.write_text(json.dumps(spec))
    out = str(tmp_path / 'bad')
    with pytest.raises(SystemExit) as e:
        main_mod.cli(SYNTH + ['--model', 'tiny_swin_p4', '--curriculum_file', str(path), '--base_input_size', '128',
                              '--epochs', '2', '--batch_size', '8', '--output_dir', out])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0
    assert 'stage 0' in err and '48' in err and ('32' in err or '64' in err)
    assert not os.path.exists(os.path.join(out, 'log.txt'))


def test_adapted_model_state_is_consistent_after_run(vit_run):
    # The EMA copy was adapted with the model: both at the final size.
    ckpt = load_checkpoint_file(os.path.join(vit_run, f'checkpoint-{read_log(vit_run)[-1]["epoch"]}.pth'))
    assert ckpt['model_ema']['pos_embed'].shape == ckpt['model']['pos_embed'].shape
    assert torch.isfinite(ckpt['model']['pos_embed']).all()
