"""Parameter groups: no weight decay on norms/biases/tokens, layer-wise lr decay per family."""

import pytest
import timm
import torch

import main as main_mod
from optim_factory import apply_hparams, create_optimizer, device_lr, host_lr, param_groups


def scales_by_name(model, decay):
    out = {}
    for g in param_groups(model, 0.05, decay):
        for n in g['param_names']:
            out[n] = (g['lr_scale'], g['wd_scale'], g['layer_id'])
    return out


def test_convnext_layer_ids_follow_the_official_recipe():
    m = timm.create_model('convnext_tiny', num_classes=10)
    s = scales_by_name(m, 0.8)
    assert s['stem.0.weight'][2] == 0
    assert s['stages.0.blocks.0.conv_dw.weight'][2] == 1
    assert s['stages.1.downsample.1.weight'][2] == 2
    assert s['stages.2.blocks.5.conv_dw.weight'][2] == 3 + 5 // 3
    assert s['stages.3.blocks.0.conv_dw.weight'][2] == 12
    assert s['head.fc.weight'][2] == 13 and s['head.fc.weight'][0] == pytest.approx(1.0)
    assert s['stem.0.weight'][0] == pytest.approx(0.8 ** 13)
    # no weight decay on layer scale (gamma), norms and biases
    assert s['stages.0.blocks.0.gamma'][1] == 0 and s['stages.0.blocks.0.norm.weight'][1] == 0
    assert s['stages.0.blocks.0.conv_dw.bias'][1] == 0 and s['stages.0.blocks.0.conv_dw.weight'][1] == 1


def test_vit_layer_ids_and_no_decay_tokens():
    m = timm.create_model('deit_tiny_patch16_224', num_classes=10)
    s = scales_by_name(m, 0.75)
    depth = len(m.blocks)
    assert s['cls_token'][2] == 0 and s['pos_embed'][2] == 0 and s['patch_embed.proj.weight'][2] == 0
    assert s['blocks.3.attn.qkv.weight'][2] == 4
    assert s['head.weight'][2] == depth + 1 and s['head.weight'][0] == pytest.approx(1.0)
    assert s['cls_token'][1] == 0 and s['pos_embed'][1] == 0
    assert s['blocks.0.attn.qkv.weight'][1] == 1


def test_swin_layer_ids_put_merging_with_the_previous_stage():
    m = timm.create_model('swin_tiny_patch4_window7_224', num_classes=10)
    s = scales_by_name(m, 0.9)
    depths = [len(layer.blocks) for layer in m.layers]
    assert s['layers.0.blocks.0.attn.qkv.weight'][2] == 1
    assert s['layers.1.downsample.reduction.weight'][2] == depths[0]
    assert s['layers.1.blocks.0.attn.qkv.weight'][2] == depths[0] + 1
    assert s['head.fc.weight'][2] == sum(depths) + 1
    assert s['layers.0.blocks.0.attn.relative_position_bias_table'][1] == 0


def test_other_families_fall_back_to_timm_group_matcher():
    m = timm.create_model('resnet18', num_classes=10)
    groups = param_groups(m, 0.05, 0.7)
    assert len({g['lr_scale'] for g in groups}) > 2
    assert all(g['wd_scale'] in (0.0, 1.0) for g in groups)


def test_cswin_layer_ids_follow_the_efficienttrain_finetuning():
    """LeapLabTHU/EfficientTrain optim_factory.py get_num_layer_for_cswin (the CSWin 22K -> 1K
    fine-tuning with --layer_decay 0.9): 20 layers of two blocks, merge3 and stage 4 at 20,
    scale layer_decay ** (21 - id); norm and head at 21 (scale 1)."""
    import models
    with torch.device('meta'):
        m = models.create_model('CSWin_96_24322_base_224', num_classes=10)  # depths 2, 4, 32, 2
    s = scales_by_name(m, 0.9)
    expected = {'stage1_conv_embed.0.weight': 0, 'stage1_conv_embed.2.weight': 0, 'stage1.1.qkv.weight': 1,
                'merge1.conv.weight': 2, 'stage2.0.qkv.weight': 2, 'stage2.3.mlp.fc1.weight': 3,
                'merge2.norm.weight': 4, 'stage3.0.qkv.weight': 4, 'stage3.1.attns.0.get_v.weight': 4,
                'stage3.2.qkv.weight': 5, 'stage3.31.proj.weight': 19, 'merge3.conv.weight': 20,
                'stage4.1.qkv.weight': 20, 'norm.weight': 21, 'head.weight': 21}
    assert {n: s[n][2] for n in expected} == expected
    assert s['stage1_conv_embed.0.weight'][0] == pytest.approx(0.9 ** 21)
    assert s['stage3.2.qkv.weight'][0] == pytest.approx(0.9 ** 16)
    assert s['norm.weight'][0] == s['head.weight'][0] == pytest.approx(1.0)
    assert s['stage1.0.norm1.weight'][1] == 0 and s['stage1.0.qkv.weight'][1] == 1
    assert s['head.bias'][1] == 0


