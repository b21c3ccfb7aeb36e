"""What a training run writes, and reading weights back: checkpoints (atomic, written by rank 0
with every rank's RNG state), the finite check before each, config.json, log.txt lines, and
loading released or own weights (--finetune, --resume, --eval).
"""
import itertools
import json
import math
import os
import signal

import torch

import utils
from engine import TrainingDiverged
from models.checkpoint_compat import load_into
from models.mae import is_mae_state_dict, mae_to_vit_state_dict
from utils import UserError


def state_from(ckpt, keys, path):
    """(weights, the key they were under or None) of a checkpoint: the first of the "|"-separated
    `keys` it holds, or the whole file when it is a bare state dict."""
    for k in keys.split('|'):
        if k in ckpt:
            print(f'Loading weights from {path} [{k}]')
            return ckpt[k], k
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt, None
    raise UserError(f'{path} has none of the keys {keys.split("|")} (it has {sorted(ckpt)[:5]}): '
                    f'pass --model_key')


def load_weights(model, state, path, finetune=False):
    """Load released or own weights; anything but a fine-tune must fit the model exactly."""
    try:
        report = load_into(model, state, strict_arch=True)
    except ValueError as e:
        raise UserError(f'{path}: {e}') from None
    if report.dropped_head and not finetune:
        raise UserError(f'{path}: its classifier ({", ".join(report.dropped_head)}) does not fit the '
                        f'{model.num_classes if hasattr(model, "num_classes") else "?"} classes of the data: '
                        f'use --finetune to train a new head, or evaluate on data with the same classes')
    return report


def load_finetune(args, model):
    ckpt = utils.load_checkpoint_file(args.finetune)
    state, _ = state_from(ckpt, args.model_key, args.finetune)
    if args.model_prefix:
        state = {k[len(args.model_prefix):]: v for k, v in state.items() if k.startswith(args.model_prefix)}
    if is_mae_state_dict(state):
        load_mae_encoder(args.finetune, model, state)
    else:
        # load_into maps official names first, then drops a classifier of another shape
        report = load_weights(model, state, args.finetune, finetune=True)
        if report.dropped_head:
            print(f'Dropped classifier weights whose shape differs from the model: {", ".join(report.dropped_head)}')
        print(f'Fine-tuning from {args.finetune}: missing {report.missing or "none"}, '
              f'unexpected {report.unexpected or "none"}')
    if args.head_init_scale != 1.0 and hasattr(model, 'get_classifier'):
        head = model.get_classifier()
        with torch.no_grad():
            for p_ in head.parameters():
                p_.mul_(args.head_init_scale)


def load_mae_encoder(path, model, state):
    """An MAE pre-training state (main_pretrain.py's or an official file) into timm's ViT `model`:
    the encoder by name, the decoder and mask token dropped (models.mae.mae_to_vit_state_dict,
    which refuses, in one line naming the model that fits, an encoder of another shape)."""
    mapped, skipped = mae_to_vit_state_dict(state, model, what=path)
    result = model.load_state_dict(mapped, strict=False)
    groups = {}
    for k in skipped:
        groups[k.split('.')[0]] = groups.get(k.split('.')[0], 0) + 1
    print(f'Fine-tuning the MAE encoder of {path}: skipped {len(skipped)} pre-training tensors '
          f'({", ".join(f"{g} ({n})" if n > 1 else g for g, n in groups.items())}); '
          f'new: {", ".join(result.missing_keys) or "none"}')


def save_training_checkpoint(args, name, epoch, model, optimizer, loss_scaler, model_ema, extra,
                             step=None, meters=None):
    """Write a checkpoint from rank 0; every rank must call (their RNG states and meters are gathered).

    step/meters make it a mid-epoch recovery checkpoint: training continues at batch `step`
    of `epoch` with the epoch's running averages.
    """
    rng = utils.gather_rng_states()
    gathered_meters = None
    if meters is not None:
        gathered_meters = [meters]
        if utils.is_dist_avail_and_initialized():
            gathered_meters = [None] * utils.get_world_size()
            torch.distributed.all_gather_object(gathered_meters, meters)
    if not utils.is_main_process():
        return
    state = {'model': model.state_dict(), 'optimizer': plain_lr(optimizer.state_dict()), 'epoch': epoch,
             'scaler': loss_scaler.state_dict(), 'args': utils.plain_args(args), 'rng': rng, **extra}
    if step is not None:
        state['step'] = step
        state['meters'] = gathered_meters
    if model_ema is not None:
        state['model_ema'] = model_ema.module.state_dict()
    path = os.path.join(args.output_dir, name)
    try:
        utils.atomic_save(state, path)
    except OSError as e:
        raise UserError(f'could not write {path} ({e.strerror or e}): free space in --output_dir and re-run '
                        f'the same command; earlier checkpoints are intact') from None


def plain_lr(opt_state):
    """An optimizer state whose lr entries are numbers (a captured step keeps them in device tensors)."""
    for g in opt_state['param_groups']:
        if isinstance(g.get('lr'), torch.Tensor):
            g['lr'] = float(g['lr'])
        if g.get('capturable'):
            g['capturable'] = False  # set by a capture (engine.TrainStep._capture), which sets it again
    return opt_state


