"""CSWin Transformer (Dong et al., CVPR 2022), written from the paper.

Cross-shaped window self-attention: in stages 1-3 the channels (and heads) of
each block are split in two halves, one half attends within vertical stripes
(full height, ``split`` columns wide), the other within horizontal stripes
(``split`` rows high, full width).  The last stage attends over the whole
feature map with a single branch.  Positions come from LePE: a depthwise 3x3
conv of V added to the attention output, so nothing depends on the input size
except the stripe widths.  For an input of B x B the split sizes are
[1, 2, B/32, B/32], which is what ``set_input_size`` re-derives in place.

Parameter names follow the microsoft/CSWin-Transformer release
(``stage1_conv_embed.0``, ``stage1.0.attns.0.get_v``, ``merge1.conv`` ...) so
its checkpoints, and the EfficientTrain++ CSWin checkpoints trained with that
code, load with ``load_state_dict(strict=True)``.
"""
from typing import List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

try:
    # timm >= 1.0.2x records the size a model runs at (used to rebuild it from saved
    # args); timm's own set_input_size implementations call this, so do the same.
    from timm.models._input import update_model_input_size as _record_input_size
except ImportError:  # older timm keeps no such record
    def _record_input_size(model, img_size, **kwargs):
        return None

__all__ = ['CSWinTransformer', 'cswin_split_sizes', 'nearest_valid_size']

_STRIDE = 32  # total down-sampling; split sizes of stages 3-4 are B / 32


