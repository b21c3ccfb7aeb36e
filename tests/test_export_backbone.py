"""scripts/export_backbone.py and models/official_names.py: timm names -> official names, checked
by loading the export back through models/checkpoint_compat.py (same logits) for every family."""
import argparse
import os
import sys

import pytest
import timm
import torch

import tiny_models  # noqa: F401  (registers tiny_pvt)
from models import create_model
from models.checkpoint_compat import LoadReport, load_into
from models.official_names import ExportError, to_official
from test_checkpoint_compat import (logits, perturbed, small_caformer, small_convnext, small_cswin, small_deit,
                                    small_swin, to_official_caformer, to_official_convnext, to_official_swin)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import export_backbone  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_intra_op_thread')


def small_resnet(num_classes=5):
    return timm.create_model('resnet18', num_classes=num_classes, zero_init_last=False)


def small_pvt(num_classes=5):
    return create_model('tiny_pvt', num_classes=num_classes)


# family -> (builder, input size, independent transcription of the official names or None)
FAMILIES = {
    'convnext': (small_convnext, 32, lambda sd, m: to_official_convnext(sd)),
    'swin': (small_swin, 64, to_official_swin),
    'caformer': (small_caformer, 32, lambda sd, m: to_official_caformer(sd)),
    'deit': (small_deit, 32, lambda sd, m: dict(sd)),
    'cswin': (small_cswin, 64, lambda sd, m: dict(sd)),
    'pvt': (small_pvt, 64, lambda sd, m: dict(sd)),
    'resnet': (small_resnet, 32, lambda sd, m: dict(sd)),
}


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_export_loads_back_with_same_logits(family):
    build, size, transcribed = FAMILIES[family]
    torch.manual_seed(0)
    src = perturbed(build(), seed=1)
    official = to_official(src)
    # the names are those of the official code (test_checkpoint_compat's transcription; it writes
    # an attn_mask for every odd Swin block, the official code none where the window covers the
    # whole map, i.e. without shift, as timm's blocks hold them)
    expected = set(transcribed(src.state_dict(), src))
    masks = {k for k in official if k.endswith('attn_mask')}
    assert set(official) == expected - ({k for k in expected if k.endswith('attn_mask')} - masks)
    assert masks == {k for k, b in src.named_buffers() if k.endswith('attn_mask') and b is not None}
    torch.manual_seed(1)
    dst = build().eval()
    assert not torch.allclose(logits(dst, size), logits(src, size))
    assert load_into(dst, {'model': official}) == LoadReport()
    assert torch.allclose(logits(dst, size), logits(src, size), atol=1e-5)

    backbone = to_official(src, drop_head=True)
    dropped = set(official) - set(backbone)
    assert dropped and all(k.startswith(('head', 'fc.')) for k in dropped)
    headless = build(num_classes=0).eval()
    report = load_into(headless, {'model': backbone})
    assert report.missing == [] and report.unexpected == []
    with torch.no_grad():
        x = torch.randn(1, 3, size, size)
        assert torch.allclose(headless(x), src.forward_head(src.forward_features(x), pre_logits=True), atol=1e-5)


def test_wrong_mapping_is_caught():
    m = small_convnext()
    sd = m.state_dict()
    sd['stages.0.blocks.0.conv_dw.weight'] = sd['stages.0.blocks.0.conv_dw.weight'] + 1  # not the model's values
    out = to_official(m, sd)  # a state dict of the model's architecture converts fine
    assert torch.equal(out['stages.0.0.dwconv.weight'], sd['stages.0.blocks.0.conv_dw.weight'])
    with pytest.raises(ExportError, match='no official naming'):
        to_official(timm.create_model('mobilenetv3_small_050', num_classes=3))


def _training_checkpoint(path, model, name, size, ema=None):
    ckpt = {'model': model.state_dict(), 'epoch': 3, 'input_size': size,
            'args': argparse.Namespace(model=name, nb_classes=model.num_classes, input_size=224)}
    if ema is not None:
        ckpt['model_ema'] = ema.state_dict()
    torch.save(ckpt, path)


