"""Argument groups any entry point can pick, the parser they go into, and the checks of the shared groups.

An entry point builds its parser from the groups it needs, in the order --help shows them:

    p = ArgumentParser(prog=..., description=...)
    for add in (add_model_args, add_optim_args, ..., add_data_args, add_run_args, add_dist_args, add_perf_args):
        add(p)

Each add_*_args(parser) adds one argument group and returns it, so an entry point can add its own
flags to it. A new flag goes into its group: `<group>.add_argument('--x', default=..., help='...')`,
with **BOOL for a true/false flag; --help appends the default unless the help says it.
tests/test_cli.py checks every action of main.py's parser (help text, default shown, a group, bool metavar).
"""
import argparse
import os

import torch

from runner.resume import RESUME_CHECKED, parse_overrides
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


def add_model_args(parser):
    """The model: its name and size, regularisation, initial weights (--finetune)."""
    model = parser.add_argument_group('model')
    model.add_argument('--model', default='convnext_tiny', type=str,
                       help='a recipe name (scripts/recipes.py list) or any timm model name')
    model.add_argument('--input_size', default=INPUT_SIZE_DEFAULT, type=int,
                       help='image size for training without a curriculum, and for --eval (default: 224; '
                            "with --eval, the size the --resume checkpoint records, when it records one)")
    model.add_argument('--drop_path', default=0.0, type=float, help='stochastic depth rate')
    model.add_argument('--layer_scale_init_value', default=None, type=float,
                       help='layer-scale init of ConvNeXt/ViT-style models (default: the model\'s own)')
    model.add_argument('--nb_classes', default=None, type=int, help='number of classes (default: from the data)')
    model.add_argument('--global_pool', default=None, type=str,
                       help="the model's pooling before the classifier, passed to timm (default: the model's own); "
                            "ViT: avg pools the patch tokens with the final norm after the pool (fc_norm), as MAE "
                            "fine-tunes its encoders")
    model.add_argument('--finetune', default='', type=str,
                       help='initialise from these weights (a released or own checkpoint); a classifier of '
                            'another shape is dropped and trained anew')
    model.add_argument('--head_init_scale', default=1.0, type=float,
                       help='with --finetune: scale the classifier weights by this')
    model.add_argument('--model_key', default='model|module', type=str,
                       help='the checkpoint entries that may hold the weights, tried in order ("|"-separated)')
    model.add_argument('--model_prefix', default='', type=str,
                       help='with --finetune: keep only weights whose names start with this, prefix removed')
    return model


def add_optim_args(parser):
    """Batch, accumulation, optimizer and its settings, clipping, layer decay."""
    optim = parser.add_argument_group('optimisation')
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
                       help="optimizer betas (unset: the optimizer's own)")
    optim.add_argument('--momentum', default=0.9, type=float, help='SGD momentum')
    optim.add_argument('--clip_grad', default=None, type=float, help='clip the gradient norm to this (default: off)')
    optim.add_argument('--layer_decay', default=1.0, type=float,
                       help='layer-wise learning-rate decay (1.0: off), as in fine-tuning recipes')
    return optim


def add_schedule_args(parser):
    """Epochs, learning rate and weight decay schedules, the EMA."""
    schedule = parser.add_argument_group('schedule (learning rate, weight decay, EMA)')
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
    return schedule


_CURRICULA = {'none': 'plain training at --input_size', 'et': 'EfficientTrain (ICCV 2023)',
              'etpp': 'EfficientTrain++ (TPAMI 2024)'}


def add_curriculum_args(parser, curricula=('none', 'et', 'etpp')):
    """The curriculum: preset or file, base size, low-pass, replay, per-stage batches; `curricula`:
    the --curriculum choices the entry point has (MAE pre-training: none and etpp)."""
    curriculum = parser.add_argument_group('curriculum (EfficientTrain / EfficientTrain++)')
    curriculum.add_argument('--curriculum', default='none', choices=list(curricula),
                            help='; '.join(f'{c}: {_CURRICULA[c]}' for c in curricula))
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
                                 '(default: unset; etpp compares with the paper\'s baseline, 300 epochs (MAE '
                                 'pre-training: 1600), when --epochs is a published budget)')
    curriculum.add_argument('--stage_batch', default='published', choices=['published', 'auto', 'large'],
                            help="batches of stages below the base size: published: the recipe's per-GPU "
                                 "micro-batch (the base micro-batch x the published ratio), the global batch "
                                 "constant; auto: the micro-batch grown with (base/B)^2 (about the memory of the base "
                                 "stage), up to --max_micro_batch, with update_freq shrunk so that the global batch "
                                 "and the recipe stay as published; large: for many GPUs, the global batch grows "
                                 "with (base/B)^2 (a power of two, at most --max_global_batch_factor, held by what the "
                                 "micro-batch may hold) and the stage's lr linearly with it, the same images per stage "
                                 "in fewer optimizer steps (this project's rule: the paper's early large batch rule "
                                 "is not published; TRAINING.md)")
    curriculum.add_argument('--max_micro_batch', default=0, type=int,
                            help='with --stage_batch auto or large: largest per-GPU micro-batch (0: no cap beyond '
                                 'about the base stage\'s memory; update_freq still bounds the growth)')
    curriculum.add_argument('--max_global_batch_factor', default=4, type=int,
                            help='with --stage_batch large: the most a stage\'s global batch (and lr) may grow over '
                                 'the published one, >= 1 (a power of two is used: the largest not above it)')
    return curriculum


