"""Pyramid Vision Transformer v1 (Wang et al., ICCV 2021, arXiv 2102.12122), written from the paper.

Four stages at strides 4, 8, 16, 32.  Each stage embeds the previous feature map with a
non-overlapping patch convolution (patch 4, then 2) followed by LayerNorm, adds its own
learned absolute position embedding, and runs Transformer blocks whose attention uses
spatial reduction (SRA): keys and values come from the map shrunk by a conv of kernel =
stride = R_i and a LayerNorm, so attention costs N x N / R_i^2.  The classification token
joins only in the last stage; the logits are read from it after the final LayerNorm.

Sizes (paper Table 1; whai362/PVT classification/pvt.py): embed dims 64/128/320/512,
heads 1/2/5/8, MLP ratios 8/8/4/4, SR ratios 8/4/2/1, qkv bias; depths Tiny [2,2,2,2],
Small [3,4,6,3], Medium [3,4,18,3], Large [3,8,27,3] (13.2M / 24.5M / 44.2M / 61.4M
parameters, official README).  Details checked against that file: LayerNorm eps 1e-6 in the
blocks and the final norm, default eps (1e-5) in the patch embeddings and the SRA norm;
position embeddings and cls token trunc-normal(0.02), Linear trunc-normal(0.02) with zero
bias, convolutions at PyTorch's default init; only cls_token is exempt from weight decay.

Parameter names are the official ones (patch_embed1..4.{proj,norm}, pos_embed1..4,
block1..4.j.{norm1, attn.q, attn.kv, attn.proj, attn.sr, attn.norm, norm2, mlp.fc1,
mlp.fc2}, norm, cls_token, head), so the released checkpoints load with strict=True.

Input size: a model built for B x B holds position embeddings of grids B/4, B/8, B/16,
B/32 (+1 for the class token).  ``set_input_size`` resamples them bilinearly
(align_corners=False), the operation the official forward applies to other sizes; the
curriculum (curriculum/adapt.py) does the same to the Adam moments.
"""
import math
from typing import List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

try:  # see models/cswin.py: timm >= 1.0.2x records the size a model runs at
    from timm.models._input import update_model_input_size as _record_input_size
except ImportError:
    def _record_input_size(model, img_size, **kwargs):
        return None

__all__ = ['PyramidVisionTransformer', 'resample_pos_embed', 'checkpoint_filter_fn', 'PVT_STRIDE']

PVT_STRIDE = 32  # patch 4, then three 2x patch embeddings


