#!/usr/bin/env python3
"""Launch the published EfficientTrain++ / EfficientTrain / baseline recipes.

One table (RECIPES) holds every per-model hyper-parameter (METHOD.md); the drop path at
a budget E, the batch split for the number of GPUs and the torchrun / SLURM launch line
are derived from it, so the per-model wrappers (scripts/train_<model>.sh, written by
`recipes.py wrappers`) cannot drift apart.

    python scripts/recipes.py list
    python scripts/recipes.py train swin_tiny --data_path /data/imagenet [--budget 150]
        [--variant etpp|et|baseline] [--replay] [--gpus 8] [--dry_run] [main.py flags]
    python scripts/recipes.py eval swin_tiny CHECKPOINT --data_path /data/imagenet [--ema]
    python scripts/recipes.py train mae_vit_base_patch16 --task mae [--variant etpp|baseline] [--target hog]
    python scripts/recipes.py train vit_base_patch16_224 --task mae_ft --finetune PRETRAIN.pth
    python scripts/recipes.py wrappers

Flags the launcher does not know are passed to main.py after the recipe's own, so they
override it (argparse keeps the last value). Launch settings come from flags or the
environment: GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, RDZV_ID,
DATA_PATH, OUTPUT_DIR (or OUTPUT_ROOT), BUDGET, DRY_RUN=1. Nothing is passed through a
shell: the command is an argument list, printed shell-quoted.
"""
import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MAIN = os.path.join(ROOT, 'main.py')
MAIN_PRETRAIN = os.path.join(ROOT, 'main_pretrain.py')

# The published recipes keep this global batch at every stage, on 8 GPUs.
GLOBAL_BATCH = 4096
PUBLISHED_GPUS = 8
DEFAULT_LR = 4e-3
DEFAULT_WEIGHT_DECAY = 0.05
WARMUP_EPOCHS = 20

Flags = Tuple[Tuple[str, str], ...]
EMA: Flags = (('--model_ema', 'true'), ('--model_ema_eval', 'true'))
AMP: Flags = (('--use_amp', 'true'),)
CLIP: Flags = (('--clip_grad', '5.0'),)


@dataclass(frozen=True)
class Recipe:
    family: str
    # drop path of the 300-epoch baseline; EfficientTrain++ scales it by E/200
    drop_path: float
    # per-GPU batch x update_freq at B=224 on 8 GPUs; curriculum/presets.py derives the
    # larger micro-batches of the lower-B stages from it
    batch: int
    update_freq: int
    flags: Flags = ()
    lr: float = DEFAULT_LR
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    # METHOD.md publishes replay settings for this model (--replay_preset true)
    replay: bool = False
    source: str = 'METHOD.md'
    # --variant et where the ICCV driver (LeapLabTHU/EfficientTrain ET_training.py) trained the
    # model otherwise than the EfficientTrain++ one: (flags, lr, weight decay) instead of the above
    et: Optional[Tuple[Flags, float, float]] = None


_METAFORMER = ('sail-sg/metaformer training scripts (METHOD.md gives no CAFormer recipe); '
               'their head dropout has no main.py flag')

_PVT = ('whai362/PVT classification code and configs (lr 5e-4 x batch/512, wd 0.05, drop path, clipping); '
        'EfficientTrain++ schedule not published: Swin-S/B\'s stands in (TRAINING.md)')

RECIPES: Dict[str, Recipe] = {
    'resnet50': Recipe('resnet', 0.0, 512, 1, replay=True),
    'convnext_tiny': Recipe('convnext', 0.1, 128, 4, EMA),
    'convnext_small': Recipe('convnext', 0.4, 64, 8, EMA),
    'convnext_base': Recipe('convnext', 0.5, 64, 8, EMA),
    'deit_tiny_patch16_224': Recipe('deit', 0.1, 256, 2, AMP + CLIP, replay=True),
    'deit_small_patch16_224': Recipe('deit', 0.1, 256, 2, AMP + CLIP, replay=True),
    'swin_tiny': Recipe('swin', 0.2, 256, 2, AMP + CLIP, replay=True),
    'swin_small': Recipe('swin', 0.3, 128, 4, AMP + CLIP),
    'swin_base': Recipe('swin', 0.5, 128, 4, AMP + CLIP),
    'CSWin_64_12211_tiny_224': Recipe('cswin', 0.2, 256, 2, AMP + EMA, replay=True),
    'CSWin_64_24322_small_224': Recipe('cswin', 0.4, 128, 4, AMP + EMA),
    'CSWin_96_24322_base_224': Recipe(
        'cswin', 0.5, 128, 4,
        AMP + EMA + (('--model_ema_decay', '0.9998'), ('--opt', 'lamb'), ('--opt_eps', '1e-6')),
        lr=8e-3, weight_decay=0.1,
        # ET_training.py gives CSWin-B only the CSWin flags: AdamW (eps 1e-8), lr 4e-3, wd 0.05, EMA 0.9999
        et=(AMP + EMA, DEFAULT_LR, DEFAULT_WEIGHT_DECAY)),
    'caformer_s18': Recipe('caformer', 0.15, 128, 4, (('--opt', 'lamb'),), lr=8e-3, source=_METAFORMER),
    'caformer_s36': Recipe('caformer', 0.3, 128, 4, (('--opt', 'lamb'),), lr=8e-3, source=_METAFORMER),
    'caformer_m36': Recipe('caformer', 0.4, 128, 4, (('--opt', 'lamb'),), lr=8e-3, source=_METAFORMER),
    # PVT v1 (EfficientTrain++ Table 7): the PVT authors' recipe (whai362/PVT classification):
    # AdamW, lr 5e-4 x global batch / 512 (= 4e-3 at 4096), weight decay 0.05, drop path
    # 0.1/0.1/0.3/0.3 and gradient clipping none/none/1.0/1.0 (configs/pvt/pvt_*.py),
    # mixed precision (its main.py always builds the AMP loss scaler), 128 images per GPU.
    # Kept from the EfficientTrain++ recipes instead of PVT's: 20 warmup epochs (PVT: 5 at
    # batch 1024), min lr 1e-6 (PVT: 1e-5), no repeated augmentation (PVT: on).
    # Its EfficientTrain++ schedule is a stand-in: curriculum/presets.py PVT_ETPP.
    'pvt_tiny': Recipe('pvt', 0.1, 128, 4, AMP, source=_PVT),
    'pvt_small': Recipe('pvt', 0.1, 128, 4, AMP, source=_PVT),
    'pvt_medium': Recipe('pvt', 0.3, 128, 4, AMP + (('--clip_grad', '1.0'),), source=_PVT),
    'pvt_large': Recipe('pvt', 0.3, 128, 4, AMP + (('--clip_grad', '1.0'),), source=_PVT),
}

