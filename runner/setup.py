"""A run's set-up: the device, distributed init, seeding and determinism, the training parts
of a model (device, EMA, optimizer, loss scaler) and its DDP / torch.compile wrapper.
"""
import os

import torch
from timm.utils import ModelEmaV3

import utils
from optim_factory import create_optimizer
from utils import UserError


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


def setup_run(args, check_args):
    """Distributed init, the entry point's flag checks (`check_args(args)`), --global_batch_size,
    seeding and determinism; returns (device, rank, world)."""
    if getattr(args, 'plan_only', False):
        # an entry point with a plan-only mode (main.py) leaves before setting anything up
        raise UserError('--plan_only true: this entry point has no plan-only mode; drop it')
    check_device(args.device)
    utils.init_distributed_mode(args)
    check_args(args)
    device = torch.device(args.device)
    rank, world = utils.get_rank(), utils.get_world_size()
    planned = getattr(args, 'plan_world_size', None)
    if planned is not None and planned != world:
        raise UserError(f'--world_size {planned} plans for {planned} processes with --plan_only true, but this run '
                        f'has {world} (torchrun --nproc_per_node sets it): drop --world_size')
    apply_global_batch(args, world)
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


def apply_global_batch(args, world):
    """--global_batch_size: --update_freq set from it, --batch_size and the `world` processes."""
    if not args.global_batch_size:
        return
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


def training_parts(args, model, device):
    """(EMA or None, optimizer, loss scaler) of `model`, which goes to `device` (channels_last
    with --channels_last) first."""
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
    return model_ema, optimizer, loss_scaler


def amp_dtype_of(args):
    """The autocast dtype of --use_amp/--amp_dtype, None without mixed precision."""
    return getattr(torch, args.amp_dtype) if args.use_amp else None
