"""Published schedules (METHOD.md) and custom curriculum files, turned into a Plan.

Per-GPU batches in the recipe tables are the published ones on 8 GPUs (global
batch 4096). They are used as ratios against the last (base-size) stage: the
user's ``--batch_size x --update_freq`` is the base stage's setting, and lower-B
stages take a larger micro-batch with a smaller update_freq, so the global batch
never changes; --stage_batch large grows it below the base size (large_batches).
"""
import json
import math
import os
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

from curriculum.plan import Plan, Stage, relative_cost, split_rounded

ETPP_SEGMENTS = 10
ET_SEGMENTS = 5


@dataclass(frozen=True)
class Recipe:
    # bandwidth of each of the 10 equal-compute segments, at base 224
    sizes: Tuple[int, ...]
    # published per-GPU batch at each bandwidth (8 GPUs, global 4096)
    batch_at: Dict[int, int]
    # the drivers' warmup of each launch, in its own epochs (driver_warmup_end): 'epochs':
    # int(--warmup_epochs / replay); 'compute': int(fraction x E x (224/B)^2 / replay);
    # 'equivalent': int(--warmup_epochs x (224/B)^2 / replay), --warmup_epochs counted at the base size
    warmup: Tuple[str, Optional[float]] = ('epochs', 20)
    # published replay settings: {B: (replay_times, buffer_size)}
    replay: Optional[Dict[int, Tuple[int, int]]] = None
    # False: the model trains without RandAugment (MAE), so no stage has a magnitude
    randaugment: bool = True


_S3 = (96, 96, 160, 160, 160, 160, 224, 224, 224, 224)
GENERIC = Recipe(_S3, {96: 1, 160: 1, 224: 1})
RESNET50 = Recipe(_S3, {96: 512, 160: 512, 224: 512},
                  replay={96: (4, 1920), 160: (2, 256), 224: (1, 0)})
SWIN_T = Recipe(_S3, {96: 512, 160: 512, 224: 256}, replay={96: (2, 1024)})
SWIN_SB = Recipe(_S3, {96: 512, 160: 256, 224: 128})
CONVNEXT_T = Recipe((160,) * 6 + (224,) * 4, {160: 256, 224: 128})
CONVNEXT_SB = Recipe((160,) * 6 + (224,) * 4, {160: 128, 224: 64})
DEIT = Recipe((96, 96, 160, 160, 160, 160, 192, 192, 224, 224), {96: 512, 160: 512, 192: 256, 224: 256},
              warmup=('compute', 0.2), replay={96: (4, 1920), 160: (2, 256), 224: (1, 0), 192: (1, 0)})

# Recipe names and the timm names they stand for; any other model gets GENERIC.
ETPP_RECIPES = {
    'resnet50': RESNET50,
    'swin_tiny': SWIN_T, 'swin_tiny_patch4_window7_224': SWIN_T,
    'CSWin_64_12211_tiny_224': SWIN_T,
    'swin_small': SWIN_SB, 'swin_small_patch4_window7_224': SWIN_SB,
    'swin_base': SWIN_SB, 'swin_base_patch4_window7_224': SWIN_SB,
    'CSWin_64_24322_small_224': SWIN_SB, 'CSWin_96_24322_base_224': SWIN_SB,
    'convnext_tiny': CONVNEXT_T,
    'convnext_small': CONVNEXT_SB, 'convnext_base': CONVNEXT_SB,
    'deit_tiny_patch16_224': DEIT, 'deit_small_patch16_224': DEIT,
}

# PVT v1 (EfficientTrain++ Table 7): the paper's PVT schedule is not published with the
# official code.  Stand-in: Swin-S/B's (closest published: a stride-32 pyramid whose stage
# sizes 96/160/224 are all valid PVT inputs, and whose computation saving, 1.50-1.51x, is the
# one the paper reports for PVT).  A corrected schedule is this one line.
PVT_ETPP = Recipe(_S3, {96: 512, 160: 256, 224: 128})
ETPP_RECIPES.update({name: PVT_ETPP for name in ('pvt_tiny', 'pvt_small', 'pvt_medium', 'pvt_large')})
# ImageNet-22K pre-training (Table 12) of the Large models: their family's larger-model schedule.
ETPP_RECIPES.update({'convnext_large': CONVNEXT_SB, 'CSWin_144_24322_large_224': SWIN_SB})

