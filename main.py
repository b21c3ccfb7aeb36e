"""Train or evaluate a timm backbone, optionally with the EfficientTrain(++) curriculum.

    python main.py --data_set SYNTH --model resnet18 --input_size 64 --epochs 3 \
        --batch_size 32 --device cpu --output_dir out/demo
    torchrun --nproc_per_node=8 main.py --model convnext_tiny --curriculum etpp \
        --epochs 200 --data_path /path/to/imagenet --output_dir out/x

main() is wiring only: the plan (curriculum/) says what each epoch is, the engine
trains and evaluates, utils writes checkpoints and logs.
"""
import argparse
import datetime
import itertools
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass


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
from timm.utils import ModelEmaV3

import utils
from curriculum import PlanError, build_plan
from curriculum.adapt import adapt_model, check_input_size, size_multiple
from curriculum.lowfreq import FourierCrop
from curriculum.replay import ReplayBuffer, history
import datasets
from datasets import build_base_datasets, build_eval_loader, build_train_loader
from engine import TrainingDiverged, TrainStep, evaluate, train_one_epoch
from models import create_model
from models.checkpoint_compat import load_into
from optim_factory import create_optimizer
from utils import UserError, str2bool


class _InputSizeDefault(int):
    """--input_size's default (224), a distinct type so that a value the user typed can be told
    apart from it: --eval then evaluates at the checkpoint's recorded size unless one was given.
    utils.plain_args stores it as a plain int."""


INPUT_SIZE_DEFAULT = _InputSizeDefault(224)


def input_size_given(args):
    """Whether --input_size was given (its value is not the parser's default object)."""
    return type(args.input_size) is not _InputSizeDefault


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' unless the help already says its default; None reads 'unset'."""

    def _get_help_string(self, action):
        text = action.help or ''
        if 'default' in text or action.default is argparse.SUPPRESS or not action.option_strings \
                or action.nargs == 0 or action.required:
            return text
        d = action.default
        shown = 'unset' if d is None or d == '' else str(d).lower() if isinstance(d, bool) else str(d)
        return text + f' (default: {shown})'.replace('%', '%%')


class ArgumentParser(argparse.ArgumentParser):
    """argparse without abbreviations (`--epoch 1` is an error, not --epochs), errors on one line."""

    def __init__(self, *a, **kw):
        kw.setdefault('allow_abbrev', False)
        kw.setdefault('formatter_class', HelpFormatter)
        super().__init__(*a, **kw)

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


# true/false flags: shown as {true,false} in --help
BOOL = dict(type=str2bool, metavar='{true,false}')