# variant -> (--curriculum, default budget): EfficientTrain++ counts equivalent epochs
# at 224; EfficientTrain and the baseline count data epochs.
VARIANTS = {'etpp': ('etpp', 200), 'et': ('et', 300), 'baseline': ('none', 300)}
PUBLISHED_BUDGETS = (100, 150, 200, 300)


class LaunchError(ValueError):
    pass


# ------------------------------------------------------------- ImageNet-22K, then IN-1K fine-tuning
# EfficientTrain++ Table 12: pre-train on IN-22K at the baseline's budget or with ET / ET++ at
# 2/3, 1/2 and 1/3 of it, then fine-tune on IN-1K at 224 and at 384 (two separate runs).

@dataclass(frozen=True)
class Pretrain22k:
    family: str
    drop_path: float        # of the baseline; ET++ scales it by E / (2/3 x epochs), as E/200 at 300 on IN-1K
    batch: int              # per-GPU batch x update_freq at 224 on 8 GPUs (global 4096)
    update_freq: int
    flags: Flags = ()
    lr: float = DEFAULT_LR
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    epochs: int = 90        # the baseline's epochs
    warmup: int = 5
    source: str = ''


@dataclass(frozen=True)
class Finetune22k:
    drop_path: float
    batch: int              # per-GPU batch x update_freq on 8 GPUs at the fine-tuning size
    update_freq: int
    flags: Flags = ()
    lr: float = 5e-5
    weight_decay: float = 1e-8
    epochs: int = 30
    global_batch: int = 512
    source: str = ''


_CONVNEXT_22K = ('facebookresearch/ConvNeXt TRAINING.md, "ImageNet-22K Pre-training" (90 epochs, 5 warmup, '
                 'global batch 4096, lr 4e-3, drop path 0.1 for B and L, no EMA, --disable_eval true)')
_CSWIN_22K = ('a stand-in, no recipe is published (microsoft/CSWin-Transformer releases only the 22K '
              'weights): ConvNeXt\'s IN-22K protocol (90 epochs, 5 warmup, drop path 0.1) with the CSWin-B '
              'EfficientTrain++ optimizer (LAMB, lr 8e-3, wd 0.1, EMA 0.9998, AMP)')
_CSWIN_22K_FLAGS: Flags = AMP + EMA + (('--model_ema_decay', '0.9998'), ('--opt', 'lamb'), ('--opt_eps', '1e-6'))
IN22K_PRETRAIN: Dict[str, Pretrain22k] = {
    'convnext_base': Pretrain22k('convnext', 0.1, 32, 16, source=_CONVNEXT_22K),
    'convnext_large': Pretrain22k('convnext', 0.1, 32, 16, source=_CONVNEXT_22K),
    'CSWin_96_24322_base_224': Pretrain22k('cswin', 0.1, 64, 8, _CSWIN_22K_FLAGS, lr=8e-3, weight_decay=0.1,
                                           source=_CSWIN_22K),
    'CSWin_144_24322_large_224': Pretrain22k('cswin', 0.1, 32, 16, _CSWIN_22K_FLAGS, lr=8e-3, weight_decay=0.1,
                                             source=_CSWIN_22K),
}
# ET++ budgets of Table 12: 2/3, 1/2 and 1/3 of the 90-epoch baseline (1.5x, 2x, 3x less compute)
IN22K_FRACTIONS = ((2, 3), (1, 2), (1, 3))

_FT = (('--warmup_epochs', '0'), ('--layer_decay', '0.8'), ('--head_init_scale', '0.001'),
       ('--cutmix', '0'), ('--mixup', '0'))
_CONVNEXT_FT = 'facebookresearch/ConvNeXt TRAINING.md, "Fine-tune from ImageNet-22K pre-training" (B/L: no EMA)'
# CSWin: the EfficientTrain++ authors' command (LeapLabTHU/EfficientTrain EVAL.md, "Fine-tuning
# ImageNet-22K pre-trained models", CSWin-B at 224; "for other models change --model, --finetune
# and --input_size"): 8 GPUs x 64, lr 5e-5, wd 1e-8, 30 epochs, no warmup, no mixup/cutmix, layer
# decay 0.9, drop path 0.2, AMP, EMA 0.9998 evaluated.  At 384 the global batch is kept (32 x 2).
_CSWIN_FT: Flags = AMP + EMA + (('--model_ema_decay', '0.9998'), ('--warmup_epochs', '0'), ('--layer_decay', '0.9'),
                                ('--cutmix', '0'), ('--mixup', '0'))
_CSWIN_FT_SRC = ('LeapLabTHU/EfficientTrain EVAL.md (CSWin-B 22K -> 1K at 224; the same for CSWin-L and at 384, '
                 'per its notes)')
