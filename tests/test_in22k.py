"""IN-22K pre-training and IN-1K fine-tuning recipes (scripts/recipes.py --task), the PVT recipe
and schedule, and a scaled-down pre-train -> fine-tune-at-a-larger-size run through main.py."""
import json
import os
import sys

import pytest
import torch

import main as main_mod
import tiny_models  # noqa: F401  (registers tiny_pvt)
from curriculum.presets import ETPP_RECIPES, PVT_ETPP, SWIN_SB, build_plan
from utils import load_checkpoint_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import recipes  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_intra_op_thread')


def parsed(args):
    return main_mod.get_args_parser().parse_args(args)


def main_part(cmd):
    i = next(k for k, a in enumerate(cmd) if os.path.basename(a) == 'main.py')
    return cmd[i + 1:]


@pytest.fixture(autouse=True)
def _launch_env(monkeypatch):
    for name in ('GPUS_PER_NODE', 'NNODES', 'DATA_PATH', 'OUTPUT_DIR', 'OUTPUT_ROOT', 'BUDGET', 'DRY_RUN'):
        monkeypatch.delenv(name, raising=False)


# ------------------------------------------------------------------------------ recipes

def test_pvt_schedule_is_one_shared_stand_in():
    # not published: Swin-S/B's 96x2, 160x4, 224x4 with its batches, one entry for all four
    assert PVT_ETPP.sizes == SWIN_SB.sizes and PVT_ETPP.batch_at == SWIN_SB.batch_at
    assert all(ETPP_RECIPES[m] is PVT_ETPP for m in ('pvt_tiny', 'pvt_small', 'pvt_medium', 'pvt_large'))
    a = parsed(main_part(recipes.build_command(['train', 'pvt_small', '--gpus', '8', '--data_path', '/d'])[0]))
    assert (a.lr, a.weight_decay, a.drop_path, a.use_amp, a.clip_grad) == (4e-3, 0.05, 0.1, True, None)
    plan = build_plan(a, 32)
    assert [s.size for s in plan.stages] == [96] * 2 + [160] * 4 + [224] * 4
    assert {s.size: (s.batch_size, s.update_freq) for s in plan.stages} == {96: (512, 1), 160: (256, 2),
                                                                            224: (128, 4)}


@pytest.mark.parametrize('model', sorted(recipes.IN22K_PRETRAIN))
def test_in22k_pretraining_budgets(model):
    r = recipes.IN22K_PRETRAIN[model]
    seen = {}
    for variant, budget in [('baseline', None), ('et', None), ('etpp', 60), ('etpp', 45), ('etpp', 30)]:
        argv = ['train', model, '--task', 'in22k', '--variant', variant, '--gpus', '8', '--data_path', '/in22k']
        cmd, _ = recipes.build_command(argv + (['--budget', str(budget)] if budget else []))
        a = parsed(main_part(cmd))
        assert a.model == model and a.disable_eval and a.warmup_epochs == 5 and a.baseline_epochs == 90
        assert a.batch_size * a.update_freq * 8 == 4096 and a.data_path == '/in22k'
        assert a.curriculum == {'baseline': 'none', 'et': 'et', 'etpp': 'etpp'}[variant]
        assert a.epochs == (budget or 90)
        seen[(variant, budget)] = a.drop_path
        assert f'{model}_in22k_{variant}_E{budget or 90}' in a.output_dir
    base = r.drop_path
    assert seen[('baseline', None)] == seen[('et', None)] == base
    # ET++ scales drop path by E / 60, as E / 200 for the 300-epoch IN-1K baseline
    assert [seen[('etpp', e)] for e in (60, 45, 30)] == pytest.approx([base, base * 0.75, base * 0.5])
    default, _ = recipes.build_command(['train', model, '--task', 'in22k', '--gpus', '8', '--data_path', '/d'])
    assert parsed(main_part(default)).epochs == 60


def test_convnext_in22k_and_finetune_follow_the_official_recipe():
    a = parsed(main_part(recipes.build_command(['train', 'convnext_base', '--task', 'in22k', '--variant', 'baseline',
                                                '--gpus', '8', '--data_path', '/d'])[0]))
    assert (a.lr, a.weight_decay, a.drop_path, a.model_ema) == (4e-3, 0.05, 0.1, False)
    for model, size, dp, per_gpu in [('convnext_base', 224, 0.2, 32), ('convnext_base', 384, 0.2, 16),
                                     ('convnext_large', 224, 0.3, 32), ('convnext_large', 384, 0.3, 16)]:
        cmd, _ = recipes.build_command(['train', model, '--task', f'ft{size}', '--finetune', 'in22k.pth',
                                        '--gpus', '8', '--data_path', '/in1k'])
        a = parsed(main_part(cmd))
        assert (a.finetune, a.input_size, a.curriculum, a.epochs) == ('in22k.pth', size, 'none', 30)
        assert (a.lr, a.weight_decay, a.layer_decay, a.head_init_scale) == (5e-5, 1e-8, 0.8, 0.001)
        assert (a.mixup, a.cutmix, a.warmup_epochs, a.drop_path, a.model_ema) == (0, 0, 0, dp, False)
        assert a.batch_size == per_gpu and a.batch_size * a.update_freq * 8 == 512


