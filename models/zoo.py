"""Model names of the EfficientTrain / EfficientTrain++ recipes, mapped onto timm.

``create_model(name, **kwargs)`` builds the recipe model ``name`` (see
``RECIPE_MODELS``); any other name registered with timm is passed to
``timm.create_model`` unchanged.  Weights are never downloaded: released
checkpoints are loaded afterwards with ``models.checkpoint_compat.load_into``.
"""
import difflib
from typing import Any, Dict, List, Tuple

import timm
import torch.nn as nn
from timm.models import metaformer

from . import cswin  # noqa: F401  (registers the CSWin_* names with timm)
from . import pvt  # noqa: F401  (registers pvt_tiny/small/medium/large with timm)
from . import mae  # noqa: F401  (registers mae_vit_tiny/base/large_patch16, mae_vit_huge_patch14 with timm)

__all__ = ['RECIPE_MODELS', 'create_model', 'suggest_names']

# recipe name -> (timm name, extra kwargs)
RECIPE_MODELS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    # The published ResNet-50 recipe trained torchvision's ResNet-50, whose init is
    # kaiming-normal(fan_out) convs and BN gamma=1 everywhere.  timm's ResNet.init_weights
    # does the same kaiming init, but by default (zero_init_last=True) then zeroes the
    # last BN gamma of every bottleneck (Bottleneck.zero_init_last -> bn3.weight = 0);
    # zero_init_last=False skips exactly that step.  timm's resnet50 uses torchvision's
    # parameter names (conv1, bn1, layerN.M.convK/bnK, downsample.0/1, fc).
    'resnet50': ('resnet50', {'zero_init_last': False}),
    'convnext_tiny': ('convnext_tiny', {}),
    'convnext_small': ('convnext_small', {}),
    'convnext_base': ('convnext_base', {}),
    'convnext_large': ('convnext_large', {}),  # ImageNet-22K pre-training (EfficientTrain++ Table 12)
    'deit_tiny_patch16_224': ('deit_tiny_patch16_224', {}),
    'deit_small_patch16_224': ('deit_small_patch16_224', {}),
    'swin_tiny': ('swin_tiny_patch4_window7_224', {}),
    'swin_small': ('swin_small_patch4_window7_224', {}),
    'swin_base': ('swin_base_patch4_window7_224', {}),
    'CSWin_64_12211_tiny_224': ('CSWin_64_12211_tiny_224', {}),
    'CSWin_64_24322_small_224': ('CSWin_64_24322_small_224', {}),
    'CSWin_96_24322_base_224': ('CSWin_96_24322_base_224', {}),
    'CSWin_144_24322_large_224': ('CSWin_144_24322_large_224', {}),  # ImageNet-22K pre-training
    # PVT v1 (models/pvt.py); img_size sets its position-embedding grids
    'pvt_tiny': ('pvt_tiny', {}),
    'pvt_small': ('pvt_small', {}),
    'pvt_medium': ('pvt_medium', {}),
    'pvt_large': ('pvt_large', {}),
    'caformer_s18': ('caformer_s18', {}),
    'caformer_s36': ('caformer_s36', {}),
    'caformer_m36': ('caformer_m36', {}),
}

# How a recipe model takes `img_size`.  Convolutional models are resolution-agnostic and
# their timm classes reject an img_size argument, so it is dropped.  Swin's window is B/32
# in the recipe (3 at 96, 5 at 160, 7 at 224); timm's constructor would otherwise keep the
# window at 7 and only clamp it to the feature size.  DeiT (position embedding) and CSWin
# (split sizes) take img_size as it is.
_IMG_SIZE_AGNOSTIC = frozenset({
    'resnet50', 'convnext_tiny', 'convnext_small', 'convnext_base', 'convnext_large',
    'caformer_s18', 'caformer_s36', 'caformer_m36',
})
_IMG_SIZE_SETS_WINDOW = frozenset({'swin_tiny', 'swin_small', 'swin_base'})


def _metaformer_official_head_eps(model: nn.Module) -> None:
    # sail-sg/metaformer (metaformer_baselines.py): MlpHead normalises its hidden features
    # with nn.LayerNorm(hidden_features), i.e. torch's default eps 1e-5; timm's MlpHead uses
    # timm.layers.LayerNorm, whose default is 1e-6 (the cause of logits up to 7.7e-4 away
    # from the official model, issue 11). Every other MetaFormer norm is 1e-6 in both codes.
    # timm's MetaFormer builds the MlpHead itself and takes no argument for its norm, so the
    # module is adjusted after creation; MetaFormer.reset_classifier would build timm's head
    # (eps 1e-6) again, and nothing here calls it. Models without an MLP head (PoolFormer)
    # are left alone.
    fc = getattr(getattr(model, 'head', None), 'fc', None)
    if isinstance(fc, metaformer.MlpHead):
        fc.norm.eps = 1e-5


# Per family (by model class, looked up along the MRO): what makes timm's module compute
# what the family's official code computes. Every family's norm eps against the official
# code is recorded in tests/test_norm_eps.py; only MetaFormer differs.
_OFFICIAL_FIXES = {
    metaformer.MetaFormer: _metaformer_official_head_eps,
}


def official_fixes(model: nn.Module) -> nn.Module:
    """Apply the family's fixes of _OFFICIAL_FIXES to a freshly created model (in place)."""
    for cls in type(model).__mro__:
        fix = _OFFICIAL_FIXES.get(cls)
        if fix is not None:
            fix(model)
            break
    return model


def suggest_names(name: str, n: int = 5) -> List[str]:
    """Names close to ``name`` among the recipe names and all timm models (case-insensitive)."""
    candidates = list(RECIPE_MODELS) + timm.list_models()
    by_lower: Dict[str, str] = {}
    for c in candidates:
        by_lower.setdefault(c.lower(), c)
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=0.6)
    return [by_lower[c] for c in close]


def _square_size(img_size) -> int:
    if isinstance(img_size, int):
        return img_size
    h, w = img_size
    if h != w:
        raise ValueError(f'recipe models train on square inputs, got img_size {img_size}')
    return int(h)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build ``name`` with pretrained=False; kwargs go to timm (num_classes, drop_path_rate, img_size...)."""
    if kwargs.pop('pretrained', False):
        raise ValueError(
            'pretrained=True is not supported (no network access); create the model and load a '
            'checkpoint with models.checkpoint_compat.load_into')
    if name in RECIPE_MODELS:
        timm_name, extra = RECIPE_MODELS[name]
        kwargs = {**extra, **kwargs}
        if kwargs.get('img_size') is not None:
            if name in _IMG_SIZE_AGNOSTIC:
                kwargs.pop('img_size')
            elif name in _IMG_SIZE_SETS_WINDOW and kwargs.get('window_size') is None:
                size = _square_size(kwargs['img_size'])
                if size % 32:
                    raise ValueError(f'{name}: img_size must be a multiple of 32 (window = B/32), got {size}')
                kwargs['window_size'] = size // 32
    elif timm.is_model(name):
        timm_name = name
    else:
        close = suggest_names(name)
        hint = f"; did you mean: {', '.join(close)}?" if close else '; see models.zoo.RECIPE_MODELS'
        raise ValueError(f'unknown model {name!r}{hint}')
    return official_fixes(timm.create_model(timm_name, pretrained=False, **kwargs))

