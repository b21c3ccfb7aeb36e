"""Evaluation in a run: --eval of a checkpoint at its recorded size, the evaluation after each
epoch at the stage's B (the EMA's too; checked finite; the best accuracies at the base size),
and the final evaluation at the base size when a plan ends below it.
"""
import os

import torch

import utils
from curriculum.adapt import adapt_model
from engine import evaluate
from pipelines.datasets import build_eval_loader
from runner.args import input_size_given
from runner.checkpoint import check_finite, load_weights, state_from
from utils import UserError


def eval_checkpoint(args):
    """--resume for --eval; --input_size becomes the checkpoint's recorded size unless given, and
    --global_pool the one it was trained with.

    Our checkpoints record the size the model was last trained at ('input_size'); a model
    trained at 64 and evaluated at the default 224 would score far lower without any sign why.
    """
    if not args.resume:
        raise UserError('--eval true needs --resume FILE (the checkpoint to evaluate)')
    ckpt = utils.load_checkpoint_file(args.resume)
    pool = utils.checkpoint_args(ckpt).get('global_pool')
    if pool and getattr(args, 'global_pool', pool) is None:
        # a ViT fine-tuned with average pooling has fc_norm instead of the final norm: built
        # with its default token pooling it would load around them and score far lower
        print(f'Evaluating with --global_pool {pool}, the pooling {args.resume} was trained with '
              f'(pass --global_pool to choose)')
        args.global_pool = pool
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
    """--eval: the checkpoint's weights (the EMA's with --model_ema_eval) at --input_size; its stats."""
    key = 'model_ema' if (args.model_ema_eval and 'model_ema' in ckpt) else args.model_key
    state, used = state_from(ckpt, key, args.resume)
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




class Evaluator:
    """The evaluation after each epoch (its loader rebuilt when B changes) and the best accuracies,
    counted at the base size only: accuracies at lower B are not comparable, and those models
    would not load into the standard-size architecture."""

    def __init__(self, args, val_base, device, amp_dtype, rank, world, base_size, max_acc=0.0, max_acc_ema=0.0):
        self.args, self.val_base, self.device, self.amp_dtype = args, val_base, device, amp_dtype
        self.rank, self.world, self.base = rank, world, base_size
        self.max_acc, self.max_acc_ema = max_acc, max_acc_ema
        self.loader, self.size = None, None

    def after_epoch(self, epoch, stage, stage_desc, model, model_ema):
        """(model stats, EMA stats, improved, EMA improved); ({}, {}, False, False) with --disable_eval."""
        if self.args.disable_eval:
            return {}, {}, False, False
        if self.size != stage.size:
            self.loader, self.size = build_eval_loader(self.args, self.val_base, stage.size, self.rank,
                                                       self.world), stage.size
        test_stats, ema_stats = evaluate_stage(self.args, self.loader, model, model_ema, self.device,
                                               self.amp_dtype, self.world)
        # a NaN evaluation is divergence: never a best, never written as a checkpoint
        check_finite(None, None, f'in the evaluation after epoch {epoch} ({stage_desc})',
                     losses={'evaluation loss': test_stats.get('loss'), 'EMA evaluation loss': ema_stats.get('loss')})
        improved = stage.size == self.base and test_stats.get('acc1', -1) > self.max_acc
        improved_ema = stage.size == self.base and ema_stats.get('acc1', -1) > self.max_acc_ema
        self.max_acc = test_stats['acc1'] if improved else self.max_acc
        self.max_acc_ema = ema_stats['acc1'] if improved_ema else self.max_acc_ema
        best = f' (max at {self.base}: {self.max_acc:.2f}%)' if self.max_acc > 0 else ''
        print(f'Accuracy of the network on {test_stats["num_images"]} test images at {stage.size}: '
              f'{test_stats["acc1"]:.2f}%{best}')
        return test_stats, ema_stats, improved, improved_ema

    def final_at_base(self, model, optimizer, model_ema):
        """A custom plan may end below the base size; the final model is judged at the base size
        (log.txt's final_test_at_base)."""
        adapt_model(model, self.base, optimizer, model_ema)
        loader = build_eval_loader(self.args, self.val_base, self.base, self.rank, self.world)
        final = evaluate(loader, model, self.device, self.amp_dtype, self.args.dist_eval and self.world > 1,
                         header=f'Final test at {self.base}:')
        if self.rank == 0 and self.args.output_dir:
            utils.save_json_line(os.path.join(self.args.output_dir, 'log.txt'),
                                 {'final_test_at_base': {**final, 'input_size': self.base}})
