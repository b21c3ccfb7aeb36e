"""Masked autoencoders (He et al., CVPR 2022) on timm's ViT blocks, registered with timm.

    model = models.create_model('mae_vit_base_patch16', target='hog')
    loss, pred, mask = model(images, generator=g)   # images normalised, B a multiple of 16

The encoder (patch_embed, cls_token, blocks.N, norm) is timm's PatchEmbed and Block with
the parameter names of timm's VisionTransformer and of the official MAE code, so its
weights load into timm's `vit_*_patch16_224` (see `mae_to_vit_state_dict`); the decoder
keeps MAE's names (decoder_embed, mask_token, decoder_blocks.N, decoder_norm,
decoder_pred), so official MAE checkpoints load into this model too
(`load_mae_state_dict`).

Position embeddings are MAE's fixed 2-D sin-cos ones, a function of the patch grid: they
are generated exactly for the grid of the input at hand (B/patch a side, so every
curriculum stage gets its own, nothing is interpolated), cached per grid, device and dtype,
and are not part of the state dict.  Layout (MAE's): for a grid of G x G patches in
row-major order and width D, the first D/2 channels encode the patch's column, the last
D/2 its row; within each half, sin(pos * w_k) for k < D/4 then cos(pos * w_k), with
w_k = 10000^(-k / (D/4)); the class token's entry is all zeros.

Masking: per sample, patches are ranked by uniform noise drawn from the generator the
caller passes (or the noise itself), and the first round(L x (1 - mask_ratio)) are kept
(at least 1 and at most L - 1, so both the encoder and the loss have tokens).  The
encoder runs on the kept patches plus the class token; the decoder on every position
(encoded tokens put back in place, a shared mask token elsewhere).  Loss: mean squared
error on the masked patches only.  Targets: 'pixel' (the patch's normalised pixels,
(p_row, p_col, channel) order, each patch normalised by its own mean and unbiased
variance with --norm_pix_loss, as MAE) or 'hog' (models/hog.py: 108 values per 16-pixel
patch; already L2-normalised per cell, so norm_pix_loss does not apply to it).

Sizes (MAE's published ones; decoder 512 wide, 8 blocks, 16 heads for B/L/H):
ViT-B/16 768 x 12 blocks x 12 heads, ViT-L/16 1024 x 24 x 16, ViT-H/14 1280 x 32 x 16.
`mae_vit_tiny_patch16` (ViT-Ti/16 encoder, 192 x 12 x 3; decoder 128 x 2 x 4) is this
project's small model for demos and tests, not a published one.

Compute model (`MAEConfig.flops`): the matrix products that run per image, as a function
of B: patch embedding on all L patches, encoder blocks on K + 1 tokens (K kept), the
decoder embedding on K + 1, decoder blocks on L + 1, the prediction head on L, each
block's attention scores and weighted sum (4 T^2 D) besides its linear layers.  A
training step is 3x the forward less the patch embedding's input gradient (images need
none).  Element-wise work (norms, softmax, GELU, the HOG target, the loss) is not counted,
as torch's FlopCounterMode does not count it.
"""
import math
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer

from models.hog import HOG_CELL, hog_patch_targets, hog_target_dim
from utils import UserError

__all__ = ['MaskedAutoencoderViT', 'MAEConfig', 'MAE_CONFIGS', 'sincos_pos_embed_2d', 'num_kept',
           'random_masking', 'patchify', 'unpatchify', 'mae_to_vit_state_dict', 'load_mae_state_dict',
           'is_mae_state_dict', 'infer_mae_model', 'check_mask_ratio', 'check_mae_size', 'check_mae_target',
           'mae_state_from_checkpoint', 'TARGETS']

TARGETS = ('pixel', 'hog')
_NORM = partial(nn.LayerNorm, eps=1e-6)
# MAE's norm_pix_loss: (x - mean) / sqrt(var + eps) per target patch
_NORM_PIX_EPS = 1e-6