def get_args_parser(add_help=True, prog=None):
    # Flags live in argument groups, one local variable per group (model, optim, schedule,
    # curriculum, augment, data, run, dist, perf), shown in this order by --help. A new flag
    # goes into its group: `<group>.add_argument('--x', default=..., help='...')`, with
    # **BOOL for a true/false flag; --help appends the default unless the help says it.
    # tests/test_cli.py checks every action (help text, default shown, a group, bool metavar).
    p = ArgumentParser(prog=prog, usage='%(prog)s [--flag value ...]', add_help=add_help,
                       description='EfficientTrain(++) training and evaluation of timm backbones. Single '
                                   'process: python main.py ...; several: torchrun --nproc_per_node=N main.py ...')
    model = p.add_argument_group('model')
    optim = p.add_argument_group('optimisation')
    schedule = p.add_argument_group('schedule (learning rate, weight decay, EMA)')
    curriculum = p.add_argument_group('curriculum (EfficientTrain / EfficientTrain++)')
    augment = p.add_argument_group('augmentation and regularisation')
    data = p.add_argument_group('data')
    run = p.add_argument_group('run and checkpoints')
    dist = p.add_argument_group('distributed', 'torchrun (or srun with SLURM_NTASKS > 1) starts the processes '
                                'and sets RANK, WORLD_SIZE and LOCAL_RANK; --batch_size is per process')
    perf = p.add_argument_group('performance')

    model.add_argument('--model', default='convnext_tiny', type=str,
                       help='a recipe name (scripts/recipes.py list) or any timm model name')
    model.add_argument('--input_size', default=INPUT_SIZE_DEFAULT, type=int,
                       help='image size for training without a curriculum, and for --eval (default: 224; '
                            "with --eval, the size the --resume checkpoint records, when it records one)")
    model.add_argument('--drop_path', default=0.0, type=float, help='stochastic depth rate')
    model.add_argument('--layer_scale_init_value', default=None, type=float,
                       help='layer-scale init of ConvNeXt/ViT-style models (default: the model\'s own)')
    model.add_argument('--nb_classes', default=None, type=int, help='number of classes (default: from the data)')
    model.add_argument('--finetune', default='', type=str,
                       help='initialise from these weights (a released or own checkpoint); a classifier of '
                            'another shape is dropped and trained anew')
    model.add_argument('--head_init_scale', default=1.0, type=float,
                       help='with --finetune: scale the classifier weights by this')
    model.add_argument('--model_key', default='model|module', type=str,
                       help='the checkpoint entries that may hold the weights, tried in order ("|"-separated)')
    model.add_argument('--model_prefix', default='', type=str,
                       help='with --finetune: keep only weights whose names start with this, prefix removed')

    optim.add_argument('--batch_size', default=64, type=int,
                       help='batch per process (per GPU) at the base size; curricula scale it at lower B')
    optim.add_argument('--update_freq', default=1, type=int,
                       help='gradient accumulation steps per optimizer step (at the base size)')
    optim.add_argument('--global_batch_size', default=None, type=int,
                       help='total batch per optimizer step; sets --update_freq from --batch_size and the '
                            'number of processes')
    optim.add_argument('--opt', default='adamw', type=str, help="optimizer: any name timm's factory knows")
    optim.add_argument('--opt_eps', default=1e-8, type=float, help='optimizer epsilon')
    optim.add_argument('--opt_betas', default=None, type=float, nargs='+',
                       help="optimizer betas (default: the optimizer's own)")
    optim.add_argument('--momentum', default=0.9, type=float, help='SGD momentum')
    optim.add_argument('--clip_grad', default=None, type=float, help='clip the gradient norm to this (default: off)')
    optim.add_argument('--layer_decay', default=1.0, type=float,
                       help='layer-wise learning-rate decay (1.0: off), as in fine-tuning recipes')

    schedule.add_argument('--epochs', default=300, type=int,
                          help='data epochs; with --curriculum etpp, the budget in equivalent epochs at '
                               '--base_input_size')
    schedule.add_argument('--lr', default=4e-3, type=float, help='peak learning rate (after warmup)')
    schedule.add_argument('--min_lr', default=1e-6, type=float, help='final learning rate of the cosine schedule')
    schedule.add_argument('--warmup_epochs', default=20, type=float,
                          help='linear warmup length in epochs (one that would cover the whole run is cut to '
                               'its first 20%%, with a note)')
    schedule.add_argument('--warmup_steps', default=-1, type=int,
                          help='warmup length in optimizer steps; overrides --warmup_epochs when > 0')
    schedule.add_argument('--weight_decay', default=0.05, type=float, help='weight decay (AdamW: decoupled)')
    schedule.add_argument('--weight_decay_end', default=None, type=float,
                          help='final weight decay of a cosine schedule (default: unset, constant)')
    schedule.add_argument('--model_ema', default=False, **BOOL, help='keep an exponential moving average of '
                                                                     'the weights (saved as model_ema)')
    schedule.add_argument('--model_ema_decay', default=0.9999, type=float, help='EMA decay per optimizer step')
    schedule.add_argument('--model_ema_force_cpu', default=False, **BOOL,
                          help='keep the EMA (and its evaluation) on the CPU')
    schedule.add_argument('--model_ema_eval', default=False, **BOOL,
                          help='evaluate the EMA too after each epoch; with --eval, evaluate the EMA weights')

    curriculum.add_argument('--curriculum', default='none', choices=['none', 'et', 'etpp'],
                            help='none: plain training at --input_size; et: EfficientTrain (ICCV 2023); '
                                 'etpp: EfficientTrain++ (TPAMI 2024)')
    curriculum.add_argument('--curriculum_file', default=None, type=str,
                            help='custom stages (JSON) instead of --curriculum; see TRAINING.md')
    curriculum.add_argument('--base_input_size', default=224, type=int,
                            help='the final bandwidth B of a curriculum (the size it ends at)')
    curriculum.add_argument('--lowfreq', default='auto', choices=['auto', 'fourier', 'lanczos'],
                            help='how images are reduced to bandwidth B; auto: fourier for et, lanczos for etpp')
    curriculum.add_argument('--replay_times', default=1, type=int,
                            help='replay factor for stages below the base size (1: no replay buffer)')
    curriculum.add_argument('--replay_buffer_size', default=0, type=int,
                            help='replay buffer length in loader batches')
    curriculum.add_argument('--replay_preset', default=False, **BOOL,
                            help="the recipe's published replay settings")
    curriculum.add_argument('--baseline_epochs', default=None, type=int,
                            help='also compare the plan with a baseline of this many epochs at the base size '
                                 '(default: unset; etpp compares with the published 300-epoch baseline when '
                                 '--epochs is a published budget)')

    augment.add_argument('--color_jitter', default=0.4, type=float,
                         help='colour jitter strength (used only without RandAugment)')
    augment.add_argument('--aa', default='rand-m9-mstd0.5-inc1', type=str,
                         help="timm auto-augment policy; 'none' disables (curricula set the magnitude m per stage)")
    augment.add_argument('--smoothing', default=0.1, type=float, help='label smoothing')
    augment.add_argument('--train_interpolation', default='bicubic', type=str,
                         help='interpolation of the random resized crop')
    augment.add_argument('--crop_pct', default=None, type=float,
                         help='evaluation centre-crop fraction (default: unset, 0.875 below 384, none above)')
    augment.add_argument('--reprob', default=0.25, type=float, help='random erasing probability')
    augment.add_argument('--remode', default='pixel', type=str, help="random erasing fill ('pixel', 'rand', 'const')")
    augment.add_argument('--recount', default=1, type=int, help='random erasing count')
    augment.add_argument('--resplit', default=False, **BOOL,
                         help='per-split random erasing; only has an effect with augmentation splits, which this '
                              'codebase does not use (kept for command-line compatibility)')
    augment.add_argument('--mixup', default=0.8, type=float, help='mixup alpha (0: off)')
    augment.add_argument('--cutmix', default=1.0, type=float, help='cutmix alpha (0: off)')
    augment.add_argument('--cutmix_minmax', default=None, type=float, nargs='+',
                         help='cutmix box ratio range, overrides --cutmix (default: unset)')
    augment.add_argument('--mixup_prob', default=1.0, type=float, help='probability of mixup or cutmix per batch')
    augment.add_argument('--mixup_switch_prob', default=0.5, type=float,
                         help='probability of cutmix instead of mixup when both are on')
    augment.add_argument('--mixup_mode', default='batch', type=str, help="how mixup is applied: batch, pair or elem")

    data.add_argument('--data_set', default='IMNET', choices=['IMNET', 'image_folder', 'CIFAR', 'SYNTH'],
                      help='IMNET: --data_path/train and /val; image_folder: class folders; CIFAR: CIFAR-100; '
                           'SYNTH: generated images, no download')
    data.add_argument('--data_path', default=None, type=str, help='dataset root (default: unset; needed but for SYNTH)')
    data.add_argument('--eval_data_path', default=None, type=str,
                      help='evaluation folder for image_folder (default: unset)')
    data.add_argument('--synth_classes', default=10, type=int, help='SYNTH: number of classes')
    data.add_argument('--synth_per_class', default=100, type=int, help='SYNTH: training images per class')
    data.add_argument('--synth_val_per_class', default=20, type=int, help='SYNTH: test images per class')
    data.add_argument('--synth_image_size', default=80, type=int, help='SYNTH: image side in pixels')
    data.add_argument('--synth_seed', default=0, type=int, help='SYNTH: seed of the generated images')
    data.add_argument('--data_pipeline', default='published', choices=['published', 'fast', 'gpu'],
                      help='published: the papers\' CPU order (crop/augment at the base size, then resize to B); '
                           'fast: crop and augment at B, reduced-size JPEG decoding, uint8 batches normalised '
                           'and random-erased on the device (curriculum/fastpath.py); gpu: workers only read '
                           'the JPEG bytes and draw the augmentation, the device decodes, crops, augments and '
                           'erases (curriculum/gpudata.py; image folders, RandAugment policies)')
    data.add_argument('--image_store', default=None,
                      help='with --data_pipeline fast or gpu: a store of reduced-size copies of the training images, '
                           'built by scripts/build_image_store.py, read instead of the originals when the crop '
                           'allows (curriculum/store.py)')
    data.add_argument('--num_workers', default=min(10, os.cpu_count() or 1), type=int,
                      help='data loader processes per training process (default: min(10, CPU count))')
    data.add_argument('--pin_mem', default=True, **BOOL, help='page-locked loader batches (CUDA only)')
    data.add_argument('--skip_bad_images', default=False, **BOOL,
                      help='skip and count unreadable training images instead of failing on the first')

    run.add_argument('--output_dir', default='', type=str,
                     help="checkpoints, log.txt, config.json, TensorBoard logs ('': save nothing)")
    run.add_argument('--log_dir', default=None, type=str,
                     help='TensorBoard directory (default: <output_dir>/tensorboard; "none" disables)')
    run.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', type=str,
                     help='cpu, cuda or cuda:N (torchrun: each process uses its LOCAL_RANK) '
                          '(default: cuda when available, else cpu)')
    run.add_argument('--seed', default=0, type=int, help='random seed (each process adds its rank)')
    run.add_argument('--resume', default='', type=str,
                     help='checkpoint to continue from, or to evaluate with --eval')
    run.add_argument('--auto_resume', default=True, **BOOL,
                     help='continue from the furthest checkpoint in --output_dir when there is one')
    run.add_argument('--start_epoch', default=0, type=int, help='first epoch when not resuming')
    run.add_argument('--eval', default=False, **BOOL, help='only evaluate --resume on the test set')
    run.add_argument('--disable_eval', default=False, **BOOL, help='no evaluation after each epoch')
    run.add_argument('--save_ckpt', default=True, **BOOL, help='write checkpoint-N.pth and checkpoint-best.pth')
    run.add_argument('--save_ckpt_freq', default=1, type=int, help='write checkpoint-N.pth every N epochs')
    run.add_argument('--save_ckpt_num', default=3, type=int, help='keep the newest N checkpoint-N.pth files')
    run.add_argument('--save_ckpt_steps', default=0, type=int,
                     help='also write checkpoint-recovery.pth every N optimizer steps inside an epoch (0: off)')
    run.add_argument('--deterministic', default=False, **BOOL,
                     help='deterministic kernels (torch.use_deterministic_algorithms), for bit-exact resume')
    run.add_argument('--print_freq', default=10, type=int, help='print training progress every N steps')
    run.add_argument('--resume_override', default='', type=str,
                     help='NAME[,NAME]: flags (without --) a resume may change deliberately, or "plan"; without it '
                          'a resume with other computation-changing flags or another plan is refused (TRAINING.md)')

    dist.add_argument('--dist_eval', default=True, **BOOL,
                      help='split evaluation among the processes (else every process evaluates everything)')
    dist.add_argument('--dist_timeout', default=30.0, type=float,
                      help='minutes a process waits in a collective for the others (a peer gone on another node, '
                           'or a hang) before it fails and the launcher ends the run; allow for rank 0 writing a '
                           'checkpoint alone')

    perf.add_argument('--use_amp', default=False, **BOOL, help='mixed precision (autocast)')
    perf.add_argument('--amp_dtype', default='float16', choices=['float16', 'bfloat16'],
                      help='autocast dtype with --use_amp (float16 uses a loss scaler)')
    perf.add_argument('--channels_last', default=False, **BOOL, help='model (and fast-path batches) in NHWC layout')
    perf.add_argument('--compile', default=False, **BOOL,
                      help='torch.compile the training model with static shapes: one compilation per stage size')
    perf.add_argument('--cudnn_benchmark', default=True, **BOOL,
                      help='let cuDNN time its convolution algorithms once per input shape (as the ConvNeXt/DeiT '
                           'code does; once per stage here); off with --deterministic true')
    perf.add_argument('--cuda_graph', default=False, **BOOL,
                      help='capture the whole training step (forward, backward, clipping, fused optimizer step, '
                           'loss scaling, EMA on the GPU) in a CUDA graph once per stage shape and replay it; '
                           'where a setting cannot be captured one line says why and training goes on eagerly')
    curriculum.add_argument('--stage_batch', default='published', choices=['published', 'auto'],
                            help="per-GPU micro-batch of stages below the base size: published: the recipe's (the "
                                 "base micro-batch x the published ratio); auto: grown with (base/B)^2 (about the "
                                 "memory of the base stage), up to --max_micro_batch, with update_freq shrunk so "
                                 "that the global batch and the recipe stay as published")
    curriculum.add_argument('--max_micro_batch', default=0, type=int,
                            help='with --stage_batch auto: largest per-GPU micro-batch (0: no cap; update_freq '
                                 'still bounds the growth)')
    perf.add_argument('--gpu_augment_at', default='base', choices=['base', 'stage'],
                      help='with --data_pipeline gpu at Lanczos stages (B below the base size, the EfficientTrain++ '
                           'default): base: crop and RandAugment at the base size, then the Lanczos low-pass to B, '
                           'on the device (the published order); stage: crop to B and RandAugment at B (less work, '
                           'not the published pixels)')
    perf.add_argument('--gpu_prefetch', default='auto', choices=['auto', 'true', 'false'],
                      help='with --data_pipeline gpu: finish the next batch on the device (decode, augment; its '
                           'own CUDA stream and thread) while the current one trains; auto: on CUDA devices')
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
    if args.batch_size < 1 or args.update_freq < 1:
        raise UserError('--batch_size and --update_freq must be >= 1')
    if args.epochs < 1 and not args.eval:
        raise UserError(f'--epochs must be >= 1, got {args.epochs}')
    if args.model_ema_eval and not args.model_ema:
        raise UserError('--model_ema_eval true needs --model_ema true')
    if args.curriculum_file and args.curriculum != 'none':
        raise UserError('--curriculum_file replaces --curriculum: drop --curriculum')
    if args.save_ckpt_steps < 0:
        raise UserError('--save_ckpt_steps must be >= 0 (0: no mid-epoch recovery checkpoints)')
    if args.image_store and not args.eval and (args.data_pipeline not in ('fast', 'gpu')
                                               or args.data_set not in ('IMNET', 'image_folder')):
        raise UserError('--image_store is read by the fast and gpu data paths from an image folder: add '
                        '--data_pipeline fast (or gpu) and use --data_set IMNET or image_folder, or drop --image_store')
    if args.data_pipeline == 'gpu' and not args.eval:
        check_gpu_pipeline_args(args)
    parse_overrides(getattr(args, 'resume_override', None))
    if args.log_dir is None and args.output_dir:
        args.log_dir = os.path.join(args.output_dir, 'tensorboard')
    if args.log_dir in ('none', ''):
        args.log_dir = None