IN22K_FINETUNE: Dict[Tuple[str, int], Finetune22k] = {
    ('convnext_base', 224): Finetune22k(0.2, 32, 2, _FT, source=_CONVNEXT_FT),
    ('convnext_base', 384): Finetune22k(0.2, 16, 4, _FT, source=_CONVNEXT_FT),
    ('convnext_large', 224): Finetune22k(0.3, 32, 2, _FT, source=_CONVNEXT_FT),
    ('convnext_large', 384): Finetune22k(0.3, 16, 4, _FT, source=_CONVNEXT_FT),
    ('CSWin_96_24322_base_224', 224): Finetune22k(0.2, 64, 1, _CSWIN_FT, source=_CSWIN_FT_SRC),
    ('CSWin_96_24322_base_224', 384): Finetune22k(0.2, 32, 2, _CSWIN_FT, source=_CSWIN_FT_SRC),
    ('CSWin_144_24322_large_224', 224): Finetune22k(0.2, 64, 1, _CSWIN_FT, source=_CSWIN_FT_SRC),
    ('CSWin_144_24322_large_224', 384): Finetune22k(0.2, 32, 2, _CSWIN_FT, source=_CSWIN_FT_SRC),
}

# ------------------------------------------------------------- MAE: pre-training, then fine-tuning its encoder
# facebookresearch/mae PRETRAIN.md and FINETUNE.md; EfficientTrain++ Table 15 (ViT-B, 400 equivalent
# epochs with ET++ and the HOG target).  Learning rates per 256 images (blr): main_pretrain.py takes
# --blr (lr = blr x global batch / 256); main.py takes the lr itself, so the fine-tuning recipe gives
# --lr for its global batch of 1024 (= blr x 4), kept on any GPU count (split_batch).
MAE_SOURCE = 'facebookresearch/mae PRETRAIN.md / FINETUNE.md'


@dataclass(frozen=True)
class MaePretrain:
    batch: int = 64           # per-GPU batch x update_freq on 8 GPUs (MAE: 64 per GPU, global 4096)
    update_freq: int = 8
    blr: float = 1.5e-4
    weight_decay: float = 0.05
    warmup: int = 40
    mask_ratio: float = 0.75
    global_batch: int = 4096
    flags: Flags = AMP + (('--norm_pix_loss', 'true'),)


@dataclass(frozen=True)
class MaeFinetune:
    epochs: int
    blr: float
    layer_decay: float
    drop_path: float
    batch: int = 32           # per-GPU batch x update_freq on 8 GPUs (MAE: 32 x accum 4, global 1024)
    update_freq: int = 4
    global_batch: int = 1024
    weight_decay: float = 0.05
    # MAE's fine-tuning: 5 warm-up epochs, min lr 1e-6, RandAugment m9 mstd0.5, mixup 0.8, cutmix 1.0,
    # smoothing 0.1, random erasing 0.25, average pooling with fc_norm, AdamW betas (0.9, 0.999)
    # (main.py's AdamW default), AMP; the head initialised at std 2e-5 (timm's 0.02 x 0.001)
    flags: Flags = AMP + (('--global_pool', 'avg'), ('--warmup_epochs', '5'), ('--min_lr', '1e-6'),
                          ('--aa', 'rand-m9-mstd0.5-inc1'), ('--mixup', '0.8'), ('--cutmix', '1.0'),
                          ('--smoothing', '0.1'), ('--reprob', '0.25'), ('--head_init_scale', '0.001'))

    @property
    def lr(self) -> float:
        return self.blr * self.global_batch / 256


MAE_PRETRAIN: Dict[str, MaePretrain] = {
    'mae_vit_base_patch16': MaePretrain(),
    'mae_vit_large_patch16': MaePretrain(),
}
MAE_FINETUNE: Dict[str, MaeFinetune] = {
    'vit_base_patch16_224': MaeFinetune(100, 5e-4, 0.65, 0.1),
    'vit_large_patch16_224': MaeFinetune(50, 1e-3, 0.75, 0.2),
}
# variant -> (--curriculum, default budget): ET++ at 400 equivalent epochs (Table 15), MAE at 1600 epochs
MAE_VARIANTS = {'etpp': ('etpp', 400), 'baseline': ('none', 1600)}

TASKS = ('in1k', 'in22k', 'ft224', 'ft384', 'mae', 'mae_ft')


def drop_path(recipe: Recipe, variant: str, budget: int) -> float:
    """EfficientTrain++ scales the base rate by E/200; the other variants keep it."""
    if variant == 'etpp':
        return round(recipe.drop_path * budget / 200, 6)
    return recipe.drop_path


def split_batch(recipe: Recipe, world: int, batch: Optional[int] = None,
                global_batch: int = GLOBAL_BATCH) -> Tuple[int, int]:
    """(per-GPU batch, update_freq) at B=224 that keep the global batch at GLOBAL_BATCH.

    The published per-GPU batch is the most that fits a GPU at 224, so it is kept and
    update_freq absorbs the GPU count; with more GPUs than that allows, the per-GPU
    share of the global batch is the batch and update_freq is 1.
    """
    if world < 1:
        raise LaunchError(f'the number of GPUs must be >= 1, got {world}')
    if global_batch % world:
        raise LaunchError(f'the global batch {global_batch} is not divisible by {world} GPUs: use a power of '
                          f'two, or pass --batch_size and --update_freq after the recipe flags yourself')
    per_gpu = global_batch // world
    b = batch if batch else min(recipe.batch, per_gpu)
    if b < 1 or per_gpu % b:
        raise LaunchError(f'--batch_size {b} does not divide the per-GPU share {per_gpu} of the global batch '
                          f'{global_batch} on {world} GPUs: choose a divisor of {per_gpu}')
    return b, per_gpu // b


def _fmt(x: float) -> str:
    return f'{x:g}'


def _finish(args: List[str], flags, data_path: Optional[str], output_dir: Optional[str],
            extra: Sequence[str]) -> List[str]:
    """A recipe's own flags (its table entry's (flag, value) pairs) before the other arguments,
    the paths if given, and the caller's extra arguments last (they win in argparse)."""
    for flag, value in flags:
        args = args + [flag, value]
    if data_path:
        args = args + ['--data_path', data_path]
    if output_dir:
        args = args + ['--output_dir', output_dir]
    return args + list(extra)