# MAE pre-training (EfficientTrain++ Table 15, whose schedule is not published): this
# project's choice is the ViT ramp on multiples of the patch size, two equal-compute
# segments each at 96, 128, 160, 192 and 224 (patch grids 6, 8, 10, 12, 14).  MAE uses no
# RandAugment, so the segment's magnitude is unused.  No per-stage batches are published:
# the micro-batch stays the base one (--stage_batch auto grows it at low B).  Warm-up:
# --warmup_epochs (MAE's 40) equivalent epochs at the base size, 10% of E = 400.  ViT-H/14
# takes the nearest multiples of 14 (grids 7, 9, 11, 14, 16).
MAE_ETPP_P16 = Recipe((96, 96, 128, 128, 160, 160, 192, 192, 224, 224), dict.fromkeys((96, 128, 160, 192, 224), 1),
                      warmup=('equivalent', None), randaugment=False)
MAE_ETPP_P14 = Recipe((98, 98, 126, 126, 154, 154, 196, 196, 224, 224), dict.fromkeys((98, 126, 154, 196, 224), 1),
                      warmup=('equivalent', None), randaugment=False)
ETPP_RECIPES.update({'mae_vit_tiny_patch16': MAE_ETPP_P16, 'mae_vit_base_patch16': MAE_ETPP_P16,
                     'mae_vit_large_patch16': MAE_ETPP_P16, 'mae_vit_huge_patch14': MAE_ETPP_P14})

ET_SIZES = (160, 160, 160, 192, 224)
ET_MAGNITUDES = (1, 3, 5, 7, 9)
# EfficientTrain (ICCV) published no replay settings: only --replay_times applies.
_ET_RECIPE = Recipe(ET_SIZES, {})


class PlanError(ValueError):
    pass


def scaled_size(b, base, multiple):
    """A published bandwidth (at 224) scaled to `base`, on the model's size grid."""
    if base == 224:
        return b
    return max(multiple, int(round(b * base / 224 / multiple)) * multiple)


def stage_batches(batch_size, update_freq, ratio):
    """Per-GPU batch and update_freq with ratio x the base micro-batch and the same product."""
    r = max(int(ratio), 1)
    while r > 1 and update_freq % r:
        r //= 2
    return batch_size * r, update_freq // r, r