def check_gpu_pipeline_args(args):
    """What --data_pipeline gpu cannot do, refused before anything is loaded."""
    if args.data_set not in ('IMNET', 'image_folder'):
        raise UserError(f'--data_pipeline gpu decodes image files: --data_set {args.data_set} has none; use '
                        f'--data_set IMNET or image_folder, or --data_pipeline fast')
    aa = args.aa or 'none'
    if aa != 'none' and not aa.startswith('rand'):
        raise UserError(f'--data_pipeline gpu runs RandAugment policies (rand-...), not --aa {aa}: use e.g. '
                        f'--aa rand-m9-mstd0.5-inc1, or --data_pipeline fast')
    if aa == 'none' and args.color_jitter > 0:
        raise UserError('--data_pipeline gpu has no colour jitter (timm applies it only without RandAugment): '
                        'pass --color_jitter 0 or a RandAugment --aa, or use --data_pipeline fast')
    if args.train_interpolation not in ('bilinear', 'bicubic', 'lanczos', 'random'):
        raise UserError(f'--data_pipeline gpu resizes with bilinear, bicubic or lanczos filters, not '
                        f'--train_interpolation {args.train_interpolation}: pick one of those or random')
    if (args.remode or 'const').lower() not in ('const', 'rand', 'pixel'):
        raise UserError(f'--remode {args.remode}: use const, rand or pixel')


