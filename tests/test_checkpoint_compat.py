"""Round trips: timm model -> state_dict in the official codebase's naming (written here
as the inverse of the documented conversion) -> convert_to_timm / load_into into a fresh,
differently initialised model -> same logits."""
import re

import pytest
import timm
import torch
import torchvision
from timm.models import build_model_with_cfg
from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv

from models.checkpoint_compat import (
    LoadReport, classifier_prefixes, convert_to_timm, drop_mismatched_head, load_into)
from models.cswin import CSWinTransformer


# ---------------------------------------------------------------- small models, same naming
def small_convnext(num_classes=5, depths=(2, 2, 2, 2)):
    return timm.create_model('convnext_tiny', depths=depths, dims=(16, 32, 48, 64), num_classes=num_classes)


def small_swin(num_classes=5, img_size=64, window_size=2):
    return timm.create_model('swin_tiny_patch4_window7_224', depths=(2, 2, 2, 2), embed_dim=16,
                             num_heads=(1, 2, 2, 4), img_size=img_size, window_size=window_size,
                             num_classes=num_classes)


def small_deit(num_classes=5, img_size=32):
    return timm.create_model('deit_tiny_patch16_224', img_size=img_size, depth=2, num_classes=num_classes)


def small_caformer(num_classes=5):
    return build_model_with_cfg(
        MetaFormer, 'caformer_s18', pretrained=False, depths=(1, 2, 2, 1), dims=(16, 32, 64, 64),
        token_mixers=[SepConv, SepConv, Attention, Attention],
        norm_layers=[LayerNorm2dNoBias] * 2 + [LayerNormNoBias] * 2, num_classes=num_classes)


def small_cswin(num_classes=5):
    return CSWinTransformer(img_size=64, embed_dim=16, depths=(1, 2, 1, 1), num_heads=(2, 2, 4, 4),
                            num_classes=num_classes)


# ---------------------------------------------------------------- timm -> official names
def to_official_convnext(sd):
    """facebookresearch/ConvNeXt: downsample_layers.0 = stem (conv, LN), downsample_layers.i
    = (LN, conv), stages.i.j.{dwconv, norm, pwconv1, pwconv2 (nn.Linear), gamma}, norm, head."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r'^stem\.', 'downsample_layers.0.', k)
        k = re.sub(r'^stages\.(\d+)\.downsample\.', r'downsample_layers.\1.', k)
        k = re.sub(r'^stages\.(\d+)\.blocks\.(\d+)\.', r'stages.\1.\2.', k)
        k = k.replace('.conv_dw.', '.dwconv.').replace('.mlp.fc1.', '.pwconv1.').replace('.mlp.fc2.', '.pwconv2.')
        k = re.sub(r'^head\.norm\.', 'norm.', k)
        k = re.sub(r'^head\.fc\.', 'head.', k)
        if '.pwconv' in k and v.ndim == 4:
            v = v.flatten(1)
        out[k] = v
    return out


def to_official_swin(sd, model):
    """microsoft/Swin-Transformer: the PatchMerging after stage i is layers.i.downsample
    (timm: layers.{i+1}.downsample), head is a plain Linear, and the persistent buffers
    relative_position_index / attn_mask are saved."""
    out = {}
    for k, v in sd.items():
        m = re.match(r'^layers\.(\d+)\.downsample\.(.*)$', k)
        if m:
            k = f'layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}'
        k = re.sub(r'^head\.fc\.', 'head.', k)
        out[k] = v
    for i, layer in enumerate(model.layers):
        for j, blk in enumerate(layer.blocks):
            n = blk.attn.window_area
            out[f'layers.{i}.blocks.{j}.attn.relative_position_index'] = torch.randint(0, 9, (n, n))
            if j % 2:
                out[f'layers.{i}.blocks.{j}.attn_mask'] = torch.zeros(4, n, n)
    return out


def to_official_deit(sd):
    """timm 0.4 VisionTransformer used today's names (cls_token, pos_embed, patch_embed.proj,
    blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm, head)."""
    return dict(sd)


def to_official_caformer(sd):
    """sail-sg/metaformer: downsample_layers.0 = stem (conv, post_norm), downsample_layers.i
    (pre_norm, conv), stages.i.j.*, nn.Linear weights (2-D), norm, head = MlpHead (fc1, norm, fc2)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r'^stem\.conv\.', 'downsample_layers.0.conv.', k)
        k = re.sub(r'^stem\.norm\.', 'downsample_layers.0.post_norm.', k)
        k = re.sub(r'^stages\.(\d+)\.downsample\.norm\.', r'downsample_layers.\1.pre_norm.', k)
        k = re.sub(r'^stages\.(\d+)\.downsample\.conv\.', r'downsample_layers.\1.conv.', k)
        k = re.sub(r'^stages\.(\d+)\.blocks\.(\d+)\.', r'stages.\1.\2.', k)
        k = re.sub(r'^head\.norm\.', 'norm.', k)
        k = re.sub(r'^head\.fc\.', 'head.', k)
        if v.ndim == 4 and v.shape[-2:] == (1, 1):
            v = v.flatten(1)
        out[k] = v
    return out