def nearest_valid_size(size: int) -> str:
    """The multiple(s) of 32 closest to ``size``, as text for error messages."""
    lo = max(_STRIDE, size // _STRIDE * _STRIDE)
    hi = lo + _STRIDE
    if size <= lo or size - lo < hi - size:
        return str(lo)
    if hi - size < size - lo:
        return str(hi)
    return f'{lo} or {hi}'


def _check_size(img_size: Union[int, Sequence[int]]) -> int:
    if isinstance(img_size, int):
        h = w = img_size
    else:
        h, w = (int(s) for s in img_size)
    if h != w:
        raise ValueError(f'CSWin needs a square input, got {h}x{w}; use {max(h, w)}x{max(h, w)}')
    if h < _STRIDE or h % _STRIDE:
        raise ValueError(
            f'CSWin input size must be a multiple of {_STRIDE} (split sizes [1, 2, B/32, B/32]), '
            f'got {h}; nearest valid size: {nearest_valid_size(h)}')
    return h


def cswin_split_sizes(img_size: int) -> Tuple[int, int, int, int]:
    """Stripe widths of the four stages for a B x B input (7 at 224 for stages 3-4)."""
    b = _check_size(img_size)
    return 1, 2, b // _STRIDE, b // _STRIDE


class _TokensFromMap(nn.Module):
    """(B, C, H, W) -> (B, H*W, C); a parameter-free slot kept so the stem's LayerNorm
    sits at index 2 (``stage1_conv_embed.2``) as in the released checkpoints."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class LePEAttention(nn.Module):
    """Multi-head attention inside stripes of one orientation, plus LePE.

    ``orientation`` 0: vertical stripes (H x split), 1: horizontal stripes
    (split x W), -1: the whole map.  The order (0 on the first half of the
    channels, 1 on the second) is the released one and must stay so for its
    weights to mean the same thing.
    """

    def __init__(self, dim: int, num_heads: int, orientation: int, attn_drop: float = 0.):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'attention dim {dim} is not divisible by {num_heads} heads')
        self.dim = dim
        self.num_heads = num_heads
        self.orientation = orientation
        self.attn_drop = attn_drop
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)
        self.window = (1, 1)

    def set_window(self, resolution: int, split: int) -> None:
        if self.orientation == -1:
            self.window = (resolution, resolution)
        elif self.orientation == 0:
            self.window = (resolution, split)
        else:
            self.window = (split, resolution)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """q, k, v: (B, H*W, C) -> (B, H*W, C)."""
        B, L, C = q.shape
        H, W = hw
        wh, ww = self.window
        nh, nw = H // wh, W // ww
        n = wh * ww
        d = C // self.num_heads

        def to_windows(t):  # (B, L, C) -> (B * windows, wh * ww, C), row-major inside a window
            t = t.reshape(B, nh, wh, nw, ww, C).permute(0, 1, 3, 2, 4, 5)
            return t.reshape(B * nh * nw, n, C)

        def split_heads(t):  # (Bw, n, C) -> (Bw, heads, n, d); head h owns channels [h*d, (h+1)*d)
            return t.reshape(-1, n, self.num_heads, d).transpose(1, 2)

        qw, kw, vw = to_windows(q), to_windows(k), to_windows(v)
        # LePE is applied to V window by window (zero padding at stripe borders), as the
        # released code does; the released weights were trained with exactly this.
        v_map = vw.transpose(1, 2).reshape(-1, C, wh, ww)
        lepe = self.get_v(v_map).reshape(-1, self.num_heads, d, n).transpose(2, 3)

        out = F.scaled_dot_product_attention(
            split_heads(qw), split_heads(kw), split_heads(vw),
            dropout_p=self.attn_drop if self.training else 0.)
        out = (out + lepe).transpose(1, 2).reshape(-1, n, C)

        out = out.reshape(B, nh, nw, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
        return out.reshape(B, L, C)


class CSWinBlock(nn.Module):
    def __init__(
            self,
            dim: int,
            num_heads: int,
            resolution: int,
            split: int,
            last_stage: bool,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            norm_layer=nn.LayerNorm,
    ):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm1 = norm_layer(dim)
        # The branch count depends only on the stage, never on the input size, so that
        # set_input_size cannot change the parameter layout.
        if last_stage:
            self.attns = nn.ModuleList([LePEAttention(dim, num_heads, -1, attn_drop)])
        else:
            if num_heads % 2 or dim % 2:
                raise ValueError(f'cross-shaped attention splits heads in two; got dim {dim}, {num_heads} heads')
            self.attns = nn.ModuleList([
                LePEAttention(dim // 2, num_heads // 2, orientation, attn_drop) for orientation in (0, 1)])
        # No dropout after proj: the released block defines one but never applies it.
        self.proj = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.norm2 = norm_layer(dim)
        self.set_input_size(resolution, split)

    def set_input_size(self, resolution: int, split: int) -> None:
        if resolution % split:
            raise ValueError(f'feature size {resolution} is not divisible by split size {split}')
        self.resolution = resolution
        self.split = split
        for attn in self.attns:
            attn.set_window(resolution, split)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        hw = (self.resolution, self.resolution)
        if L != hw[0] * hw[1]:
            raise ValueError(
                f'CSWin block set for {hw[0]}x{hw[1]} tokens got {L}; call set_input_size for the input size')
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        if len(self.attns) == 1:
            y = self.attns[0](q, k, v, hw)
        else:
            h = C // 2
            y = torch.cat([
                self.attns[0](q[..., :h], k[..., :h], v[..., :h], hw),
                self.attns[1](q[..., h:], k[..., h:], v[..., h:], hw),
            ], dim=-1)
        x = x + self.drop_path(self.proj(y))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class MergeBlock(nn.Module):
    """3x3 stride-2 conv between stages, then LayerNorm on the tokens."""

    def __init__(self, dim: int, dim_out: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 3, 2, 1)
        self.norm = norm_layer(dim_out)

    def forward(self, x: torch.Tensor, resolution: int) -> torch.Tensor:
        B, L, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, resolution, resolution)
        x = self.conv(x).flatten(2).transpose(1, 2)
        return self.norm(x)


class CSWinTransformer(nn.Module):
    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 64,
            depths: Sequence[int] = (1, 2, 21, 1),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer=nn.LayerNorm,
    ):
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError('CSWin has four stages: depths and num_heads need four entries each')
        if global_pool not in ('avg', ''):
            raise ValueError(f"CSWin pools with 'avg' (or '' for token output), got {global_pool!r}")
        size = _check_size(img_size)
        splits = cswin_split_sizes(size)
        self.img_size = (size, size)
        self.split_size = list(splits)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.depths = tuple(depths)
        self.grad_checkpointing = False

        self.stage1_conv_embed = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=4, padding=2),
            _TokensFromMap(),
            nn.LayerNorm(embed_dim),
        )

        # explicit CPU so the model can also be built under a meta / cuda default device
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        dims = [embed_dim * 2 ** i for i in range(4)]
        cursor = 0
        for i in range(4):
            blocks = nn.ModuleList([
                CSWinBlock(
                    dim=dims[i],
                    num_heads=num_heads[i],
                    resolution=size // (4 * 2 ** i),
                    split=splits[i],
                    last_stage=(i == 3),
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    # drop_rate is the blocks' MLP dropout, as in the released code (its
                    # --drop); there is no dropout before the classifier.
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[cursor + j],
                    norm_layer=norm_layer,
                ) for j in range(depths[i])])
            setattr(self, f'stage{i + 1}', blocks)
            cursor += depths[i]
            if i < 3:
                setattr(self, f'merge{i + 1}', MergeBlock(dims[i], dims[i + 1], norm_layer))

        self.num_features = self.head_hidden_size = dims[-1]
        self.norm = norm_layer(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Convs keep PyTorch's default init, as in the released training code.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _stages(self) -> List[Tuple[Optional[MergeBlock], nn.ModuleList]]:
        return [(None, self.stage1), (self.merge1, self.stage2), (self.merge2, self.stage3), (self.merge3, self.stage4)]

    def set_input_size(self, img_size: Union[int, Tuple[int, int]] = (224, 224)) -> None:
        """Adapt, in place, to B x B inputs: split sizes [1, 2, B/32, B/32] and the
        per-stage token grids.  No parameter is created, removed or reshaped."""
        size = _check_size(img_size)
        splits = cswin_split_sizes(size)
        for i, (_, blocks) in enumerate(self._stages()):
            for blk in blocks:
                blk.set_input_size(size // (4 * 2 ** i), splits[i])
        self.img_size = (size, size)
        self.split_size = list(splits)
        _record_input_size(self, self.img_size)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        # CSWin has no position embeddings or tokens; 1-D params (norms, biases) are
        # excluded from weight decay by the optimizer factory, not by name here.
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        # timm's grouping (its layer-wise lr decay reads it): the stem first, then the
        # blocks in depth order, each merge layer right after the blocks of the stage it
        # closes, the final norm last; the head, matched by nothing, goes above all.
        return dict(
            stem=r'^stage1_conv_embed',
            blocks=r'^(?:stage|merge)(\d+)' if coarse else [
                (r'^stage(\d+)\.(\d+)', None),
                (r'^merge(\d+)', (99999,)),
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
            if global_pool not in ('avg', ''):
                raise ValueError(f"CSWin pools with 'avg' (or '' for token output), got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normalised tokens (B, H/32 * W/32, C)."""
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f'CSWin set for {self.img_size[0]}x{self.img_size[1]} inputs got '
                f'{x.shape[-2]}x{x.shape[-1]}; call model.set_input_size(({x.shape[-2]}, {x.shape[-1]})) first')
        x = self.stage1_conv_embed(x)
        resolution = self.img_size[0] // 4
        for merge, blocks in self._stages():
            if merge is not None:
                x = merge(x, resolution)
                resolution //= 2
            for blk in blocks:
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, use_reentrant=False)
                else:
                    x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs):
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': 0.9,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stage1_conv_embed.0',
        'classifier': 'head',
        'paper_ids': 'arXiv:2107.00652',
        **kwargs,
    }


