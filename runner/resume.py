"""Resuming a run: where it continues, and the checks that it is the same run.

resume_training loads --resume, or the furthest checkpoint in --output_dir, into the model,
optimizer, scaler and EMA, and returns the ResumePoint (epoch, batches done, the epoch's
running averages, best accuracies, the model's size). Before anything is loaded,
check_same_run compares the checkpoint's computation-changing flags (RESUME_CHECKED, or an
entry point's own list) and its plan with this run's; --resume_override names deliberate
changes. Only the position is restored: the plan is rebuilt from the same arguments.
"""
import os
from dataclasses import dataclass

import utils
from curriculum.adapt import adapt_model
from runner.checkpoint import load_weights, state_from
from utils import UserError


@dataclass
class ResumePoint:
    """Where a run continues: epoch and loader batches done in it (with the epoch's running
    averages), the best accuracies so far, the model's size, and the checkpoint it came from."""
    epoch: int = 0
    step: int = 0
    meters: dict = None
    max_acc: float = 0.0
    max_acc_ema: float = 0.0
    size: int = 0
    resumed_from: str = None


# Flags that change what a run computes (data and its order, augmentation, model, optimisation,
# schedules, precision, what evaluation measures): a resume continues the run only with the
# same values, or with the names listed in --resume_override. Everything else (paths, worker
# and GPU counts, logging, checkpoint frequency, speed switches such as --compile,
# --channels_last, --image_store, and --skip_bad_images) may differ, and so may flags inert in
# both runs (_INERT_UNLESS). With --global_batch_size, or on another GPU count, the per-GPU
# split (--batch_size, --update_freq) may differ: the plan comparison checks every stage's
# global batch instead.
RESUME_CHECKED = (
    'model', 'drop_path', 'layer_scale_init_value', 'nb_classes', 'global_pool',
    'batch_size', 'update_freq', 'global_batch_size', 'epochs', 'warmup_epochs', 'warmup_steps', 'lr', 'min_lr',
    'weight_decay', 'weight_decay_end', 'opt', 'opt_eps', 'opt_betas', 'momentum', 'clip_grad', 'layer_decay',
    'model_ema', 'model_ema_decay',
    'color_jitter', 'aa', 'smoothing', 'train_interpolation', 'crop_pct', 'reprob', 'remode', 'recount',
    'mixup', 'cutmix', 'cutmix_minmax', 'mixup_prob', 'mixup_switch_prob', 'mixup_mode',
    'curriculum', 'curriculum_file', 'base_input_size', 'input_size', 'lowfreq', 'replay_times',
    'replay_buffer_size', 'replay_preset', 'stage_batch', 'max_micro_batch', 'max_global_batch_factor',
    'data_set', 'synth_classes', 'synth_per_class', 'synth_val_per_class', 'synth_image_size', 'synth_seed',
    'seed', 'data_pipeline', 'gpu_augment_at', 'use_amp', 'amp_dtype',
)
# The flags the plan is built from, and the parts of the plan (summary keys, top level or per
# stage) overriding each may change; None: any part. Overriding --epochs, say, lets the stage
# epochs and the budget differ but not the stages' sizes, magnitudes or batches, so an edited
# --curriculum_file still shows.
_BATCH_KEYS = frozenset({'batch_size', 'update_freq', 'buffer_size'})
PLAN_FLAGS = {
    'model': None, 'curriculum': None, 'curriculum_file': None, 'base_input_size': None, 'input_size': None,
    'lowfreq': None,
    # (the preset's name holds the budget; short budgets skip stages)
    'epochs': frozenset({'name', 'budget_epochs', 'num_epochs', 'epochs', 'start_epoch', 'warmup', 'stages'}),
    'warmup_epochs': frozenset({'warmup'}), 'warmup_steps': frozenset({'warmup'}),
    'batch_size': _BATCH_KEYS, 'update_freq': _BATCH_KEYS, 'global_batch_size': _BATCH_KEYS,
    'replay_times': _BATCH_KEYS | {'replay_times'}, 'replay_buffer_size': _BATCH_KEYS | {'replay_times'},
    'replay_preset': _BATCH_KEYS | {'replay_times'},
    # (--stage_batch large: a stage's global batch and its lr scale)
    'stage_batch': _BATCH_KEYS | {'lr_scale'}, 'max_micro_batch': _BATCH_KEYS | {'lr_scale'},
    'max_global_batch_factor': _BATCH_KEYS | {'lr_scale'},
}
# Flags that have no effect while another is off (in the checkpoint's run and now alike):
# a difference in them changes nothing, so it is not refused.
_INERT_UNLESS = {
    'amp_dtype': lambda a: a.get('use_amp'),
    'model_ema_decay': lambda a: a.get('model_ema'),
    'remode': lambda a: a.get('reprob'), 'recount': lambda a: a.get('reprob'),
    'gpu_augment_at': lambda a: a.get('data_pipeline') == 'gpu',
    'max_global_batch_factor': lambda a: a.get('stage_batch') == 'large',
    # training without a curriculum is at --input_size, with one its stages end at --base_input_size
    'input_size': lambda a: a.get('curriculum') == 'none' and not a.get('curriculum_file'),
    'base_input_size': lambda a: a.get('curriculum') != 'none' or bool(a.get('curriculum_file')),
    # timm's Mixup: on with either alpha or --cutmix_minmax; the switch picks between the two
    'mixup_prob': lambda a: a.get('mixup') or a.get('cutmix') or a.get('cutmix_minmax') is not None,
    'mixup_mode': lambda a: a.get('mixup') or a.get('cutmix') or a.get('cutmix_minmax') is not None,
    'mixup_switch_prob': lambda a: a.get('mixup') and (a.get('cutmix') or a.get('cutmix_minmax') is not None),
}