def variant_budget(variants, variant: str, budget: Optional[int], unknown: str) -> Tuple[str, int]:
    """(--curriculum, budget) of `variant` in a variants table, the budget defaulting to its own;
    LaunchError (`unknown`) for a variant not in the table, and for a budget below 1."""
    if variant not in variants:
        raise LaunchError(unknown)
    curriculum, default_budget = variants[variant]
    budget = default_budget if budget is None else budget
    if budget < 1:
        raise LaunchError(f'--budget must be >= 1, got {budget}')
    return curriculum, budget


def main_args(model: str, variant: str = 'etpp', budget: Optional[int] = None, world: int = PUBLISHED_GPUS,
              data_path: Optional[str] = None, output_dir: Optional[str] = None, replay: bool = False,
              batch: Optional[int] = None, extra: Sequence[str] = ()) -> List[str]:
    """main.py's arguments for a recipe (everything after `main.py`)."""
    if model not in RECIPES:
        raise LaunchError(f'no published recipe for {model!r}: one of {", ".join(RECIPES)} '
                          f'(other models: call main.py directly, see TRAINING.md)')
    curriculum, budget = variant_budget(VARIANTS, variant, budget, f'unknown variant {variant!r}: one of '
                                                                  f'{", ".join(VARIANTS)}')
    r = RECIPES[model]
    if replay and variant != 'etpp':
        raise LaunchError('--replay uses the EfficientTrain++ replay settings: only with --variant etpp')
    if replay and not r.replay:
        with_replay = ', '.join(m for m, x in RECIPES.items() if x.replay)
        raise LaunchError(f'no published replay settings for {model} (published for {with_replay}); '
                          f'pass --replay_times N --replay_buffer_size M instead')
    b, uf = split_batch(r, world, batch)
    own_flags, lr, wd = r.et if variant == 'et' and r.et else (r.flags, r.lr, r.weight_decay)
    args = ['--model', model, '--curriculum', curriculum, '--epochs', str(budget),
            '--batch_size', str(b), '--update_freq', str(uf),
            '--lr', _fmt(lr), '--weight_decay', _fmt(wd),
            '--warmup_epochs', str(WARMUP_EPOCHS), '--drop_path', _fmt(drop_path(r, variant, budget))]
    flags = list(own_flags) + ([('--replay_preset', 'true')] if replay else [])
    return _finish(args, flags, data_path, output_dir, extra)


def in22k_drop_path(r: Pretrain22k, variant: str, budget: int) -> float:
    """ET++ scales the base rate by E over the budget at 2/3 of the baseline (200 of 300 on IN-1K)."""
    if variant == 'etpp':
        return round(r.drop_path * budget / (r.epochs * 2 / 3), 6)
    return r.drop_path


def in22k_default_budget(model: str, variant: str) -> int:
    r = IN22K_PRETRAIN[model]
    return r.epochs * 2 // 3 if variant == 'etpp' else r.epochs


def in22k_args(model: str, variant: str = 'etpp', budget: Optional[int] = None, world: int = PUBLISHED_GPUS,
               data_path: Optional[str] = None, output_dir: Optional[str] = None, batch: Optional[int] = None,
               extra: Sequence[str] = ()) -> List[str]:
    """main.py's arguments for IN-22K pre-training (an image folder of its classes, no evaluation)."""
    if model not in IN22K_PRETRAIN:
        raise LaunchError(f'no IN-22K recipe for {model!r}: one of {", ".join(IN22K_PRETRAIN)}')
    if variant not in VARIANTS:
        raise LaunchError(f'unknown variant {variant!r}: one of {", ".join(VARIANTS)}')
    r = IN22K_PRETRAIN[model]
    budget = in22k_default_budget(model, variant) if budget is None else budget
    if budget < 1:
        raise LaunchError(f'--budget must be >= 1, got {budget}')
    b, uf = split_batch(r, world, batch)
    args = ['--model', model, '--curriculum', VARIANTS[variant][0], '--epochs', str(budget),
            '--baseline_epochs', str(r.epochs), '--batch_size', str(b), '--update_freq', str(uf),
            '--lr', _fmt(r.lr), '--weight_decay', _fmt(r.weight_decay), '--warmup_epochs', str(r.warmup),
            '--drop_path', _fmt(in22k_drop_path(r, variant, budget)), '--disable_eval', 'true']
    return _finish(args, r.flags, data_path, output_dir, extra)


def finetune_args(model: str, size: int, checkpoint: str, world: int = PUBLISHED_GPUS,
                  data_path: Optional[str] = None, output_dir: Optional[str] = None, batch: Optional[int] = None,
                  extra: Sequence[str] = ()) -> List[str]:
    """main.py's arguments to fine-tune an IN-22K checkpoint on IN-1K at ``size`` (no curriculum)."""
    r = IN22K_FINETUNE.get((model, size))
    if r is None:
        have = ', '.join(f'{m} at {s}' for m, s in IN22K_FINETUNE)
        raise LaunchError(f'no IN-1K fine-tuning recipe for {model} at {size}: one of {have}')
    if not checkpoint:
        raise LaunchError('fine-tuning needs the IN-22K checkpoint: pass --finetune FILE')
    b, uf = split_batch(r, world, batch, r.global_batch)
    args = ['--model', model, '--finetune', checkpoint, '--input_size', str(size), '--curriculum', 'none',
            '--epochs', str(r.epochs), '--batch_size', str(b), '--update_freq', str(uf), '--lr', _fmt(r.lr),
            '--weight_decay', _fmt(r.weight_decay), '--drop_path', _fmt(r.drop_path)]
    return _finish(args, r.flags, data_path, output_dir, extra)


