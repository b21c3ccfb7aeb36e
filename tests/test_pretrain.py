"""MAE pre-training end to end (main_pretrain.py) and fine-tuning its encoder with main.py --finetune:
the README demo, exact resume after kills across stage boundaries, SIGTERM, two gloo processes, MAE's
augmentation on the published and fast paths, and every bad input in one line with nothing written."""
import argparse
import io
import json
import os
import signal
import sys

import pytest
import torch

import main as main_mod
import main_pretrain
import utils
from engine import MAEStep
from models import create_model
from models.mae import sincos_pos_embed_2d
from runner.checkpoint import load_finetune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import fault_inject  # noqa: E402

# the README quick start's demo (the command), --output_dir and --target added per test
DEMO = ['--model', 'mae_vit_tiny_patch16', '--data_set', 'SYNTH', '--synth_classes', '4', '--synth_per_class', '16',
        '--synth_image_size', '64', '--base_input_size', '64', '--curriculum', 'etpp', '--epochs', '2',
        '--batch_size', '8', '--num_workers', '0', '--device', 'cpu']
FINETUNE = ['--model', 'vit_tiny_patch16_224', '--global_pool', 'avg', '--data_set', 'SYNTH', '--synth_classes', '4',
            '--synth_per_class', '8', '--synth_val_per_class', '2', '--synth_image_size', '64', '--input_size', '64',
            '--epochs', '1', '--batch_size', '8', '--num_workers', '0', '--device', 'cpu', '--print_freq', '100']
RUN_TIMEOUT = 300


@pytest.fixture(scope='module')
def demo_runs(tmp_path_factory, one_intra_op_thread):
    """{target: output dir} of the demo with --target hog and --target pixel."""
    runs = {}
    for target in ('hog', 'pixel'):
        out = str(tmp_path_factory.mktemp(f'demo_{target}'))
        main_pretrain.cli(DEMO + ['--target', target, '--output_dir', out, '--print_freq', '100'])
        runs[target] = out
    return runs


def _log(out):
    with open(os.path.join(out, 'log.txt')) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize('target', ['hog', 'pixel'])
def test_the_demo_writes_checkpoints_and_a_falling_loss(demo_runs, target):
    out = demo_runs[target]
    log = _log(out)
    # E=2 at base 64: the ET++ segments that train, B = 32, 32, 48, 64, one data epoch each
    assert [r['input_size'] for r in log] == [32, 32, 48, 64]
    assert all(r['magnitude'] is None and 'test_acc1' not in r for r in log)
    assert log[-1]['train_loss'] < log[0]['train_loss']
    # compute under the MAE compute model: an epoch at the base size counts 1
    assert log[-1]['compute'] - log[-2]['compute'] == pytest.approx(1.0)
    ckpt = utils.load_checkpoint_file(os.path.join(out, 'checkpoint-3.pth'))
    assert {'model', 'optimizer', 'epoch', 'args', 'plan', 'rng', 'input_size'} <= set(ckpt)
    assert ckpt['epoch'] == 3 and ckpt['input_size'] == 64 and 'max_accuracy' not in ckpt
    assert ckpt['args'].target == target and ckpt['args'].lr == pytest.approx(1.5e-4 * 8 / 256)
    assert ckpt['optimizer']['param_groups'][0]['betas'] == (0.9, 0.95)
    stages = json.load(open(os.path.join(out, 'config.json')))['plan']['stages']
    # the plan's cost is the model's: at B=32 the encoder's 1 + 1 tokens of 4 patches cost more than
    # (32/64)^2 of its 4 + 1 of 16
    assert stages[0]['cost'] == log[0]['compute'] > (32 / 64) ** 2 and stages[-1]['cost'] == 1.0


def test_plot_log_draws_the_pretraining_loss(demo_runs, tmp_path):
    pytest.importorskip('matplotlib')
    import plot_log
    from PIL import Image
    png = str(tmp_path / 'curves.png')
    assert plot_log.cli([demo_runs['pixel'], '--out', png]) == 0
    records, base = plot_log.read_log(demo_runs['pixel'])
    s = plot_log.series(records, base)
    # the compute axis is the plan's (MAE's cost), not (B/base)^2
    assert s['compute'] == pytest.approx([r['compute'] for r in records]) and s['compute'][0] > 0.25
    assert all(v is not None for v in s['train_loss']) and all(v is None for v in s['test_acc1'])
    with Image.open(png) as im:
        # loss, lr, weight decay and B: no empty accuracy row
        assert 400 < im.size[1] < 5 * 2.0 * 80


