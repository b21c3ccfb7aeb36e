"""Norm eps of every recipe family against the official code (issue 11).

Official values, read from each family's official model code:

* ConvNeXt, facebookresearch/ConvNeXt models/convnext.py: LayerNorm(..., eps=1e-6) in the stem,
  the downsampling layers and every block; final nn.LayerNorm(dims[-1], eps=1e-6).
* Swin, microsoft/Swin-Transformer models/swin_transformer.py: norm_layer=nn.LayerNorm (torch
  default eps 1e-5) for the patch embedding, every block, PatchMerging and the final norm.
* DeiT, facebookresearch/deit models.py: timm 0.4 VisionTransformer with
  norm_layer=partial(nn.LayerNorm, eps=1e-6) (blocks and final norm).
* CSWin, microsoft/CSWin-Transformer models/cswin.py: nn.LayerNorm (default 1e-5) in the stem
  (stage1_conv_embed), every block, Merge_Block and the final norm.
* CAFormer, sail-sg/metaformer metaformer_baselines.py: LayerNormWithoutBias / LayerNormGeneral
  eps=1e-6 in blocks, stem and downsampling; output norm partial(nn.LayerNorm, eps=1e-6); the
  MlpHead's norm is nn.LayerNorm(hidden_features), default eps 1e-5 (timm's is 1e-6: fixed in
  models/zoo.py).
* ResNet-50, torchvision: BatchNorm2d, default eps 1e-5.
* PVT v1, whai362/PVT classification/pvt.py: blocks and the final norm
  partial(nn.LayerNorm, eps=1e-6); PatchEmbed's norm and the spatial-reduction norm of
  Attention are nn.LayerNorm (default 1e-5).
"""
import re

import pytest
import torch
import torch.nn.functional as F

from models import RECIPE_MODELS, create_model
from tests.test_checkpoint_compat import perturbed, to_official_caformer
from models.checkpoint_compat import load_into

# recipe name -> family (the recipes of models/zoo.py)
FAMILY = {
    'resnet50': 'resnet', 'convnext_tiny': 'convnext', 'convnext_small': 'convnext', 'convnext_base': 'convnext',
    'deit_tiny_patch16_224': 'deit', 'deit_small_patch16_224': 'deit',
    'swin_tiny': 'swin', 'swin_small': 'swin', 'swin_base': 'swin',
    'CSWin_64_12211_tiny_224': 'cswin', 'CSWin_64_24322_small_224': 'cswin', 'CSWin_96_24322_base_224': 'cswin',
    'caformer_s18': 'caformer', 'caformer_s36': 'caformer', 'caformer_m36': 'caformer',
    'convnext_large': 'convnext', 'CSWin_144_24322_large_224': 'cswin',
    'pvt_tiny': 'pvt', 'pvt_small': 'pvt', 'pvt_medium': 'pvt', 'pvt_large': 'pvt',
}

# family -> (eps of every norm, {module-name pattern: eps} exceptions), as in the official code (above)
OFFICIAL_EPS = {
    'resnet': (1e-5, {}),
    'convnext': (1e-6, {}),
    'swin': (1e-5, {}),
    'deit': (1e-6, {}),
    'cswin': (1e-5, {}),
    'caformer': (1e-6, {r'head\.fc\.norm': 1e-5}),
    'pvt': (1e-6, {r'patch_embed\d\.norm': 1e-5, r'block\d\.\d+\.attn\.norm': 1e-5}),
}


def expected_eps(name, default, exceptions):
    for pattern, eps in exceptions.items():
        if re.fullmatch(pattern, name):
            return eps
    return default


def test_every_recipe_has_a_family():
    assert set(FAMILY) == set(RECIPE_MODELS)


def build(name):
    # on the meta device where the constructor allows it: nothing allocated or initialised
    try:
        with torch.device('meta'):
            return create_model(name, num_classes=10)
    except Exception:  # noqa: BLE001 - a constructor that reads values (CSWin's drop-path rates)
        return create_model(name, num_classes=10)


@pytest.mark.parametrize('name', sorted(FAMILY))
def test_norm_eps_as_official(name):
    default, exceptions = OFFICIAL_EPS[FAMILY[name]]
    model = build(name)
    norms = {n: m.eps for n, m in model.named_modules()
             if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm))
             or (hasattr(m, 'eps') and hasattr(m, 'weight') and isinstance(getattr(m, 'eps'), float))}
    assert len(norms) > 3
    wrong = {n: e for n, e in norms.items() if e != expected_eps(n, default, exceptions)}
    assert not wrong, wrong
    # every exception names norms that exist
    assert all(any(re.fullmatch(p, n) for n in norms) for p in exceptions)


def official_caformer_head(sd, pooled, head_eps):
    """The official head from official-layout weights: norm (LayerNorm 1e-6) of the pooled
    features, then MlpHead: fc1, SquaredReLU, LayerNorm(head_eps), fc2."""
    x = F.layer_norm(pooled, pooled.shape[-1:], sd['norm.weight'], sd['norm.bias'], eps=1e-6)
    x = F.linear(x, sd['head.fc1.weight'], sd['head.fc1.bias'])
    x = torch.relu(x) ** 2
    x = F.layer_norm(x, x.shape[-1:], sd['head.norm.weight'], sd['head.norm.bias'], eps=head_eps)
    return F.linear(x, sd['head.fc2.weight'], sd['head.fc2.bias'])


@pytest.mark.parametrize('name', ['caformer_s18', 'caformer_s36', 'caformer_m36'])
def test_caformer_head_matches_official_weights(name):
    """Official-layout weights of each recipe CAFormer loaded through load_into give the official
    head's logits (float64, so only the eps can differ)."""
    torch.manual_seed(0)
    src = perturbed(create_model(name, num_classes=10), seed=1)
    with torch.no_grad():
        # small hidden activations make the head's LayerNorm eps visible (as trained weights can)
        src.head.fc.fc1.weight.mul_(0.02)
    official = to_official_caformer(src.state_dict())
    model = create_model(name, num_classes=10).eval()
    assert load_into(model, {'model': official}).missing == []
    model = model.double()
    sd = {k: v.double() for k, v in official.items()}
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = feats.mean((2, 3))
        got = model.forward_head(feats)
    want = official_caformer_head(sd, pooled, head_eps=1e-5)
    assert torch.allclose(got, want, rtol=0, atol=1e-9), (got - want).abs().max()
    # the check can fail: timm's default head eps gives other logits
    other = official_caformer_head(sd, pooled, head_eps=1e-6)
    assert (other - want).abs().max() > 1e-6