def mae_pretrain_args(model: str, variant: str = 'etpp', budget: Optional[int] = None, target: str = 'pixel',
                      world: int = PUBLISHED_GPUS, data_path: Optional[str] = None, output_dir: Optional[str] = None,
                      batch: Optional[int] = None, extra: Sequence[str] = ()) -> List[str]:
    """main_pretrain.py's arguments for MAE pre-training (with or without EfficientTrain++, pixel or HOG target)."""
    if model not in MAE_PRETRAIN:
        raise LaunchError(f'no MAE pre-training recipe for {model!r}: one of {", ".join(MAE_PRETRAIN)}')
    curriculum, budget = variant_budget(MAE_VARIANTS, variant, budget, f'MAE pre-training runs --variant '
                                        f'{" or ".join(MAE_VARIANTS)}, not {variant!r}')
    r = MAE_PRETRAIN[model]
    b, uf = split_batch(r, world, batch, r.global_batch)
    args = ['--model', model, '--curriculum', curriculum, '--epochs', str(budget), '--target', target,
            '--batch_size', str(b), '--update_freq', str(uf), '--blr', _fmt(r.blr),
            '--weight_decay', _fmt(r.weight_decay), '--warmup_epochs', str(r.warmup),
            '--mask_ratio', _fmt(r.mask_ratio)]
    return _finish(args, r.flags, data_path, output_dir, extra)


def mae_finetune_args(model: str, checkpoint: str, world: int = PUBLISHED_GPUS, data_path: Optional[str] = None,
                      output_dir: Optional[str] = None, batch: Optional[int] = None,
                      extra: Sequence[str] = ()) -> List[str]:
    """main.py's arguments to fine-tune an MAE encoder (main_pretrain.py's checkpoint or an official file)."""
    if model not in MAE_FINETUNE:
        raise LaunchError(f'no MAE fine-tuning recipe for {model!r}: one of {", ".join(MAE_FINETUNE)}')
    if not checkpoint:
        raise LaunchError('fine-tuning needs the MAE pre-training checkpoint: pass --finetune FILE')
    r = MAE_FINETUNE[model]
    b, uf = split_batch(r, world, batch, r.global_batch)
    args = ['--model', model, '--finetune', checkpoint, '--curriculum', 'none', '--epochs', str(r.epochs),
            '--batch_size', str(b), '--update_freq', str(uf), '--lr', _fmt(r.lr),
            '--weight_decay', _fmt(r.weight_decay), '--layer_decay', _fmt(r.layer_decay),
            '--drop_path', _fmt(r.drop_path)]
    return _finish(args, r.flags, data_path, output_dir, extra)


def eval_args(model: str, checkpoint: str, data_path: Optional[str] = None, ema: bool = False,
              input_size: Optional[int] = None, batch: int = 128, extra: Sequence[str] = ()) -> List[str]:
    """main.py's arguments to evaluate a checkpoint (fp32, exact sharded evaluation).

    Without input_size main.py evaluates at the size the checkpoint records, else 224."""
    if model not in RECIPES and model not in IN22K_PRETRAIN and model not in MAE_FINETUNE:
        from_timm = 'any timm model name also works with main.py directly'
        raise LaunchError(f'no published recipe for {model!r}: one of {", ".join(RECIPES)} ({from_timm})')
    args = ['--model', model, '--eval', 'true', '--resume', checkpoint, '--batch_size', str(batch)]
    if input_size:
        args += ['--input_size', str(input_size)]
    if ema:
        args += ['--model_ema', 'true', '--model_ema_eval', 'true']
    if data_path:
        args += ['--data_path', data_path]
    return args + list(extra)


# --------------------------------------------------------------------------- launching

@dataclass
class Launch:
    launcher: str                 # 'python', 'torchrun' or 'slurm'
    gpus: int                     # processes per node (torchrun); ignored for slurm
    nnodes: int = 1
    node_rank: Optional[int] = None
    master_addr: Optional[str] = None
    master_port: Optional[str] = None
    rdzv_backend: str = 'c10d'
    rdzv_id: Optional[str] = None

    @property
    def world(self) -> int:
        if self.launcher == 'slurm':
            return int(os.environ.get('SLURM_NTASKS', '1'))
        return self.gpus * self.nnodes


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name)
    if v in (None, ''):
        return None
    try:
        return int(v)
    except ValueError:
        raise LaunchError(f'${name} must be an integer, got {v!r}') from None


def _visible_gpus() -> Optional[int]:
    cvd = os.environ.get('CUDA_VISIBLE_DEVICES')
    if cvd is not None and cvd.strip() not in ('', '-1'):
        return len([d for d in cvd.split(',') if d.strip()])
    try:
        out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    n = sum(1 for line in out.stdout.splitlines() if line.startswith('GPU '))
    return n or None


def resolve_launch(ns) -> Launch:
    gpus = ns.gpus or _env_int('GPUS_PER_NODE')
    if gpus is None and ns.launcher != 'slurm':
        gpus = _visible_gpus()
        if gpus is None:
            raise LaunchError('cannot tell how many GPUs to use: pass --gpus N or set GPUS_PER_NODE')
    nnodes = ns.nnodes or _env_int('NNODES') or 1
    node_rank = ns.node_rank if ns.node_rank is not None else _env_int('NODE_RANK')
    launch = Launch(
        launcher=ns.launcher, gpus=gpus or 1, nnodes=nnodes, node_rank=node_rank,
        master_addr=ns.master_addr or os.environ.get('MASTER_ADDR') or None,
        master_port=str(ns.master_port or os.environ.get('MASTER_PORT') or '') or None,
        rdzv_backend=ns.rdzv_backend, rdzv_id=ns.rdzv_id or os.environ.get('RDZV_ID') or None)
    if launch.launcher == 'auto':
        launch.launcher = 'torchrun' if launch.world > 1 else 'python'
    if launch.launcher == 'python' and launch.world > 1:
        raise LaunchError(f'--launcher python runs one process, but {launch.world} GPUs were asked for')
    if launch.nnodes > 1 and launch.launcher == 'torchrun':
        if not (launch.master_addr and launch.master_port):
            raise LaunchError('multi-node runs need the rendezvous host and port: --master_addr/--master_port '
                              'or $MASTER_ADDR/$MASTER_PORT (the same on every node)')
        if launch.rdzv_backend == 'static' and launch.node_rank is None:
            raise LaunchError('--rdzv_backend static needs this node\'s rank: --node_rank or $NODE_RANK')
    return launch


