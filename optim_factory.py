"""Parameter groups (weight decay, layer-wise lr decay) and the optimizer.

Layer ids follow the official recipes of each family, chosen by model class in
LAYER_ID_TABLE. Families not in the table fall back to timm's own
group_matcher-based layer decay. No weight decay on norms, biases, position
embeddings and tokens (1-D tensors, '.bias' and the model's no_weight_decay()).
"""
import re
import weakref

import torch
from timm.models.convnext import ConvNeXt
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2, param_groups_layer_decay

from models.cswin import CSWinTransformer


def _convnext_layers(model):
    return 12


def _convnext_layer_id(name, num_layers):
    # The ConvNeXt fine-tuning recipe: stem 0, stages 0/1 and their downsamples 1-3,
    # stage 2 in groups of 3 blocks, stage 3 at the top; head above everything.
    if name.startswith('stem'):
        return 0
    m = re.match(r'stages\.(\d+)\.(downsample|blocks)(?:\.(\d+))?', name)
    if not m:
        return num_layers + 1
    stage = int(m.group(1))
    if m.group(2) == 'downsample':
        return {0: 0, 1: 2, 2: 3}.get(stage, num_layers)
    block = int(m.group(3))
    if stage in (0, 1):
        return stage + 1
    if stage == 2:
        return 3 + block // 3
    return num_layers


def _vit_layers(model):
    return len(model.blocks)


def _vit_layer_id(name, num_layers):
    if name in ('cls_token', 'dist_token', 'reg_token', 'pos_embed') or name.startswith('patch_embed'):
        return 0
    m = re.match(r'blocks\.(\d+)\.', name)
    if m:
        return int(m.group(1)) + 1
    return num_layers + 1


def _swin_depths(model):
    return [len(layer.blocks) for layer in model.layers]


def _swin_layers(model):
    return sum(_swin_depths(model))


def _swin_layer_id_fn(model):
    depths = _swin_depths(model)
    starts = [sum(depths[:i]) for i in range(len(depths))]

    def layer_id(name, num_layers):
        if name.startswith(('patch_embed', 'absolute_pos_embed')):
            return 0
        m = re.match(r'layers\.(\d+)\.(blocks|downsample)(?:\.(\d+))?', name)
        if not m:
            return num_layers + 1
        stage = int(m.group(1))
        if m.group(2) == 'downsample':
            # timm runs the patch merging at the start of stage i; the official code at
            # the end of stage i-1, where it shares the id of that stage's last block.
            return starts[stage]
        return starts[stage] + int(m.group(3)) + 1
    return layer_id


# CSWin: the EfficientTrain++ authors' fine-tuning of their IN-22K models with --layer_decay
# (LeapLabTHU/EfficientTrain optim_factory.py, get_num_layer_for_cswin, after BEiT): 20
# layers of two consecutive blocks; stem 0, stage s block j at a per-stage base + j // 2,
# merge1/merge2 with the start of the next stage, merge3 and stage 4 at the top (20), the
# final norm and head above everything (21).
_CSWIN_STAGE_BASE = {1: 1, 2: 2, 3: 4, 4: 20}
_CSWIN_MERGE = {1: 2, 2: 4, 3: 20}


def _cswin_layers(model):
    return 20


def _cswin_layer_id(name, num_layers):
    if name.startswith('stage1_conv_embed'):
        return 0
    m = re.match(r'merge(\d+)\.', name)
    if m:
        return _CSWIN_MERGE[int(m.group(1))]
    m = re.match(r'stage(\d+)\.(\d+)\.', name)
    if m:
        return min(_CSWIN_STAGE_BASE[int(m.group(1))] + int(m.group(2)) // 2, num_layers)
    return num_layers + 1


# model class -> (number of layers, layer_id(name, num_layers))
LAYER_ID_TABLE = {
    ConvNeXt: lambda m: (_convnext_layers(m), _convnext_layer_id),
    VisionTransformer: lambda m: (_vit_layers(m), _vit_layer_id),
    SwinTransformer: lambda m: (_swin_layers(m), _swin_layer_id_fn(m)),
    CSWinTransformer: lambda m: (_cswin_layers(m), _cswin_layer_id),
}


def _no_decay_names(model):
    return set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()


def param_groups(model, weight_decay, layer_decay=1.0):
    """Groups with 'lr_scale' and 'wd_scale' (0 for norms, biases, tokens, embeddings)."""
    skip = _no_decay_names(model)
    entry = next((v for k, v in LAYER_ID_TABLE.items() if isinstance(model, k)), None)
    if layer_decay < 1.0 and entry is None:
        # timm's group_matcher knows the block structure of the families we do not list.
        groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip,
                                          layer_decay=layer_decay)
        for g in groups:
            g['wd_scale'] = 1.0 if g['weight_decay'] > 0 else 0.0
        return groups
    num_layers, layer_id = entry(model) if entry is not None else (0, lambda n, k: 0)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name.endswith('.bias') or name in skip
        lid = layer_id(name, num_layers) if layer_decay < 1.0 else 0
        scale = layer_decay ** (num_layers + 1 - lid) if layer_decay < 1.0 else 1.0
        key = (lid, no_wd)
        if key not in groups:
            groups[key] = {'params': [], 'param_names': [], 'weight_decay': 0.0 if no_wd else weight_decay,
                           'wd_scale': 0.0 if no_wd else 1.0, 'lr_scale': scale, 'layer_id': lid}
        groups[key]['params'].append(p)
        groups[key]['param_names'].append(name)
    return [groups[k] for k in sorted(groups)]


