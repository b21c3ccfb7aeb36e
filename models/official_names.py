"""timm-named state dicts -> the official parameter names of each family (the reverse of
models/checkpoint_compat.py), for detection / segmentation code that loads backbones the
way it loads the released files.

timm's checkpoint filters only go official -> timm, so each family's inverse is written
here as a name map (plus the one reshape some families need), and ``to_official``
verifies it on every call: the result is run back through ``checkpoint_compat``'s
official -> timm conversion (timm's own filter) and must give back every key with the
identical tensor.  A wrong or missing rule therefore fails loudly instead of writing a
file that loads with silently missing weights.

=========  ====================================================================
family     official naming (what the inverse produces)
=========  ====================================================================
convnext   facebookresearch/ConvNeXt: downsample_layers.0 = stem, downsample_layers.i,
           stages.i.j.{dwconv, norm, pwconv1, pwconv2 (2-D Linear), gamma}, norm, head
swin       microsoft/Swin-Transformer: each PatchMerging at the END of its stage
           (layers.i.downsample = timm layers.{i+1}.downsample), head a plain Linear,
           plus the relative_position_index / attn_mask buffers the released files hold
caformer   sail-sg/metaformer: downsample_layers.*, stages.i.j.*, 2-D Linear weights,
           norm, head.{fc1, norm, fc2}
deit       timm 0.4 VisionTransformer: today's timm names (identity)
cswin      microsoft/CSWin-Transformer: models/cswin.py uses them (identity)
pvt        whai362/PVT: models/pvt.py uses them (identity)
resnet     torchvision: timm's resnet uses them (identity)
=========  ====================================================================
"""
import re
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .checkpoint_compat import _family_and_filter, classifier_prefixes, convert_to_timm

__all__ = ['to_official', 'official_family', 'ExportError']

Rules = List[Tuple[str, str]]


class ExportError(ValueError):
    pass


_CONVNEXT: Rules = [
    (r'^stem\.', 'downsample_layers.0.'),
    (r'^stages\.(\d+)\.downsample\.', r'downsample_layers.\1.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.', r'stages.\1.\2.'),
    (r'\.conv_dw\.', '.dwconv.'),
    (r'\.mlp\.fc1\.', '.pwconv1.'),
    (r'\.mlp\.fc2\.', '.pwconv2.'),
    (r'^head\.norm\.', 'norm.'),
    (r'^head\.fc\.', 'head.'),
]

_CAFORMER: Rules = [
    (r'^stem\.conv\.', 'downsample_layers.0.conv.'),
    (r'^stem\.norm\.', 'downsample_layers.0.post_norm.'),
    (r'^stages\.(\d+)\.downsample\.norm\.', r'downsample_layers.\1.pre_norm.'),
    (r'^stages\.(\d+)\.downsample\.conv\.', r'downsample_layers.\1.conv.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.', r'stages.\1.\2.'),
    (r'^head\.norm\.', 'norm.'),
    (r'^head\.fc\.', 'head.'),
]


def _apply(rules: Rules, key: str) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _swin_name(key: str) -> str:
    m = re.match(r'^layers\.(\d+)\.downsample\.(.*)$', key)
    if m:  # timm merges at the start of stage i, the official code at the end of stage i-1
        key = f'layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}'
    return re.sub(r'^head\.fc\.', 'head.', key)


def _flatten_1x1(v: torch.Tensor) -> torch.Tensor:
    # the official code's nn.Linear where timm (ConvNeXt with conv_mlp, MetaFormer) has a 1x1 conv
    return v.flatten(1) if v.ndim == 4 and tuple(v.shape[-2:]) == (1, 1) else v


def _swin_extra(model: nn.Module) -> Dict[str, torch.Tensor]:
    # The released Swin files carry these buffers (persistent in the official code, not in
    # timm); the official index formula is timm's get_relative_position_index.
    return {_swin_name(k): b.detach().clone() for k, b in model.named_buffers()
            if k.endswith(('relative_position_index', 'attn_mask')) and b is not None}


# family -> (timm key -> official key, tensor reshape, extra official-only tensors)
_INVERSE: Dict[str, Tuple[Callable[[str], str], Callable[[torch.Tensor], torch.Tensor],
                          Optional[Callable[[nn.Module], Dict[str, torch.Tensor]]]]] = {
    'convnext': (lambda k: _apply(_CONVNEXT, k), _flatten_1x1, None),
    'swin': (_swin_name, lambda v: v, _swin_extra),
    'caformer': (lambda k: _apply(_CAFORMER, k), _flatten_1x1, None),
    'deit': (lambda k: k, lambda v: v, None),
    'cswin': (lambda k: k, lambda v: v, None),
    'pvt': (lambda k: k, lambda v: v, None),
    'resnet': (lambda k: k, lambda v: v, None),
}


def official_family(model: nn.Module) -> Optional[str]:
    family, _ = _family_and_filter(model)
    return family if family in _INVERSE else None


def to_official(model: nn.Module, state_dict: Optional[Dict[str, torch.Tensor]] = None,
                drop_head: bool = False) -> Dict[str, torch.Tensor]:
    """``model``'s weights (or ``state_dict`` in timm names, of ``model``'s architecture) in
    the official naming of its family; ``drop_head`` leaves out the classifier.

    Raises ExportError for a family without an official naming, or when the round trip
    through checkpoint_compat's conversion does not give back every tensor unchanged.
    """
    family = official_family(model)
    if family is None:
        supported = ', '.join(sorted(_INVERSE))
        raise ExportError(f'{type(model).__name__} has no official naming to export to (families: {supported})')
    sd = dict(model.state_dict() if state_dict is None else state_dict)
    rename, reshape, extra = _INVERSE[family]
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        name = rename(k)
        if name in out:
            raise ExportError(f'{family}: two tensors map to the official name {name}')
        out[name] = reshape(v)
    if extra is not None:
        out.update({k: v for k, v in extra(model).items() if k not in out})

    back = convert_to_timm(model, out)
    lost = sorted(set(sd) - set(back))
    changed = sorted(k for k in sd if k in back and (back[k].shape != sd[k].shape or not torch.equal(back[k], sd[k])))
    if lost or changed:
        what = f'{lost[0]} is lost' if lost else f'{changed[0]} comes back changed'
        raise ExportError(f'{family}: the official names do not convert back ({what}; '
                          f'{len(lost)} lost, {len(changed)} changed)')

    if drop_head:
        heads = classifier_prefixes(model)
        head_names = {rename(k) for k in sd if any(k.startswith(p + '.') for p in heads)}
        out = {k: v for k, v in out.items() if k not in head_names}
    return out