def _check_size(img_size: Union[int, Sequence[int]]) -> int:
    if isinstance(img_size, int):
        h = w = img_size
    else:
        h, w = (int(s) for s in img_size)
    if h != w:
        raise ValueError(f'PVT needs a square input, got {h}x{w}; use {max(h, w)}x{max(h, w)}')
    if h < PVT_STRIDE or h % PVT_STRIDE:
        lo = max(PVT_STRIDE, h // PVT_STRIDE * PVT_STRIDE)
        raise ValueError(f'PVT input size must be a multiple of {PVT_STRIDE} (four stages of stride 4, 8, 16, '
                         f'32), got {h}; nearest valid sizes: {lo} or {lo + PVT_STRIDE}')
    return h


def resample_pos_embed(t: torch.Tensor, old_grid: Tuple[int, int], new_grid: Tuple[int, int],
                       num_prefix: int = 0) -> torch.Tensor:
    """(1, prefix + gh*gw, C) row-major grid -> the new grid, bilinear, prefix kept.

    Bilinear with align_corners=False, as whai362/PVT's forward resizes position
    embeddings for other input sizes (and as the EfficientTrain reference resizes DeiT's).
    """
    if tuple(old_grid) == tuple(new_grid):
        return t
    prefix, grid = t[:, :num_prefix], t[:, num_prefix:]
    n, _, dim = t.shape
    g = grid.float().reshape(n, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=tuple(new_grid), mode='bilinear', align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(n, new_grid[0] * new_grid[1], dim).to(t.dtype)
    return torch.cat([prefix, g], dim=1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Spatial-reduction attention (paper Sec. 3.3): K and V from the map reduced by R."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.,
                 proj_drop: float = 0., sr_ratio: int = 1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'PVT attention dim {dim} is not divisible by {num_heads} heads')
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        d = C // self.num_heads
        q = self.q(x).reshape(B, N, self.num_heads, d).transpose(1, 2)
        if self.sr_ratio > 1:
            # In the last stage N also counts the class token, but R = 1 there: the reduced
            # map is only ever built from a pure H x W token grid.
            x = x.transpose(1, 2).reshape(B, C, hw[0], hw[1])
            x = self.norm(self.sr(x).flatten(2).transpose(1, 2))
        k, v = self.kv(x).reshape(B, -1, 2, self.num_heads, d).permute(2, 0, 3, 1, 4)
        # softmax(q k^T / sqrt(d)) v, the scale of the official code (qk_scale unset)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop: float,
                 attn_drop: float, drop_path: float, sr_ratio: int, norm_layer):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patch conv then LayerNorm (default eps, as released)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.proj(x)
        hw = (x.shape[-2], x.shape[-1])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class PyramidVisionTransformer(nn.Module):
    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dims: Sequence[int] = (64, 128, 320, 512),
            num_heads: Sequence[int] = (1, 2, 5, 8),
            mlp_ratios: Sequence[float] = (8, 8, 4, 4),
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            depths: Sequence[int] = (2, 2, 2, 2),
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
    ):
        super().__init__()
        if not all(len(s) == 4 for s in (embed_dims, num_heads, mlp_ratios, depths, sr_ratios)):
            raise ValueError('PVT has four stages: embed_dims, num_heads, mlp_ratios, depths, sr_ratios need 4 each')
        if patch_size != 4:
            raise ValueError('PVT v1 embeds 4x4 patches first (stride 32 overall); patch_size must be 4')
        if global_pool not in ('token', ''):
            raise ValueError(f"PVT classifies from its class token: global_pool 'token' (or ''), got {global_pool!r}")
        size = _check_size(img_size)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.depths = tuple(depths)
        self.embed_dims = tuple(embed_dims)
        self.num_stages = 4
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False
        self.img_size = (size, size)
        self.grids = [(size // (patch_size * 2 ** i),) * 2 for i in range(4)]
        # eps 1e-6 in the blocks and the final norm: the released models' partial(nn.LayerNorm, eps=1e-6)
        norm_layer = lambda d: nn.LayerNorm(d, eps=1e-6)  # noqa: E731

        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        cursor = 0
        for i in range(4):
            setattr(self, f'patch_embed{i + 1}', PatchEmbed(
                patch_size if i == 0 else 2, in_chans if i == 0 else embed_dims[i - 1], embed_dims[i]))
            tokens = self.grids[i][0] * self.grids[i][1] + (1 if i == 3 else 0)
            setattr(self, f'pos_embed{i + 1}', nn.Parameter(torch.zeros(1, tokens, embed_dims[i])))
            setattr(self, f'pos_drop{i + 1}', nn.Dropout(drop_rate))
            setattr(self, f'block{i + 1}', nn.ModuleList([
                Block(embed_dims[i], num_heads[i], mlp_ratios[i], qkv_bias, drop_rate, attn_drop_rate,
                      dpr[cursor + j], sr_ratios[i], norm_layer) for j in range(depths[i])]))
            cursor += depths[i]
        self.norm = norm_layer(embed_dims[3])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[3]))
        self.num_features = self.head_hidden_size = embed_dims[3]
        self.head = nn.Linear(embed_dims[3], num_classes) if num_classes > 0 else nn.Identity()

        for i in range(4):
            trunc_normal_(getattr(self, f'pos_embed{i + 1}'), std=.02)
        trunc_normal_(self.cls_token, std=.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ input size
    def pos_embed_grids(self) -> List[Tuple[int, int]]:
        return list(self.grids)

    def set_input_size(self, img_size: Union[int, Tuple[int, int]] = (224, 224)) -> None:
        """Adapt in place to B x B inputs: each stage's position embedding is resampled
        bilinearly to its new grid (class token entry kept) and replaced by a new Parameter.
        An optimizer holding the old ones must be updated (curriculum.adapt.adapt_model does)."""
        size = _check_size(img_size)
        new_grids = [(size // (4 * 2 ** i),) * 2 for i in range(4)]
        for i in range(4):
            name = f'pos_embed{i + 1}'
            old = getattr(self, name)
            if self.grids[i] != new_grids[i]:
                with torch.no_grad():
                    new = resample_pos_embed(old.detach(), self.grids[i], new_grids[i], 1 if i == 3 else 0)
                setattr(self, name, nn.Parameter(new, requires_grad=old.requires_grad))
        self.grids = new_grids
        self.img_size = (size, size)
        _record_input_size(self, self.img_size)

    # ------------------------------------------------------------------ timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        # the released training code exempts only the class token (its position
        # embeddings are decayed: "has pos_embed may be better")
        return {'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        # For timm's layer-wise lr decay: stage-1 embedding first, each later stage's patch
        # and position embeddings with its first block, the class token with stage 4, the
        # final norm with the last block ((99999,) is timm's "join the previous group").
        return dict(
            stem=r'^(?:patch_embed1|pos_embed1)\.?',
            blocks=[(r'^(?:block|patch_embed|pos_embed)(\d+)', None), (r'^cls_token', (4,)),
                    (r'^norm', (99999,))] if coarse else [
                (r'^block(\d+)\.(\d+)', None),
                (r'^(?:patch_embed|pos_embed)(\d+)', (0,)),
                (r'^cls_token', (4, 0)),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ('token', ''):
                raise ValueError(f"PVT pools with 'token' (or ''), got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normalised last-stage tokens (B, 1 + H/32 * W/32, C), class token first."""
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f'PVT set for {self.img_size[0]}x{self.img_size[1]} inputs got {x.shape[-2]}x{x.shape[-1]}; '
                f'call model.set_input_size(({x.shape[-2]}, {x.shape[-1]})) first')
        B = x.shape[0]
        for i in range(4):
            x, hw = getattr(self, f'patch_embed{i + 1}')(x)
            if i == 3:
                x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
            x = getattr(self, f'pos_drop{i + 1}')(x + getattr(self, f'pos_embed{i + 1}'))
            for blk in getattr(self, f'block{i + 1}'):
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, hw, use_reentrant=False)
                else:
                    x = blk(x, hw)
            if i < 3:
                x = x.transpose(1, 2).reshape(B, -1, hw[0], hw[1])
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'token':
            x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict, model: PyramidVisionTransformer):
    """Official names are this module's names; position embeddings saved for another input
    size are resampled to the model's grids (bilinear, as the official forward does)."""
    out = dict(state_dict)
    grids = model.pos_embed_grids()
    for i in range(4):
        key = f'pos_embed{i + 1}'
        t = out.get(key)
        if t is None or not torch.is_tensor(t) or t.ndim != 3:
            continue
        prefix = 1 if i == 3 else 0
        n = t.shape[1] - prefix
        side = math.isqrt(max(n, 0))
        if side * side != n or (side, side) == grids[i]:
            continue  # another shape entirely: load_into reports it
        out[key] = resample_pos_embed(t, (side, side), grids[i], prefix)
    return out


def _cfg(**kwargs):
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed1.proj',
        'classifier': 'head',
        'paper_ids': 'arXiv:2102.12122',
        **kwargs,
    }


# read by timm's register_model (see models/cswin.py)
default_cfgs = generate_default_cfgs({
    'pvt_tiny': _cfg(),
    'pvt_small': _cfg(),
    'pvt_medium': _cfg(),
    'pvt_large': _cfg(),
})

# depths per variant (paper Table 1 / whai362/PVT classification/pvt.py); everything else is shared
PVT_DEPTHS = {
    'pvt_tiny': (2, 2, 2, 2),
    'pvt_small': (3, 4, 6, 3),
    'pvt_medium': (3, 4, 18, 3),
    'pvt_large': (3, 8, 27, 3),
}


def _create_pvt(variant: str, pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    if pretrained:
        raise ValueError(
            f'{variant}: no pretrained weights are downloadable here; create it with pretrained=False and '
            'load a checkpoint with models.checkpoint_compat.load_into')
    args = dict(patch_size=4, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
                qkv_bias=True, depths=PVT_DEPTHS[variant], sr_ratios=(8, 4, 2, 1))
    return build_model_with_cfg(PyramidVisionTransformer, variant, pretrained=False, **dict(args, **kwargs))


@register_model
def pvt_tiny(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _create_pvt('pvt_tiny', pretrained, **kwargs)


@register_model
def pvt_small(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _create_pvt('pvt_small', pretrained, **kwargs)


@register_model
def pvt_medium(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _create_pvt('pvt_medium', pretrained, **kwargs)


@register_model
def pvt_large(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _create_pvt('pvt_large', pretrained, **kwargs)