def launcher_prefix(launch: Launch, default_rdzv_id: str) -> List[str]:
    """What comes before main.py: the interpreter, and torchrun's options."""
    if launch.launcher in ('python', 'slurm'):
        # under srun every task is one rank: utils.init_distributed_mode reads SLURM_*
        return [sys.executable]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(launch.gpus)]
    if launch.nnodes == 1:
        if launch.master_port:
            return cmd + ['--master_port', launch.master_port]
        # a free port chosen by torchrun, so concurrent single-node jobs do not collide
        return cmd + ['--standalone']
    cmd += ['--nnodes', str(launch.nnodes)]
    if launch.rdzv_backend == 'static':
        return cmd + ['--node_rank', str(launch.node_rank), '--master_addr', launch.master_addr,
                      '--master_port', launch.master_port]
    # c10d assigns ranks on arrival; a node rank would be ignored
    return cmd + ['--rdzv_backend', 'c10d', '--rdzv_endpoint', f'{launch.master_addr}:{launch.master_port}',
                  '--rdzv_id', launch.rdzv_id or default_rdzv_id]


def _truthy(v: Optional[str]) -> bool:
    return str(v or '').strip().lower() in ('1', 'true', 'yes', 'y', 't')


def _add_launch_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('launch (flags win over the environment)')
    g.add_argument('--gpus', type=int, default=None, help='GPUs (processes) per node [$GPUS_PER_NODE, '
                                                          'else the visible GPUs]')
    g.add_argument('--nnodes', type=int, default=None, help='[$NNODES, else 1]')
    g.add_argument('--node_rank', type=int, default=None, help='only for --rdzv_backend static [$NODE_RANK]')
    g.add_argument('--master_addr', default=None, help='rendezvous host of a multi-node run [$MASTER_ADDR]')
    g.add_argument('--master_port', default=None, help='rendezvous port [$MASTER_PORT; single node: a free '
                                                       'one]')
    g.add_argument('--rdzv_backend', default='c10d', choices=['c10d', 'static'])
    g.add_argument('--rdzv_id', default=None, help='job id shared by all nodes [$RDZV_ID, else from the run]')
    g.add_argument('--launcher', default='auto', choices=['auto', 'torchrun', 'python', 'slurm'],
                   help='auto: torchrun for more than one GPU; slurm: one srun task per GPU '
                        '(scripts/slurm_train.sh)')
    g.add_argument('--dry_run', action='store_true', help='print the command and exit [$DRY_RUN=1]')
    g.add_argument('--data_path', default=None, help='ImageNet root with train/ and val/ [$DATA_PATH]')


def _train_models() -> List[str]:
    return _unique(list(RECIPES) + list(IN22K_PRETRAIN) + [m for m, _ in IN22K_FINETUNE] + list(MAE_PRETRAIN)
                   + list(MAE_FINETUNE))


def _unique(xs):
    return list(dict.fromkeys(xs))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='recipes.py', allow_abbrev=False,
                                description='Published EfficientTrain(++) recipes; unknown flags go to main.py.')
    sub = p.add_subparsers(dest='cmd', required=True)
    sub.add_parser('list', help='print the recipe table')
    t = sub.add_parser('train', allow_abbrev=False, help='train a model with its published recipe')
    t.add_argument('model', choices=_train_models(), metavar='MODEL',
                   help=f'one of {", ".join(_train_models())} (--task in22k/ft224/ft384: see TRAINING.md)')
    t.add_argument('--task', default='in1k', choices=list(TASKS),
                   help='in1k: ImageNet-1K training (default); in22k: ImageNet-22K pre-training; ft224 / ft384: '
                        'fine-tuning an IN-22K checkpoint (--finetune) on ImageNet-1K at 224 / 384; mae: MAE '
                        'pre-training (main_pretrain.py; --variant etpp or baseline); mae_ft: fine-tuning an MAE '
                        'encoder (--finetune) on ImageNet-1K')
    t.add_argument('--finetune', default=None, help='with --task ft224/ft384/mae_ft: the pre-trained checkpoint')
    t.add_argument('--target', default=None, choices=['pixel', 'hog'],
                   help='with --task mae: the reconstruction target (default: pixel)')
    t.add_argument('--variant', default='etpp', choices=list(VARIANTS),
                   help='etpp: EfficientTrain++ (default); et: EfficientTrain (ICCV); baseline: no curriculum')
    t.add_argument('--budget', '-E', type=int, default=None,
                   help='etpp: equivalent epochs E (default 200; published 100/150/200/300; in22k: default 60, '
                        'published 60/45/30 = 2/3, 1/2, 1/3 of 90); et/baseline: epochs (default 300; in22k 90) '
                        '[$BUDGET]')
    t.add_argument('--replay', action='store_true', help='the published replay-buffer settings (etpp)')
    t.add_argument('--batch_size', type=int, default=None,
                   help='per-GPU batch at 224 (default: the published one); update_freq keeps 4096 global')
    t.add_argument('--output_dir', default=None,
                   help='[$OUTPUT_DIR, else $OUTPUT_ROOT/<model>_<variant>_E<budget>, OUTPUT_ROOT=output]')
    _add_launch_flags(t)
    e = sub.add_parser('eval', allow_abbrev=False, help='evaluate a checkpoint (released or own)')
    e.add_argument('model', choices=_train_models(), metavar='MODEL', help='a recipe name, as for train')
    e.add_argument('checkpoint')
    e.add_argument('--ema', action='store_true', help="evaluate the checkpoint's 'model_ema' entry")
    e.add_argument('--input_size', type=int, default=None,
                   help="evaluation size (default: the size the checkpoint records, else 224)")
    e.add_argument('--batch_size', type=int, default=128, help='per-GPU batch (x1.5 for evaluation)')
    _add_launch_flags(e)
    sub.add_parser('wrappers', help='(re)write scripts/train_<model>.sh')
    return p