def check_device(name):
    """--device as torch understands it, on this machine (before anything is initialised on it)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f'--device {name} is not a device: use cpu, cuda or cuda:N') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UserError(f'--device {name} but no CUDA device is visible: pass --device cpu')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f'--device {name} but only {torch.cuda.device_count()} CUDA device(s) are visible: '
                            f'use cuda:0..cuda:{torch.cuda.device_count() - 1}')
    elif device.type != 'cpu':
        raise UserError(f'--device {name}: this codebase trains on cpu or cuda only')
    return device


def _model_kwargs(args, nb_classes):
    kw = dict(num_classes=nb_classes, drop_path_rate=args.drop_path)
    if args.layer_scale_init_value is not None:
        kw['layer_scale_init_value'] = args.layer_scale_init_value  # models.create_model maps it per family
    return kw


def _state_from(ckpt, keys, path):
    for k in keys.split('|'):
        if k in ckpt:
            print(f'Loading weights from {path} [{k}]')
            return ckpt[k], k
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt, None
    raise UserError(f'{path} has none of the keys {keys.split("|")} (it has {sorted(ckpt)[:5]}): '
                    f'pass --model_key')


def baseline_epochs(args):
    """ET compares with the baseline at the same epochs; ETPP's budget E with the 300-epoch baseline."""
    if args.baseline_epochs:
        return args.baseline_epochs
    return 300 if args.curriculum == 'etpp' and not args.curriculum_file else args.epochs


def compared_baseline_epochs(args):
    """A baseline the plan table compares with besides the same data epochs at the base size:
    --baseline_epochs, or the paper's 300-epoch one when the run is a paper setting
    (EfficientTrain++ at 224, a budget of 100 epochs or more); else None."""
    if args.baseline_epochs:
        return args.baseline_epochs
    paper = (args.curriculum == 'etpp' and not args.curriculum_file and args.base_input_size == 224
             and args.epochs >= 100)
    return 300 if paper else None


def plan_text(args, plan, device, world):
    """The plan table as main.py prints it for this run."""
    return plan.table(compared_baseline_epochs(args), pipeline=args.data_pipeline, world=world,
                      per='GPU' if device.type == 'cuda' else 'process')


def checked_plan(args, model):
    """The plan for these flags, every stage's B checked against the model before training."""
    try:
        plan = build_plan(args, size_multiple(model))
    except PlanError as e:
        raise UserError(str(e)) from None
    for s in plan.stages:
        try:
            check_input_size(model, s.size)
        except ValueError as e:
            raise UserError(f'stage {s.index} of the plan: {e}') from None
    return plan


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
    state, _ = _state_from(ckpt, args.model_key, args.finetune)
    if args.model_prefix:
        state = {k[len(args.model_prefix):]: v for k, v in state.items() if k.startswith(args.model_prefix)}
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


def setup_run(args):
    """Distributed init, flag checks, seeding and determinism; returns (device, rank, world)."""
    check_device(args.device)
    utils.init_distributed_mode(args)
    check_args(args)
    device = torch.device(args.device)
    rank, world = utils.get_rank(), utils.get_world_size()
    if args.global_batch_size:
        per_step = args.batch_size * world
        if args.global_batch_size % per_step:
            raise UserError(f'--global_batch_size {args.global_batch_size} does not divide among {world} '
                            f'process(es) x --batch_size {args.batch_size}: choose a per-process batch such that '
                            f'batch x processes divides it')
        freq = args.global_batch_size // per_step
        if args.update_freq not in (1, freq):
            raise UserError(f'--update_freq {args.update_freq} contradicts --global_batch_size '
                            f'{args.global_batch_size} ({world} process(es) x {args.batch_size} needs {freq}): '
                            f'drop one')
        args.update_freq = freq
    args.pin_mem = args.pin_mem and device.type == 'cuda'
    utils.seed_everything(args.seed + rank)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark and device.type == 'cuda'
    if args.deterministic:
        # CPU kernels are deterministic already; this also pins cuDNN/cuBLAS choices on GPU.
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    if args.output_dir and rank == 0:
        utils.check_writable_dir(args.output_dir)
    return device, rank, world


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