def create_optimizer(args, model):
    groups = param_groups(model, args.weight_decay, args.layer_decay)
    for g in groups:
        g.pop('param_names', None)
    kwargs = {}
    if args.opt_eps is not None:
        kwargs['eps'] = args.opt_eps
    if args.opt_betas is not None:
        kwargs['betas'] = tuple(args.opt_betas)
    # timm's factory knows adamw, sgd, lamb, lion, ...; per-group weight_decay is kept.
    # torch's fused kernels (CPU and CUDA) take found_inf: the engine skips an update on
    # the device, the way GradScaler does, without reading a flag on the host; they also
    # take a tensor lr, which a captured CUDA graph needs.  Copies of the group dicts:
    # torch fills its defaults into the dicts it is given.
    opt = create_optimizer_v2([dict(g) for g in groups], opt=args.opt, lr=args.lr,
                              weight_decay=args.weight_decay, momentum=args.momentum, **kwargs)
    if type(opt) in FUSED_CLASSES:
        opt = create_optimizer_v2([dict(g) for g in groups], opt=args.opt, lr=args.lr,
                                  weight_decay=args.weight_decay, momentum=args.momentum, fused=True, **kwargs)
    return opt


# torch optimizers whose fused kernel honours found_inf/grad_scale (GradScaler's
# "_step_supports_amp_scaling" protocol); timm maps adamw/adam/sgd/momentum/nesterov to them.
FUSED_CLASSES = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)


class _DeviceLr:
    """Every group's lr as a 0-dim view of one device tensor, and the groups' lr_scale beside it."""

    def __init__(self, optimizer, device):
        groups = optimizer.param_groups
        self.lrs = torch.tensor([float(g['lr']) for g in groups], dtype=torch.float32, device=device)
        # float64: lr * lr_scale is rounded to float32 once, as for a Python float lr (the
        # eager step's), so a replayed update uses the very lr the eager one does
        self.scales = torch.tensor([g.get('lr_scale', 1.0) for g in groups], dtype=torch.float64, device=device)
        self.views = [self.lrs[i] for i in range(len(groups))]
        for g, v in zip(groups, self.views):
            g['lr'] = v

    def holds(self, optimizer):
        groups = optimizer.param_groups
        return len(groups) == len(self.views) and all(g['lr'] is v for g, v in zip(groups, self.views))


_DEVICE_LR = weakref.WeakKeyDictionary()  # optimizer -> _DeviceLr


def device_lr(optimizer, device):
    """Move every param group's lr into device memory (what a captured CUDA graph reads); idempotent.

    The lrs are views of one tensor, so apply_hparams writes all groups with one kernel
    (layer-wise decay gives ConvNeXt/DeiT some 30 groups: 30 launches per update otherwise).
    """
    current = _DEVICE_LR.get(optimizer)
    if current is None or not current.holds(optimizer):
        _DEVICE_LR[optimizer] = _DeviceLr(optimizer, device)


def host_lr(optimizer):
    """Every group's lr back to a Python number (one read of the device)."""
    current = _DEVICE_LR.pop(optimizer, None)
    values = current.lrs.tolist() if current is not None and current.holds(optimizer) else None
    for i, g in enumerate(optimizer.param_groups):
        if isinstance(g['lr'], torch.Tensor):
            g['lr'] = values[i] if values is not None else float(g['lr'])


def apply_hparams(optimizer, lr, weight_decay):
    stacked = _DEVICE_LR.get(optimizer)
    on_device = stacked is not None and stacked.holds(optimizer)
    if on_device:
        # a captured step reads lr from these views: written in place, one kernel, no host sync
        torch.mul(stacked.scales, lr, out=stacked.lrs)
    for g in optimizer.param_groups:
        if not on_device:
            value = lr * g.get('lr_scale', 1.0)
            if isinstance(g['lr'], torch.Tensor):
                g['lr'].fill_(value)
            else:
                g['lr'] = value
        g['weight_decay'] = weight_decay * g.get('wd_scale', 1.0)


__all__ = ['param_groups', 'create_optimizer', 'apply_hparams', 'device_lr', 'host_lr', 'LAYER_ID_TABLE']