def wrapper_text(model: str) -> str:
    return (
        '#!/usr/bin/env bash\n'
        f'# {model}: EfficientTrain++ at budget E (default 200), --variant et or baseline.\n'
        '# Written by `python scripts/recipes.py wrappers`; the recipe lives in scripts/recipes.py.\n'
        f'# Usage: scripts/train_{model}.sh --data_path DIR [--budget E] [--variant etpp|et|baseline]\n'
        '#        [--replay] [--gpus N] [--dry_run] [main.py flags]\n'
        'set -euo pipefail\n'
        f'exec "${{PYTHON:-python}}" "$(dirname "${{BASH_SOURCE[0]}}")/recipes.py" train {model} "$@"\n'
    )


# the MAE wrappers: script name -> (model, task)
MAE_WRAPPERS = {
    'pretrain_mae_vit_base.sh': ('mae_vit_base_patch16', 'mae'),
    'pretrain_mae_vit_large.sh': ('mae_vit_large_patch16', 'mae'),
    'finetune_mae_vit_base.sh': ('vit_base_patch16_224', 'mae_ft'),
    'finetune_mae_vit_large.sh': ('vit_large_patch16_224', 'mae_ft'),
}


def mae_wrapper_text(model: str, task: str) -> str:
    if task == 'mae':
        what = (f'# {model}: MAE pre-training, EfficientTrain++ at E=400 equivalent epochs (default) or\n'
                '# --variant baseline (1600 epochs), --target pixel (default) or hog.\n')
        usage = '--data_path DIR [--variant etpp|baseline] [--target pixel|hog] [--budget E]'
    else:
        what = f'# {model}: fine-tuning an MAE encoder (main_pretrain.py checkpoint or an official file).\n'
        usage = '--data_path DIR --finetune PRETRAIN.pth'
    return (
        '#!/usr/bin/env bash\n' + what +
        '# Written by `python scripts/recipes.py wrappers`; the recipe lives in scripts/recipes.py.\n'
        f'# Usage: scripts/{next(n for n, v in MAE_WRAPPERS.items() if v == (model, task))} {usage}\n'
        '#        [--gpus N] [--dry_run] [entry point flags]\n'
        'set -euo pipefail\n'
        f'exec "${{PYTHON:-python}}" "$(dirname "${{BASH_SOURCE[0]}}")/recipes.py" train {model} --task {task} "$@"\n'
    )


def write_wrappers() -> List[str]:
    texts = {f'train_{model}.sh': wrapper_text(model) for model in RECIPES}
    texts.update({name: mae_wrapper_text(*v) for name, v in MAE_WRAPPERS.items()})
    paths = []
    for name, text in texts.items():
        path = os.path.join(HERE, name)
        with open(path, 'w', encoding='utf-8') as f:
            f.write(text)
        os.chmod(path, 0o755)
        paths.append(path)
    return paths