def grown_batches(args, b, base, bs, uf):
    """--stage_batch auto: the stage's micro-batch grown towards (base/B)^2 x the base one.

    Activation memory grows with batch x B^2, so a stage at B fits about (base/B)^2 times
    the base stage's micro-batch.  The growth is a divisor of the stage's update_freq, so
    micro-batch x update_freq (the global batch, and with it the recipe) never changes;
    --max_micro_batch caps it.  Never below the published micro-batch `bs`.
    """
    if getattr(args, 'stage_batch', 'published') != 'auto' or b >= base:
        return bs, uf
    target = max(int((base / b) ** 2 * args.batch_size) // bs, 1)
    cap = getattr(args, 'max_micro_batch', 0) or 0
    if cap:
        target = min(target, max(cap // bs, 1))
    grow = max(d for d in range(1, uf + 1) if uf % d == 0 and d <= target)
    return bs * grow, uf // grow


def _nearest_power_of_two(x):
    """The power of two nearest x on a log scale (1 for x <= 1): 1.96 -> 2, 1.36 -> 1, 5.44 -> 4."""
    return 2 ** max(int(round(math.log2(x))), 0) if x > 1 else 1


def large_batches(args, b, base, bs, uf, replay_times=1, cost=None):
    """--stage_batch large: (micro-batch, update_freq, factor) of a stage at B below the base size.

    The stage's images per optimizer step, per process and so globally, are the published
    ones (bs x uf) times `factor`: the power of two nearest (base/B)^2 (the model's own cost
    ratio with a compute model), so that an optimizer step at B does about the work of one at
    the base size, at most --max_global_batch_factor.  The micro-batch carries the growth:
    it may hold about the base micro-batch's memory at B (--batch_size x that power of two)
    or --max_micro_batch, whichever is smaller, with update_freq at most the base stage's (1
    where the stage replays); where memory cannot hold the growth the factor halves.  Within
    that the micro-batch is as large as it may be (as --stage_batch auto).  The learning rate
    scales with the factor (Stage.lr_scale).  These rules are this project's choice: the
    paper's "early large batch" rule is not published.
    """
    if getattr(args, 'stage_batch', 'published') != 'large' or b >= base:
        return bs, uf, 1
    ratio = _nearest_power_of_two(_epoch_scale(base, b, cost))
    factor = _wanted_factor(args, b, base, cost)
    memory = args.batch_size * ratio
    if getattr(args, 'max_micro_batch', 0):
        memory = min(memory, args.max_micro_batch)
    memory = max(memory, bs)  # never below the published micro-batch
    most_freq = 1 if replay_times > 1 else max(uf, args.update_freq)
    while factor > 1:
        micro_steps = uf * factor  # micro-batches of bs per optimizer step
        fits = [d for d in range(1, micro_steps + 1)
                if micro_steps % d == 0 and bs * d <= memory and micro_steps // d <= most_freq]
        if fits:
            return bs * max(fits), micro_steps // max(fits), factor
        factor //= 2
    grow = max(d for d in range(1, uf + 1) if uf % d == 0 and bs * d <= memory)
    return bs * grow, uf // grow, 1


def _check_stage_batch_args(args):
    mode = getattr(args, 'stage_batch', 'published')
    cap = getattr(args, 'max_micro_batch', 0) or 0
    if cap < 0:
        raise PlanError(f'--max_micro_batch must be >= 0 (0: no limit), got {cap}')
    if cap and mode not in ('auto', 'large'):
        raise PlanError('--max_micro_batch applies to --stage_batch auto or large: add one of them or drop it')
    factor = getattr(args, 'max_global_batch_factor', 4)
    if factor < 1:
        raise PlanError(f'--max_global_batch_factor must be >= 1 (1: the global batch never grows), got {factor}')
    if mode == 'auto' and getattr(args, 'curriculum_file', None):
        raise PlanError('--stage_batch auto grows the micro-batch of the published recipes; a --curriculum_file '
                        'sets each stage\'s batch_size and update_freq itself: drop --stage_batch auto')


def _auto_note(args, stages, base, wanted=None):
    """The plan's note on --stage_batch auto or large; `wanted`: {B: the factor large aimed at}."""
    mode = getattr(args, 'stage_batch', 'published')
    cap = getattr(args, 'max_micro_batch', 0) or 0
    if mode == 'large':
        notes = [f'--stage_batch large: below the base size the global batch grows with (base/B)^2, as a power '
                 f'of two, at most x{args.max_global_batch_factor} (--max_global_batch_factor), and the learning '
                 f'rate linearly with it ("lr x"); the same images per stage in fewer optimizer steps (this '
                 f'project\'s rule: the paper\'s is not published)']
        held = sorted({s.size for s in stages if wanted and s.lr_scale < wanted.get(s.size, 1)})
        if held:
            mem = f'{cap} (--max_micro_batch)' if cap else 'about the base micro-batch\'s memory'
            notes.append(f'B={", ".join(map(str, held))}: a smaller global batch than (base/B)^2 asks: the '
                         f'micro-batch may hold {mem} with update_freq at most {args.update_freq} (1 where a stage '
                         f'replays); a larger --max_micro_batch or --update_freq allows more')
        return notes
    if mode != 'auto':
        return []
    grown = [s for s in stages if s.size < base]
    return [f'--stage_batch auto: micro-batch grown towards (base/B)^2 x {args.batch_size}'
            f'{f" (at most {cap})" if cap else ""} with update_freq shrunk, so each process still '
            f'contributes {args.batch_size * args.update_freq} images per optimizer step'
            + ('' if any(s.update_freq < args.update_freq for s in grown) else
               f'; no growth possible: --update_freq {args.update_freq} leaves nothing to trade')]


def _wanted_factor(args, b, base, cost=None):
    """The factor --stage_batch large aims at for B, before memory (1 in the other modes)."""
    if getattr(args, 'stage_batch', 'published') != 'large' or b >= base:
        return 1
    return min(_nearest_power_of_two(_epoch_scale(base, b, cost)), 2 ** int(math.log2(args.max_global_batch_factor)))


def build_plan(args, size_multiple=16, cost=None):
    """The Plan for args.curriculum ('none', 'et', 'etpp' or a --curriculum_file).

    cost: the model's per-image compute as a function of the input size (e.g.
    models.mae.MaskedAutoencoderViT.train_flops), which then measures compute progress and
    sizes ET++'s equal-compute segments; None: (B/base)^2, the papers' measure.
    """
    base = args.base_input_size if args.curriculum != 'none' else args.input_size
    lowfreq = getattr(args, 'lowfreq', 'auto')
    _check_stage_batch_args(args)
    if getattr(args, 'curriculum_file', None):
        return load_plan_file(args.curriculum_file, args, size_multiple, cost)
    if args.curriculum == 'none':
        st = Stage(0, args.input_size, None, args.epochs, args.batch_size, args.update_freq)
        plan = Plan('baseline', [st], base, 'epochs', 'none')
        plan.warmup = clip_warmup(plan, plan.progress_after_plain_epochs(args.warmup_epochs),
                                  f'--warmup_epochs {args.warmup_epochs:g}')
        plan.budget = args.epochs
        return plan
    if args.curriculum in ('et', 'etpp'):
        if args.curriculum == 'et':
            plan = _build_et(args, base, size_multiple, 'fourier' if lowfreq == 'auto' else lowfreq, cost)
        else:
            plan = _build_etpp(args, base, size_multiple, 'lanczos' if lowfreq == 'auto' else lowfreq, cost)
        if plan.stages and plan.stages[-1].size < base:
            # the drivers' cut always trains the last segment, but a --base_input_size off the
            # model's size grid scales it to another B: say what the user then gets
            plan.notes.append(f'no stage trains at the base size {base} (the last is at B={plan.stages[-1].size}): '
                              f'the run ends with a test at {base} but writes no checkpoint-best.pth (only '
                              f'base-size results compete); a larger --epochs or a base on the size grid reaches {base}')
        return plan
    raise PlanError(f"unknown --curriculum {args.curriculum}: use none, et, etpp or --curriculum_file")


def _replay_for(args, recipe, b_pub, b, base):
    if getattr(args, 'replay_preset', False):
        if recipe.replay is None:
            raise PlanError(f'--replay_preset true: no published replay settings for --model {args.model} '
                            f'(published for resnet50, deit_tiny/small, swin_tiny, CSWin tiny); '
                            f'use --replay_times/--replay_buffer_size')
        return recipe.replay.get(b_pub, (1, 0))
    times = getattr(args, 'replay_times', 1) or 1
    if times > 1 and b < base:
        return times, getattr(args, 'replay_buffer_size', 0)
    return 1, 0


def _skipped_note(skipped, segments):
    if not skipped:
        return []
    return [f'segment{"s" if len(skipped) > 1 else ""} {", ".join(skipped)} of {segments} '
            f'round{"" if len(skipped) > 1 else "s"} to 0 data epochs and '
            f'{"are" if len(skipped) > 1 else "is"} skipped: a larger --epochs trains every segment']


def _stage_cost(cost, b, base):
    """Stage.cost: the model's relative per-image compute, or None for (B/base)^2."""
    return None if cost is None else relative_cost(cost, b, base)


def _build_etpp(args, base, multiple, lowfreq, cost=None):
    recipe = ETPP_RECIPES.get(args.model, GENERIC)
    e = float(args.epochs)
    last = recipe.batch_at[recipe.sizes[-1]]
    raw, notes = [], []
    for k, b_pub in enumerate(recipe.sizes):
        b = scaled_size(b_pub, base, multiple)
        rt, buf = _replay_for(args, recipe, b_pub, b, base)
        ratio = recipe.batch_at[b_pub] // last
        bs, uf, r = stage_batches(args.batch_size, args.update_freq, ratio)
        bs, uf = grown_batches(args, b, base, bs, uf)
        bs, uf, factor = large_batches(args, b, base, bs, uf, rt, cost)
        if bs < args.batch_size * ratio:  # (auto and large may grow it there after all)
            notes.append(f'segment {k}: micro-batch x{r} instead of the published x{ratio}: --update_freq '
                         f'{args.update_freq} is not a multiple of {ratio}, and the global batch must stay constant')
        if rt > 1 and bs % rt:
            raise PlanError(f'segment {k}: per-GPU batch {bs} not divisible by replay_times {rt}: '
                            f'choose --batch_size a multiple of {rt}')
        raw.append((b, k, bs, uf, rt, buf, factor))
    sizes, replays = [r[0] for r in raw], [r[4] for r in raw]
    spans = driver_spans(args.epochs, sizes, replays, base, ETPP_SEGMENTS, cost)
    stages, skipped, kept = [], [], []
    for (b, k, bs, uf, rt, buf, factor), (start, end) in zip(raw, spans):
        if end <= start:
            skipped.append(f'{k} (B={b})')
            continue
        kept.append(k)
        m = k if recipe.randaugment else None
        stages.append(Stage(0, b, m, end - start, bs, uf, rt, buf, cost=_stage_cost(cost, b, base),
                            lr_scale=float(factor)))
    notes += _skipped_note(skipped, ETPP_SEGMENTS)
    _check_replay_update_freq(stages)
    notes += _auto_note(args, stages, base, {b: _wanted_factor(args, b, base, cost) for b in sizes})
    plan = Plan(f'EfficientTrain++ (E={args.epochs:g})', stages, base, 'compute', lowfreq, notes=notes)
    plan.budget = e
    plan.warmup = _driver_warmup(args, recipe, plan, base, sizes, replays, spans, kept, cost)
    return plan


def _driver_warmup(args, recipe, plan, base, sizes, replays, spans, kept, cost=None):
    """The plan's warmup (progress) where the drivers' per-launch warmup ends (driver_warmup_end)."""
    kind, value = recipe.warmup
    if kind in ('compute', 'equivalent'):
        # DeiT: each launch warms up over int(0.2 x E x (base/B)^2 / r) of its own epochs; MAE
        # (no driver: the project's choice) over --warmup_epochs equivalent epochs at the base size
        amount = value * args.epochs if kind == 'compute' else args.warmup_epochs
        cuts = [int(amount * _epoch_scale(base, b, cost) / rt) for b, rt in zip(sizes, replays)]
        what = f'the DeiT warmup ({100 * value:g}% of E)' if kind == 'compute' else \
            f'--warmup_epochs {args.warmup_epochs:g} (equivalent epochs)'
    else:
        # the others: int(--warmup_epochs / r) of each launch's own epochs (the drivers pass 20)
        cuts = [int(args.warmup_epochs / rt) for rt in replays]
        what = f'--warmup_epochs {args.warmup_epochs:g}'
    end = driver_warmup_end(spans, cuts)
    if end is None:
        return clip_warmup(plan, plan.total_progress, what)
    segment, into = end
    stage = plan.stages[kept.index(segment)]
    return clip_warmup(plan, plan.progress(stage.start_epoch + into), what)


def _build_et(args, base, multiple, lowfreq, cost=None):
    # ET_training.py launches every segment with --epochs E, one epoch unit throughout, each
    # resuming where the last stopped: driver_spans' rule with nothing to map (all at base, no replay)
    spans = driver_spans(args.epochs, [base] * ET_SEGMENTS, [1] * ET_SEGMENTS, base, ET_SEGMENTS)
    epochs = [max(end - start, 0) for start, end in spans]
    stages, notes, undoubled, skipped = [], [], [], []
    for k, (b_pub, m, n) in enumerate(zip(ET_SIZES, ET_MAGNITUDES, epochs)):
        b = scaled_size(b_pub, base, multiple)
        bs, uf, r = stage_batches(args.batch_size, args.update_freq, 2 if b < base else 1)
        if b < base and r == 1 and n > 0:
            undoubled.append(str(k))
        bs, uf = grown_batches(args, b, base, bs, uf)
        rt, buf = _replay_for(args, _ET_RECIPE, b_pub, b, base)
        bs, uf, factor = large_batches(args, b, base, bs, uf, rt, cost)
        if n > 0:
            stages.append(Stage(0, b, m, n, bs, uf, rt, buf, cost=_stage_cost(cost, b, base),
                                lr_scale=float(factor)))
        else:
            skipped.append(f'{k} (B={b})')
    notes += _skipped_note(skipped, ET_SEGMENTS)
    if undoubled:
        notes.append(f'segment{"s" if len(undoubled) > 1 else ""} {", ".join(undoubled)}: batch not doubled '
                     f'(--update_freq {args.update_freq} is odd); the global batch stays constant')
    _check_replay_update_freq(stages)
    notes += _auto_note(args, stages, base, {s.size: _wanted_factor(args, s.size, base, cost) for s in stages})
    plan = Plan(f'EfficientTrain (ICCV, {args.epochs} epochs)', stages, base, 'epochs', lowfreq, notes=notes)
    plan.budget = args.epochs
    # ET_training.py: --warmup_epochs 20 on the one epoch scale of all its launches
    plan.warmup = clip_warmup(plan, plan.progress_after_plain_epochs(args.warmup_epochs),
                              f'--warmup_epochs {args.warmup_epochs:g}')
    return plan


# A warmup as long as the run would leave no run after it (the lr only rises): it is cut to
# this fraction of the run instead, the published rule of the DeiT recipes.
CLIPPED_WARMUP_FRACTION = 0.2


# ---------------------------------------------------------------------------
# stage epochs and warmup as the official drivers launch them
# ---------------------------------------------------------------------------
# The released checkpoints were trained by the drivers of LeapLabTHU/EfficientTrain, which
# launch the training script once per segment (_ET_pp_main_<model>.py and
# _ET_pp_wReplay_main_<model>.py for EfficientTrain++, ET_training.py for EfficientTrain).
# What they do, read from those files and from main_buffer.py / utils_buffer.auto_load_model:
# - launch k counts epochs in its own unit, data epochs at B_k with r_k-fold replay: it is
#   given --epochs N_k = int(E x (224/B_k)^2 / r_k), the whole budget in that unit, and
#   --end_epoch int(N_k / S x (k+1)) for S segments;
# - it starts where the newest checkpoint leaves off (its epoch + 1), mapped into its unit:
#   first x r_prev / r_k when the replay differs, then x B_prev^2 / B_k^2, each rounded with
#   Python's round (halves to even); a launch whose start is not below its end trains nothing
#   and writes no checkpoint, so the next one maps from the one before;
# - its lr warms up over its own first W_k epochs: int(20 / r_k), or for DeiT
#   int(0.2 x E x (224/B_k)^2 / r_k).
# So the stage ends are whole epochs cut down in each launch's unit, not a rounded running
# total: at E=200 Swin-T trains 108, 109, 39, 39, 40, 39, 20, 20, 20, 20 data epochs.


def _epoch_scale(base, b, cost=None):
    """Data epochs at B per epoch of compute at the base size: (base/B)^2, or the inverse of the
    model's own relative cost (MAE: no driver exists; the project applies the same cut to it)."""
    if cost is None:
        return (base * base) / (b * b)
    return 1.0 / relative_cost(cost, b, base)


def driver_spans(budget, sizes, replays, base, segments, cost=None):
    """[(start, end)] of each segment's epochs in its own unit, as the drivers launch them.

    The segment trains end - start data epochs (none when end <= start).  EfficientTrain's
    driver is the same rule with every segment at `base` and no replay (one unit, no mapping).
    """
    spans, last = [], None  # last: (end, B, replay) of the newest launch that trained
    for k, (b, rt) in enumerate(zip(sizes, replays)):
        total = int(budget * _epoch_scale(base, b, cost) / rt)
        end = int(total / segments * (k + 1))
        start = 0
        if last is not None:
            start, b_prev, rt_prev = last
            if rt_prev != rt:
                start = round(start * (rt_prev / rt))
            if cost is None:
                start = round(start * b_prev ** 2 / b ** 2)
            else:
                start = round(start * _epoch_scale(base, b, cost) / _epoch_scale(base, b_prev, cost))
        spans.append((start, end))
        if end > start:
            last = (end, b, rt)
    return spans


def driver_warmup_end(spans, cuts):
    """(segment, data epochs into it) where the drivers' warmup ends, or None if it never does.

    cuts[k]: the warmup length W_k of segment k in its own unit (its lr rises over its epochs
    0..W_k-1).  The warmup ends in the first segment that trains and has W_k < end: at W_k, or
    at its start when W_k lies before it.  At small budgets a driver would warm up again in a
    later segment (its W_k beyond a mapped start); a run here warms up once, over this prefix.
    """
    for k, ((start, end), cut) in enumerate(zip(spans, cuts)):
        if end > start and cut < end:
            return k, max(cut - start, 0)
    return None


def clip_warmup(plan, warmup, what):
    """warmup (progress), or a fifth of the run with a note when it would take the whole run."""
    total = plan.total_progress
    if total <= 0 or warmup < total:
        return warmup
    clipped = CLIPPED_WARMUP_FRACTION * total
    unit = 'equivalent epochs' if plan.progress_unit == 'compute' else 'epochs'
    plan.notes.append(f'{what} covers the whole run ({total:.2f} {unit}): warmup clipped to its first '
                      f'{100 * CLIPPED_WARMUP_FRACTION:.0f}% ({clipped:.2f} {unit}); lower --warmup_epochs to choose')
    return clipped


# The replay buffer splits every loaded batch into this many chunks (METHOD.md).
REPLAY_CHUNKS = 32


def _check_replay_update_freq(stages):
    for s in stages:
        if s.replay_times > 1 and s.update_freq > 1:
            raise PlanError(f'stage {s.index} (B={s.size}): replay needs update_freq 1 but the stage has '
                            f'{s.update_freq}: raise --batch_size or lower --update_freq, or turn replay off')
        if s.replay_times > 1 and s.loader_batch % REPLAY_CHUNKS:
            raise PlanError(f'stage {s.index} (B={s.size}): the loader batch {s.batch_size}/{s.replay_times} = '
                            f'{s.loader_batch} does not split into {REPLAY_CHUNKS} equal replay chunks: choose a '
                            f'per-GPU batch that is a multiple of {REPLAY_CHUNKS * s.replay_times}')


# ---------------------------------------------------------------------------
# custom curriculum files (JSON: no extra dependency)
# ---------------------------------------------------------------------------

_STAGE_KEYS = {'share', 'size', 'magnitude', 'batch_size', 'update_freq', 'replay_times', 'buffer_size'}
_TOP_KEYS = {'progress', 'lowfreq', 'warmup_epochs', 'warmup_fraction', 'stages', 'name'}


def _field_error(path, where, msg):
    return PlanError(f'{path}: {where}: {msg}')


def _int_field(path, where, v, lo, allow_none=False):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _field_error(path, where, f'must be an integer >= {lo}, got {v!r}')
    return v


def load_plan_file(path, args, size_multiple=16, cost=None):
    """A Plan from a JSON curriculum file; a bad field fails naming it.

    {"progress": "compute"|"epochs", "lowfreq": "fourier"|"lanczos",
     "warmup_epochs": 20 | "warmup_fraction": 0.2,
     "stages": [{"share": 0.2, "size": 96, "magnitude": 0, "batch_size": 512,
                 "update_freq": 1, "replay_times": 1, "buffer_size": 0}, ...]}
    share is the stage's part of the --epochs budget (compute or epochs, per
    "progress"); shares must add up to 1. batch_size/update_freq default to
    --batch_size/--update_freq.
    """
    try:
        with open(path, encoding='utf-8') as f:
            spec = json.load(f)
    except OSError as e:
        raise PlanError(f'{path}: cannot be read ({e.strerror}): check --curriculum_file') from None
    except json.JSONDecodeError as e:
        raise PlanError(f'{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})') from None
    if not isinstance(spec, dict):
        raise _field_error(path, 'top level', 'must be an object with a "stages" list')
    unknown = set(spec) - _TOP_KEYS
    if unknown:
        raise _field_error(path, sorted(unknown)[0], f'unknown field (known: {", ".join(sorted(_TOP_KEYS))})')
    unit = spec.get('progress', 'compute')
    if unit not in ('compute', 'epochs'):
        raise _field_error(path, 'progress', f'must be "compute" or "epochs", got {unit!r}')
    lowfreq = spec.get('lowfreq', 'lanczos')
    if getattr(args, 'lowfreq', 'auto') != 'auto':
        lowfreq = args.lowfreq
    if lowfreq not in ('fourier', 'lanczos'):
        raise _field_error(path, 'lowfreq', f'must be "fourier" or "lanczos", got {lowfreq!r}')
    stages_spec = spec.get('stages')
    if not isinstance(stages_spec, list) or not stages_spec:
        raise _field_error(path, 'stages', 'must be a non-empty list of stage objects')
    base = args.base_input_size
    raw = []
    for i, st in enumerate(stages_spec):
        where = f'stages[{i}]'
        if not isinstance(st, dict):
            raise _field_error(path, where, 'must be an object')
        bad = set(st) - _STAGE_KEYS
        if bad:
            raise _field_error(path, f'{where}.{sorted(bad)[0]}',
                               f'unknown field (known: {", ".join(sorted(_STAGE_KEYS))})')
        for req in ('share', 'size'):
            if req not in st:
                raise _field_error(path, f'{where}.{req}', 'missing')
        share = st['share']
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise _field_error(path, f'{where}.share', f'must be a number in (0, 1], got {share!r}')
        size = _int_field(path, f'{where}.size', st['size'], 8)
        if size % 2:
            raise _field_error(path, f'{where}.size', f'must be even (the Fourier crop keeps -B/2..B/2-1), got {size}')
        if size > base:
            raise _field_error(path, f'{where}.size', f'{size} exceeds --base_input_size {base}')
        mag = _int_field(path, f'{where}.magnitude', st.get('magnitude'), 0, allow_none=True)
        if mag is not None and mag > 30:
            raise _field_error(path, f'{where}.magnitude', f'RandAugment magnitudes run 0..30, got {mag}')
        bs = _int_field(path, f'{where}.batch_size', st.get('batch_size', args.batch_size), 1)
        uf = _int_field(path, f'{where}.update_freq', st.get('update_freq', args.update_freq), 1)
        rt = _int_field(path, f'{where}.replay_times', st.get('replay_times', 1), 1)
        buf = _int_field(path, f'{where}.buffer_size', st.get('buffer_size', 0), 0)
        if rt > 1 and uf > 1:
            raise _field_error(path, f'{where}.update_freq', f'must be 1 with replay_times {rt}')
        if rt > 1 and buf < 1:
            raise _field_error(path, f'{where}.buffer_size', f'must be >= 1 with replay_times {rt}')
        if bs % rt or (rt > 1 and (bs // rt) % REPLAY_CHUNKS):
            raise _field_error(path, f'{where}.batch_size', f'{bs} must be a multiple of replay_times x '
                                                           f'{REPLAY_CHUNKS} = {rt * REPLAY_CHUNKS}')
        per_epoch = relative_cost(cost, size, base) * rt if unit == 'compute' else 1.0
        bs, uf, factor = large_batches(args, size, base, bs, uf, rt, cost)
        raw.append((share * args.epochs / per_epoch,
                    Stage(0, size, mag, 1, bs, uf, rt, buf, cost=_stage_cost(cost, size, base),
                          lr_scale=float(factor))))
    total_share = sum(s['share'] for s in stages_spec)
    if abs(total_share - 1.0) > 1e-6:
        raise _field_error(path, 'stages[*].share', f'must add up to 1, they add up to {total_share:g}')
    counts = split_rounded([r[0] for r in raw])
    stages = []
    for (_, st), n in zip(raw, counts):
        if n > 0:
            stages.append(replace(st, epochs=n))
    if not stages:
        raise _field_error(path, 'stages', f'every stage rounds to 0 epochs at --epochs {args.epochs}')
    name = spec.get('name', os.path.basename(path))
    plan = Plan(f'custom: {name}', stages, base, unit, lowfreq,
                notes=_auto_note(args, stages, base, {s.size: _wanted_factor(args, s.size, base, cost)
                                                      for s in stages}))
    _check_replay_update_freq(plan.stages)
    plan.budget = args.epochs
    if 'warmup_fraction' in spec:
        wf = spec['warmup_fraction']
        if isinstance(wf, bool) or not isinstance(wf, (int, float)) or not 0 <= wf < 1:
            raise _field_error(path, 'warmup_fraction', f'must be a number in [0, 1), got {wf!r}')
        plan.warmup = wf * plan.total_progress
    else:
        we = spec.get('warmup_epochs', args.warmup_epochs)
        if isinstance(we, bool) or not isinstance(we, (int, float)) or we < 0:
            raise _field_error(path, 'warmup_epochs', f'must be a number >= 0, got {we!r}')
        plan.warmup = clip_warmup(plan, plan.progress_after_plain_epochs(we), f'warmup_epochs {we:g}')
    return plan