def test_finetuning_loads_the_encoder_and_trains(demo_runs, tmp_path, capsys):
    ckpt_path = os.path.join(demo_runs['hog'], 'checkpoint-3.pth')
    pre = utils.load_checkpoint_file(ckpt_path)['model']
    args = main_mod.get_args_parser().parse_args(FINETUNE + ['--finetune', ckpt_path,
                                                             '--output_dir', str(tmp_path / 'ft')])
    model, _ = main_mod.build_model(args, 4)
    assert type(model.norm).__name__ == 'Identity' and model.global_pool == 'avg'  # timm's fc_norm instead
    load_finetune(args, model)
    line = [ln for ln in capsys.readouterr().out.splitlines() if 'MAE encoder' in ln]
    assert len(line) == 1 and 'mask_token' in line[0] and 'decoder_blocks (24)' in line[0]
    state = model.state_dict()
    encoder = [k for k in pre if k.startswith(('patch_embed.', 'blocks.')) or k == 'cls_token']
    assert len(encoder) == 2 + 12 * 12 + 1
    for k in encoder:
        assert torch.equal(state[k], pre[k]), k
    assert torch.equal(state['pos_embed'], sincos_pos_embed_2d(192, 4))
    # the command itself: one epoch trains from those weights
    main_mod.cli(FINETUNE + ['--finetune', ckpt_path, '--output_dir', str(tmp_path / 'ft')])
    tuned = utils.load_checkpoint_file(str(tmp_path / 'ft' / 'checkpoint-0.pth'))['model']
    assert not torch.equal(tuned['blocks.0.attn.qkv.weight'], pre['blocks.0.attn.qkv.weight'])
    assert 'fc_norm.weight' in tuned
    # --eval builds the model with the pooling the checkpoint was fine-tuned with
    capsys.readouterr()
    evaluated = main_mod.main(main_mod.get_args_parser().parse_args(
        [a for a in FINETUNE if a not in ('--global_pool', 'avg')] +
        ['--eval', 'true', '--resume', str(tmp_path / 'ft' / 'checkpoint-0.pth')]))
    assert 'Evaluating with --global_pool avg' in capsys.readouterr().out
    assert evaluated['acc1'] == _log(str(tmp_path / 'ft'))[0]['test_acc1']


def test_an_official_mae_file_loads_the_same_way(tmp_path, capsys):
    torch.manual_seed(0)
    mae = create_model('mae_vit_tiny_patch16')
    official = dict(mae.state_dict())
    # the official files keep the fixed tables in the state (regenerated here, not read)
    official['pos_embed'] = sincos_pos_embed_2d(192, 14)
    official['decoder_pos_embed'] = sincos_pos_embed_2d(128, 14)
    path = str(tmp_path / 'mae_pretrain_vit_tiny.pth')
    torch.save({'model': official}, path)
    args = main_mod.get_args_parser().parse_args(FINETUNE + ['--finetune', path, '--input_size', '224'])
    model, _ = main_mod.build_model(args, 4)
    load_finetune(args, model)
    assert 'decoder_pos_embed' in capsys.readouterr().out
    assert torch.equal(model.state_dict()['blocks.11.mlp.fc2.weight'], official['blocks.11.mlp.fc2.weight'])
    assert torch.equal(model.state_dict()['pos_embed'], official['pos_embed'])


def test_mae_augmentation_is_crop_and_flip_only(tmp_path):
    from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
    from torchvision import transforms

    from pipelines.datasets import build_device_transform, train_transform
    args = main_pretrain.get_args_parser().parse_args(DEMO)
    t = train_transform(args, 64, None, 'none')
    kinds = [type(x) for x in t.transforms]
    assert kinds == [RandomResizedCropAndInterpolation, transforms.RandomHorizontalFlip, MaybeToTensor,
                     transforms.Normalize]
    assert t.transforms[0].scale == (0.2, 1.0) and t.transforms[1].p == 0.5
    args.data_pipeline = 'fast'
    fast = train_transform(args, 32, None, 'lanczos')
    assert fast.transforms[0].scale == (0.2, 1.0)
    # timm's secondary part (RandAugment, colour jitter) is empty
    assert [type(x).__name__ for x in fast.transforms] == ['DraftRandomResizedCrop', 'RandomHorizontalFlip',
                                                            'Compose', 'ToUint8HWC']
    assert fast.transforms[2].transforms == []
    assert build_device_transform(args, torch.device('cpu')).erasing is None


SAMPLES = os.path.join(ROOT, '..', 'shared', 'data', 'imagenet-samples')


