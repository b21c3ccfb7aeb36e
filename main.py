"""Train or evaluate a timm backbone, optionally with the EfficientTrain(++) curriculum.

    python main.py --data_set SYNTH --model resnet18 --input_size 64 --epochs 3 \
        --batch_size 32 --device cpu --output_dir out/demo
    torchrun --nproc_per_node=8 main.py --model convnext_tiny --curriculum etpp \
        --epochs 200 --data_path /path/to/imagenet --output_dir out/x

main() is wiring only: the plan (curriculum/) says what each epoch is, pipelines/ load
the data, the engine trains and evaluates, runner/ holds the run machinery any entry point
shares (argument groups, set-up, resume, checkpoints, the stage switch, evaluation).
"""
import argparse
import datetime
import os
import signal
import sys
import time


def _interrupted_while_starting(signum, frame):
    # Ctrl-C while torch and timm load (seconds): one line and 130, as later on, not a
    # traceback through the import machinery; nothing has been read or written yet
    sys.stderr.write('interrupted (Ctrl-C) while starting: nothing written\n')
    sys.stderr.flush()
    os._exit(130)


if __name__ == '__main__' and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_while_starting)  # cli() puts Python's handler back

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import utils
from curriculum.adapt import adapt_model, check_input_size
from engine import TrainingDiverged, train_one_epoch
from models import create_model
from pipelines import datasets
from pipelines.datasets import (build_base_datasets, build_device_transform, build_train_loader, device_loader,
                                warn_data_problems)
from pipelines.errors import BadImageError
from runner.args import (ArgumentParser, add_augment_args, add_curriculum_args, add_data_args, add_dist_args,
                         add_model_args, add_optim_args, add_perf_args, add_run_args, add_schedule_args,
                         check_data_args, check_run_args)
from runner.checkpoint import Checkpointer, check_finite, load_finetune, log_epoch, write_config
from runner.evaluation import Evaluator, eval_checkpoint, run_eval_only
from runner.resume import clean_output_dir, resume_training
from runner.setup import amp_dtype_of, setup_run, training_parts
from runner.stage import (StageSwitch, StepParts, checked_plan, describe, epoch_text, make_hparams, plan_only,
                          plan_text, stage_record, warm_shape, whole_run_eta)
from utils import UserError

GROUPS = (add_model_args, add_optim_args, add_schedule_args, add_curriculum_args, add_augment_args, add_data_args,
          add_run_args, add_dist_args, add_perf_args)


def get_args_parser(add_help=True, prog=None):
    """main.py's parser: every argument group of runner.args, in the order --help shows them."""
    p = ArgumentParser(prog=prog, usage='%(prog)s [--flag value ...]', add_help=add_help,
                       description='EfficientTrain(++) training and evaluation of timm backbones. Single '
                                   'process: python main.py ...; several: torchrun --nproc_per_node=N main.py ...')
    for add in GROUPS:
        add(p)
    return p


def script_parser(prog, description, epilog=None):
    """A helper script's parser: main.py's flags are accepted but left out of its --help,
    which lists the script's own options (add them to the returned parser) and points to
    main.py --help for the rest."""
    p = get_args_parser(prog=prog)
    for action in p._actions:  # argparse has no public way to hide inherited options
        if action.option_strings and action.dest != 'help':
            action.help = argparse.SUPPRESS
    for group in p._action_groups:
        group.description = None  # main.py's group notes, above no visible option
    p.description = description
    p.epilog = ((epilog + ' ') if epilog else '') + \
        'Every flag of main.py is accepted too: see python main.py --help.'
    return p


def check_args(args):
    """main.py's flag combinations that cannot work, refused before anything is loaded."""
    if args.batch_size < 1 or args.update_freq < 1:
        raise UserError('--batch_size and --update_freq must be >= 1')
    if args.epochs < 1 and not args.eval:
        raise UserError(f'--epochs must be >= 1, got {args.epochs}')
    if args.model_ema_eval and not args.model_ema:
        raise UserError('--model_ema_eval true needs --model_ema true')
    if args.curriculum_file and args.curriculum != 'none':
        raise UserError('--curriculum_file replaces --curriculum: drop --curriculum')
    check_data_args(args)
    check_run_args(args)


