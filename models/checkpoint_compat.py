"""Load released checkpoints (official-codebase parameter names) into timm models.

The EfficientTrain / EfficientTrain++ checkpoints use the names of the official
model code of each family:

=============  ==========================================  ==========================
family         checkpoint naming                           conversion
=============  ==========================================  ==========================
ConvNeXt       facebookresearch/ConvNeXt                   timm convnext filter
Swin           microsoft/Swin-Transformer (downsample at   timm swin filter
               the END of each stage: layers.0.downsample)
DeiT           timm 0.4 VisionTransformer                  timm vision_transformer filter
CAFormer       sail-sg/metaformer                          timm metaformer filter
CSWin          microsoft/CSWin-Transformer                 identity (models.cswin uses those names)
PVT (v1)       whai362/PVT                                 models.pvt filter (names identical;
                                                           position embeddings resized)
ResNet-50      torchvision                                 identity (timm resnet uses those names)
=============  ==========================================  ==========================

What is relied on in timm 1.0.x (checked against the installed 1.0.31); each
filter takes ``(state_dict, model)`` and returns a new dict with timm names:

* ``convnext.checkpoint_filter_fn``: returns the input untouched when it already has
  timm names ('head.norm.weight' or 'norm_pre.weight' present); otherwise maps
  downsample_layers.0 -> stem, downsample_layers.i -> stages.i.downsample,
  stages.i.j -> stages.i.blocks.j, dwconv -> conv_dw, pwconv -> mlp.fc, norm -> head.norm,
  head -> head.fc, and reshapes 2-D weights to the model's shape by indexing
  ``model.state_dict()[new_key]`` (KeyError on a foreign checkpoint).
* ``swin_transformer.checkpoint_filter_fn``: drops relative_position_index / attn_mask
  buffers; if 'layers.0.downsample.reduction.weight' is present (official layout) moves
  layers.i.downsample -> layers.{i+1}.downsample and head -> head.fc; resizes
  relative_position_bias_table to the model's window (so a 224 checkpoint loads into a
  model built for B=96/160) via ``model.get_submodule`` (AttributeError on a foreign
  checkpoint).
* ``vision_transformer.checkpoint_filter_fn``: names of timm 0.4 DeiT are the current
  ones; it resamples pos_embed to the model's patch grid and drops 'pre_logits'.
  Called with adapt_layer_scale=True as timm's deit builder does (only renames DeiT-3
  'gamma_N' keys, absent here).
* ``metaformer.checkpoint_filter_fn``: returns the input untouched when 'stem.conv.weight'
  is present; otherwise maps downsample_layers.0 -> stem (post_norm -> norm),
  downsample_layers.i -> stages.i.downsample (pre_norm -> norm), stages.i.j ->
  stages.i.blocks.j, norm -> head.norm, head -> head.fc, and reshapes any tensor whose
  numel equals the model's (official Linear -> timm 1x1 conv weights); it indexes
  ``model.state_dict()[new_key]`` (KeyError on a foreign checkpoint).

Names are not all: the official CAFormer head normalises with eps 1e-5 where timm's uses
1e-6, so a CAFormer reproduces the official logits only when built by
``models.create_model`` (models/zoo.py sets the official eps; tests/test_norm_eps.py).

A filter that raises on a foreign checkpoint is caught: the keys are then passed on
unconverted and ``load_into`` reports the mismatch with one readable line.
"""
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models import convnext, metaformer, resnet, swin_transformer, vision_transformer

from .cswin import CSWinTransformer

__all__ = [
    'LoadReport', 'convert_to_timm', 'load_into', 'drop_mismatched_head',
    'unwrap_state_dict', 'classifier_prefixes', 'guess_family',
]


