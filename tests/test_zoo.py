import math

import pytest
import torch
import torchvision
from timm.models.convnext import ConvNeXt
from timm.models.metaformer import MetaFormer
from timm.models.resnet import Bottleneck, ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from models.cswin import CSWinTransformer
from models.pvt import PyramidVisionTransformer
from models.zoo import RECIPE_MODELS, create_model

EXPECTED = {
    'resnet50': ('resnet50', ResNet),
    'convnext_tiny': ('convnext_tiny', ConvNeXt),
    'convnext_small': ('convnext_small', ConvNeXt),
    'convnext_base': ('convnext_base', ConvNeXt),
    'deit_tiny_patch16_224': ('deit_tiny_patch16_224', VisionTransformer),
    'deit_small_patch16_224': ('deit_small_patch16_224', VisionTransformer),
    'swin_tiny': ('swin_tiny_patch4_window7_224', SwinTransformer),
    'swin_small': ('swin_small_patch4_window7_224', SwinTransformer),
    'swin_base': ('swin_base_patch4_window7_224', SwinTransformer),
    'CSWin_64_12211_tiny_224': ('CSWin_64_12211_tiny_224', CSWinTransformer),
    'CSWin_64_24322_small_224': ('CSWin_64_24322_small_224', CSWinTransformer),
    'CSWin_96_24322_base_224': ('CSWin_96_24322_base_224', CSWinTransformer),
    'caformer_s18': ('caformer_s18', MetaFormer),
    'caformer_s36': ('caformer_s36', MetaFormer),
    'caformer_m36': ('caformer_m36', MetaFormer),
    # issue 14: the IN-22K Large models and PVT v1
    'convnext_large': ('convnext_large', ConvNeXt),
    'CSWin_144_24322_large_224': ('CSWin_144_24322_large_224', CSWinTransformer),
    'pvt_tiny': ('pvt_tiny', PyramidVisionTransformer),
    'pvt_small': ('pvt_small', PyramidVisionTransformer),
    'pvt_medium': ('pvt_medium', PyramidVisionTransformer),
    'pvt_large': ('pvt_large', PyramidVisionTransformer),
}


def test_recipe_table():
    assert set(RECIPE_MODELS) == set(EXPECTED)
    for name, (timm_name, extra) in RECIPE_MODELS.items():
        assert timm_name == EXPECTED[name][0] and isinstance(extra, dict)


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_recipe_names_create_right_class(name):
    timm_name, cls = EXPECTED[name]
    with torch.device('meta'):  # structure only, no weight init cost for the big ones
        model = create_model(name, num_classes=10, drop_path_rate=0.1)
    assert type(model) is cls
    assert model.pretrained_cfg['architecture'] == timm_name
    assert model.num_classes == 10


def test_img_size_handling():
    with torch.device('meta'):
        for size, window in ((96, 3), (160, 5), (224, 7)):
            swin = create_model('swin_tiny', img_size=size)
            assert [layer.blocks[0].window_size for layer in swin.layers] == [(window, window)] * 4
        assert create_model('CSWin_64_12211_tiny_224', img_size=160).split_size == [1, 2, 5, 5]
        assert create_model('deit_small_patch16_224', img_size=96).pos_embed.shape[1] == 1 + 6 * 6
        # resolution-agnostic models take (and ignore) img_size
        assert isinstance(create_model('resnet50', img_size=96), ResNet)
        assert isinstance(create_model('convnext_tiny', img_size=96), ConvNeXt)
        assert isinstance(create_model('convnext_large', img_size=96), ConvNeXt)
        assert create_model('pvt_tiny', img_size=96).pos_embed4.shape[1] == 1 + 3 * 3
        assert create_model('CSWin_144_24322_large_224', img_size=384).split_size == [1, 2, 12, 12]
        assert isinstance(create_model('caformer_s18', img_size=96), MetaFormer)
    with pytest.raises(ValueError, match='multiple of 32'):
        create_model('swin_tiny', img_size=100)


def test_other_timm_names_pass_through():
    model = create_model('resnet18', num_classes=3)
    assert isinstance(model, ResNet) and model.fc.out_features == 3
    with torch.device('meta'):
        swin = create_model('swin_tiny_patch4_window7_224')
    assert isinstance(swin, SwinTransformer)


@pytest.mark.parametrize('name,expect', [
    ('convnext_tiyn', 'convnext_tiny'),
    ('swin_tinny', 'swin_tiny'),
    ('cswin_64_12211_tiny_224', 'CSWin_64_12211_tiny_224'),
    ('caformer_s19', 'caformer_s18'),
])
def test_unknown_name_suggests(name, expect):
    with pytest.raises(ValueError) as err:
        create_model(name)
    msg = str(err.value)
    assert '\n' not in msg and name in msg and expect in msg and 'did you mean' in msg


def test_pretrained_refused():
    with pytest.raises(ValueError, match='pretrained'):
        create_model('resnet50', pretrained=True)


def test_resnet50_init_matches_torchvision():
    torch.manual_seed(0)
    model = create_model('resnet50')
    ref = torchvision.models.resnet50()  # what the published recipe trained
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 16
    for blk in blocks:  # timm zeroes these by default (zero_init_last=True); torchvision does not
        assert torch.all(blk.bn3.weight == 1)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    # kaiming normal, fan_out, relu gain, as torchvision
    w = model.layer4[0].conv2.weight
    assert math.isclose(w.std().item(), math.sqrt(2 / (w.shape[0] * 9)), rel_tol=0.02)
    # classifier keeps nn.Linear's default init in both
    assert model.fc.weight.abs().max() <= 1 / math.sqrt(2048)
