"""Fine-tuning at 384 from a 224 checkpoint through main.py's --finetune path, for the families
the IN-22K -> IN-1K recipes and the curriculum cover, and evaluation at 384 (resize, no crop).

What depends on the input size must be derived at load exactly as each family's own
fine-tuning code does: Swin windows 12 with its bias tables resized (timm's filter, as the
Swin release's loader), CSWin split sizes [1, 2, 12, 12] (microsoft/CSWin-Transformer's
*_384 models), ViT position embeddings resampled (timm's filter, bicubic as DeiT's
fine-tuning), PVT's per-stage embeddings resampled bilinearly (whai362/PVT's forward),
ConvNeXt unchanged.
"""
import json
import os

import pytest
import timm
import torch
from PIL import Image
from timm.models import build_model_with_cfg, swin_transformer, vision_transformer

import main as main_mod
from runner.checkpoint import load_finetune
from tiny_models import _registered
from curriculum.adapt import adapt_model
from pipelines.datasets import eval_transform
from models import create_model
from models.cswin import CSWinTransformer
from utils import load_checkpoint_file

pytestmark = pytest.mark.usefixtures('one_intra_op_thread')


@_registered
def tiny_cswin_ft(pretrained=False, **kwargs):
    """CSWin layout (cross-shaped stripes, LePE, split sizes [1, 2, B/32, B/32]) at toy width."""
    args = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4))
    return build_model_with_cfg(CSWinTransformer, 'tiny_cswin_ft', pretrained, **dict(args, **kwargs))


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict(keep_vars=True).values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * 0.05)
    return model


def _saved_224(name, path, classes=4):
    """A checkpoint as main.py writes it at the end of a 224 run (another number of classes)."""
    src = create_model(name, num_classes=classes)
    adapt_model(src, 224)
    sd = {k: v.clone() for k, v in _perturb(src, seed=3).state_dict().items()}
    torch.save({'model': sd, 'input_size': 224}, path)
    return sd


def _without_head(sd):
    head = {f'{p}.{s}' for p in ('head', 'head.fc') for s in ('weight', 'bias')}
    return {k: v for k, v in sd.items() if k not in head}


def _reference_swin(sd):
    ref = timm.create_model('tiny_swin_p4', img_size=384, window_size=12, num_classes=3)
    ref.load_state_dict(_without_head(swin_transformer.checkpoint_filter_fn(sd, ref)), strict=False)
    return ref


def _reference_vit(sd):
    ref = timm.create_model('tiny_vit_p16', img_size=384, num_classes=3)
    ref.load_state_dict(_without_head(vision_transformer.checkpoint_filter_fn(sd, ref)), strict=False)
    return ref


def _reference_cswin(sd):
    ref = create_model('tiny_cswin_ft', img_size=384, num_classes=3)
    assert ref.split_size == [1, 2, 12, 12]  # CSWin_*_384 of the CSWin release
    ref.load_state_dict(_without_head(sd), strict=False)
    return ref


def _reference_pvt(sd):
    ref = create_model('tiny_pvt', img_size=224, num_classes=3)
    ref.load_state_dict(_without_head(sd), strict=False)
    ref.set_input_size(384)  # the official forward resizes each stage's embedding the same way
    return ref


def _reference_convnext(sd):
    ref = create_model('convnext_atto', num_classes=3)
    ref.load_state_dict(_without_head(sd), strict=False)
    return ref


REFERENCES = {'tiny_swin_p4': _reference_swin, 'tiny_vit_p16': _reference_vit, 'tiny_cswin_ft': _reference_cswin,
              'tiny_pvt': _reference_pvt, 'convnext_atto': _reference_convnext}


@pytest.mark.parametrize('name', sorted(REFERENCES))
def test_finetune_at_384_adapts_at_load(name, tmp_path, capsys):
    ckpt = str(tmp_path / 'in22k.pth')
    sd = _saved_224(name, ckpt)
    args = main_mod.get_args_parser().parse_args(['--model', name, '--input_size', '384', '--finetune', ckpt,
                                                  '--head_init_scale', '0.001'])
    model, size = main_mod.build_model(args, 3)
    load_finetune(args, model)
    assert size == 384 and 'Dropped classifier weights' in capsys.readouterr().out
    if name == 'tiny_swin_p4':
        attns = [m for m in model.modules() if isinstance(m, swin_transformer.WindowAttention)]
        assert attns and all(tuple(a.window_size) == (12, 12) for a in attns)
        assert all(a.relative_position_bias_table.shape[0] == 23 * 23 for a in attns)
    if name == 'tiny_cswin_ft':
        assert model.split_size == [1, 2, 12, 12]
    ref = REFERENCES[name](sd).eval()
    x = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model.eval().forward_features(x), ref.forward_features(x)
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-5)