def _identity(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    return dict(state_dict)


def _vit_filter(state_dict, model):
    return vision_transformer.checkpoint_filter_fn(state_dict, model, adapt_layer_scale=True)


# model class -> (family name, filter).  Looked up along the model's MRO, so subclasses
# (e.g. timm's VisionTransformerDistilled) use their base class's entry.
_CONVERTERS: Dict[type, Tuple[str, Callable]] = {
    convnext.ConvNeXt: ('convnext', convnext.checkpoint_filter_fn),
    swin_transformer.SwinTransformer: ('swin', swin_transformer.checkpoint_filter_fn),
    vision_transformer.VisionTransformer: ('deit', _vit_filter),
    metaformer.MetaFormer: ('caformer', metaformer.checkpoint_filter_fn),
    resnet.ResNet: ('resnet', _identity),
    CSWinTransformer: ('cswin', _identity),
}

# Key sets that identify a checkpoint's family, official and timm naming; used only to
# word the error message.
_FAMILY_MARKERS: List[Tuple[str, Tuple[str, ...]]] = [
    ('cswin', ('stage1_conv_embed.0.weight',)),
    ('swin', ('layers.0.blocks.0.attn.relative_position_bias_table',)),
    ('convnext', ('downsample_layers.0.0.weight', 'stages.0.0.dwconv.weight')),
    ('convnext', ('stem.0.weight', 'stages.0.blocks.0.conv_dw.weight')),
    ('caformer', ('downsample_layers.0.conv.weight',)),
    ('caformer', ('stem.conv.weight', 'stages.0.blocks.0.norm1.weight')),
    ('deit', ('cls_token', 'blocks.0.attn.qkv.weight')),
    ('resnet', ('conv1.weight', 'layer1.0.conv1.weight')),
]

_WRAPPER_KEYS = ('model', 'module', 'state_dict')
_PREFIXES = ('module.', '_orig_mod.')  # DataParallel/DDP, torch.compile


@dataclass
class LoadReport:
    missing: List[str] = field(default_factory=list)       # model keys left at their init
    unexpected: List[str] = field(default_factory=list)    # checkpoint keys the model has no use for
    dropped_head: List[str] = field(default_factory=list)  # classifier keys dropped (shape differs)
    mismatched: List[str] = field(default_factory=list)    # non-classifier keys of another shape, skipped
                                                           # (only possible with strict_arch=False)


def unwrap_state_dict(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint: unwraps {'model': ...} (also 'module', 'state_dict')
    when the top level holds no tensors, and strips a leading 'module.' / '_orig_mod.'."""
    sd = checkpoint
    while isinstance(sd, Mapping) and not any(torch.is_tensor(v) for v in sd.values()):
        inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    out = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    for prefix in _PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def _family_and_filter(model: nn.Module) -> Tuple[Optional[str], Callable]:
    for cls in type(model).__mro__:
        if cls in _CONVERTERS:
            return _CONVERTERS[cls]
    return None, _identity


def guess_family(state_dict: Mapping) -> Optional[str]:
    """Family whose marker keys are all in ``state_dict`` (official or timm names), else None."""
    keys = set(state_dict)
    for family, markers in _FAMILY_MARKERS:
        if all(m in keys for m in markers):
            return family
    return None


def _convert(model: nn.Module, sd: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """(converted dict, None), or (sd unconverted, why) when timm's filter gave up."""
    family, filter_fn = _family_and_filter(model)
    try:
        return dict(filter_fn(sd, model)), None
    except (KeyError, AttributeError, RuntimeError, ValueError, IndexError) as e:
        # timm's filters index the model by each converted key (model.state_dict()[k],
        # model.get_submodule(...)), so a key the model lacks aborts the whole conversion.
        what = repr(e.args[0]) if isinstance(e, KeyError) and e.args else f'{type(e).__name__}: {e}'
        return dict(sd), f"timm's {family} conversion failed on {what}".replace('\n', ' ')


def convert_to_timm(model: nn.Module, state_dict: Mapping) -> Dict[str, torch.Tensor]:
    """Map a checkpoint in the official naming of ``model``'s family onto ``model``'s keys.

    Checkpoints already in timm naming pass through.  A checkpoint of another family (or
    size) that makes timm's filter fail is returned unconverted (prefix stripped):
    ``load_into`` then explains the mismatch.
    """
    return _convert(model, unwrap_state_dict(state_dict))[0]


def classifier_prefixes(model: nn.Module) -> List[str]:
    """Module names of the classifier, from pretrained_cfg['classifier'] and from the
    module(s) returned by model.get_classifier()."""
    names = []
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    cls_cfg = cfg.get('classifier')
    if cls_cfg:
        names += [cls_cfg] if isinstance(cls_cfg, str) else list(cls_cfg)
    if hasattr(model, 'get_classifier'):
        heads = model.get_classifier()
        heads = heads if isinstance(heads, (tuple, list)) else (heads,)
        ids = {id(h) for h in heads if isinstance(h, nn.Module)}
        names += [n for n, m in model.named_modules() if id(m) in ids and n]
    return sorted(set(names))


def _is_head_key(key: str, prefixes: List[str]) -> bool:
    return any(key.startswith(p + '.') for p in prefixes)


def drop_mismatched_head(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """Remove, in place, classifier keys (timm names) whose shape differs from the model's
    or that the model's classifier lacks (e.g. num_classes=0); returns the removed keys."""
    prefixes = classifier_prefixes(model)
    model_sd = model.state_dict()
    dropped = [
        k for k, v in state_dict.items()
        if _is_head_key(k, prefixes) and (k not in model_sd or tuple(model_sd[k].shape) != tuple(v.shape))
    ]
    for k in dropped:
        del state_dict[k]
    return dropped


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture') or type(model).__name__


def _shape(t) -> str:
    return '(' + ','.join(str(s) for s in t.shape) + ')'


def load_into(model: nn.Module, state_dict: Mapping, strict_arch: bool = True) -> LoadReport:
    """Convert ``state_dict`` (official or timm names, optionally wrapped / 'module.'-prefixed),
    drop a classifier of another shape, and load it into ``model``.

    With strict_arch (default) a checkpoint of another architecture raises a one-line
    ValueError: more than half of the model's tensors missing, more than 10% of them
    unexpected, or any shape mismatch outside the classifier.  Otherwise missing and
    unexpected keys are loaded around and listed in the returned report.
    """
    raw = unwrap_state_dict(state_dict)
    sd, conversion_error = _convert(model, raw)
    dropped_head = drop_mismatched_head(model, sd)
    model_sd = model.state_dict()

    # BatchNorm's num_batches_tracked is absent from some torchvision-era files and
    # carries no weights, so it does not count as evidence either way.
    counted = [k for k in model_sd if not k.endswith('num_batches_tracked')]
    missing_counted = [k for k in counted if k not in sd]
    unexpected = [k for k in sd if k not in model_sd]
    mismatched = [k for k in sd if k in model_sd and tuple(sd[k].shape) != tuple(model_sd[k].shape)]

    if strict_arch:
        family, _ = _family_and_filter(model)
        seen = guess_family(raw) or guess_family(sd)
        problem = None
        if conversion_error is not None and seen in (family, None):
            # same family, other size: the counts would be of unconverted names, so say why instead
            problem = conversion_error
        elif len(missing_counted) * 2 > len(counted):
            problem = f'{len(missing_counted)} of {len(counted)} tensors missing'
        elif mismatched:
            k = mismatched[0]
            problem = (f'{len(mismatched)} of {len(counted)} tensors have another shape outside the classifier '
                       f'(e.g. {k}: checkpoint {_shape(sd[k])}, model {_shape(model_sd[k])})')
        elif len(unexpected) * 10 > len(counted):
            problem = f'{len(unexpected)} unexpected tensors for a model of {len(counted)}'
        elif conversion_error is not None:
            problem = conversion_error
        if problem is not None:
            if seen is None:
                looks = 'it is not a checkpoint of a known family'
            elif seen == family:
                looks = f'it looks like a {seen} checkpoint of another size'
            else:
                looks = f'it looks like a {seen} checkpoint'
            raise ValueError(
                f'checkpoint does not match model {_model_name(model)}: {problem} ({looks}); '
                'pass the matching --model')

    for k in mismatched:
        del sd[k]
    result = model.load_state_dict(sd, strict=False)
    return LoadReport(
        missing=list(result.missing_keys),
        unexpected=list(result.unexpected_keys),
        dropped_head=dropped_head,
        mismatched=mismatched,
    )


# PVT v1: models.pvt uses the official names; its filter only resamples position embeddings
# saved for another input size (a 224 checkpoint into a 384 fine-tune or a B=96 stage).
# The reverse direction (timm names -> official) is models/official_names.py.
from .pvt import PyramidVisionTransformer, checkpoint_filter_fn as _pvt_filter  # noqa: E402

_CONVERTERS[PyramidVisionTransformer] = ('pvt', _pvt_filter)
_FAMILY_MARKERS.append(('pvt', ('patch_embed1.proj.weight', 'pos_embed1')))