@dataclass
class ResumePoint:
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
    'model', 'drop_path', 'layer_scale_init_value', 'nb_classes',
    'batch_size', 'update_freq', 'global_batch_size', 'epochs', 'warmup_epochs', 'warmup_steps', 'lr', 'min_lr',
    'weight_decay', 'weight_decay_end', 'opt', 'opt_eps', 'opt_betas', 'momentum', 'clip_grad', 'layer_decay',
    'model_ema', 'model_ema_decay',
    'color_jitter', 'aa', 'smoothing', 'train_interpolation', 'crop_pct', 'reprob', 'remode', 'recount',
    'mixup', 'cutmix', 'cutmix_minmax', 'mixup_prob', 'mixup_switch_prob', 'mixup_mode',
    'curriculum', 'curriculum_file', 'base_input_size', 'input_size', 'lowfreq', 'replay_times',
    'replay_buffer_size', 'replay_preset', 'stage_batch', 'max_micro_batch',
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
    'stage_batch': _BATCH_KEYS, 'max_micro_batch': _BATCH_KEYS,
}
# Flags that have no effect while another is off (in the checkpoint's run and now alike):
# a difference in them changes nothing, so it is not refused.
_INERT_UNLESS = {
    'amp_dtype': lambda a: a.get('use_amp'),
    'model_ema_decay': lambda a: a.get('model_ema'),
    'remode': lambda a: a.get('reprob'), 'recount': lambda a: a.get('reprob'),
    'gpu_augment_at': lambda a: a.get('data_pipeline') == 'gpu',
    # training without a curriculum is at --input_size, with one its stages end at --base_input_size
    'input_size': lambda a: a.get('curriculum') == 'none' and not a.get('curriculum_file'),
    'base_input_size': lambda a: a.get('curriculum') != 'none' or bool(a.get('curriculum_file')),
    # timm's Mixup: on with either alpha or --cutmix_minmax; the switch picks between the two
    'mixup_prob': lambda a: a.get('mixup') or a.get('cutmix') or a.get('cutmix_minmax') is not None,
    'mixup_mode': lambda a: a.get('mixup') or a.get('cutmix') or a.get('cutmix_minmax') is not None,
    'mixup_switch_prob': lambda a: a.get('mixup') and (a.get('cutmix') or a.get('cutmix_minmax') is not None),
}


def parse_overrides(value):
    """--resume_override NAME[,NAME]: flag names (without --) and 'plan'; checked against the table."""
    names = [n.strip().lstrip('-') for n in (value or '').split(',') if n.strip()]
    unknown = [n for n in names if n not in RESUME_CHECKED and n != 'plan']
    if unknown:
        raise UserError(f'--resume_override {",".join(unknown)}: not a checked flag; name flags among '
                        f'{", ".join(RESUME_CHECKED)}, or plan')
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


