"""Tiny ViT and Swin registered with timm, so curriculum runs through main.py stay fast on CPU.

Registering a model is also how users add their own (TRAINING.md): --model then finds it.
"""
import timm
from timm.models import build_model_with_cfg, register_model
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer


def _registered(fn):
    return fn if timm.is_model(fn.__name__) else register_model(fn)


@_registered
def tiny_vit_p16(pretrained=False, **kwargs):
    kwargs.setdefault('img_size', 64)
    args = dict(patch_size=16, embed_dim=48, depth=2, num_heads=2)
    return build_model_with_cfg(VisionTransformer, 'tiny_vit_p16', pretrained, **dict(args, **kwargs))


@_registered
def tiny_swin_p4(pretrained=False, **kwargs):
    kwargs.setdefault('img_size', 128)
    kwargs.setdefault('window_size', 4)
    args = dict(patch_size=4, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    return build_model_with_cfg(SwinTransformer, 'tiny_swin_p4', pretrained, **dict(args, **kwargs))


@_registered
def tiny_pvt(pretrained=False, **kwargs):
    """PVT v1 layout (four stages, SR attention, per-stage position embeddings) at toy width."""
    from models.pvt import PyramidVisionTransformer
    kwargs.setdefault('img_size', 64)
    args = dict(embed_dims=(8, 16, 40, 64), num_heads=(1, 2, 5, 8), mlp_ratios=(2, 2, 2, 2),
                depths=(1, 1, 1, 1), sr_ratios=(8, 4, 2, 1))
    return build_model_with_cfg(PyramidVisionTransformer, 'tiny_pvt', pretrained, **dict(args, **kwargs))