@dataclass(frozen=True)
class MAEConfig:
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    vit: str  # the timm ViT the encoder fine-tunes into
    mlp_ratio: float = 4.0
    in_chans: int = 3

    def out_dim(self, target: str) -> int:
        if target == 'hog':
            return hog_target_dim(self.patch_size, self.in_chans)
        return self.patch_size ** 2 * self.in_chans

    def flops(self, size: int, mask_ratio: float = 0.75, target: str = 'pixel') -> Dict[str, int]:
        """Forward FLOPs (2 per multiply-add) per image at input size x size, by part, and 'train'."""
        p, c = self.patch_size, self.in_chans
        n = (size // p) ** 2
        te, td = num_kept(n, mask_ratio) + 1, n + 1
        d, dd = self.embed_dim, self.decoder_embed_dim

        def block_linear(t, dim):
            hidden = int(dim * self.mlp_ratio)
            return 2 * t * (dim * 3 * dim + dim * dim + 2 * dim * hidden)

        def block_attention(t, dim):
            return 4 * t * t * dim  # q k^T and (softmax) v, over all heads

        parts = {
            'patch_embed': 2 * n * c * p * p * d,
            'encoder_linear': self.depth * block_linear(te, d),
            'encoder_attention': self.depth * block_attention(te, d),
            'decoder_embed': 2 * te * d * dd,
            'decoder_linear': self.decoder_depth * block_linear(td, dd),
            'decoder_attention': self.decoder_depth * block_attention(td, dd),
            'decoder_pred': 2 * n * dd * self.out_dim(target),
        }
        parts['forward'] = sum(parts.values())
        # backward: input and weight gradients (2x forward) of every layer but the patch
        # embedding, which needs no input gradient
        parts['train'] = 3 * parts['forward'] - parts['patch_embed']
        return parts


MAE_CONFIGS: Dict[str, MAEConfig] = {
    'mae_vit_tiny_patch16': MAEConfig(16, 192, 12, 3, 128, 2, 4, 'vit_tiny_patch16_224'),
    'mae_vit_base_patch16': MAEConfig(16, 768, 12, 12, 512, 8, 16, 'vit_base_patch16_224'),
    'mae_vit_large_patch16': MAEConfig(16, 1024, 24, 16, 512, 8, 16, 'vit_large_patch16_224'),
    'mae_vit_huge_patch14': MAEConfig(14, 1280, 32, 16, 512, 8, 16, 'vit_huge_patch14_224'),
}


# ---------------------------------------------------------------------------
# bad input (one line with the fix; UserError: exit 2 where main catches it)
# ---------------------------------------------------------------------------

def check_mask_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1 or math.isnan(ratio):
        raise UserError(f'--mask_ratio {ratio} is outside (0, 1): it is the fraction of patches hidden from the '
                        f'encoder; MAE uses --mask_ratio 0.75')
    return float(ratio)


def check_mae_size(size: int, patch_size: int, what: str = '--input_size') -> int:
    """size must be a multiple of the patch size (a whole grid of patches), at least 2 patches a
    side (one patch could not be both seen and masked)."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise UserError(f'{what} must be a whole number of {patch_size}-pixel patches, got {size!r}')
    lowest = 2 * patch_size
    if size >= lowest and size % patch_size == 0:
        return size
    if size < lowest:
        raise UserError(f'{what} {size} is too small: MAE needs at least 2 patches of {patch_size} pixels a side; '
                        f'nearest valid {lowest}')
    below = size // patch_size * patch_size
    above = below + patch_size
    near = [b for b in (below, above) if abs(size - b) == min(size - below, above - size)]
    raise UserError(f'{what} {size} is not a multiple of the patch size {patch_size} (the image must be a whole '
                    f'grid of patches): nearest valid {" or ".join(map(str, near))}')


def check_mae_target(target: str, patch_size: int, model: str = 'the model') -> str:
    if target not in TARGETS:
        raise UserError(f'--target {target} is unknown: use --target pixel or --target hog')
    if target == 'hog' and patch_size % HOG_CELL:
        raise UserError(f'--target hog needs a patch size that is a multiple of {HOG_CELL} (HOG cells are '
                        f'{HOG_CELL}x{HOG_CELL} pixels), {model} has patch size {patch_size}: use --target pixel '
                        f'or a patch-16 model (e.g. mae_vit_large_patch16)')
    return target


# ---------------------------------------------------------------------------
# position embeddings, masking, patches
# ---------------------------------------------------------------------------

def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool = True, dtype=torch.float32,
                        device=None) -> torch.Tensor:
    """(1, [1 +] grid^2, dim) fixed 2-D sin-cos embedding (layout in the module docstring)."""
    if dim % 4:
        raise ValueError(f'a 2-D sin-cos embedding needs a width divisible by 4, got {dim}')
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    idx = torch.arange(grid, dtype=torch.float64)
    col = idx.repeat(grid)               # patch i*G + j is in column j ...
    row = idx.repeat_interleave(grid)    # ... and row i

    def one_axis(pos):
        angle = pos[:, None] * omega[None, :]
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)

    emb = torch.cat([one_axis(col), one_axis(row)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.unsqueeze(0).to(dtype=dtype, device=device)


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches the encoder sees: round(L (1 - ratio)), at least 1 and at most L - 1."""
    keep = int(math.floor(num_patches * (1 - mask_ratio) + 0.5))
    return min(max(keep, 1), max(num_patches - 1, 1))


def random_masking(x: torch.Tensor, keep: int, noise: torch.Tensor):
    """Keep `keep` tokens of x (N, L, D) per sample, those of lowest noise (N, L).

    Returns (kept tokens (N, keep, D), mask (N, L): 1 where removed, ids_restore (N, L)).
    """
    n, length, d = x.shape
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = (ids_restore >= keep).to(x.dtype)
    return kept, mask, ids_restore


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), each patch in (row, column, channel) order."""
    n, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(n, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(n, gh * gw, patch_size * patch_size * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    n, length, _ = patches.shape
    g = int(round(math.sqrt(length)))
    x = patches.reshape(n, g, g, patch_size, patch_size, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, channels, g * patch_size, g * patch_size)


# ---------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------

class MaskedAutoencoderViT(nn.Module):
    """MAE with a timm ViT encoder; forward(images) -> (loss, pred (N, L, out), mask (N, L))."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_pix_loss: bool = True,
                 target: str = 'pixel', mask_ratio: float = 0.75, num_classes: Optional[int] = None, vit: str = ''):
        # num_classes: accepted (and unused: no classifier) for callers that build any model with one
        super().__init__()
        check_mae_target(target, patch_size)
        self.mask_ratio = check_mask_ratio(mask_ratio)
        self.target = target
        self.norm_pix_loss = bool(norm_pix_loss)
        self.config = MAEConfig(patch_size, embed_dim, depth, num_heads, decoder_embed_dim, decoder_depth,
                                decoder_num_heads, vit, mlp_ratio, in_chans)
        # strict_img_size=False: any multiple of the patch size is taken (the curriculum's B)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=_NORM)
                                     for _ in range(depth)])
        self.norm = _NORM(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=_NORM)
            for _ in range(decoder_depth)])
        self.decoder_norm = _NORM(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.config.out_dim(target))
        self._pos_cache: Dict[tuple, torch.Tensor] = {}
        self._init_weights()

    # MAE's initialisation: xavier-uniform linear layers (and the patch projection, seen as
    # a linear layer), zero biases, unit LayerNorms, N(0, 0.02) tokens
    def _init_weights(self):
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def no_weight_decay(self):
        # read by timm/optim_factory-style parameter grouping: tokens take no weight decay
        return {'cls_token', 'mask_token'}

    def pos_embed(self, grid: int, decoder: bool) -> torch.Tensor:
        """The fixed (1, 1 + grid^2, width) table, in the parameters' dtype and device (cached)."""
        dim = self.config.decoder_embed_dim if decoder else self.config.embed_dim
        like = self.cls_token
        key = (grid, dim, like.device, like.dtype)
        emb = self._pos_cache.get(key)
        if emb is None:
            emb = self._pos_cache[key] = sincos_pos_embed_2d(dim, grid, dtype=like.dtype, device=like.device)
        return emb

    def flops(self, size: int) -> Dict[str, int]:
        return self.config.flops(size, self.mask_ratio, self.target)

    def train_flops(self, size: int) -> int:
        """FLOPs of one training step per image at size B (the plan's compute model)."""
        return self.flops(size)['train']

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        if self.target == 'hog':
            return hog_patch_targets(images, self.patch_size)
        t = patchify(images.float(), self.patch_size)
        if self.norm_pix_loss:
            mean, var = t.mean(dim=-1, keepdim=True), t.var(dim=-1, keepdim=True)
            t = (t - mean) / (var + _NORM_PIX_EPS) ** 0.5
        return t

    def draw_noise(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        n, _, h, w = images.shape
        length = (h // self.patch_size) * (w // self.patch_size)
        return torch.rand(n, length, device=images.device, generator=generator)

    def forward_encoder(self, images: torch.Tensor, mask_ratio: float, noise: torch.Tensor):
        if images.shape[-2] != images.shape[-1]:
            raise ValueError(f'MAE takes square images, got {tuple(images.shape[-2:])}')
        x = self.patch_embed(images)
        pos = self.pos_embed(images.shape[-1] // self.patch_size, False)
        x = x + pos[:, 1:]
        x, mask, ids_restore = random_masking(x, num_kept(x.shape[1], mask_ratio), noise)
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        masked = self.mask_token.to(x.dtype).expand(n, length + 1 - x.shape[1], -1)
        tokens = torch.cat([x[:, 1:], masked], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], tokens], dim=1)
        x = x + self.pos_embed(int(round(math.sqrt(length))), True)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x)[:, 1:])

    def loss(self, target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)
        mask = mask.float()
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor, mask_ratio: Optional[float] = None,
                generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None):
        """Loss, prediction and mask for a batch of normalised images (N, C, B, B).

        The mask comes from `noise` (N, L) if given, else from uniform noise drawn with
        `generator` (None: torch's global generator, seeded by the project's seeding).
        """
        ratio = self.mask_ratio if mask_ratio is None else check_mask_ratio(mask_ratio)
        if noise is None:
            noise = self.draw_noise(images, generator)
        target = self.targets(images)
        latent, mask, ids_restore = self.forward_encoder(images, ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.loss(target, pred, mask), pred, mask


# ---------------------------------------------------------------------------
# checkpoints: this project's and official MAE pre-training files
# ---------------------------------------------------------------------------

_ENCODER_PREFIXES = ('patch_embed.', 'blocks.', 'norm.')
_ENCODER_KEYS = ('cls_token',)
# fixed sin-cos tables the official MAE code keeps in its state dict (regenerated here)
_FIXED_KEYS = ('pos_embed', 'decoder_pos_embed')


def mae_state_from_checkpoint(ckpt) -> Dict[str, torch.Tensor]:
    """The model state of a checkpoint dict ({'model': ...}, this project's or MAE's) or a bare state dict."""
    if isinstance(ckpt, dict) and isinstance(ckpt.get('model'), dict):
        return ckpt['model']
    return ckpt


def is_mae_state_dict(state: Dict[str, torch.Tensor]) -> bool:
    """True for an MAE pre-training state (it has the mask token and the decoder)."""
    return 'mask_token' in state and 'decoder_embed.weight' in state


def _encoder_shape(state) -> Tuple[int, int, int]:
    """(width, depth, patch size) of the encoder in a state dict."""
    w = state['patch_embed.proj.weight']
    depth = len({k.split('.')[1] for k in state if k.startswith('blocks.')})
    return int(w.shape[0]), depth, int(w.shape[-1])


def infer_mae_model(state: Dict[str, torch.Tensor]) -> Optional[str]:
    """The MAE_CONFIGS name whose encoder and decoder shapes the state has (None if none)."""
    if not is_mae_state_dict(state):
        return None
    width, depth, patch = _encoder_shape(state)
    dec_w = int(state['decoder_embed.weight'].shape[0])
    dec_depth = len({k.split('.')[1] for k in state if k.startswith('decoder_blocks.')})
    for name, cfg in MAE_CONFIGS.items():
        if (cfg.embed_dim, cfg.depth, cfg.patch_size, cfg.decoder_embed_dim, cfg.decoder_depth) == \
                (width, depth, patch, dec_w, dec_depth):
            return name
    return None


def _describe(width, depth, patch):
    return f'width {width}, depth {depth}, patch {patch}'


def _fit_hint(state, src) -> str:
    name = infer_mae_model(state)
    if name:
        return f'use --model {MAE_CONFIGS[name].vit}'
    return f'use a timm ViT with {_describe(*src)} and a class token'


def mae_to_vit_state_dict(state: Dict[str, torch.Tensor], model: VisionTransformer,
                          what: str = 'the pre-training checkpoint') -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Map an MAE pre-training state onto timm's ViT `model`: (state to load, skipped source keys).

    `state`: this project's MAE state, an official MAE one, or a checkpoint dict holding
    either under 'model'.  The encoder (patch_embed, cls_token, blocks.N, norm) is copied
    by name; the decoder, the mask token and the fixed tables are skipped; norm.* is skipped
    too when the model has no final norm (global_pool 'avg': timm then normalises with a
    fresh fc_norm, as MAE's fine-tuning does).  pos_embed: timm's ViT has a learned one; it
    starts as the exact sin-cos embedding of the model's own grid with a zero class-token
    row, i.e. what the encoder was trained with (at the pre-training size this equals the
    official checkpoint's table; at another fine-tuning size it is generated for that grid
    rather than interpolated as MAE's fine-tuning code does).  The returned state loads with
    strict=False; what it lacks is the classifier (head, fc_norm).  UserError (one line)
    when the state is not an MAE one or its encoder does not fit the model.
    """
    state = mae_state_from_checkpoint(state)
    if not isinstance(state, dict) or not is_mae_state_dict(state):
        raise UserError(f'{what} holds no MAE pre-training weights (no mask_token / decoder_embed): load a '
                        f'supervised checkpoint without MAE conversion')
    if not isinstance(model, VisionTransformer):
        raise UserError(f'MAE encoders fine-tune into timm\'s VisionTransformer, not {type(model).__name__}: '
                        f'use e.g. --model vit_base_patch16_224')
    src = _encoder_shape(state)
    dst = (model.embed_dim, len(model.blocks), int(model.patch_embed.patch_size[0]))
    if src != dst or model.cls_token is None or model.num_prefix_tokens != 1 or model.no_embed_class:
        token = '' if model.cls_token is not None and model.num_prefix_tokens == 1 and not model.no_embed_class \
            else ', not one class token with a position'
        raise UserError(f'{what}: its encoder ({_describe(*src)}) does not fit the model ({_describe(*dst)}{token}): '
                        f'{_fit_hint(state, src)}')
    target = model.state_dict()
    out, skipped = {}, []
    for key, value in state.items():
        encoder = key in _ENCODER_KEYS or key.startswith(_ENCODER_PREFIXES)
        if not encoder or key not in target:
            skipped.append(key)
            continue
        if tuple(value.shape) != tuple(target[key].shape):
            raise UserError(f'{what}: {key} has shape {tuple(value.shape)}, the model {tuple(target[key].shape)}: '
                            f'the encoder does not fit; {_fit_hint(state, src)}')
        out[key] = value
    gh, gw = model.patch_embed.grid_size
    if gh != gw:
        raise UserError(f'the model\'s patch grid {gh}x{gw} is not square: fine-tune at a square --input_size')
    pos = sincos_pos_embed_2d(model.embed_dim, gh, cls_token=True, dtype=target['pos_embed'].dtype)
    if tuple(pos.shape) != tuple(target['pos_embed'].shape):
        raise UserError(f'the model\'s pos_embed {tuple(target["pos_embed"].shape)} is not one class token plus '
                        f'a {gh}x{gw} grid: use a standard timm ViT')
    out['pos_embed'] = pos
    missing = [k for k in target if k not in out and k != 'pos_embed']
    unexpected = [k for k in missing if not k.startswith(('head.', 'fc_norm.'))]
    if unexpected:
        raise UserError(f'{what} lacks encoder weights the model needs ({", ".join(unexpected[:4])}): it is not '
                        f'a complete MAE encoder for this model')
    return out, skipped


def load_mae_state_dict(model: MaskedAutoencoderViT, state: Dict[str, torch.Tensor]) -> List[str]:
    """Load this project's or an official MAE state into `model`; returns the skipped fixed tables.

    Official files carry pos_embed / decoder_pos_embed (the same fixed sin-cos tables this
    model generates); everything else must match exactly.
    """
    state = mae_state_from_checkpoint(state)
    skipped = [k for k in _FIXED_KEYS if k in state]
    model.load_state_dict({k: v for k, v in state.items() if k not in _FIXED_KEYS}, strict=True)
    return skipped


# ---------------------------------------------------------------------------
# registration with timm
# ---------------------------------------------------------------------------

def _cfg(**kwargs):
    return {'url': '', 'num_classes': 0, 'input_size': (3, 224, 224), 'pool_size': None, 'crop_pct': 0.875,
            'interpolation': 'bicubic', 'fixed_input_size': False, 'mean': (0.485, 0.456, 0.406),
            'std': (0.229, 0.224, 0.225), 'first_conv': 'patch_embed.proj', 'classifier': '',
            'paper_ids': 'arXiv:2111.06377', **kwargs}


# read by timm's register_model (see models/cswin.py)
default_cfgs = generate_default_cfgs({
    'mae_vit_tiny_patch16': _cfg(),
    'mae_vit_base_patch16': _cfg(),
    'mae_vit_large_patch16': _cfg(),
    'mae_vit_huge_patch14': _cfg(),
})


def _create_mae(variant: str, pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    if pretrained:
        raise ValueError(f'{variant}: no pretrained weights are downloadable here; create it with pretrained=False '
                         f'and load a checkpoint with models.mae.load_mae_state_dict')
    c = MAE_CONFIGS[variant]
    args = dict(patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads,
                decoder_embed_dim=c.decoder_embed_dim, decoder_depth=c.decoder_depth,
                decoder_num_heads=c.decoder_num_heads, mlp_ratio=c.mlp_ratio, vit=c.vit)
    return build_model_with_cfg(MaskedAutoencoderViT, variant, pretrained=False, **dict(args, **kwargs))


@register_model
def mae_vit_tiny_patch16(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    return _create_mae('mae_vit_tiny_patch16', pretrained, **kwargs)


@register_model
def mae_vit_base_patch16(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    return _create_mae('mae_vit_base_patch16', pretrained, **kwargs)


@register_model
def mae_vit_large_patch16(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    return _create_mae('mae_vit_large_patch16', pretrained, **kwargs)


@register_model
def mae_vit_huge_patch14(pretrained: bool = False, **kwargs) -> MaskedAutoencoderViT:
    return _create_mae('mae_vit_huge_patch14', pretrained, **kwargs)