@pytest.mark.skipif(not os.path.isdir(SAMPLES), reason='needs ../shared/data/imagenet-samples')
@pytest.mark.parametrize('pipeline', ['fast', 'gpu'])
def test_real_images_on_the_fast_and_gpu_paths(tmp_path, pipeline, one_intra_op_thread):
    # an image folder without a validation folder (pre-training reads none); the gpu path's
    # device half runs on the CPU tensors here
    from pipelines.datasets import train_transform
    argv = ['--model', 'mae_vit_tiny_patch16', '--data_set', 'image_folder', '--data_path', SAMPLES,
            '--base_input_size', '64', '--curriculum', 'etpp', '--epochs', '1', '--batch_size', '16',
            '--num_workers', '0', '--device', 'cpu', '--data_pipeline', pipeline, '--print_freq', '100']
    args = main_pretrain.get_args_parser().parse_args(argv)
    t = train_transform(args, 64, None, 'lanczos')
    assert (t if pipeline == 'gpu' else t.transforms[0]).scale == (0.2, 1.0)
    main_pretrain.cli(argv + ['--output_dir', str(tmp_path)])
    log = _log(str(tmp_path))
    assert len(log) == 1 and 0 < log[0]['train_loss'] < 10


def test_masks_follow_the_batch_position_only():
    model = create_model('mae_vit_tiny_patch16')
    opt = torch.optim.AdamW(model.parameters())

    def step(rank=0):
        return MAEStep(model, None, opt, utils.LossScaler('cpu', enabled=False), torch.device('cpu'),
                       seed=0, rank=rank, world=2)
    x, y = torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    a, b = step(), step()
    torch.rand(5)  # whatever else draws from the global streams
    _, na, hard = a.prepare(x, y, 1, 3)
    _, nb, _ = b.prepare(x, y, 1, 3)
    assert hard is None and na.shape == (2, 4) and torch.equal(na, nb)
    assert not torch.equal(na, a.prepare(x, y, 1, 4)[1]) and not torch.equal(na, step(1).prepare(x, y, 1, 3)[1])
    out = a.run(*a.prepare(x, y, 0, 0), update=True, it=0)
    assert out['class_acc'] is None and torch.isfinite(out['loss'])


def test_the_plan_table_has_no_magnitudes_and_the_warmup_is_in_equivalent_epochs():
    from runner.stage import checked_plan, plan_text
    args = main_pretrain.get_args_parser().parse_args(DEMO)
    model = create_model('mae_vit_tiny_patch16')
    table = checked_plan(args, model, cost=model.train_flops).table()
    header = table.splitlines()[1].split()
    assert header[:3] == ['stage', 'B', 'epochs'] and 'm' not in header
    # ViT-B at E=400: --warmup_epochs counts equivalent epochs at 224, ended on a whole data epoch
    with torch.device('meta'):
        vit_b = create_model('mae_vit_base_patch16')
    for warmup in (40, 20):
        args = main_pretrain.get_args_parser().parse_args(['--curriculum', 'etpp', '--warmup_epochs', str(warmup)])
        plan = checked_plan(args, vit_b, cost=vit_b.train_flops)
        assert abs(plan.warmup - warmup) <= plan.stages[0].cost
    # the paper's comparison: MAE's 1600 epochs
    assert '1600-epoch baseline at 224: 4.00x' in plan_text(args, plan, torch.device('cpu'), 8,
                                                            main_pretrain.compared_baseline_epochs)


# ---------------------------------------------------------------------------
# kills, signals, two processes
# ---------------------------------------------------------------------------

def test_sigkill_across_stage_boundaries_resumes_exactly(tmp_path):
    # 4 stages of 8 steps; every kill lands within an attempt's first 10 steps, so each restart
    # continues into later stages (B=32 -> 48 -> 64); recovery checkpoints every 3 steps
    argv = DEMO + ['--target', 'hog', '--deterministic', 'true', '--save_ckpt_steps', '3']
    rc = fault_inject.main(['--run_timeout', str(RUN_TIMEOUT), '--entry', 'main_pretrain.py', '--kills', '2',
                            '--seed', '1', '--workdir', str(tmp_path), '--'] + argv)
    assert rc == 0
    text = open(tmp_path / 'faulty.out').read()
    assert text.count('Resumed from') == 2 and 'Traceback' not in text


