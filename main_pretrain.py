"""MAE self-supervised pre-training (He et al. 2022), optionally with the EfficientTrain++ curriculum.

    python main_pretrain.py --model mae_vit_tiny_patch16 --data_set SYNTH --synth_classes 4 \
        --synth_per_class 16 --synth_image_size 64 --base_input_size 64 --curriculum etpp --target hog \
        --epochs 2 --batch_size 8 --num_workers 0 --device cpu --output_dir OUT
    torchrun --nproc_per_node=8 main_pretrain.py --model mae_vit_base_patch16 --curriculum etpp \
        --target hog --epochs 400 --batch_size 128 --global_batch_size 4096 --data_path /imagenet \
        --output_dir out/mae_b_etpp

Wiring only, as main.py: the plan (curriculum/, with the MAE model's own compute model),
the loaders (pipelines/, MAE's augmentation: random resized crop from 20-100% of the image
and a horizontal flip), the step (engine.MAEStep: the model's masked reconstruction loss,
masks seeded per batch), and runner/'s set-up, resume, checkpoints, stage switch and epoch
loop (runner.loop.fit, without evaluation).  Checkpoints are checkpoint-N.pth as main.py's;
main.py --finetune CHECKPOINT --model vit_base_patch16_224 --global_pool avg fine-tunes the
encoder (TRAINING.md, "Self-supervised pre-training (MAE)").
"""
import dataclasses
import functools
import sys

from runner.entry import guard_startup, run_cli, run_guarded

guard_startup(__name__)  # before torch loads: a Ctrl-C while starting is one line and exit 130

from engine import MAEStep
from models import create_model
from models.mae import (MAE_CONFIGS, TARGETS, check_mae_size, check_mae_target, check_mask_ratio,
                        is_mae_state_dict)
from pipelines.datasets import build_base_datasets, build_device_transform, build_train_loader, device_loader
from runner.args import (BOOL, ArgumentParser, add_curriculum_args, add_data_args, add_dist_args, add_optim_args,
                         add_perf_args, add_run_args, add_schedule_args, check_shared_args)
from runner.checkpoint import Checkpointer
from runner.loop import fit
from runner.resume import RESUME_CHECKED, clean_output_dir, resume_training
from runner.setup import amp_dtype_of, setup_run, training_parts
from runner.stage import StageSwitch, StepParts, checked_plan, plan_text
from utils import UserError

# MAE's augmentation (random resized crop from this share of the image, horizontal flip)
MAE_CROP_SCALE = (0.2, 1.0)
# EfficientTrain++ Table 15 compares its 400 equivalent epochs with MAE's 1600-epoch pre-training
MAE_BASELINE_EPOCHS = 1600


def get_args_parser(add_help=True, prog=None):
    """main_pretrain.py's parser: MAE's model flags, then runner.args' groups (with MAE's defaults)."""
    p = ArgumentParser(prog=prog, usage='%(prog)s [--flag value ...]', add_help=add_help,
                       description='MAE pre-training, optionally with the EfficientTrain++ curriculum. Single '
                                   'process: python main_pretrain.py ...; several: torchrun --nproc_per_node=N '
                                   'main_pretrain.py ...')
    mae = p.add_argument_group('model (masked autoencoder, models/mae.py)')
    mae.add_argument('--model', default='mae_vit_base_patch16', choices=sorted(MAE_CONFIGS),
                     help='the MAE model (its encoder fine-tunes into the timm ViT TRAINING.md names)')
    mae.add_argument('--input_size', default=224, type=int,
                     help='image size without a curriculum (a multiple of the patch size)')
    mae.add_argument('--mask_ratio', default=0.75, type=float, help='fraction of the patches hidden from the encoder')
    mae.add_argument('--norm_pix_loss', default=True, **BOOL,
                     help='pixel target normalised per patch by its mean and variance (no effect on --target hog)')
    mae.add_argument('--target', default='pixel', choices=list(TARGETS),
                     help='what the decoder reconstructs: pixel (MAE) or hog (MaskFeat\'s HOG features, patch '
                          'sizes that are multiples of 8)')
    optim = add_optim_args(p)
    optim.add_argument('--blr', default=1.5e-4, type=float,
                       help='base learning rate per 256 images: the peak lr is blr x global batch / 256 (MAE\'s '
                            'rule) unless --lr is given')
    add_schedule_args(p)
    add_curriculum_args(p, curricula=('none', 'etpp'))
    aug = p.add_argument_group('augmentation (MAE: random resized crop and horizontal flip, nothing else)')
    aug.add_argument('--crop_scale', default=list(MAE_CROP_SCALE), type=float, nargs=2, metavar=('MIN', 'MAX'),
                     help='area range of the random resized crop, as fractions of the image')
    aug.add_argument('--train_interpolation', default='bicubic', type=str,
                     help='interpolation of the random resized crop')
    for add in (add_data_args, add_run_args, add_dist_args, add_perf_args):
        add(p)
    # MAE's recipe (PRETRAIN.md): AdamW betas (0.9, 0.95), weight decay 0.05, cosine to 0 after
    # 40 warm-up epochs, 64 images per GPU; the lr from --blr (train() sets --lr)
    p.set_defaults(opt_betas=[0.9, 0.95], batch_size=64, epochs=400, warmup_epochs=40, lr=None, min_lr=0.0,
                   # what the shared code reads of the groups this entry point leaves out: no
                   # RandAugment, colour jitter, random erasing, mixup or classifier
                   aa='none', color_jitter=0.0, reprob=0.0, remode='const', recount=1, smoothing=0.0, mixup=0.0,
                   cutmix=0.0, cutmix_minmax=None, crop_pct=None, nb_classes=None)
    return p