def parse_overrides(value, checked=RESUME_CHECKED):
    """--resume_override NAME[,NAME]: flag names (without --) and 'plan'; checked against the table."""
    names = [n.strip().lstrip('-') for n in (value or '').split(',') if n.strip()]
    unknown = [n for n in names if n not in checked and n != 'plan']
    if unknown:
        raise UserError(f'--resume_override {",".join(unknown)}: not a checked flag; name flags among '
                        f'{", ".join(checked)}, or plan')
    return set(names)


def _plan_difference(saved, current, saved_world, world, allowed=frozenset()):
    """The first difference of two plan summaries, in words ('' if none); keys in `allowed` may differ.

    Per stage, the global batch (per-GPU batch x update_freq x GPUs) must be equal; the per-GPU
    split of it may differ when the GPU count does (--global_batch_size on another GPU count).
    """
    for key in ('name', 'budget_epochs', 'base_size', 'progress_unit', 'lowfreq', 'num_epochs', 'warmup'):
        if key in saved and key not in allowed and saved[key] != current.get(key):
            return f'{key} {current.get(key)} (was {saved[key]})'
    a, b = saved.get('stages', []), current.get('stages', [])
    if len(a) != len(b):
        return '' if 'stages' in allowed else f'{len(b)} stages (was {len(a)})'
    split = {'batch_size', 'update_freq'} if saved_world != world else set()
    for old, new in zip(a, b):
        for key in old:
            if key not in allowed and key not in split and old[key] != new.get(key):
                return f'stage {old.get("index")} {key} {new.get(key)} (was {old[key]})'
        if split and not _BATCH_KEYS & allowed and \
                old['batch_size'] * old['update_freq'] * saved_world != new['batch_size'] * new['update_freq'] * world:
            return (f'stage {old.get("index")} global batch {new["batch_size"]} x {new["update_freq"]} x {world} '
                    f'GPU(s) (was {old["batch_size"]} x {old["update_freq"]} x {saved_world}; on another GPU count '
                    f'keep it with --global_batch_size)')
    return ''