# Read by timm's register_model (it looks up `default_cfgs` in the entrypoint's module),
# which is what makes timm.create_model attach a pretrained_cfg to these models.
default_cfgs = generate_default_cfgs({
    'CSWin_64_12211_tiny_224': _cfg(),
    'CSWin_64_24322_small_224': _cfg(),
    'CSWin_96_24322_base_224': _cfg(),
    'CSWin_144_24322_large_224': _cfg(),
})


def _create_cswin(variant: str, pretrained: bool = False, **kwargs) -> CSWinTransformer:
    if pretrained:
        raise ValueError(
            f'{variant}: no pretrained weights are downloadable here; create it with pretrained=False and '
            'load a checkpoint with models.checkpoint_compat.load_into')
    return build_model_with_cfg(CSWinTransformer, variant, pretrained=False, **kwargs)


@register_model
def CSWin_64_12211_tiny_224(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    args = dict(embed_dim=64, depths=(1, 2, 21, 1), num_heads=(2, 4, 8, 16), mlp_ratio=4.)
    return _create_cswin('CSWin_64_12211_tiny_224', pretrained, **dict(args, **kwargs))


@register_model
def CSWin_64_24322_small_224(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    args = dict(embed_dim=64, depths=(2, 4, 32, 2), num_heads=(2, 4, 8, 16), mlp_ratio=4.)
    return _create_cswin('CSWin_64_24322_small_224', pretrained, **dict(args, **kwargs))


@register_model
def CSWin_96_24322_base_224(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    args = dict(embed_dim=96, depths=(2, 4, 32, 2), num_heads=(4, 8, 16, 32), mlp_ratio=4.)
    return _create_cswin('CSWin_96_24322_base_224', pretrained, **dict(args, **kwargs))


@register_model
def CSWin_144_24322_large_224(pretrained: bool = False, **kwargs) -> CSWinTransformer:
    # microsoft/CSWin-Transformer models/cswin.py: embed 144, depths [2,4,32,2], heads
    # [6,12,24,24] (the last stage keeps 24 heads), split [1,2,7,7] at 224 (173M parameters);
    # its IN-22K weights are released as cswin_large_22k_224.pth, fine-tuned as cswin_large_224/384.
    args = dict(embed_dim=144, depths=(2, 4, 32, 2), num_heads=(6, 12, 24, 24), mlp_ratio=4.)
    return _create_cswin('CSWin_144_24322_large_224', pretrained, **dict(args, **kwargs))