def recipe_table() -> str:
    hdr = f'{"model":<26} {"family":<9} {"lr":>6} {"wd":>5} {"batch@224 x uf":>14} {"drop path E=100/150/200/300":>28}  flags'
    lines = [hdr, '-' * len(hdr)]
    for name, r in RECIPES.items():
        dps = '/'.join(_fmt(drop_path(r, 'etpp', e)) for e in PUBLISHED_BUDGETS)
        flags = ' '.join(f'{k} {v}' for k, v in r.flags) + (' [replay]' if r.replay else '')
        lines.append(f'{name:<26} {r.family:<9} {_fmt(r.lr):>6} {_fmt(r.weight_decay):>5} '
                     f'{f"{r.batch} x {r.update_freq}":>14} {dps:>28}  {flags}')
    lines.append(f'batch x update_freq on {PUBLISHED_GPUS} GPUs (global {GLOBAL_BATCH}); baseline and et use the '
                 f'E=200 drop path column.')
    for name, r in RECIPES.items():
        if r.et:
            flags = ' '.join(f'{k} {v}' for k, v in r.et[0])
            lines.append(f'{name} with --variant et (ET_training.py): lr {_fmt(r.et[1])} wd {_fmt(r.et[2])}  {flags}')
    lines += [f'{n}: from {r.source}' for n, r in RECIPES.items() if r.source != 'METHOD.md']
    lines += ['', 'ImageNet-22K pre-training (--task in22k; --data_path: train/ and val/ of the 22K classes)']
    for name, r in IN22K_PRETRAIN.items():
        budgets = '/'.join(str(r.epochs * a // b) for a, b in IN22K_FRACTIONS)
        dps = '/'.join(_fmt(in22k_drop_path(r, 'etpp', r.epochs * a // b)) for a, b in IN22K_FRACTIONS)
        flags = ' '.join(f'{k} {v}' for k, v in r.flags)
        lines.append(f'{name:<26} baseline/et {r.epochs} ep, etpp E={budgets} (drop path {dps}); lr {_fmt(r.lr)} '
                     f'wd {_fmt(r.weight_decay)} warmup {r.warmup} batch {r.batch} x {r.update_freq}  {flags}')
    lines += [f'{n}: from {r.source}' for n, r in IN22K_PRETRAIN.items()]
    lines += ['', 'ImageNet-1K fine-tuning of an IN-22K checkpoint (--task ft224 / ft384 --finetune FILE)']
    for (name, size), r in IN22K_FINETUNE.items():
        flags = ' '.join(f'{k} {v}' for k, v in r.flags)
        lines.append(f'{name:<26} {size}: {r.epochs} ep, lr {_fmt(r.lr)} wd {_fmt(r.weight_decay)} drop path '
                     f'{_fmt(r.drop_path)} batch {r.batch} x {r.update_freq} (global {r.global_batch})  {flags}')
    lines += [f'{n} at {sz}: from {r.source}' for (n, sz), r in IN22K_FINETUNE.items()]
    lines += ['', 'MAE pre-training (--task mae: main_pretrain.py; --variant etpp E=400 / baseline 1600 epochs; '
                  '--target pixel or hog)']
    for name, r in MAE_PRETRAIN.items():
        flags = ' '.join(f'{k} {v}' for k, v in r.flags)
        lines.append(f'{name:<26} blr {_fmt(r.blr)} (lr = blr x {r.global_batch} / 256) wd {_fmt(r.weight_decay)} '
                     f'warmup {r.warmup} mask {_fmt(r.mask_ratio)} batch {r.batch} x {r.update_freq} AdamW betas '
                     f'0.9/0.95  {flags}')
    lines += ['', 'MAE fine-tuning (--task mae_ft --finetune FILE: main.py, the encoder loaded into timm\'s ViT)']
    for name, r in MAE_FINETUNE.items():
        lines.append(f'{name:<26} {r.epochs} ep, blr {_fmt(r.blr)} (--lr {_fmt(r.lr)} at {r.global_batch}) layer '
                     f'decay {_fmt(r.layer_decay)} wd {_fmt(r.weight_decay)} drop path {_fmt(r.drop_path)} batch '
                     f'{r.batch} x {r.update_freq}')
    lines.append(f'MAE: from {MAE_SOURCE}; fine-tuning flags: ' + ' '.join(f'{k} {v}' for k, v in MaeFinetune.flags))
    return '\n'.join(lines)


def _split_passthrough(argv: List[str]) -> Tuple[List[str], List[str]]:
    if '--' in argv:
        i = argv.index('--')
        return argv[:i], argv[i + 1:]
    return argv, []


def build_command(argv: Sequence[str]) -> Tuple[List[str], bool]:
    """(command, dry_run) for a train/eval command line; LaunchError for a bad request."""
    own, after = _split_passthrough(list(argv))
    ns, unknown = build_parser().parse_known_args(own)
    extra = unknown + after
    launch = resolve_launch(ns)
    data_path = ns.data_path or os.environ.get('DATA_PATH') or None
    if not data_path and not any(a == '--data_set' or a.startswith('--data_set=') for a in extra):
        raise LaunchError('no data: pass --data_path DIR (or set $DATA_PATH), or a --data_set of main.py')
    dry = ns.dry_run or _truthy(os.environ.get('DRY_RUN'))
    if ns.cmd == 'train':
        if ns.task in ('ft224', 'ft384', 'mae_ft') and ns.budget is not None:
            raise LaunchError(f'--budget does not apply to --task {ns.task} (the fine-tuning recipe has its epochs): '
                              f'drop it, or add main.py\'s --epochs N after the recipe flags')
        if ns.target and ns.task != 'mae':
            raise LaunchError('--target is the MAE reconstruction target: only with --task mae')
        if ns.budget is None and os.environ.get('BUDGET'):
            ns.budget = _env_int('BUDGET')
        if ns.task != 'in1k' and ns.replay:
            raise LaunchError('--replay has published settings only for ImageNet-1K training (--task in1k)')
        if ns.finetune and ns.task not in ('ft224', 'ft384', 'mae_ft'):
            raise LaunchError('--finetune belongs to --task ft224, ft384 or mae_ft (fine-tuning a pre-trained '
                              'checkpoint)')
        if ns.task == 'in1k':
            budget = VARIANTS[ns.variant][1] if ns.budget is None else ns.budget
            name = f'{ns.model}_{ns.variant}_E{budget}'
        elif ns.task == 'in22k':
            if ns.model not in IN22K_PRETRAIN:
                raise LaunchError(f'no IN-22K recipe for {ns.model!r}: one of {", ".join(IN22K_PRETRAIN)}')
            budget = in22k_default_budget(ns.model, ns.variant) if ns.budget is None else ns.budget
            name = f'{ns.model}_in22k_{ns.variant}_E{budget}'
        elif ns.task == 'mae':
            budget = MAE_VARIANTS.get(ns.variant, (None, 0))[1] if ns.budget is None else ns.budget
            name = f'{ns.model}_{ns.variant}_{ns.target or "pixel"}_E{budget}'
        else:
            name = f'{ns.model}_{ns.task}'
        out = ns.output_dir or os.environ.get('OUTPUT_DIR') or os.path.join(
            os.environ.get('OUTPUT_ROOT') or 'output', name)
        if ns.task == 'in1k':
            args = main_args(ns.model, ns.variant, budget, launch.world, data_path, out, ns.replay, ns.batch_size,
                             extra)
        elif ns.task == 'in22k':
            args = in22k_args(ns.model, ns.variant, budget, launch.world, data_path, out, ns.batch_size, extra)
        elif ns.task == 'mae':
            args = mae_pretrain_args(ns.model, ns.variant, budget, ns.target or 'pixel', launch.world, data_path,
                                     out, ns.batch_size, extra)
        elif ns.task == 'mae_ft':
            args = mae_finetune_args(ns.model, ns.finetune, launch.world, data_path, out, ns.batch_size, extra)
        else:
            args = finetune_args(ns.model, int(ns.task[2:]), ns.finetune, launch.world, data_path, out,
                                 ns.batch_size, extra)
        rdzv = name
    else:
        args = eval_args(ns.model, ns.checkpoint, data_path, ns.ema, ns.input_size, ns.batch_size, extra)
        rdzv = f'eval_{ns.model}'
    entry = MAIN_PRETRAIN if ns.cmd == 'train' and ns.task == 'mae' else MAIN
    return launcher_prefix(launch, rdzv) + [entry] + args, dry


def cli(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ['list']:
        print(recipe_table())
        return 0
    if argv[:1] == ['wrappers']:
        for path in write_wrappers():
            print(path)
        return 0
    try:
        cmd, dry = build_command(argv)
    except LaunchError as e:
        print(f'recipes.py: error: {e}', file=sys.stderr)
        return 2
    print(shlex.join(cmd), flush=True)
    if dry:
        return 0
    os.execv(cmd[0], cmd)


if __name__ == '__main__':
    sys.exit(cli())