def check_same_run(args, ckpt, path, plan, world, checked=RESUME_CHECKED):
    """UserError unless the checkpoint's run had these computation-changing flags and this plan.

    Flags named in --resume_override may differ (listed in a warning); so may the parts of the
    plan those flags change (PLAN_FLAGS), or all of it with 'plan'. A different GPU count is
    allowed (restore_rank_state warns), with the same global batch in every stage. `checked`: the
    flags compared (an entry point with other flags passes its own list).
    """
    saved = ckpt.get('args')
    if saved is None or 'epoch' not in ckpt:
        return  # weights only (or a checkpoint of an older version): nothing to compare
    saved = vars(saved)
    overrides = parse_overrides(getattr(args, 'resume_override', None), checked)
    mine = vars(utils.plain_args(args))
    with_plan = plan is not None and 'plan' in ckpt
    rng = ckpt.get('rng')
    saved_world = len(rng) if rng else world
    skip = {'update_freq'} if mine.get('global_batch_size') else set()
    if with_plan and (mine.get('global_batch_size') or saved_world != world):
        # the per-GPU split of the global batch may change with the GPU count (by
        # --global_batch_size, or --batch_size/--update_freq by hand): the plan comparison
        # below checks each stage's global batch
        skip |= {'update_freq', 'batch_size'}
    if with_plan and saved.get('curriculum_file') and mine.get('curriculum_file'):
        skip.add('curriculum_file')  # a moved file is fine: the plan comparison checks its content
    skip |= {k for k, live in _INERT_UNLESS.items() if not live(saved) and not live(mine)}
    diffs = [(k, mine[k], saved[k]) for k in checked
             if k in saved and k in mine and k not in skip and saved[k] != mine[k]]
    refused = [d for d in diffs if d[0] not in overrides]
    if refused:
        what = ', '.join(f'--{k} {_flag_text(v)}' for k, v, _ in refused)
        was = ', '.join(_flag_text(old) for _, _, old in refused)
        verb = 'differs' if len(refused) == 1 else 'differ'
        raise UserError(f'{what} {verb} from the run in {path} ({was}): resume with the run\'s values, start a '
                        f'new --output_dir (--finetune {path} to start from its weights), or pass '
                        f'--resume_override {",".join(k for k, _, _ in refused)} to change it deliberately')
    allowed = set()
    for k, _, _ in diffs:
        if k in PLAN_FLAGS:
            allowed = None if allowed is None or PLAN_FLAGS[k] is None else allowed | PLAN_FLAGS[k]
    if with_plan and 'plan' not in overrides and allowed is not None:
        diff = _plan_difference(ckpt['plan'], plan.summary(), saved_world, world, allowed)
        if diff:
            why = '' if 'global batch' in diff else ' (a changed --curriculum_file or preset?)'
            raise UserError(f'the training plan differs from the run in {path}: {diff}{why}: resume with the run\'s '
                            f'plan, start a new --output_dir, '
                            f'or pass --resume_override plan to change it deliberately')
    if diffs:
        print(f'WARNING: resuming {path} with deliberately changed '
              f'{", ".join(f"--{k} {_flag_text(v)} (was {_flag_text(old)})" for k, v, old in diffs)} '
              f'(--resume_override): from here on the run differs from the one the checkpoint began')