@pytest.mark.parametrize('model', ['CSWin_96_24322_base_224', 'CSWin_144_24322_large_224'])
def test_cswin_finetune_follows_the_efficienttrain_release(model):
    # LeapLabTHU/EfficientTrain EVAL.md: CSWin 22K -> 1K fine-tuning command
    for size, per_gpu in ((224, 64), (384, 32)):
        cmd, _ = recipes.build_command(['train', model, '--task', f'ft{size}', '--finetune', 'f.pth',
                                        '--gpus', '8', '--data_path', '/in1k'])
        a = parsed(main_part(cmd))
        assert (a.input_size, a.epochs, a.lr, a.weight_decay, a.drop_path) == (size, 30, 5e-5, 1e-8, 0.2)
        assert (a.layer_decay, a.mixup, a.cutmix, a.warmup_epochs, a.use_amp) == (0.9, 0, 0, 0, True)
        assert a.model_ema and a.model_ema_eval and a.model_ema_decay == 0.9998
        assert a.batch_size == per_gpu and a.batch_size * a.update_freq * 8 == 512


def test_launcher_refuses_bad_combinations(capsys):
    for argv, msg in [
        (['train', 'convnext_base', '--task', 'ft224', '--data_path', '/d', '--gpus', '8'], '--finetune FILE'),
        (['train', 'pvt_tiny', '--task', 'in22k', '--data_path', '/d', '--gpus', '8'], 'no IN-22K recipe'),
        (['train', 'CSWin_144_24322_large_224', '--data_path', '/d', '--gpus', '8'], 'no published recipe'),
        (['train', 'convnext_base', '--finetune', 'x', '--data_path', '/d', '--gpus', '8'], 'belongs to --task'),
        (['train', 'convnext_base', '--task', 'ft384', '--finetune', 'x', '--budget', '30', '--data_path', '/d',
          '--gpus', '8'], '--budget does not apply'),
    ]:
        assert recipes.cli(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count('\n') == 1


# ------------------------------------------------------------------ pre-train -> fine-tune

TINY = ['--model', 'tiny_pvt', '--data_set', 'SYNTH', '--synth_per_class', '16', '--synth_val_per_class', '4',
        '--device', 'cpu', '--num_workers', '0', '--print_freq', '1000', '--batch_size', '16',
        '--update_freq', '1', '--reprob', '0', '--pin_mem', 'false', '--log_dir', 'none']


def test_pretrain_then_finetune_at_a_larger_size(tmp_path, capsys):
    """IN-22K-like pre-training with ET++ (4 classes, B up to 64), then IN-1K-like fine-tuning of its
    checkpoint at 96 on other classes: the recipes' own flags, scaled down by later overrides."""
    pre = str(tmp_path / 'pre')
    argv = recipes.in22k_args('convnext_base', 'etpp', budget=3, world=1, output_dir=pre, extra=TINY + [
        '--synth_classes', '4', '--synth_image_size', '72', '--base_input_size', '64', '--warmup_epochs', '1'])
    main_mod.main(parsed(argv))
    log = [json.loads(line) for line in open(os.path.join(pre, 'log.txt'))]
    assert {r['input_size'] for r in log} == {32, 64} and 'test_acc1' not in log[-1]  # --disable_eval
    last = load_checkpoint_file(os.path.join(pre, f'checkpoint-{log[-1]["epoch"]}.pth'))
    assert last['input_size'] == 64 and last['model']['head.weight'].shape[0] == 4

    ft = str(tmp_path / 'ft')
    argv = recipes.finetune_args('CSWin_144_24322_large_224', 384, os.path.join(pre, f'checkpoint-{log[-1]["epoch"]}.pth'),
                                 world=1, output_dir=ft, extra=TINY + [
                                     '--synth_classes', '3', '--synth_image_size', '108', '--input_size', '96',
                                     '--epochs', '1', '--layer_decay', '0.8', '--model_ema_decay', '0.9'])
    a = parsed(argv)
    assert a.model_ema and a.layer_decay == 0.8 and a.finetune
    main_mod.main(a)
    out = capsys.readouterr().out
    assert 'Dropped classifier weights' in out and 'Fine-tuning from' in out
    done = load_checkpoint_file(os.path.join(ft, 'checkpoint-0.pth'))
    assert done['input_size'] == 96
    # position embeddings of the 64 model resampled to the 96 grids at load, head new (3 classes)
    assert done['model']['pos_embed1'].shape == (1, 24 * 24, 8)
    assert done['model']['pos_embed4'].shape == (1, 1 + 3 * 3, 64)
    assert done['model']['head.weight'].shape == (3, 64) and 'model_ema' in done
    rec = [json.loads(line) for line in open(os.path.join(ft, 'log.txt'))][-1]
    assert rec['input_size'] == 96 and 'test_acc1' in rec and 'test_ema_acc1' in rec
    # the backbone came from the pre-training: a weight of unchanged shape moved only by one
    # epoch of fine-tuning at a small lr (a fresh init would differ by about its 0.02 std)
    w_pre = last['model']['patch_embed4.proj.weight']
    w_ft = done['model']['patch_embed4.proj.weight']
    assert (w_ft - w_pre).abs().max() < 0.05