def test_cli_mid_curriculum_checkpoint_exported_at_standard_size(tmp_path):
    # a checkpoint saved during a B=32 stage; exported for the model's standard 64 input
    torch.manual_seed(0)
    src = perturbed(create_model('tiny_pvt', num_classes=5, img_size=32), seed=3)
    ema = perturbed(create_model('tiny_pvt', num_classes=5, img_size=32), seed=4)
    ckpt = str(tmp_path / 'checkpoint-3.pth')
    _training_checkpoint(ckpt, src, 'tiny_pvt', 32, ema)
    out = str(tmp_path / 'backbone.pth')
    assert export_backbone.cli([ckpt, '--output', out, '--input_size', '64', '--ema']) == 0
    exported = torch.load(out, weights_only=True)
    assert list(exported) == ['model'] and exported['model']['pos_embed1'].shape == (1, 16 * 16, 8)
    dst = create_model('tiny_pvt', num_classes=5, img_size=64).eval()
    assert load_into(dst, exported) == LoadReport()
    ema.set_input_size(64)
    assert torch.allclose(logits(dst, 64), logits(ema.eval(), 64), atol=1e-5)


def test_cli_errors_leave_files_alone(tmp_path, capsys):
    src = small_convnext()
    ckpt = str(tmp_path / 'ckpt.pth')
    torch.save({'model': src.state_dict()}, ckpt)
    out = tmp_path / 'exists.pth'
    out.write_bytes(b'keep')
    cases = [
        ([ckpt, '--output', str(out), '--model', 'convnext_tiny'], 'exists: pass --overwrite'),
        ([ckpt, '--output', str(tmp_path / 'a.pth')], 'records no model name: pass --model'),
        ([ckpt, '--output', str(tmp_path / 'b.pth'), '--model', 'resnet18'], 'does not match model'),
        ([ckpt, '--output', str(tmp_path / 'c.pth'), '--model', 'convnext_tiny', '--ema'], "no 'model_ema'"),
        ([ckpt, '--output', ckpt, '--model', 'convnext_tiny'], 'is the input checkpoint'),
    ]
    for argv, msg in cases:
        assert export_backbone.cli(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count('\n') == 1, err
    assert out.read_bytes() == b'keep'
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pth', 'exists.pth']  # no partial or temporary file


def test_cli_no_head_and_own_help(tmp_path):
    text = export_backbone.get_args_parser().format_help()  # what --help prints
    assert '--no_head' in text and '--overwrite' in text and '--curriculum' not in text
    src = perturbed(create_model('tiny_pvt', num_classes=7), seed=2)
    ckpt = str(tmp_path / 'ckpt.pth')
    torch.save({'model': src.state_dict()}, ckpt)  # a bare file: model and classes from the flags / weights
    out = str(tmp_path / 'backbone.pth')
    assert export_backbone.cli([ckpt, '--output', out, '--model', 'tiny_pvt', '--input_size', '64', '--no_head']) == 0
    exported = torch.load(out, weights_only=True)['model']
    assert 'head.weight' not in exported and 'cls_token' in exported and 'norm.weight' in exported
    headless = create_model('tiny_pvt', num_classes=0).eval()
    assert load_into(headless, {'model': exported}) == LoadReport()
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        assert torch.allclose(headless(x), src.forward_head(src.forward_features(x), pre_logits=True), atol=1e-5)


def test_cli_bad_paths_and_failed_write(tmp_path, capsys, monkeypatch):
    """A folder as --output, a missing input, a full disk: one line, exit 2, nothing left behind."""
    src = small_pvt(num_classes=7)
    ckpt = str(tmp_path / 'ckpt.pth')
    torch.save({'model': src.state_dict()}, ckpt)
    folder = tmp_path / 'out'
    folder.mkdir()
    cases = [
        ([ckpt, '--output', str(folder), '--model', 'tiny_pvt', '--overwrite'], 'is a folder'),
        ([str(tmp_path / 'missing.pth'), '--output', str(tmp_path / 'd.pth')], 'is not a file: pass the checkpoint'),
        ([str(folder), '--output', str(tmp_path / 'e.pth')], 'is not a file: pass the checkpoint'),
    ]
    for argv, msg in cases:
        assert export_backbone.cli(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count('\n') == 1 and '--resume' not in err, err

    def disk_full(obj, f, *a, **k):
        f.write(b'partial')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', disk_full)
    assert export_backbone.cli([ckpt, '--output', str(tmp_path / 'f.pth'), '--model', 'tiny_pvt']) == 2
    err = capsys.readouterr().err
    assert 'cannot write' in err and 'No space left' in err and err.count('\n') == 1, err
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pth', 'out'] and not os.listdir(folder)