def _model_kwargs(args, nb_classes):
    kw = dict(num_classes=nb_classes, drop_path_rate=args.drop_path)
    if args.layer_scale_init_value is not None:
        kw['layer_scale_init_value'] = args.layer_scale_init_value  # models.create_model maps it per family
    return kw


def build_model(args, nb_classes):
    """The model at the size it ends (or is evaluated) at, and that size."""
    try:
        model = create_model(args.model, **_model_kwargs(args, nb_classes))
    except ValueError as e:
        raise UserError(str(e)) from None
    curriculum = args.curriculum != 'none' or args.curriculum_file
    final_size = args.base_input_size if curriculum and not args.eval else args.input_size
    try:
        check_input_size(model, final_size)
    except ValueError as e:
        raise UserError(f'{"--input_size" if final_size == args.input_size else "--base_input_size"}: {e}') from None
    adapt_model(model, final_size)
    return model, final_size


def build_loss(args, nb_classes):
    """(mixup_fn or None, criterion): soft targets with mixup/cutmix, label smoothing otherwise."""
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=nb_classes)
        return mixup_fn, SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return None, torch.nn.CrossEntropyLoss()


def main(args):
    # training installs its own SIGTERM handler (utils.StopRequest); callers in the same
    # process (tests, notebooks) get theirs back, or processes they fork later would
    # inherit one that never exits (a multiprocessing.Pool then waits forever to terminate them)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    datasets.hold_workers()
    try:
        return train(args)
    finally:
        # on every way out (an error raised in a loader worker included) the workers end on
        # SIGTERM again, so shutting the loaders down cannot wait forever
        datasets.release_workers()
        for s, handler in previous.items():
            # None: a handler not set from Python, which cannot be put back
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def train(args):
    if args.plan_only:
        return plan_only(args, check_args, build_model)
    device, rank, world = setup_run(args, check_args)
    print(' '.join(sys.argv))
    # before the data is built: a wrong path fails at once, and the model is built at its size
    eval_ckpt = eval_checkpoint(args) if args.eval else None
    train_base, val_base, nb_classes = build_base_datasets(args)
    args.nb_classes = nb_classes
    model, final_size = build_model(args, nb_classes)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f'Model {args.model}: {n_parameters / 1e6:.2f}M parameters, {nb_classes} classes')
    amp_dtype = amp_dtype_of(args)
    if args.eval:
        return run_eval_only(args, eval_ckpt, model, val_base, device, amp_dtype, rank, world)

    plan = checked_plan(args, model)
    print(plan_text(args, plan, device, world, len(train_base)))
    # before anything is loaded or written: the loader checks the batch against the data
    # and the image store against the folder
    train_loader, batch_sampler = build_train_loader(args, train_base, plan, rank, world)
    if args.finetune:
        load_finetune(args, model)
    model_ema, optimizer, loss_scaler = training_parts(args, model, device)
    mixup_fn, criterion = build_loss(args, nb_classes)
    start = resume_training(args, model, optimizer, loss_scaler, model_ema, final_size, rank, world, plan=plan)
    clean_output_dir(args, start, rank)

    device_transform = build_device_transform(args, device, rank, world, dataset=train_loader.dataset)
    parts = StepParts(criterion, optimizer, loss_scaler, device, model_ema, mixup_fn, amp_dtype, device_transform)
    switch = StageSwitch(args, plan, model, start.size, train_loader, batch_sampler, parts)
    evaluator = Evaluator(args, val_base, device, amp_dtype, rank, world, plan.base_size, start.max_acc,
                          start.max_acc_ema)
    checkpoints = Checkpointer(args, model, optimizer, loss_scaler, model_ema, plan.summary())
    if rank == 0 and args.output_dir and start.epoch < plan.num_epochs:
        write_config(args, checkpoints.plan_summary, world, start)
    if start.epoch >= plan.num_epochs:
        print(f'Nothing left to train: all {plan.num_epochs} data epochs of the plan are done '
              f'(--epochs and --resume_override epochs extend a finished run)')
    else:
        print(f'Start training for {plan.num_epochs} data epochs from epoch {start.epoch}')
    fit(args, plan, start, switch, evaluator, checkpoints, device_loader(args, train_loader, device_transform, device),
        n_parameters, nb_classes)
    return model