def test_apply_hparams_scales_lr_and_wd_per_group():
    args = main_mod.get_args_parser().parse_args(['--layer_decay', '0.5', '--opt', 'adamw'])
    m = timm.create_model('deit_tiny_patch16_224', num_classes=10)
    opt = create_optimizer(args, m)
    apply_hparams(opt, 1e-3, 0.1)
    for g in opt.param_groups:
        assert g['lr'] == pytest.approx(1e-3 * g['lr_scale'])
        assert g['weight_decay'] == pytest.approx(0.1 * g['wd_scale'])


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ATen operators dispatched (one kernel launch each on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_device_lr_is_written_by_one_kernel_for_every_group():
    """Issue 18, 2d: ConvNeXt-T with layer decay has 16 groups; once lr lives on the device (a captured
    step), apply_hparams writes all of them with one operator instead of one fill_ per group, and the
    values are those of the eager path (lr * lr_scale in Python floats, rounded to float32 once)."""
    m = timm.create_model('convnext_tiny', num_classes=10)
    groups = param_groups(m, 0.05, 0.8)
    for g in groups:
        g.pop('param_names')
    opt = torch.optim.AdamW(groups, lr=1e-3, fused=True)
    n = len(opt.param_groups)
    assert n == 16
    with _CountOps() as c:
        apply_hparams(opt, 4e-3, 0.05)
    assert c.ops == []  # Python floats: nothing on the device
    eager = [g['lr'] for g in opt.param_groups]
    device_lr(opt, torch.device('cpu'))
    views = [g['lr'] for g in opt.param_groups]
    with _CountOps() as c:
        apply_hparams(opt, 4e-3, 0.05)
    assert c.ops == ['aten.mul.out']  # before issue 18: n x aten.fill_.Scalar
    assert all(g['lr'] is v for g, v in zip(opt.param_groups, views))  # in place: a graph keeps reading them
    assert [float(v) for v in views] == [float(torch.tensor(e, dtype=torch.float32)) for e in eager]
    assert [g['weight_decay'] for g in opt.param_groups] == [0.05 * g['wd_scale'] for g in opt.param_groups]
    device_lr(opt, torch.device('cpu'))  # idempotent
    assert all(g['lr'] is v for g, v in zip(opt.param_groups, views))
    host_lr(opt)
    assert [type(g['lr']) for g in opt.param_groups] == [float] * n
    apply_hparams(opt, 4e-3, 0.05)
    assert [g['lr'] for g in opt.param_groups] == eager


@pytest.mark.parametrize('opt', ['adamw', 'sgd', 'lamb'])
def test_timm_optimizers(opt):
    args = main_mod.get_args_parser().parse_args(['--opt', opt])
    m = torch.nn.Linear(4, 2)
    o = create_optimizer(args, m)
    m(torch.randn(3, 4)).sum().backward()
    o.step()
    assert isinstance(o, torch.optim.Optimizer)


TINY = ['--data_set', 'SYNTH', '--synth_classes', '4', '--synth_per_class', '8', '--synth_val_per_class', '2',
        '--synth_image_size', '36', '--input_size', '32', '--model', 'test_convnext', '--batch_size', '8',
        '--device', 'cpu', '--num_workers', '0', '--epochs', '1', '--print_freq', '100']


@pytest.mark.parametrize('extra', [
    ['--use_amp', 'true', '--amp_dtype', 'bfloat16', '--clip_grad', '1.0', '--update_freq', '2'],
    ['--use_amp', 'true', '--amp_dtype', 'float16', '--model_ema', 'true', '--model_ema_eval', 'true',
     '--model_ema_force_cpu', 'true', '--layer_decay', '0.8', '--weight_decay_end', '0.2'],
])
def test_amp_clip_accumulation_ema_runs(tmp_path, extra):
    out = str(tmp_path / 'o')
    main_mod.main(main_mod.get_args_parser().parse_args(TINY + ['--output_dir', out] + extra))
    import json
    rec = json.loads(open(f'{out}/log.txt').readline())
    assert rec['epoch'] == 0 and rec['train_loss'] == rec['train_loss']  # finite, not NaN
