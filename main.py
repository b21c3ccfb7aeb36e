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
import sys

from runner.entry import guard_startup, run_cli, run_guarded

guard_startup(__name__)  # before torch loads: a Ctrl-C while starting is one line and exit 130

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from curriculum.adapt import adapt_model, check_input_size
from models import create_model
from pipelines.datasets import build_base_datasets, build_device_transform, build_train_loader, device_loader
from runner.args import (ArgumentParser, add_augment_args, add_curriculum_args, add_data_args, add_dist_args,
                         add_model_args, add_optim_args, add_perf_args, add_run_args, add_schedule_args,
                         check_shared_args)
from runner.checkpoint import Checkpointer, load_finetune
from runner.evaluation import Evaluator, eval_checkpoint, run_eval_only
from runner.loop import fit
from runner.resume import clean_output_dir, resume_training
from runner.setup import amp_dtype_of, setup_run, training_parts
from runner.stage import StageSwitch, StepParts, checked_plan, plan_only, plan_text
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
    if args.epochs < 1 and not args.eval:
        raise UserError(f'--epochs must be >= 1, got {args.epochs}')
    check_shared_args(args)


def _model_kwargs(args, nb_classes):
    kw = dict(num_classes=nb_classes, drop_path_rate=args.drop_path)
    if args.global_pool is not None:
        kw['global_pool'] = args.global_pool  # timm's ViT: 'avg' also moves the final norm after the pool (fc_norm)
    if args.layer_scale_init_value is not None:
        kw['layer_scale_init_value'] = args.layer_scale_init_value  # models.create_model maps it per family
    return kw


def build_model(args, nb_classes):
    """The model at the size it ends (or is evaluated) at, and that size."""
    try:
        model = create_model(args.model, **_model_kwargs(args, nb_classes))
    except ValueError as e:
        raise UserError(str(e)) from None
    except (TypeError, AssertionError) as e:
        # timm: a TypeError from a model without the argument, an AssertionError (naming the
        # choices) for a pooling the model does not have
        if args.global_pool is None or (isinstance(e, TypeError) and 'global_pool' not in str(e)):
            raise
        why = str(e).rstrip('.') if isinstance(e, AssertionError) else f'{args.model} takes no global_pool argument'
        raise UserError(f'--global_pool {args.global_pool}: {why}; choose one of those or drop the flag') from None
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
    """Train or evaluate in this process; the caller's signal handlers are put back afterwards."""
    return run_guarded(train, args)


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
    print(plan_text(args, plan, device, world, images=len(train_base)))
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
    fit(args, plan, start, switch, checkpoints, device_loader(args, train_loader, device_transform, device),
        n_parameters, nb_classes, evaluator)
    return model


def cli(argv=None):
    run_cli(get_args_parser, main, argv)


if __name__ == '__main__':
    cli()