def perturbed(model, seed):
    """Random values in every saved tensor (norm gains, scales, BN statistics included) so
    that any two tensors exchanged by a wrong mapping change the output.  Non-persistent
    buffers (e.g. Swin's attn_mask) are derived, not loaded, so they stay as built."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            if name.endswith('running_var'):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.add_(torch.randn(t.shape, generator=g) * 0.05)
    return model.eval()


def logits(model, size):
    torch.manual_seed(123)
    with torch.no_grad():
        return model(torch.randn(1, 3, size, size))


FAMILIES = {
    'convnext': (small_convnext, lambda sd, m: to_official_convnext(sd), 32),
    'swin': (small_swin, to_official_swin, 64),
    'deit': (small_deit, lambda sd, m: to_official_deit(sd), 32),
    'caformer': (small_caformer, lambda sd, m: to_official_caformer(sd), 32),
    'cswin': (small_cswin, lambda sd, m: dict(sd), 64),
}


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_official_round_trip(family):
    build, to_official, size = FAMILIES[family]
    torch.manual_seed(0)
    src = perturbed(build(), seed=1)
    official = to_official(src.state_dict(), src)
    assert set(official) != set(src.state_dict()) or family in ('deit', 'cswin')
    torch.manual_seed(1)
    dst = build().eval()
    assert not torch.allclose(logits(dst, size), logits(src, size))
    converted = convert_to_timm(dst, {'model': official})
    assert set(converted) == set(dst.state_dict())
    report = load_into(dst, {'model': {f'module.{k}': v for k, v in official.items()}})
    assert report == LoadReport()
    assert torch.allclose(logits(dst, size), logits(src, size), atol=1e-5)


def test_resnet50_torchvision_checkpoint():
    torch.manual_seed(0)
    ref = perturbed(torchvision.models.resnet50(num_classes=10), seed=1)
    model = timm.create_model('resnet50', num_classes=10, zero_init_last=False).eval()
    report = load_into(model, ref.state_dict())
    assert report == LoadReport()
    assert torch.allclose(logits(model, 32), logits(ref, 32), atol=1e-4)


def test_timm_named_checkpoint_passes_through():
    src = perturbed(small_convnext(), seed=3)
    dst = small_convnext().eval()
    assert load_into(dst, src.state_dict()) == LoadReport()
    assert torch.allclose(logits(dst, 32), logits(src, 32), atol=1e-5)


def test_other_architecture_raises_one_line():
    swin_official = to_official_swin(small_swin().state_dict(), small_swin())
    for model in (small_convnext(), small_caformer(), small_deit(), small_cswin()):
        with pytest.raises(ValueError) as err:
            load_into(model, {'model': swin_official})
        msg = str(err.value)
        assert '\n' not in msg
        assert msg.startswith('checkpoint does not match model ')
        assert 'looks like a swin checkpoint' in msg and 'pass the matching --model' in msg
    with pytest.raises(ValueError, match=r'convnext_tiny: \d+ of \d+ tensors missing .*looks like a cswin'):
        load_into(small_convnext(), small_cswin().state_dict())
    resnet = timm.create_model('resnet18', num_classes=5)
    with pytest.raises(ValueError, match='looks like a convnext checkpoint'):
        load_into(resnet, to_official_convnext(small_convnext().state_dict()))


def test_same_family_other_size_raises():
    deeper = to_official_convnext(small_convnext(depths=(2, 2, 6, 2)).state_dict())
    with pytest.raises(ValueError, match="conversion failed on 'stages.2.blocks.2.*convnext checkpoint of another size"):
        load_into(small_convnext(), deeper)
    deeper_cswin = CSWinTransformer(img_size=64, embed_dim=16, depths=(1, 2, 3, 1), num_heads=(2, 2, 4, 4))
    with pytest.raises(ValueError, match='unexpected tensors.*cswin checkpoint of another size'):
        load_into(small_cswin(), deeper_cswin.state_dict())
    wider = timm.create_model('deit_tiny_patch16_224', img_size=32, depth=2, embed_dim=96, num_classes=5)
    with pytest.raises(ValueError, match=r'another shape outside the classifier \(e\.g\. '):
        load_into(small_deit(), wider.state_dict())


def test_mismatched_head_dropped_and_named():
    cases = [
        (small_convnext, lambda m: to_official_convnext(m.state_dict()), ['head.fc.bias', 'head.fc.weight'], 32),
        (small_swin, lambda m: to_official_swin(m.state_dict(), m), ['head.fc.bias', 'head.fc.weight'], 64),
        (small_deit, lambda m: m.state_dict(), ['head.bias', 'head.weight'], 32),
        (small_caformer, lambda m: to_official_caformer(m.state_dict()), ['head.fc.fc2.bias', 'head.fc.fc2.weight'], 32),
        (small_cswin, lambda m: m.state_dict(), ['head.bias', 'head.weight'], 64),
    ]
    for build, export, head_keys, size in cases:
        src = perturbed(build(num_classes=7), seed=5)
        dst = build(num_classes=3).eval()
        report = load_into(dst, export(src))
        assert sorted(report.dropped_head) == head_keys
        assert sorted(report.missing) == head_keys and report.unexpected == [] and report.mismatched == []
        with torch.no_grad():  # everything up to the classifier was loaded
            fa = src.forward_head(src.forward_features(torch.ones(1, 3, size, size)), pre_logits=True)
            fb = dst.forward_head(dst.forward_features(torch.ones(1, 3, size, size)), pre_logits=True)
        assert torch.allclose(fa, fb, atol=1e-5)


def test_resnet_head_and_classifier_names():
    model = timm.create_model('resnet50', num_classes=3)
    assert classifier_prefixes(model) == ['fc']
    sd = torchvision.models.resnet50().state_dict()
    dropped = drop_mismatched_head(model, sd)
    assert sorted(dropped) == ['fc.bias', 'fc.weight'] and 'fc.weight' not in sd
    assert classifier_prefixes(small_caformer()) == ['head.fc', 'head.fc.fc2']
    distilled = timm.create_model('deit_tiny_distilled_patch16_224', img_size=32, depth=1, num_classes=2)
    assert classifier_prefixes(distilled) == ['head', 'head_dist']


def test_headless_model_drops_head():
    src = small_convnext(num_classes=7)
    dst = small_convnext(num_classes=0)
    report = load_into(dst, to_official_convnext(src.state_dict()))
    assert sorted(report.dropped_head) == ['head.fc.bias', 'head.fc.weight'] and report.missing == []


def test_strict_arch_false_loads_what_fits():
    src = perturbed(small_convnext(), seed=2)
    official = to_official_convnext(src.state_dict())
    official = {k: v for k, v in official.items() if not k.startswith('stages.')}
    official['downsample_layers.1.1.weight'] = torch.zeros(32, 16, 3, 3)
    dst = small_convnext()
    with pytest.raises(ValueError, match='tensors missing'):
        load_into(dst, official)
    report = load_into(dst, official, strict_arch=False)
    assert report.mismatched == ['stages.1.downsample.1.weight']
    assert 'stages.1.downsample.1.weight' in report.missing
    assert all(k.startswith('stages.') for k in report.missing)
    assert torch.equal(dst.stem[0].weight, src.stem[0].weight)


def test_swin_224_checkpoint_into_low_resolution_stage():
    """A 224 Swin (window 7) checkpoint loads into the B=96 model (window 3): timm's filter
    resizes relative_position_bias_table; nothing else changes shape."""
    src = small_swin(img_size=224, window_size=7)
    dst = small_swin(img_size=96, window_size=3)
    report = load_into(dst, to_official_swin(src.state_dict(), src))
    assert report == LoadReport()
    assert dst.layers[0].blocks[0].attn.relative_position_bias_table.shape[0] == (2 * 3 - 1) ** 2
    assert logits(dst.eval(), 96).shape == (1, 5)


def test_deit_pos_embed_resampled():
    src = small_deit(img_size=64)
    dst = small_deit(img_size=32)
    assert load_into(dst, src.state_dict()) == LoadReport()
    assert dst.pos_embed.shape == (1, 1 + 2 * 2, 192)