def _steps_on(point, ckpt, plan, world):
    """A mid-epoch checkpoint's batches done, in this run's per-rank batches: as many images.

    `step` counts each rank's loader batches; on another GPU count (or per-GPU batch, with
    --global_batch_size) the same number of this run's batches would skip other amounts of
    the epoch. The images each rank saw cannot be matched anyway (the shards differ), only
    their number.
    """
    rng, stages = ckpt.get('rng'), (ckpt.get('plan') or {}).get('stages')
    if not rng or not stages or not 0 <= point.epoch < plan.num_epochs:
        return point.step
    stage = plan.stage_at(point.epoch)
    if stage.index >= len(stages):
        return point.step
    old = stages[stage.index]
    old_images = point.step * (old['batch_size'] // old['replay_times']) * len(rng)
    step = old_images // (stage.loader_batch * world)
    if step != point.step:
        print(f'WARNING: the checkpoint stopped after {point.step} batches of {len(rng)} process(es); with {world} '
              f'and {stage.loader_batch} images per batch here, continuing after {step} (as many images)')
    return step


def _warn_newer_in_output_dir(output_dir, resume_path, ckpt):
    """--resume FILE wins (the ConvNeXt/DeiT convention), but a re-submitted command that names
    it would go back to FILE each time: say so when --output_dir is further along (by names)."""
    epoch = utils.checkpoint_position(ckpt)[0]
    later = [p for n, p in utils.list_epoch_checkpoints(output_dir)
             if n >= epoch and not os.path.samefile(p, resume_path)]
    if later:
        print(f'WARNING: {later[0]} in --output_dir is further along than --resume {resume_path}; continuing from '
              f'the latter as asked (drop --resume to continue from the newest checkpoint in --output_dir)')


def _refuse_fresh_start_over(output_dir):
    """--auto_resume false where another run left checkpoints: refused. Its checkpoint-N.pth of
    later epochs would outlive the new run's (rotation keeps the highest N, deleting the new
    run's own), checkpoint-best.pth would mix the two, and a later resume would pick the
    other run's files."""
    found = [os.path.basename(p) for _, p in utils.list_epoch_checkpoints(output_dir)]
    if os.path.exists(os.path.join(output_dir, utils.RECOVERY_NAME)):
        found.append(utils.RECOVERY_NAME)
    if found:
        raise UserError(f'--auto_resume false but {output_dir} holds checkpoints of a run ({", ".join(found[:3])}'
                        f'{", ..." if len(found) > 3 else ""}): a fresh run there would mix with them; start it in a '
                        f'new --output_dir (or move those files away), or drop --auto_resume false to continue it')


def _flag_text(value):
    return ' '.join(str(v) for v in value) if isinstance(value, list) else str(value)


def resume_training(args, model, optimizer, loss_scaler, model_ema, size, rank, world, plan=None,
                    checked=RESUME_CHECKED, accept=None):
    """Load --resume, or the furthest checkpoint in --output_dir; where training continues.

    A training checkpoint must come from the same run (check_same_run) before anything is loaded;
    `accept(ckpt, path)`, an entry point's own check, may refuse it first (UserError: main_pretrain
    refuses a supervised checkpoint)."""
    point = ResumePoint(epoch=args.start_epoch, size=size)
    resume_path, ckpt = None, None
    if args.resume:
        resume_path, ckpt = args.resume, utils.load_checkpoint_file(args.resume)
        if args.output_dir and 'epoch' in ckpt:
            _warn_newer_in_output_dir(args.output_dir, resume_path, ckpt)
    elif args.auto_resume and args.output_dir:
        resume_path, ckpt = utils.find_resume_checkpoint(args.output_dir)
    elif args.output_dir:
        _refuse_fresh_start_over(args.output_dir)
    if ckpt is None:
        return point
    if accept is not None:
        accept(ckpt, resume_path)
    check_same_run(args, ckpt, resume_path, plan, world, checked)
    point.resumed_from = resume_path
    # The checkpoint holds the model at the size it was trained at last.
    point.size = int(ckpt.get('input_size', size))
    adapt_model(model, point.size, optimizer, model_ema)
    state, _ = state_from(ckpt, 'model', resume_path)
    report = load_weights(model, state, resume_path)
    if report.missing or report.unexpected:
        raise UserError(f'{resume_path} does not fit --model {args.model} (missing {report.missing[:3]}, '
                        f'unexpected {report.unexpected[:3]}): resume with the same --model')
    if 'optimizer' in ckpt and 'epoch' in ckpt:
        saved_opt = getattr(ckpt.get('args'), 'opt', args.opt)
        if saved_opt != args.opt:  # only with --resume_override opt: the state cannot be carried over
            raise UserError(f'{resume_path} holds a {saved_opt} optimizer state but --opt is {args.opt}: '
                            f'resume with --opt {saved_opt}, or start a new --output_dir with --finetune')
        optimizer.load_state_dict(ckpt['optimizer'])
        loss_scaler.load_state_dict(ckpt.get('scaler'))
        point.epoch, point.step = utils.checkpoint_position(ckpt)
        if point.step and plan is not None:
            point.step = _steps_on(point, ckpt, plan, world)
        point.max_acc = float(ckpt.get('max_accuracy', 0.0))
        point.max_acc_ema = float(ckpt.get('max_accuracy_ema', 0.0))
        restore_rank_state(ckpt, rank, world)
        if point.step and len(ckpt.get('meters', [])) == world:
            point.meters = ckpt['meters'][rank]
    if model_ema is not None and 'model_ema' in ckpt:
        model_ema.module.load_state_dict(ckpt['model_ema'])
    where = f'epoch {point.epoch}' + (f', batch {point.step}' if point.step else '')
    print(f'Resumed from {resume_path}; continuing at {where}')
    return point


def restore_rank_state(ckpt, rank, world):
    """This rank's generator states from the checkpoint, if it was written by as many ranks."""
    states = ckpt.get('rng')
    if not states:
        return
    if len(states) != world:
        print(f'WARNING: checkpoint written by {len(states)} processes, resuming with {world}: '
              f'random streams restart, so the run is not bit-exact from here')
        return
    utils.set_rng_state(states[rank])


def clean_output_dir(args, start, rank):
    """Rank 0: a run killed mid-write leaves temporary files and possibly log lines of epochs
    it will now redo; both go before anything is written."""
    if rank == 0 and args.output_dir:
        utils.remove_stale_temp_files(args.output_dir)
        utils.truncate_log(os.path.join(args.output_dir, 'log.txt'), start.epoch)