def fit(args, plan, start, switch, evaluator, checkpoints, epoch_loader, n_parameters, nb_classes):
    """The epoch loop: plan -> stage -> loader, model and step -> train -> evaluate -> log -> checkpoint."""
    rank = utils.get_rank()
    log_writer = utils.TensorboardLogger(args.log_dir) if (args.log_dir and rank == 0) else None
    hparams = make_hparams(args, plan, switch.per_rank)
    stop_request = utils.StopRequest().install()
    per = 'GPU' if switch.parts.device.type == 'cuda' else 'process'
    start_time = time.time()
    for epoch in range(start.epoch, plan.num_epochs):
        stage = plan.stage_at(epoch)
        skip = start.step if epoch == start.epoch else 0
        switch.enter(stage, epoch, skip, refill=epoch == start.epoch)  # model at B, low-pass, replay, loader
        print(epoch_text(plan, stage, epoch, per, whole_run_eta(plan, start.epoch, epoch, time.time() - start_time)))
        extra = checkpoints.extra(switch.size, evaluator.max_acc, evaluator.max_acc_ema)
        step = switch.train_step(stage)
        epoch_start = time.time()
        train_stats = train_one_epoch(
            step, epoch_loader, epoch,
            hparams_at=lambda frac, e=epoch: hparams(plan.progress(e, frac)), log_writer=log_writer,
            global_step=sum(switch.steps_in(e) for e in range(epoch)), print_freq=args.print_freq,
            header=f'Epoch: [{epoch}/{plan.num_epochs}] [{describe(stage)}]',
            start_step=skip, meter_state=start.meters if skip else None, stop_requested=stop_request.requested,
            on_update=checkpoints.on_update(epoch, extra, switch.steps_in(epoch), stop_request),
            warm_shape=warm_shape(args, step, stage, nb_classes))
        train_time = time.time() - epoch_start
        warn_data_problems(switch.loader.dataset)
        check_finite(switch.model, switch.parts.model_ema, f'after epoch {epoch} ({describe(stage)})')
        # Evaluate and log before the epoch's checkpoint: a kill in between repeats the epoch
        # from the previous checkpoint, and the resumed run rewrites this log line.
        test_stats, ema_stats, improved, improved_ema = evaluator.after_epoch(
            epoch, stage, describe(stage), switch.model, switch.parts.model_ema)
        log_epoch(args, log_writer, {**{f'train_{k}': v for k, v in train_stats.items()},
                                     **{f'test_{k}': v for k, v in test_stats.items()},
                                     **{f'test_ema_{k}': v for k, v in ema_stats.items()},
                                     'epoch': epoch, 'n_parameters': n_parameters, **stage_record(plan, epoch),
                                     # the training pass alone (no evaluation, no checkpoint); of a
                                     # resumed epoch, only the part after the resume
                                     'train_time_s': round(train_time, 3)})
        extra.update(max_accuracy=evaluator.max_acc, max_accuracy_ema=evaluator.max_acc_ema)
        checkpoints.end_of_epoch(epoch, extra, epoch + 1 == plan.num_epochs, improved, improved_ema)

    if switch.size != plan.base_size and not args.disable_eval and start.epoch < plan.num_epochs:
        evaluator.final_at_base(switch.model, switch.parts.optimizer, switch.parts.model_ema)
    print(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')


def cli(argv=None):
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt, handled below
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except BadImageError as e:
        # raised on the rank that read the file, maybe not rank 0, whose print() alone is on
        # (utils.setup_for_distributed): written directly. torchrun then ends the other ranks.
        sys.stderr.write(f'error: {e}\n')
        sys.stderr.flush()
        sys.exit(2)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(3)
    except utils.TrainingInterrupted as e:
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        # Ctrl-C before training's handler is installed, during evaluation, or a second one
        print('interrupted (Ctrl-C): stopped without saving; checkpoints already written are intact',
              file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        if utils.is_dist_avail_and_initialized():
            torch.distributed.destroy_process_group()


if __name__ == '__main__':
    cli()