def test_sigterm_saves_a_recovery_checkpoint_and_resumes(tmp_path):
    out = str(tmp_path / 'run')
    log = io.StringIO()
    cmd = fault_inject.command(DEMO + ['--target', 'pixel'], out, 1, 'main_pretrain.py')
    rc, _ = fault_inject.run_once(cmd, kill_after=3, sig=signal.SIGTERM, log=log, timeout=RUN_TIMEOUT)
    assert rc == 143 and 'stopped by SIGTERM' in log.getvalue() and 'Traceback' not in log.getvalue()
    ckpt = utils.load_checkpoint_file(os.path.join(out, utils.RECOVERY_NAME))
    assert ckpt['epoch'] == 0 and ckpt['step'] >= 3
    rc, _ = fault_inject.run_once(cmd, log=log, timeout=RUN_TIMEOUT)
    assert rc == 0 and 'Resumed from' in log.getvalue()
    assert [r['epoch'] for r in _log(out)] == [0, 1, 2, 3]


def test_two_gloo_processes(tmp_path):
    out = str(tmp_path / 'ddp')
    log = io.StringIO()
    argv = DEMO + ['--target', 'hog', '--batch_size', '4', '--global_batch_size', '8']
    rc, steps = fault_inject.run_once(fault_inject.command(argv, out, 2, 'main_pretrain.py'), log=log,
                                      timeout=RUN_TIMEOUT)
    assert rc == 0, log.getvalue()[-3000:]
    ckpt = utils.load_checkpoint_file(os.path.join(out, 'checkpoint-3.pth'))
    assert len(ckpt['rng']) == 2 and ckpt['args'].lr == pytest.approx(1.5e-4 * 8 / 256)
    log_lines = _log(out)
    assert len(log_lines) == 4 and log_lines[-1]['train_loss'] < log_lines[0]['train_loss']


# ---------------------------------------------------------------------------
# bad input: one line with the fix, exit 2, nothing written
# ---------------------------------------------------------------------------

