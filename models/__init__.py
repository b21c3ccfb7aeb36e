"""Models: timm's registry plus what timm lacks (CSWin, PVT v1) and the recipe names.

zoo.py              recipe names -> timm names and constructor arguments
cswin.py            CSWin Transformer, registered with timm
pvt.py              PVT v1 (Pyramid Vision Transformer), registered with timm
mae.py              MAE pre-training models (timm ViT encoder + decoder), registered with timm
hog.py              HOG targets of masked image modelling (MaskFeat's), used by mae.py
checkpoint_compat.py  released checkpoints (official parameter names) -> timm modules
"""

from models.zoo import RECIPE_MODELS, create_model as _zoo_create_model

# Constructor argument for the initial layer-scale value, by family; tried in order since the
# class is only known once the model exists (ConvNeXt, ViT/DeiT, MetaFormer/CAFormer).
_LAYER_SCALE_KWARGS = ('ls_init_value', 'init_values', 'layer_scale_init_values')


def create_model(name, layer_scale_init_value=None, **kwargs):
    """A model by recipe or timm name (never pretrained); ValueError for unknown names."""
    if layer_scale_init_value is None:
        return _zoo_create_model(name, **kwargs)
    for key in _LAYER_SCALE_KWARGS:
        try:
            return _zoo_create_model(name, **{key: layer_scale_init_value}, **kwargs)
        except TypeError:
            continue
    raise ValueError(f'--layer_scale_init_value: model {name} has no layer scale; drop the flag')


__all__ = ['create_model', 'RECIPE_MODELS']