def write_config(args, plan_summary, world, start):
    """The run's configuration, once every check has passed and training is about to start.

    The first part of a run writes config.json; every later part (a resume, or a fresh start
    where an earlier one stopped before its first checkpoint) keeps the earlier files and writes
    the next free config-N.json (N = 1, 2, ...), so each part keeps its record.
    """
    config = {'args': vars(utils.plain_args(args)), 'plan': plan_summary, 'world_size': world,
              'start_epoch': start.epoch, 'start_step': start.step, 'resumed': start.resumed_from}
    name, n = 'config.json', 0
    # never over an earlier record: a fresh start in a directory holding another start's record
    # numbers its own too ('resumed' is null in it)
    while os.path.exists(os.path.join(args.output_dir, name)):
        n += 1
        name = f'config-{n}.json'
    utils.atomic_write_text(os.path.join(args.output_dir, name), json.dumps(config, indent=2))


def check_finite(model, model_ema, where, losses=None):
    """Raise TrainingDiverged, on every rank alike, if the weights and buffers (BatchNorm
    statistics), the EMA or one of `losses` are not finite; run before anything is written,
    so the newest checkpoint stays the last good one (a re-run resumes from it)."""
    named = []
    if model is not None:
        named.append(('weights or buffers', not utils.all_finite(itertools.chain(model.parameters(),
                                                                                 model.buffers()))))
    if model_ema is not None:
        named.append(('EMA weights', not utils.all_finite(itertools.chain(model_ema.module.parameters(),
                                                                          model_ema.module.buffers()))))
    for name, value in (losses or {}).items():
        if value is not None:
            named.append((f'{name} ({value})', not math.isfinite(value)))
    if not named:
        return
    # one rank alone raising would leave the others waiting in the next collective
    flags = utils.all_reduce_sum([float(bad) for _, bad in named])
    bad = [name for (name, _), f in zip(named, flags) if f > 0]
    if bad:
        raise TrainingDiverged(f'{" and ".join(bad)} not finite {where}: training diverged, nothing was saved '
                               f'for it (the newest checkpoint is the last good one); lower --lr, enable '
                               f'--clip_grad, or use --amp_dtype bfloat16')


def log_epoch(args, log_writer, log_stats):
    """Rank 0: the epoch's line in log.txt and its scalars in TensorBoard."""
    if not utils.is_main_process():
        return
    if args.output_dir:
        utils.save_json_line(os.path.join(args.output_dir, 'log.txt'), log_stats)
    if log_writer is not None:
        log_writer.add_scalars(log_stats['epoch'], 'epoch', **{k: v for k, v in log_stats.items() if v is not None})
        log_writer.flush()


class Checkpointer:
    """A training run's checkpoints: checkpoint-N.pth (rotated), the best ones at the base size, and
    checkpoint-recovery.pth inside an epoch (--save_ckpt_steps, or on a stop request). Every rank
    calls (RNG states and meters are gathered); rank 0 writes."""

    def __init__(self, args, model, optimizer, loss_scaler, model_ema, plan_summary):
        self.args, self.model, self.optimizer = args, model, optimizer
        self.loss_scaler, self.model_ema, self.plan_summary = loss_scaler, model_ema, plan_summary

    def extra(self, size, max_acc=None, max_acc_ema=None):
        """The run's state besides weights and position; the plan goes with every checkpoint: a
        resume compares it (runner.resume.check_same_run).  The best accuracies of a run that
        evaluates (none for pre-training)."""
        best = {} if max_acc is None else {'max_accuracy': max_acc, 'max_accuracy_ema': max_acc_ema}
        return {'input_size': size, **best, 'plan': self.plan_summary}

    def save(self, name, epoch, extra, step=None, meters=None):
        save_training_checkpoint(self.args, name, epoch, self.model, self.optimizer, self.loss_scaler,
                                 self.model_ema, extra, step=step, meters=meters)

    def on_update(self, epoch, extra, steps, stop_request):
        """engine.train_one_epoch's on_update for `epoch` (of `steps` batches): a recovery
        checkpoint every --save_ckpt_steps optimizer steps and on a stop request, after which
        training ends (utils.TrainingInterrupted)."""
        args = self.args

        def on_update(done, meters, stop):
            periodic = args.save_ckpt_steps > 0 and done % args.save_ckpt_steps == 0 and done < steps
            if args.output_dir and (stop or periodic):
                check_finite(self.model, self.model_ema, f'at epoch {epoch}, batch {done}')
                self.save(utils.RECOVERY_NAME, epoch, extra, step=done, meters=meters.state_dict())
            if stop:
                saved = f'; recovery checkpoint {os.path.join(args.output_dir, utils.RECOVERY_NAME)}' \
                    if args.output_dir else ' (no --output_dir: nothing saved)'
                raise utils.TrainingInterrupted(f'stopped by {stop_request.name or "a signal"} at epoch {epoch}, '
                                                f'batch {done}{saved}; run the same command again to continue',
                                                stop_request.signum or signal.SIGTERM)
        return on_update

    def end_of_epoch(self, epoch, extra, last, improved=False, improved_ema=False):
        """checkpoint-N.pth every --save_ckpt_freq epochs and at the `last`, superseding the
        recovery checkpoint; checkpoint-best(-ema).pth when the accuracy improved."""
        args = self.args
        if not (args.output_dir and args.save_ckpt):
            return
        if (epoch + 1) % args.save_ckpt_freq == 0 or last:
            self.save(f'checkpoint-{epoch}.pth', epoch, extra)
            if utils.is_main_process():
                utils.rotate_checkpoints(args.output_dir, args.save_ckpt_num)
                recovery = os.path.join(args.output_dir, utils.RECOVERY_NAME)
                if os.path.exists(recovery):
                    os.remove(recovery)
        for name, better in (('checkpoint-best.pth', improved), ('checkpoint-best-ema.pth', improved_ema)):
            if better:
                self.save(name, epoch, extra)
