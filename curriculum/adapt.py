"""Adapting a model, its optimizer state and its EMA copy to a stage's input size B.

Weights carry over between curriculum stages, so a model trained at B x B must take
the next stage's B' x B' input (METHOD.md, "Models across stages"):

- timm VisionTransformer (DeiT included): the absolute position embedding is resized
  bilinearly to the new patch grid; prefix (class / distillation) tokens are kept.
- timm SwinTransformer: window size B/32 in every stage; each relative-position-bias
  table is resized bilinearly.
- CSWin (models.cswin.CSWinTransformer): split sizes follow B through its own
  `set_input_size`; no parameter changes shape.
- PVT v1 (models.pvt.PyramidVisionTransformer): each stage's position embedding is
  resized bilinearly to that stage's grid (B/4, B/8, B/16, B/32; the last stage's class
  token entry kept), as for DeiT.
- MAE pre-training (models.mae.MaskedAutoencoderViT): fixed sin-cos position embeddings
  generated for each patch grid, nothing to resize; B a multiple of the patch size.
- ResNet, ConvNeXt, CAFormer and any other class: resolution-agnostic, nothing to do.

Replaced parameters are swapped into the optimizer at the same position and their
optimizer state tensors of the parameter's shape (AdamW exp_avg / exp_avg_sq, SGD
momentum_buffer, LAMB moments, ...) are resized exactly as the parameter, as the
published reference does for the Adam moments.  Bilinear interpolation (not bicubic)
matters there: it is a convex combination, so second moments stay non-negative.
"""
import contextlib
import math
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
import timm.models.swin_transformer as swin_module
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from timm.models.vision_transformer import VisionTransformer

__all__ = ["check_input_size", "adapt_model", "size_multiple", "input_size_grid"]

Resampler = Callable[[torch.Tensor], torch.Tensor]

# Smallest input accepted by resolution-agnostic backbones: their deepest stage has
# stride 32, so anything smaller leaves no spatial extent.
_MIN_AGNOSTIC_SIZE = 32