def _checked(parser):
    """The flags a resume must keep (runner.resume.check_same_run): main.py's that this parser has,
    and MAE's own."""
    dests = {a.dest for a in parser._actions}  # argparse has no public list of a parser's options
    own = ('mask_ratio', 'norm_pix_loss', 'target', 'blr', 'crop_scale')
    return tuple(k for k in RESUME_CHECKED if k in dests) + own


CHECKED = _checked(get_args_parser(add_help=False))


def final_size(args):
    """The size the run ends at: --base_input_size with a curriculum, else --input_size."""
    if args.curriculum != 'none' or args.curriculum_file:
        return args.base_input_size, '--base_input_size'
    return args.input_size, '--input_size'


def check_args(args):
    """main_pretrain.py's flags that cannot work, refused before anything is loaded or written."""
    if args.epochs < 1:
        raise UserError(f'--epochs must be >= 1, got {args.epochs}')
    if args.eval:
        raise UserError('--eval: pre-training evaluates nothing; fine-tune the checkpoint with main.py --finetune '
                        'and evaluate that (EVAL.md)')
    check_shared_args(args, CHECKED)
    patch = MAE_CONFIGS[args.model].patch_size
    check_mask_ratio(args.mask_ratio)
    check_mae_target(args.target, patch, args.model)
    size, flag = final_size(args)
    check_mae_size(size, patch, flag)
    low, high = args.crop_scale
    if not 0 < low <= high <= 1:
        raise UserError(f'--crop_scale {low:g} {high:g}: the area range must satisfy 0 < MIN <= MAX <= 1 '
                        f'(MAE: {MAE_CROP_SCALE[0]:g} {MAE_CROP_SCALE[1]:g})')
    if args.lr is None and args.blr <= 0:
        raise UserError(f'--blr must be > 0, got {args.blr:g}')


def compared_baseline_epochs(args):
    """The baseline the plan table compares with: --baseline_epochs, or MAE's 1600 epochs for the
    paper's setting (EfficientTrain++ at 224)."""
    if args.baseline_epochs:
        return args.baseline_epochs
    paper = args.curriculum == 'etpp' and not args.curriculum_file and args.base_input_size == 224
    return MAE_BASELINE_EPOCHS if paper else None


def accept_checkpoint(ckpt, path):
    """runner.resume_training's check: only an MAE pre-training checkpoint continues a pre-training run."""
    state = ckpt.get('model')
    if not (isinstance(state, dict) and is_mae_state_dict(state)):
        raise UserError(f'{path} is not an MAE pre-training checkpoint (no mask token or decoder: a supervised '
                        f'one?): pre-training continues only main_pretrain.py checkpoints; pass one of those to '
                        f'--resume, or pre-train from scratch in a new --output_dir')


def without_magnitudes(plan):
    """The plan with no RandAugment magnitude (a --curriculum_file may give some): MAE uses none."""
    if all(s.magnitude is None for s in plan.stages):
        return plan
    plan.notes.append('the RandAugment magnitudes of --curriculum_file are ignored: MAE pre-training uses none')
    return dataclasses.replace(plan, stages=[dataclasses.replace(s, magnitude=None) for s in plan.stages])


def main(args):
    """Pre-train in this process; the caller's signal handlers are put back afterwards."""
    return run_guarded(train, args)


def train(args):
    device, rank, world = setup_run(args, check_args)
    print(' '.join(sys.argv))
    if args.lr is None:
        args.lr = args.blr * args.batch_size * args.update_freq * world / 256
        print(f'lr {args.lr:.4g} = --blr {args.blr:g} x global batch {args.batch_size * args.update_freq * world} '
              f'/ 256')
    train_base, _, nb_classes = build_base_datasets(args, with_val=False)
    model = create_model(args.model, mask_ratio=args.mask_ratio, norm_pix_loss=args.norm_pix_loss,
                         target=args.target)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f'Model {args.model}: {n_parameters / 1e6:.2f}M parameters, target {args.target}, mask ratio '
          f'{args.mask_ratio:g}')
    plan = without_magnitudes(checked_plan(args, model, cost=model.train_flops))
    print(plan_text(args, plan, device, world, compared_baseline_epochs))
    train_loader, batch_sampler = build_train_loader(args, train_base, plan, rank, world)
    model_ema, optimizer, loss_scaler = training_parts(args, model, device)
    start = resume_training(args, model, optimizer, loss_scaler, model_ema, final_size(args)[0], rank, world,
                            plan=plan, checked=CHECKED, accept=accept_checkpoint)
    clean_output_dir(args, start, rank)

    device_transform = build_device_transform(args, device, rank, world, dataset=train_loader.dataset)
    parts = StepParts(None, optimizer, loss_scaler, device, model_ema, None, amp_dtype_of(args), device_transform)
    switch = StageSwitch(args, plan, model, start.size, train_loader, batch_sampler, parts)
    switch.step_class = functools.partial(MAEStep, seed=args.seed, rank=rank, world=world)
    checkpoints = Checkpointer(args, model, optimizer, loss_scaler, model_ema, plan.summary())
    fit(args, plan, start, switch, checkpoints, device_loader(args, train_loader, device_transform, device),
        n_parameters, nb_classes)
    return model


def cli(argv=None):
    run_cli(get_args_parser, main, argv)


if __name__ == '__main__':
    cli()