def check_same_run(args, ckpt, path, plan, world):
    """UserError unless the checkpoint's run had these computation-changing flags and this plan.

    Flags named in --resume_override may differ (listed in a warning); so may the parts of the
    plan those flags change (PLAN_FLAGS), or all of it with 'plan'. A different GPU count is
    allowed (restore_rank_state warns), with the same global batch in every stage.
    """
    saved = ckpt.get('args')
    if saved is None or 'epoch' not in ckpt:
        return  # weights only (or a checkpoint of an older version): nothing to compare
    saved = vars(saved)
    overrides = parse_overrides(getattr(args, 'resume_override', None))
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
    diffs = [(k, mine[k], saved[k]) for k in RESUME_CHECKED
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


def resume_training(args, model, optimizer, loss_scaler, model_ema, size, rank, world, plan=None):
    """Load --resume, or the furthest checkpoint in --output_dir; where training continues.

    A training checkpoint must come from the same run (check_same_run) before anything is loaded."""
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
    check_same_run(args, ckpt, resume_path, plan, world)
    point.resumed_from = resume_path
    # The checkpoint holds the model at the size it was trained at last.
    point.size = int(ckpt.get('input_size', size))
    adapt_model(model, point.size, optimizer, model_ema)
    state, _ = _state_from(ckpt, 'model', resume_path)
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


def build_device_transform(args, device, rank=0, world=1, dataset=None):
    """The device half of the fast or gpu data path, else None.

    fast: uint8 -> normalised, random erasing seeded per (seed, epoch, batch, rank), like
    the CPU transforms per sample, so a batch is erased the same way whenever it is loaded
    again (replay buffer refills after a resume).  gpu: decoding, crop, resize, flip,
    RandAugment, normalisation and erasing of an EncodedBatch, every draw made per sample
    by the workers; `dataset` (the training loader's) counts its CPU decodes and names
    files no decoder can read.
    """
    if args.data_pipeline not in ('fast', 'gpu'):
        return None
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    if args.data_pipeline == 'gpu':
        from curriculum.gpudata import GpuDataTransform
        fill = tuple(min(255, round(255 * m)) for m in IMAGENET_DEFAULT_MEAN)  # timm's RandAugment fill
        return GpuDataTransform(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, re_mode=args.remode,
                                channels_last=args.channels_last, fill=fill, dataset=dataset).to(device)
    from curriculum.fastpath import DeviceTransform
    return DeviceTransform(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, re_prob=args.reprob, re_mode=args.remode,
                           re_count=args.recount, channels_last=args.channels_last, seed=args.seed, rank=rank,
                           world=world).to(device)


def refill_replay(replay, stage, epoch, step, steps_in, loader, batch_sampler, device, device_transform, lowfreq):
    """Rebuild a resumed run's replay buffer from the stage's last loaded batches (reloaded).

    Every batch is reproducible (augmentation seeded per sample, device erasing per
    batch), so the buffer equals the interrupted run's, slot for slot.  Draws nothing
    from the global random streams, whose saved state the run continues with.
    """
    stage_epochs = range(stage.start_epoch, stage.start_epoch + stage.epochs)
    appended, ranges = history(stage_epochs, steps_in, epoch, step, stage.buffer_size)
    if not appended:
        return
    count = sum(last - first for _, first, last in ranges)
    print(f'Rebuilding the replay buffer of stage {stage.index}: reloading its last {count} loader batches')

    def batches():
        for e, first, last in ranges:
            batch_sampler.set_epoch(e, skip=first)
            for k, (x, y) in enumerate(itertools.islice(loader, last - first), start=first):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if device_transform is not None:
                    x = device_transform(x, e, k)
                if lowfreq is not None:
                    x = lowfreq(x)
                yield x, y

    # the reloaded batches were counted when first loaded: keep the warnings' counts
    counters = [loader.dataset.bad_count]
    store = getattr(loader.dataset.base, 'store', None)
    if store is not None:
        counters.append(store.misses)
    if hasattr(loader.dataset.base, 'cpu_decoded'):
        counters.append(loader.dataset.base.cpu_decoded)
    before = [c.value for c in counters]
    replay.refill(appended, batches())
    for c, v in zip(counters, before):
        c.value = v


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
    device, rank, world = setup_run(args)
    print(' '.join(sys.argv))
    # before the data is built: a wrong path fails at once, and the model is built at its size
    eval_ckpt = eval_checkpoint(args) if args.eval else None
    train_base, val_base, nb_classes = build_base_datasets(args)
    args.nb_classes = nb_classes
    model, final_size = build_model(args, nb_classes)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f'Model {args.model}: {n_parameters / 1e6:.2f}M parameters, {nb_classes} classes')
    amp_dtype = getattr(torch, args.amp_dtype) if args.use_amp else None
    if args.eval:
        return run_eval_only(args, eval_ckpt, model, val_base, device, amp_dtype, rank, world)

    plan = checked_plan(args, model)
    print(plan_text(args, plan, device, world))
    # before anything is loaded or written: the loader checks the batch against the data
    # and the image store against the folder
    train_loader, batch_sampler = build_train_loader(args, train_base, plan, rank, world)
    if args.finetune:
        load_finetune(args, model)
    model.to(device)
    if args.channels_last:
        # 4-D weights in NHWC; convolutions then run (and return) channels_last whatever
        # the input layout (PyTorch picks NHWC when input or weight is channels_last).
        model.to(memory_format=torch.channels_last)
    model_ema = None
    if args.model_ema:
        # timm's ModelEmaV3 keeps a decayed copy; force_cpu keeps it off the GPU.
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                               device='cpu' if args.model_ema_force_cpu else None)
    optimizer = create_optimizer(args, model)
    loss_scaler = utils.LossScaler(device.type, enabled=args.use_amp and args.amp_dtype == 'float16')
    mixup_fn, criterion = build_loss(args, nb_classes)

    start = resume_training(args, model, optimizer, loss_scaler, model_ema, final_size, rank, world, plan=plan)
    if rank == 0 and args.output_dir:
        # a run killed mid-write leaves temporary files and possibly log lines of epochs it
        # will now redo
        utils.remove_stale_temp_files(args.output_dir)
        utils.truncate_log(os.path.join(args.output_dir, 'log.txt'), start.epoch)

    model_without_ddp = model
    model = wrap_ddp(model_without_ddp, args)
    device_transform = build_device_transform(args, device, rank, world, dataset=train_loader.dataset)
    epoch_loader = train_loader
    if args.data_pipeline == 'gpu' and (args.gpu_prefetch == 'true' or
                                        (args.gpu_prefetch == 'auto' and device.type == 'cuda')):
        from curriculum.gpudata import DevicePrefetcher
        epoch_loader = DevicePrefetcher(train_loader, device_transform, device)
    per_rank = len(batch_sampler.sampler)
    log_writer = utils.TensorboardLogger(args.log_dir) if (args.log_dir and rank == 0) else None

    base = plan.base_size
    hparams = make_hparams(args, plan, per_rank)

    def steps_in(epoch):
        return per_rank // plan.stage_at(epoch).loader_batch

    def save(name, epoch, extra, **kw):
        save_training_checkpoint(args, name, epoch, model_without_ddp, optimizer, loss_scaler, model_ema,
                                 extra, **kw)

    stop_request = utils.StopRequest().install()
    eval_loader, eval_size = None, None
    replay, replay_stage = None, None
    train_step = None
    current_size, max_acc, max_acc_ema = start.size, start.max_acc, start.max_acc_ema
    plan_summary = plan.summary()
    if rank == 0 and args.output_dir and start.epoch < plan.num_epochs:
        write_config(args, plan_summary, world, start)
    if start.epoch >= plan.num_epochs:
        print(f'Nothing left to train: all {plan.num_epochs} data epochs of the plan are done '
              f'(--epochs and --resume_override epochs extend a finished run)')
    else:
        print(f'Start training for {plan.num_epochs} data epochs from epoch {start.epoch}')
    per = 'GPU' if device.type == 'cuda' else 'process'
    start_time = time.time()
    for epoch in range(start.epoch, plan.num_epochs):
        stage = plan.stage_at(epoch)
        if stage.size != current_size:
            if adapt_model(model_without_ddp, stage.size, optimizer, model_ema):
                model = wrap_ddp(model_without_ddp, args)
            current_size = stage.size
            print(f'Stage {stage.index}: model adapted to {stage.size}x{stage.size}')
        lowfreq = FourierCrop(stage.size) if plan.lowfreq == 'fourier' and stage.size < base else None
        if stage.replay_times > 1 and replay_stage != stage.index:
            replay, replay_stage = ReplayBuffer(stage.buffer_size, stage.replay_times), stage.index
            if epoch == start.epoch:
                refill_replay(replay, stage, epoch, start.step, steps_in, train_loader, batch_sampler, device,
                              device_transform, lowfreq)
        elif stage.replay_times == 1:
            replay, replay_stage = None, None
        skip = start.step if epoch == start.epoch else 0
        batch_sampler.set_epoch(epoch, skip=skip)
        stage_desc = f'stage {stage.index}, B={stage.size}, m={stage.magnitude}'
        print(f'Epoch {epoch}: {stage_desc}, batch {stage.batch_size} x {stage.update_freq} per {per}'
              f'{f", replay {stage.replay_times}x (buffer {stage.buffer_size})" if stage.replay_times > 1 else ""}, '
              f'progress {plan.progress(epoch):.2f}/{plan.total_progress:.2f} {plan.progress_unit}'
              f'{whole_run_eta(plan, start.epoch, epoch, time.time() - start_time)}')
        # the plan goes with every checkpoint: a resume compares it (check_same_run)
        extra = {'input_size': current_size, 'max_accuracy': max_acc, 'max_accuracy_ema': max_acc_ema,
                 'plan': plan_summary}

        def on_update(done, meters, stop, epoch=epoch, extra=extra):
            periodic = args.save_ckpt_steps > 0 and done % args.save_ckpt_steps == 0 and done < steps_in(epoch)
            if args.output_dir and (stop or periodic):
                check_finite(model_without_ddp, model_ema, f'at epoch {epoch}, batch {done}')
                save(utils.RECOVERY_NAME, epoch, extra, step=done, meters=meters.state_dict())
            if stop:
                saved = f'; recovery checkpoint {os.path.join(args.output_dir, utils.RECOVERY_NAME)}' \
                    if args.output_dir else ' (no --output_dir: nothing saved)'
                raise utils.TrainingInterrupted(f'stopped by {stop_request.name or "a signal"} at epoch {epoch}, '
                                                f'batch {done}{saved}; run the same command again to continue',
                                                stop_request.signum or signal.SIGTERM)

        epoch_start = time.time()
        train_step = stage_step(args, train_step, model, stage, stage_desc, criterion, optimizer, loss_scaler,
                                device, model_ema, mixup_fn, amp_dtype, lowfreq, replay, device_transform)
        train_stats = train_one_epoch(
            train_step, epoch_loader, epoch,
            hparams_at=lambda frac, e=epoch: hparams(plan.progress(e, frac)), log_writer=log_writer,
            global_step=sum(steps_in(e) for e in range(epoch)), print_freq=args.print_freq,
            header=f'Epoch: [{epoch}/{plan.num_epochs}] [{stage_desc}]',
            start_step=skip, meter_state=start.meters if skip else None,
            stop_requested=stop_request.requested, on_update=on_update,
            warm_shape=warm_shape(args, train_step, stage, nb_classes))
        train_time = time.time() - epoch_start
        warn_data_problems(train_loader.dataset)
        check_finite(model_without_ddp, model_ema, f'after epoch {epoch} ({stage_desc})')

        # Evaluate and log before the epoch's checkpoint: a kill in between repeats the epoch
        # from the previous checkpoint, and the resumed run rewrites this log line.
        test_stats, ema_stats = {}, {}
        if not args.disable_eval:
            if eval_size != stage.size:
                eval_loader, eval_size = build_eval_loader(args, val_base, stage.size, rank, world), stage.size
            test_stats, ema_stats = evaluate_stage(args, eval_loader, model_without_ddp, model_ema, device,
                                                   amp_dtype, world)
            # a NaN evaluation is divergence: never a best, never written as a checkpoint
            check_finite(None, None, f'in the evaluation after epoch {epoch} ({stage_desc})',
                         losses={'evaluation loss': test_stats.get('loss'),
                                 'EMA evaluation loss': ema_stats.get('loss')})
        # Best checkpoints only at the base size: accuracies at lower B are not comparable,
        # and those models would not load into the standard-size architecture.
        improved = stage.size == base and test_stats.get('acc1', -1) > max_acc
        improved_ema = stage.size == base and ema_stats.get('acc1', -1) > max_acc_ema
        max_acc = test_stats['acc1'] if improved else max_acc
        max_acc_ema = ema_stats['acc1'] if improved_ema else max_acc_ema
        if test_stats:
            best = f' (max at {base}: {max_acc:.2f}%)' if max_acc > 0 else ''
            print(f'Accuracy of the network on {test_stats["num_images"]} test images at {stage.size}: '
                  f'{test_stats["acc1"]:.2f}%{best}')

        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                     **{f'test_{k}': v for k, v in test_stats.items()},
                     **{f'test_ema_{k}': v for k, v in ema_stats.items()},
                     'epoch': epoch, 'n_parameters': n_parameters, **stage_record(plan, epoch),
                     # the training pass alone (no evaluation, no checkpoint); of a resumed
                     # epoch, only the part after the resume
                     'train_time_s': round(train_time, 3)}
        if rank == 0:
            if args.output_dir:
                utils.save_json_line(os.path.join(args.output_dir, 'log.txt'), log_stats)
            if log_writer is not None:
                log_writer.add_scalars(epoch, 'epoch', **{k: v for k, v in log_stats.items() if v is not None})
                log_writer.flush()

        extra.update(max_accuracy=max_acc, max_accuracy_ema=max_acc_ema)
        if args.output_dir and args.save_ckpt:
            if (epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == plan.num_epochs:
                save(f'checkpoint-{epoch}.pth', epoch, extra)
                if rank == 0:
                    # the epoch checkpoint supersedes the mid-epoch one
                    utils.rotate_checkpoints(args.output_dir, args.save_ckpt_num)
                    recovery = os.path.join(args.output_dir, utils.RECOVERY_NAME)
                    if os.path.exists(recovery):
                        os.remove(recovery)
            for name, better in (('checkpoint-best.pth', improved), ('checkpoint-best-ema.pth', improved_ema)):
                if better:
                    save(name, epoch, extra)

    if current_size != base and not args.disable_eval and start.epoch < plan.num_epochs:
        # A custom plan may end below the base size; the final model is judged at the base size.
        adapt_model(model_without_ddp, base, optimizer, model_ema)
        final = evaluate(build_eval_loader(args, val_base, base, rank, world), model_without_ddp, device,
                         amp_dtype, args.dist_eval and world > 1, header=f'Final test at {base}:')
        if rank == 0 and args.output_dir:
            utils.save_json_line(os.path.join(args.output_dir, 'log.txt'),
                                 {'final_test_at_base': {**final, 'input_size': base}})
    print(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    return model_without_ddp


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


def whole_run_eta(plan, first_epoch, epoch, elapsed):
    """', ETA <h:mm:ss> for the whole run' at the start of `epoch`, or '' before anything is measured.

    The speed is the compute (equivalent epochs at the base size) done since this process
    started at `first_epoch`, per second of wall time (evaluation and checkpoints included);
    the rest of the run is the compute still to do at that speed.  Low-B epochs run below
    their compute share on real hardware, so the estimate sharpens as the run goes on.
    """
    base = plan.base_size

    def compute_before(e):
        return sum(plan.stage_at(i).epoch_compute(base) for i in range(min(e, plan.num_epochs)))

    done = compute_before(epoch) - compute_before(first_epoch)
    if epoch <= first_epoch or done <= 0 or elapsed <= 0:
        return ''
    left = (plan.total_compute - compute_before(epoch)) * elapsed / done
    return f', whole-run ETA {datetime.timedelta(seconds=int(round(left)))}'


_NOTES_SHOWN = set()


def stage_step(args, previous, model, stage, stage_desc, criterion, optimizer, loss_scaler, device, model_ema,
               mixup_fn, amp_dtype, lowfreq, replay, device_transform):
    """The stage's engine.TrainStep: kept while the model, B and the micro-batch stay (a captured
    CUDA graph is reused), else built anew; the per-stage host-side pieces are swapped in."""
    key = (id(model), stage.size, stage.batch_size, stage.update_freq)
    if previous is None or previous.key != key:
        previous = TrainStep(model, criterion, optimizer, loss_scaler, device, update_freq=stage.update_freq,
                             max_norm=args.clip_grad, model_ema=model_ema, mixup_fn=mixup_fn, amp_dtype=amp_dtype,
                             device_transform=device_transform, cuda_graph=getattr(args, 'cuda_graph', False),
                             weight_decay_varies=args.weight_decay_end not in (None, args.weight_decay),
                             compiled=getattr(args, 'compile', False))
        previous.key, previous.warmed = key, False
        if previous.graph_note and previous.graph_note not in _NOTES_SHOWN:
            _NOTES_SHOWN.add(previous.graph_note)  # once per run, not at every stage
            print(previous.graph_note, flush=True)
    previous.lowfreq, previous.replay, previous.stage_desc = lowfreq, replay, stage_desc
    return previous


def warm_shape(args, step, stage, nb_classes):
    """The stage's input for TrainStep.warm_up at its first epoch on a GPU (cuDNN autotuning of
    the new shapes while the loader starts), else None.  With --cuda_graph always: warm_up then
    also tries a capture before the stage's first batch (TrainStep.probe_capture); without it
    not when cudnn.benchmark is off (nothing to tune)."""
    if step.device.type != 'cuda' or step.warmed or not (step.cuda_graph or torch.backends.cudnn.benchmark):
        return None
    step.warmed = True
    return (stage.batch_size, 3, stage.size, stage.size), nb_classes, args.channels_last


def warn_data_problems(dataset):
    """After each epoch: images skipped (--skip_bad_images) and store copies not usable, so far."""
    if dataset.bad_count.value:
        print(f'WARNING: {dataset.bad_count.value} unreadable training images skipped so far (--skip_bad_images)')
    store = getattr(dataset.base, 'store', None)
    if store is not None and store.misses.value:
        print(f'WARNING: {store.misses.value} reduced copies missing, unreadable or stale in --image_store '
              f'{store.root} so far; the originals were decoded instead: rebuild the store with '
              f'scripts/build_image_store.py')
    cpu_decoded = getattr(dataset.base, 'cpu_decoded', None)
    if cpu_decoded is not None and cpu_decoded.value:
        print(f'WARNING: {cpu_decoded.value} training images decoded on the CPU so far (not JPEG, CMYK, '
              f'grayscale, cut short, or rejected by the device decoder; --data_pipeline gpu)')


def stage_record(plan, epoch):
    """The curriculum's fields of an epoch's log.txt line."""
    stage = plan.stage_at(epoch)
    return {'stage': stage.index, 'input_size': stage.size, 'magnitude': stage.magnitude,
            'batch_size': stage.batch_size, 'update_freq': stage.update_freq, 'replay_times': stage.replay_times,
            'progress': plan.progress(epoch + 1), 'progress_frac': plan.progress(epoch + 1) / plan.total_progress}


def evaluate_stage(args, eval_loader, model, model_ema, device, amp_dtype, world):
    """(model stats, EMA stats or {}) on the current stage's evaluation loader."""
    reduce = args.dist_eval and world > 1
    test_stats = evaluate(eval_loader, model, device, amp_dtype, reduce)
    ema_stats = {}
    if model_ema is not None and args.model_ema_eval:
        # --model_ema_force_cpu keeps the average (and so its evaluation) on the CPU
        ema_device = next(model_ema.module.parameters()).device
        ema_stats = evaluate(eval_loader, model_ema.module, ema_device, amp_dtype, reduce, header='Test EMA:')
    if world > 1 and not reduce:
        # Every rank evaluated everything, and on GPUs their numbers can differ in the last
        # image (cuDNN picks its kernels per process).  The decisions taken from them must not:
        # a best checkpoint is written with collectives (its gathers), and a rank deciding
        # otherwise would hang in them (or meet another collective).  Rank 0's numbers count.
        box = [(test_stats, ema_stats)]
        torch.distributed.broadcast_object_list(box, src=0)
        test_stats, ema_stats = box[0]
    return test_stats, ema_stats


def wrap_ddp(model, args):
    """The training model: DDP when distributed, then torch.compile when --compile true.

    dynamic=False keeps every graph specialised to one input shape: a stage has one batch
    shape (full batches only), so dynamo compiles once when a stage's size first arrives
    and never inside a stage; without it the second size would switch to a dynamic-shape
    graph.  Evaluation runs the uncompiled module (its last batch is ragged).
    """
    if args.distributed:
        kw = {'device_ids': [args.gpu]} if str(args.device).startswith('cuda') else {}
        model = torch.nn.parallel.DistributedDataParallel(model, **kw)
    if getattr(args, 'compile', False):
        model = torch.compile(model, dynamic=False)
    return model


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


def make_hparams(args, plan, per_rank_images=None):
    """progress -> (lr, weight decay): cosine with linear warmup, as pure functions of progress."""
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    warmup = plan.warmup
    if args.warmup_steps > 0 and per_rank_images:
        steps0 = max(per_rank_images // plan.stages[0].loader_batch, 1)
        warmup = plan.progress(0) + plan.epoch_weight(0) * args.warmup_steps / steps0

    def hparams(progress):
        lr = utils.cosine_schedule(progress, plan.total_progress, args.lr, args.min_lr, warmup)
        wd = utils.cosine_schedule(progress, plan.total_progress, args.weight_decay, wd_end)
        return lr, wd
    return hparams


def eval_checkpoint(args):
    """--resume for --eval; --input_size becomes the checkpoint's recorded size unless given.

    Our checkpoints record the size the model was last trained at ('input_size'); a model
    trained at 64 and evaluated at the default 224 would score far lower without any sign why.
    """
    if not args.resume:
        raise UserError('--eval true needs --resume FILE (the checkpoint to evaluate)')
    ckpt = utils.load_checkpoint_file(args.resume)
    recorded = ckpt.get('input_size')
    recorded = int(recorded) if isinstance(recorded, (int, float)) and recorded > 0 else None
    if recorded is None or recorded == args.input_size:
        return ckpt
    if input_size_given(args):
        print(f'NOTE: {args.resume} was trained at {recorded}x{recorded}; evaluating at --input_size '
              f'{args.input_size} as asked')
    else:
        print(f'Evaluating at {recorded}x{recorded}, the size {args.resume} was trained at '
              f'(not the default {args.input_size}; pass --input_size to choose)')
        args.input_size = recorded
    return ckpt


def run_eval_only(args, ckpt, model, val_base, device, amp_dtype, rank, world):
    key = 'model_ema' if (args.model_ema_eval and 'model_ema' in ckpt) else args.model_key
    state, used = _state_from(ckpt, key, args.resume)
    if 'input_size' in ckpt and int(ckpt['input_size']) != args.input_size:
        adapt_model(model, int(ckpt['input_size']))
    report = load_weights(model, state, args.resume)
    if report.missing or report.unexpected:
        print(f'Note: missing {report.missing or "none"}, unexpected {report.unexpected or "none"}')
    adapt_model(model, args.input_size)
    model.to(device)
    loader = build_eval_loader(args, val_base, args.input_size, rank, world)
    stats = evaluate(loader, model, device, amp_dtype, reduce=args.dist_eval and world > 1,
                     size=args.input_size)
    print(f'Accuracy of the network ({used or "state_dict"}) on {stats["num_images"]} test images at '
          f'{args.input_size}x{args.input_size}: {stats["acc1"]:.1f}%')
    return stats


def cli(argv=None):
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt, handled below
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except datasets.BadImageError as e:
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