def _resample_pos_embed(t: torch.Tensor, old_grid: Tuple[int, int], new_grid: Tuple[int, int],
                        num_prefix: int) -> torch.Tensor:
    # Layout (1, num_prefix + gh * gw, dim) with row-major patch tokens, as timm's
    # VisionTransformer uses; prefix tokens have no spatial position and are kept.
    prefix, grid = t[:, :num_prefix], t[:, num_prefix:]
    n, _, dim = t.shape
    g = grid.float().reshape(n, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    # Same call as the published reference: bilinear, align_corners=False, no antialias.
    g = F.interpolate(g, size=new_grid, mode="bilinear", align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(n, new_grid[0] * new_grid[1], dim).to(t.dtype)
    return torch.cat([prefix, g], dim=1)


def _resample_rel_pos_table(t: torch.Tensor, old_window: Tuple[int, int],
                            new_window: Tuple[int, int]) -> torch.Tensor:
    # timm's get_relative_position_index flattens the (2Wh-1, 2Ww-1) offset grid
    # row-major (index = dh * (2Ww - 1) + dw), so the table reshapes to that grid.
    oh, ow = 2 * old_window[0] - 1, 2 * old_window[1] - 1
    nh, nw = 2 * new_window[0] - 1, 2 * new_window[1] - 1
    heads = t.shape[-1]
    g = t.float().reshape(oh, ow, heads).permute(2, 0, 1).unsqueeze(0)
    g = F.interpolate(g, size=(nh, nw), mode="bilinear", align_corners=False)
    return g.squeeze(0).permute(1, 2, 0).reshape(nh * nw, heads).to(t.dtype)


def _bind(fn, **kwargs) -> Resampler:
    return lambda t: fn(t, **kwargs)


# --- per-family rules -------------------------------------------------------------

def _vit_multiple(m: VisionTransformer) -> Tuple[int, str]:
    ph, pw = m.patch_embed.patch_size
    k = math.lcm(ph, pw)
    return k, f"a multiple of the patch size {k}"


def _adapt_vit(m: VisionTransformer, size: int) -> Dict[str, Resampler]:
    if tuple(m.patch_embed.img_size) == (size, size):
        return {}
    old_grid = tuple(m.patch_embed.grid_size)
    # timm's set_input_size updates patch_embed's img_size / grid_size (its strict
    # size check reads them) and the recorded model args.  It also resamples
    # pos_embed, bicubically; that result is overwritten with the bilinear one.
    m.set_input_size(img_size=(size, size))
    new_grid = tuple(m.patch_embed.grid_size)
    if m.pos_embed is None or new_grid == old_grid:
        return {}
    # no_embed_class (DeiT-III style) models keep no position entries for prefix tokens.
    num_prefix = 0 if m.no_embed_class else m.num_prefix_tokens
    return {"pos_embed": _bind(_resample_pos_embed, old_grid=old_grid, new_grid=new_grid,
                               num_prefix=num_prefix)}


def _swin_multiple(m: SwinTransformer) -> Tuple[int, str]:
    ph, pw = m.patch_embed.patch_size
    k = math.lcm(ph, pw) * 2 ** (len(m.layers) - 1)
    return k, (f"a multiple of {k} (window size = size/{k} in every stage: patch {ph}, "
               f"{len(m.layers) - 1} downsamplings)")


def _empty_table(rel_pos_bias: torch.Tensor, new_window_size, new_bias_shape, *args, **kwargs) -> torch.Tensor:
    return rel_pos_bias.new_zeros(new_bias_shape)


@contextlib.contextmanager
def _patched(module, name: str, replacement):
    if not hasattr(module, name):  # a timm without the helper: nothing to bypass
        yield
        return
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def _adapt_swin(m: SwinTransformer, size: int) -> Dict[str, Resampler]:
    k, _ = _swin_multiple(m)
    window = size // k
    attns = [(name, mod) for name, mod in m.named_modules() if isinstance(mod, WindowAttention)]
    old_windows = {name: tuple(mod.window_size) for name, mod in attns}
    # timm's set_input_size(img_size, window_size) resizes patch_embed, sets every
    # block's window (clamped to the stage resolution, which equals the window in the
    # last stage here) and shift, rebuilds the relative_position_index and attn_mask
    # buffers and gives each bias table its new shape.  An explicit window also
    # becomes timm's reference for later resizes, so each call fully determines the
    # windows.  The tables' values are replaced below by the bilinear resize, so
    # timm's own interpolation (module-level resize_rel_pos_bias_table: a per-head
    # Python loop, and failing on CUDA tensors in timm 1.0.29) is bypassed.
    with _patched(swin_module, "resize_rel_pos_bias_table", _empty_table):
        m.set_input_size(img_size=(size, size), window_size=window)
    out: Dict[str, Resampler] = {}
    for name, mod in attns:
        new_window = tuple(mod.window_size)
        if new_window != old_windows[name]:
            out[f"{name}.relative_position_bias_table"] = _bind(
                _resample_rel_pos_table, old_window=old_windows[name], new_window=new_window)
    return out


def _cswin_multiple(m: nn.Module) -> Tuple[int, str]:
    return 32, "a multiple of 32 (split size = size/32 in the last two stages)"


def _adapt_cswin(m: nn.Module, size: int) -> Dict[str, Resampler]:
    # CSWin's LePE positional encoding has no size-dependent parameter; only the
    # split sizes (buffers / attributes) follow the input size.
    m.set_input_size(img_size=(size, size))
    return {}


def _any_multiple(m: nn.Module) -> Tuple[int, str]:
    return 1, "any size"


@dataclass(frozen=True)
class _Rule:
    multiple: Callable[[nn.Module], Tuple[int, str]]  # (k, description): size % k == 0
    adapt: Optional[Callable[[nn.Module, int], Dict[str, Resampler]]]  # None: agnostic
    min_size: int = 1  # besides size >= k


def _pvt_multiple(m: nn.Module) -> Tuple[int, str]:
    return 32, "a multiple of 32 (PVT stages have strides 4, 8, 16, 32, each with its own position embedding)"


def _adapt_pvt(m: nn.Module, size: int) -> Dict[str, Resampler]:
    # models.pvt's set_input_size resamples the embeddings itself (same bilinear call);
    # the resamplers returned here are what the optimizer moments get, and they also
    # rewrite the parameters from the values before the call, exactly as for DeiT.
    old = m.pos_embed_grids()
    m.set_input_size(img_size=(size, size))
    new = m.pos_embed_grids()
    last = len(old) - 1
    return {f"pos_embed{i + 1}": _bind(_resample_pos_embed, old_grid=old[i], new_grid=new[i],
                                       num_prefix=m.num_prefix_tokens if i == last else 0)
            for i in range(len(old)) if old[i] != new[i]}


_RULES: Dict[type, _Rule] = {
    VisionTransformer: _Rule(_vit_multiple, _adapt_vit),
    SwinTransformer: _Rule(_swin_multiple, _adapt_swin),
}
_AGNOSTIC = _Rule(_any_multiple, None, _MIN_AGNOSTIC_SIZE)
_CSWIN_RULE = _Rule(_cswin_multiple, _adapt_cswin)
_PVT_RULE = _Rule(_pvt_multiple, _adapt_pvt)

# Project model classes (models/), by (module, class name).  They may not be importable in
# every environment; an instance's class can only exist if its module is loaded, so looking
# it up in sys.modules (never importing it here) is enough for the isinstance dispatch.
_PROJECT_RULES: Dict[Tuple[str, str], _Rule] = {
    ("models.cswin", "CSWinTransformer"): _CSWIN_RULE,
    ("models.pvt", "PyramidVisionTransformer"): _PVT_RULE,
    # MAE pre-training: fixed sin-cos embeddings generated per grid, nothing to resize;
    # any multiple of the patch size
    ("models.mae", "MaskedAutoencoderViT"): _Rule(_vit_multiple, None),
}


def _project_classes() -> Dict[type, _Rule]:
    out = {}
    for (module, name), rule in _PROJECT_RULES.items():
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            out[cls] = rule
    return out


def _rule_for(model: nn.Module) -> _Rule:
    project = _project_classes()
    for cls in type(model).__mro__:
        if cls in _RULES:
            return _RULES[cls]
        if cls in project:
            return project[cls]
    return _AGNOSTIC


def _unwrap_model(model: nn.Module) -> nn.Module:
    # A DDP / DataParallel wrapper holds references to the old parameters; the
    # caller rebuilds it when adapt_model returns True.
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def _unwrap_ema(ema) -> nn.Module:
    # timm ModelEmaV2 / V3 keep the averaged copy in `.module`, ModelEma (v1) in `.ema`.
    for attr in ("module", "ema"):
        inner = getattr(ema, attr, None)
        if isinstance(inner, nn.Module):
            return _unwrap_model(inner)
    if isinstance(ema, nn.Module):
        return ema
    raise TypeError(f"ema_model must be an nn.Module or an EMA wrapper of one, got {type(ema).__name__}")


# --- public API -------------------------------------------------------------------

def check_input_size(model: nn.Module, size: int) -> None:
    """Raise ValueError if `model` cannot take size x size input after adaptation."""
    model = _unwrap_model(model)
    name = type(model).__name__
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError(f"input size must be an integer, got {size!r} for {name}")
    rule = _rule_for(model)
    k, what = rule.multiple(model)
    lowest = max(k, math.ceil(rule.min_size / k) * k)
    if size >= lowest and size % k == 0:
        return
    if size < lowest:
        raise ValueError(f"input size {size} is too small for {name}: it must be {what} and "
                         f"at least {lowest}; nearest valid size: {lowest}")
    below, above = size // k * k, (size // k + 1) * k
    raise ValueError(f"input size {size} is not valid for {name}: it must be {what}; "
                     f"nearest valid sizes: {below} or {above}")


def _set_parameter(root: nn.Module, name: str, param: nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, leaf, param)


def _adapt_module(module: nn.Module, size: int, optimizer: Optional[torch.optim.Optimizer]) -> bool:
    rule = _rule_for(module)
    if rule.adapt is None:
        return False
    before = dict(module.named_parameters())
    resamplers = rule.adapt(module, size)
    with torch.no_grad():
        for name, fn in resamplers.items():
            old = before[name]
            _set_parameter(module, name, nn.Parameter(fn(old.detach()), requires_grad=old.requires_grad))
    # Some timm versions rebuild buffers (Swin's attention masks) on the CPU; keep every
    # buffer with the parameters so a GPU model stays on its GPU.
    device = next(iter(before.values())).device if before else None
    for name, buf in list(module.named_buffers()):
        if device is not None and buf.device != device:
            owner, _, leaf = name.rpartition(".")
            (module.get_submodule(owner) if owner else module)._buffers[leaf] = buf.to(device)
    after = dict(module.named_parameters())
    if after.keys() != before.keys():
        raise RuntimeError(f"adapting {type(module).__name__} to {size} added or removed parameters")

    swaps: List[Tuple[nn.Parameter, nn.Parameter, Optional[Resampler]]] = []
    shape_changed = False
    for name, old in before.items():
        new = after[name]
        if new is old:
            continue
        fn = resamplers.get(name)
        if new.shape != old.shape:
            if fn is None:
                # Only a known resampler can map the optimizer state consistently.
                raise RuntimeError(f"{type(module).__name__}.{name} changed shape {tuple(old.shape)} -> "
                                   f"{tuple(new.shape)} without a rule to resize its optimizer state")
            shape_changed = True
        swaps.append((old, new, fn))
    if optimizer is not None and swaps:
        _swap_in_optimizer(optimizer, swaps)
    return shape_changed


def _swap_in_optimizer(optimizer: torch.optim.Optimizer,
                       swaps: List[Tuple[nn.Parameter, nn.Parameter, Optional[Resampler]]]) -> None:
    where = {id(p): (gi, pi) for gi, group in enumerate(optimizer.param_groups)
             for pi, p in enumerate(group["params"])}
    for old, new, fn in swaps:
        loc = where.get(id(old))
        if loc is None:  # not optimised (e.g. frozen): nothing to carry over
            continue
        optimizer.param_groups[loc[0]]["params"][loc[1]] = new
        state = optimizer.state.pop(old, None)
        if state is None:  # no step taken yet
            continue
        new_state = {}
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == old.shape and new.shape != old.shape:
                # fn keeps the state tensor's own dtype and device.
                value = fn(value)
            elif torch.is_tensor(value) and value.dim() > 0 and new.shape != old.shape:
                raise RuntimeError(f"optimizer state '{key}' of shape {tuple(value.shape)} for a "
                                   f"parameter of shape {tuple(old.shape)} cannot be resized")
            new_state[key] = value  # scalars such as `step` carry over unchanged
        optimizer.state[new] = new_state


def adapt_model(model: nn.Module, size: int, optimizer: Optional[torch.optim.Optimizer] = None,
                ema_model=None) -> bool:
    """Adapt `model` (and its optimizer state and EMA copy) in place to size x size input.

    `model` is the bare model (a DDP / DataParallel wrapper is unwrapped; rebuild it
    afterwards).  `ema_model` is a timm ModelEma / ModelEmaV2 / ModelEmaV3 or a plain
    module of the same structure; it has no optimizer state.  Calling at the model's
    current size is a no-op.  Returns True when any parameter changed shape (model or
    EMA), i.e. when DDP wrappers must be rebuilt.  Raises ValueError (before touching
    anything) when the size is invalid for the model; see `check_input_size`.
    """
    model = _unwrap_model(model)
    ema = _unwrap_ema(ema_model) if ema_model is not None else None
    check_input_size(model, size)
    if ema is not None:
        check_input_size(ema, size)
    changed = _adapt_module(model, size, optimizer)
    if ema is not None:
        changed = _adapt_module(ema, size, None) or changed
    return changed


def input_size_grid(model: nn.Module) -> Tuple[int, str]:
    """(k, description): the model's valid input sizes are multiples of k (1: any size, for
    resolution-agnostic models), from the same per-family rule as `check_input_size`."""
    return _rule_for(_unwrap_model(model)).multiple(_unwrap_model(model))


def size_multiple(model: nn.Module) -> int:
    """The grid valid input sizes lie on (patch size for ViT, 32 for Swin/CSWin/PVT, else 16).

    Plans scale published bandwidths to another base size on this grid.
    """
    k, _ = input_size_grid(model)
    return max(k, 16) if k % 16 == 0 or k == 1 else k