def test_swin_finetune_and_eval_at_384_through_main(tmp_path):
    """A 224 Swin checkpoint fine-tuned at 384 by main.py (window 12, 23 x 23 tables), then
    evaluated at 384 with --eval true --resume."""
    ckpt = str(tmp_path / 'pre.pth')
    _saved_224('tiny_swin_p4', ckpt)
    common = ['--model', 'tiny_swin_p4', '--data_set', 'SYNTH', '--synth_classes', '3', '--synth_per_class', '2',
              '--synth_val_per_class', '1', '--synth_image_size', '400', '--input_size', '384', '--device', 'cpu',
              '--num_workers', '0', '--print_freq', '1000', '--batch_size', '6', '--pin_mem', 'false',
              '--log_dir', 'none', '--mixup', '0', '--cutmix', '0', '--reprob', '0']
    out = str(tmp_path / 'ft')
    main_mod.main(main_mod.get_args_parser().parse_args(common + [
        '--finetune', ckpt, '--epochs', '1', '--warmup_epochs', '0', '--lr', '5e-5', '--layer_decay', '0.9',
        '--model_ema', 'true', '--model_ema_eval', 'true', '--output_dir', out]))
    rec = [json.loads(line) for line in open(os.path.join(out, 'log.txt'))][-1]
    assert rec['input_size'] == 384 and 'test_acc1' in rec and 'test_ema_acc1' in rec
    done = load_checkpoint_file(os.path.join(out, 'checkpoint-0.pth'))
    assert done['input_size'] == 384
    assert done['model']['layers.0.blocks.0.attn.relative_position_bias_table'].shape == (23 * 23, 1)
    # the saved file evaluated at 384 gives what the run measured at its end (same images, same transform)
    stats = main_mod.main(main_mod.get_args_parser().parse_args(common + [
        '--eval', 'true', '--resume', os.path.join(out, 'checkpoint-0.pth')]))
    assert stats['num_images'] == 3 and stats['acc1'] == pytest.approx(rec['test_acc1'])
    assert stats['loss'] == pytest.approx(rec['test_loss'], rel=1e-4)


def test_eval_at_384_resizes_without_crop():
    """METHOD.md: evaluation at 384 or more resizes the whole image (no centre crop)."""
    img = Image.new('RGB', (600, 400), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 30, 400))  # a red band at the left edge: a centre crop cuts it off
    t = eval_transform(384)(img)
    assert t.shape == (3, 384, 384)
    assert t[0, :, :10].mean() > t[2, :, :10].mean()  # the band is still there
    t = eval_transform(224)(img)
    assert t.shape == (3, 224, 224) and t[0, :, :10].mean() < t[2, :, :10].mean()  # cropped below 384


def test_cswin_large_is_the_released_configuration():
    # microsoft/CSWin-Transformer models/cswin.py CSWin_144_24322_large_224 / _384: embed 144,
    # depths [2, 4, 32, 2], heads [6, 12, 24, 24], split [1, 2, 7, 7] / [1, 2, 12, 12]; 173M parameters
    with torch.device('meta'):
        m = create_model('CSWin_144_24322_large_224')
    assert round(sum(p.numel() for p in m.parameters()) / 1e6) == 173
    stages = [m.get_submodule(f'stage{i}') for i in range(1, 5)]
    assert [len(s) for s in stages] == [2, 4, 32, 2]
    assert [s[0].num_heads for s in stages] == [6, 12, 24, 24]
    assert m.stage1_conv_embed[0].out_channels == 144 and m.head.in_features == 144 * 8
    assert m.split_size == [1, 2, 7, 7]
    adapt_model(m, 384)
    assert m.split_size == [1, 2, 12, 12]