def _refused(cli, argv, out, capsys, *expected):
    with pytest.raises(SystemExit) as e:
        cli(argv + ['--output_dir', str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err and '\n' not in err and 'Traceback' not in err, err
    for text in expected:
        assert text in err, err
    assert not os.path.isdir(out) or not os.listdir(out), os.listdir(out)
    return err


@pytest.mark.parametrize('extra,expected', [
    (['--mask_ratio', '1.5'], ['--mask_ratio 1.5 is outside (0, 1)', '0.75']),
    (['--mask_ratio', '0'], ['outside (0, 1)']),
    (['--curriculum', 'none', '--input_size', '100'], ['--input_size 100', 'nearest valid 96']),
    (['--base_input_size', '72'], ['--base_input_size 72', 'nearest valid 64 or 80']),
    (['--model', 'mae_vit_huge_patch14', '--target', 'hog', '--base_input_size', '224'],
     ['--target hog', 'multiple of 8', 'patch size 14', '--target pixel']),
    (['--curriculum', 'et'], ["invalid choice: 'et'"]),
])
def test_bad_pretraining_flags(tmp_path, capsys, extra, expected):
    _refused(main_pretrain.cli, DEMO + extra, tmp_path / 'out', capsys, *expected)


def test_a_curriculum_stage_off_the_patch_grid(tmp_path, capsys):
    f = tmp_path / 'c.json'
    f.write_text(json.dumps({'stages': [{'share': 0.5, 'size': 40}, {'share': 0.5, 'size': 64}]}))
    argv = [a for a in DEMO if a not in ('--curriculum', 'etpp')] + ['--curriculum_file', str(f)]
    _refused(main_pretrain.cli, argv, tmp_path / 'out', capsys, 'stage 0', 'nearest valid sizes: 32 or 48')


def test_a_supervised_checkpoint_is_not_a_pretraining_resume(tmp_path, capsys):
    vit = create_model('vit_tiny_patch16_224', num_classes=4)
    sup = str(tmp_path / 'supervised.pth')
    torch.save({'model': vit.state_dict(), 'epoch': 3, 'args': argparse.Namespace(model='vit_tiny_patch16_224')},
               sup)
    _refused(main_pretrain.cli, DEMO + ['--resume', sup], tmp_path / 'out', capsys,
             'not an MAE pre-training checkpoint', 'new --output_dir')
    # the same when --output_dir holds a supervised run (auto-resume): nothing added to it
    run = tmp_path / 'run'
    run.mkdir()
    torch.save({'model': vit.state_dict(), 'epoch': 0}, run / 'checkpoint-0.pth')
    with pytest.raises(SystemExit) as e:
        main_pretrain.cli(DEMO + ['--output_dir', str(run)])
    assert e.value.code == 2 and 'not an MAE pre-training checkpoint' in capsys.readouterr().err
    assert sorted(os.listdir(run)) == ['checkpoint-0.pth']


def test_an_encoder_that_does_not_fit_the_finetuned_model(tmp_path, capsys):
    path = str(tmp_path / 'mae_tiny.pth')
    torch.save({'model': create_model('mae_vit_tiny_patch16').state_dict()}, path)
    argv = FINETUNE + ['--finetune', path]
    argv[argv.index('vit_tiny_patch16_224')] = 'vit_small_patch16_224'
    _refused(main_mod.cli, argv, tmp_path / 'out', capsys, 'width 192', 'width 384',
             'use --model vit_tiny_patch16_224')
    argv[argv.index('vit_small_patch16_224')] = 'resnet18'
    _refused(main_mod.cli, argv, tmp_path / 'out', capsys, "timm's VisionTransformer")


# ---------------------------------------------------------------------------
# recipes (scripts/recipes.py --task mae / mae_ft) and their wrappers
# ---------------------------------------------------------------------------

def _recipe(*argv):
    import recipes
    cmd, _ = recipes.build_command(['train', *argv, '--gpus', '8', '--data_path', '/in1k'])
    i = next(k for k, a in enumerate(cmd) if a.endswith(('main.py', 'main_pretrain.py')))
    return os.path.basename(cmd[i]), cmd[i + 1:]


@pytest.mark.parametrize('model', ['mae_vit_base_patch16', 'mae_vit_large_patch16'])
def test_pretraining_recipes_follow_mae(model):
    for variant, curriculum, epochs in (('etpp', 'etpp', 400), ('baseline', 'none', 1600)):
        for target in ('pixel', 'hog'):
            entry, argv = _recipe(model, '--task', 'mae', '--variant', variant, '--target', target)
            a = main_pretrain.get_args_parser().parse_args(argv)
            assert entry == 'main_pretrain.py' and (a.model, a.curriculum, a.epochs, a.target) == \
                (model, curriculum, epochs, target)
            # MAE PRETRAIN.md: global batch 4096, blr 1.5e-4, wd 0.05, 40 warm-up epochs, AdamW (0.9, 0.95)
            assert a.batch_size * a.update_freq * 8 == 4096 and a.blr == 1.5e-4 and a.weight_decay == 0.05
            assert a.warmup_epochs == 40 and a.opt_betas == [0.9, 0.95] and a.min_lr == 0.0
            assert a.mask_ratio == 0.75 and a.norm_pix_loss and a.crop_scale == [0.2, 1.0]


@pytest.mark.parametrize('model,epochs,lr,layer_decay,drop_path', [
    ('vit_base_patch16_224', 100, 5e-4 * 4, 0.65, 0.1), ('vit_large_patch16_224', 50, 1e-3 * 4, 0.75, 0.2)])
def test_finetuning_recipes_follow_mae(model, epochs, lr, layer_decay, drop_path):
    entry, argv = _recipe(model, '--task', 'mae_ft', '--finetune', 'pre.pth')
    a = main_mod.get_args_parser().parse_args(argv)
    assert entry == 'main.py' and (a.model, a.finetune, a.global_pool, a.curriculum) == (model, 'pre.pth', 'avg',
                                                                                           'none')
    # MAE FINETUNE.md: global batch 1024, lr = blr x 1024 / 256
    assert a.batch_size * a.update_freq * 8 == 1024 and a.epochs == epochs and a.lr == pytest.approx(lr)
    assert (a.layer_decay, a.drop_path, a.weight_decay, a.warmup_epochs, a.min_lr) == \
        (layer_decay, drop_path, 0.05, 5, 1e-6)
    assert (a.aa, a.mixup, a.cutmix, a.smoothing, a.reprob) == ('rand-m9-mstd0.5-inc1', 0.8, 1.0, 0.1, 0.25)
    assert a.opt == 'adamw' and a.opt_betas is None  # torch's AdamW betas (0.9, 0.999), as MAE's fine-tuning


def test_mae_recipe_wrappers_and_errors():
    import recipes
    for name, (model, task) in recipes.MAE_WRAPPERS.items():
        with open(os.path.join(ROOT, 'scripts', name), encoding='utf-8') as f:
            assert f.read() == recipes.mae_wrapper_text(model, task), f'{name} drifted: run recipes.py wrappers'
    for argv, text in ((['mae_vit_base_patch16', '--task', 'mae', '--variant', 'et'], 'etpp or baseline'),
                       (['vit_base_patch16_224', '--task', 'mae_ft'], '--finetune FILE'),
                       (['resnet50', '--target', 'hog'], 'only with --task mae')):
        with pytest.raises(recipes.LaunchError, match=text):
            _recipe(*argv)