def add_augment_args(parser):
    """RandAugment, label smoothing, random erasing, mixup/cutmix, evaluation crop."""
    augment = parser.add_argument_group('augmentation and regularisation')
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
    return augment


def add_data_args(parser):
    """Dataset, paths, the data pipeline and image store, loader workers, bad images."""
    data = parser.add_argument_group('data')
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
                           'and random-erased on the device (pipelines/fastpath.py); gpu: workers only read '
                           'the JPEG bytes and draw the augmentation, the device decodes, crops, augments and '
                           'erases (pipelines/gpudata.py; image folders, RandAugment policies)')
    data.add_argument('--image_store', default=None,
                      help='with --data_pipeline fast or gpu: a store of reduced-size copies of the training images, '
                           'built by scripts/build_image_store.py, read instead of the originals when the crop '
                           'allows (pipelines/store.py)')
    data.add_argument('--num_workers', default=min(10, os.cpu_count() or 1), type=int,
                      help='data loader processes per training process (default: min(10, CPU count))')
    data.add_argument('--pin_mem', default=True, **BOOL, help='page-locked loader batches (CUDA only)')
    data.add_argument('--skip_bad_images', default=False, **BOOL,
                      help='skip and count unreadable training images instead of failing on the first')
    return data


def add_run_args(parser):
    """Output, device, seed, resume, evaluation only, checkpoint frequency, determinism."""
    run = parser.add_argument_group('run and checkpoints')
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
    run.add_argument('--plan_only', default=False, **BOOL,
                     help='print the training plan for these flags (on --world_size processes) and its theoretical '
                          'speedup, then exit: no data, device or output directory is touched')
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
    return run


def add_dist_args(parser):
    """Distributed evaluation and the collective timeout."""
    dist = parser.add_argument_group('distributed', 'torchrun (or srun with SLURM_NTASKS > 1) starts the processes '
                                        'and sets RANK, WORLD_SIZE and LOCAL_RANK; --batch_size is per process')
    dist.add_argument('--dist_eval', default=True, **BOOL,
                      help='split evaluation among the processes (else every process evaluates everything)')
    dist.add_argument('--dist_timeout', default=30.0, type=float,
                      help='minutes a process waits in a collective for the others (a peer gone on another node, '
                           'or a hang) before it fails and the launcher ends the run; allow for rank 0 writing a '
                           'checkpoint alone')
    dist.add_argument('--world_size', dest='plan_world_size', default=None, type=int,
                      help='with --plan_only true: plan for this many processes (GPUs) from one machine (default: '
                           'unset, the launched process count); a run takes its count from torchrun and refuses '
                           'another')
    return dist


def add_perf_args(parser):
    """Mixed precision, memory layout, compilation, cuDNN, CUDA graphs, prefetching."""
    perf = parser.add_argument_group('performance')
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
    perf.add_argument('--gpu_augment_at', default='base', choices=['base', 'stage'],
                      help='with --data_pipeline gpu at Lanczos stages (B below the base size, the EfficientTrain++ '
                           'default): base: crop and RandAugment at the base size, then the Lanczos low-pass to B, '
                           'on the device (the published order); stage: crop to B and RandAugment at B (less work, '
                           'not the published pixels)')
    perf.add_argument('--gpu_prefetch', default='auto', choices=['auto', 'true', 'false'],
                      help='with --data_pipeline gpu: finish the next batch on the device (decode, augment; its '
                           'own CUDA stream and thread) while the current one trains; auto: on CUDA devices')
    return perf


def check_shared_args(args, checked=RESUME_CHECKED):
    """Checks of the groups entry points share (optim, schedule, curriculum, data, run): batch,
    EMA evaluation, curriculum file; `checked` as for check_run_args."""
    if args.batch_size < 1 or args.update_freq < 1:
        raise UserError('--batch_size and --update_freq must be >= 1')
    if args.model_ema_eval and not args.model_ema:
        raise UserError('--model_ema_eval true needs --model_ema true')
    if args.curriculum_file and args.curriculum != 'none':
        raise UserError('--curriculum_file replaces --curriculum: drop --curriculum')
    check_data_args(args)
    check_run_args(args, checked)


def check_data_args(args):
    """The data group's combinations that cannot work, refused before anything is loaded."""
    if args.image_store and not args.eval and (args.data_pipeline not in ('fast', 'gpu')
                                               or args.data_set not in ('IMNET', 'image_folder')):
        raise UserError('--image_store is read by the fast and gpu data paths from an image folder: add '
                        '--data_pipeline fast (or gpu) and use --data_set IMNET or image_folder, or drop --image_store')
    if args.data_pipeline == 'gpu' and not args.eval:
        check_gpu_pipeline_args(args)


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


def check_run_args(args, checked=RESUME_CHECKED):
    """The run group's values checked, and --log_dir resolved (<output_dir>/tensorboard, or None);
    `checked`: the flags --resume_override may name (runner.resume.check_same_run's list)."""
    if args.save_ckpt_steps < 0:
        raise UserError('--save_ckpt_steps must be >= 0 (0: no mid-epoch recovery checkpoints)')
    if getattr(args, 'plan_only', False) and args.eval:
        raise UserError('--plan_only true prints a training plan and --eval true evaluates a checkpoint: drop one')
    planned = getattr(args, 'plan_world_size', None)
    if planned is not None and planned < 1:
        raise UserError(f'--world_size must be >= 1, got {planned}')
    parse_overrides(getattr(args, 'resume_override', None), checked)
    if args.log_dir is None and args.output_dir:
        args.log_dir = os.path.join(args.output_dir, 'tensorboard')
    if args.log_dir in ('none', ''):
        args.log_dir = None
