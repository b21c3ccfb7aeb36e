"""The plan of a run and the switch between its stages.

checked_plan builds the plan for the flags and checks every stage's B against the model;
make_hparams turns the plan's progress into the learning rate and weight decay (pure
functions, so a resume restores only a counter). StageSwitch moves training to an epoch's
stage: the model to its B (DDP rebuilt when a parameter changed shape), the low-pass
operator, the replay buffer (reloaded after a resume: refill_replay), the loader's position,
and the stage's engine.TrainStep (kept while B and the micro-batch stay).
"""
import datetime
import itertools
import os
from dataclasses import dataclass
from typing import Any

import torch

import utils
from curriculum import PlanError, build_plan
from curriculum.adapt import adapt_model, check_input_size, size_multiple
from curriculum.lowfreq import FourierCrop
from curriculum.replay import ReplayBuffer, history
from engine import TrainStep
from pipelines.datasets import data_counters
from runner.setup import apply_global_batch, wrap_ddp
from utils import UserError


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


def plan_text(args, plan, device, world, compared=compared_baseline_epochs, images=None):
    """The plan table as an entry point prints it for this run; compared(args): the baseline epochs
    the table compares with (main_pretrain.py: MAE's 1600); images: training images per data epoch
    (for the optimizer steps), None when not known."""
    return plan.table(compared(args), pipeline=args.data_pipeline, world=world,
                      per='GPU' if device.type == 'cuda' else 'process', images=images)


# training images per data epoch of the data sets whose size is known without reading them
# (ImageNet-1K's train split, CIFAR-100's)
KNOWN_TRAIN_IMAGES = {'IMNET': 1281167, 'CIFAR': 50000}


def model_structure(build_model, args, classes):
    """The model `build_model(args, classes)` gives, for its structure only (size grid, parameter
    count): built on the meta device (no memory, no initialisation: CSWin-B in 0.2 s, not 5), or
    on the CPU where a model cannot be built there."""
    try:
        with torch.device('meta'):
            return build_model(args, classes)[0]
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - a model whose construction needs real tensors
        return build_model(args, classes)[0]


def plan_only(args, check_args, build_model):
    """--plan_only true: the plan for these flags on --world_size processes (default: the launched
    count) printed with its theoretical speedup, and returned.  Nothing is read (data,
    checkpoints), written, or set up on a device: the model is built for its size grid only
    (model_structure); `check_args` and `build_model(args, classes)` are the entry point's."""
    world = args.plan_world_size or int(os.environ.get('WORLD_SIZE', '1'))
    check_args(args)
    apply_global_batch(args, world)
    synth = args.synth_classes * args.synth_per_class if args.data_set == 'SYNTH' else None
    classes = args.nb_classes or {'CIFAR': 100, 'SYNTH': args.synth_classes}.get(args.data_set, 1000)
    model = model_structure(build_model, args, classes)
    plan = checked_plan(args, model)
    cuda = str(args.device).startswith('cuda') or args.plan_world_size
    images = KNOWN_TRAIN_IMAGES.get(args.data_set, synth)
    if int(os.environ.get('RANK', '0')) == 0:  # under torchrun: once, not once per process
        print(plan_text(args, plan, torch.device('cuda' if cuda else 'cpu'), world, images=images))
        if images is None:
            print(f'(optimizer steps: the size of a --data_set {args.data_set} is known only once its folder is '
                  f'read)')
    return plan


def checked_plan(args, model, cost=None):
    """The plan for these flags, every stage's B checked against the model before training;
    cost: the model's compute per image as a function of B (build_plan's; MAE's train_flops)."""
    try:
        plan = build_plan(args, size_multiple(model), cost=cost)
    except PlanError as e:
        raise UserError(str(e)) from None
    for s in plan.stages:
        try:
            check_input_size(model, s.size)
        except ValueError as e:
            raise UserError(f'stage {s.index} of the plan: {e}') from None
    return plan


def make_hparams(args, plan, per_rank_images=None):
    """progress -> (lr, weight decay): cosine with linear warmup, as pure functions of progress.

    The lr is times the lr_scale of the stage at that progress (Plan.stage_at_progress; 1 but
    with --stage_batch large), itself a function of progress: a resume restores only the position.
    """
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    warmup = plan.warmup
    if args.warmup_steps > 0 and per_rank_images:
        steps0 = max(per_rank_images // plan.stages[0].loader_batch, 1)
        warmup = plan.progress(0) + plan.epoch_weight(0) * args.warmup_steps / steps0

    def hparams(progress):
        lr = utils.cosine_schedule(progress, plan.total_progress, args.lr, args.min_lr, warmup)
        lr *= plan.stage_at_progress(progress).lr_scale
        wd = utils.cosine_schedule(progress, plan.total_progress, args.weight_decay, wd_end)
        return lr, wd
    return hparams


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


def stage_record(plan, epoch):
    """The curriculum's fields of an epoch's log.txt line."""
    stage = plan.stage_at(epoch)
    return {'stage': stage.index, 'input_size': stage.size, 'magnitude': stage.magnitude,
            'batch_size': stage.batch_size, 'update_freq': stage.update_freq, 'replay_times': stage.replay_times,
            'progress': plan.progress(epoch + 1), 'progress_frac': plan.progress(epoch + 1) / plan.total_progress,
            # equivalent epochs at the base size done by the epoch's end, in the plan's compute
            # measure ((B/base)^2, or the model's own cost) whatever unit the schedules follow
            'compute': sum(plan.stage_at(e).epoch_compute(plan.base_size) for e in range(epoch + 1))}


def warm_shape(args, step, stage, nb_classes):
    """The stage's input for TrainStep.warm_up at its first epoch on a GPU (cuDNN autotuning of
    the new shapes while the loader starts), else None.  With --cuda_graph always: warm_up then
    also tries a capture before the stage's first batch (TrainStep.probe_capture); without it
    not when cudnn.benchmark is off (nothing to tune)."""
    if step.device.type != 'cuda' or step.warmed or not (step.cuda_graph or torch.backends.cudnn.benchmark):
        return None
    step.warmed = True
    return (stage.batch_size, 3, stage.size, stage.size), nb_classes, args.channels_last


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
    counters = data_counters(loader.dataset)
    before = [c.value for c in counters]
    replay.refill(appended, batches())
    for c, v in zip(counters, before):
        c.value = v


def describe(stage):
    """A stage in the words of the logs: 'stage k, B=.., m=..' (no m where no RandAugment runs)."""
    m = '' if stage.magnitude is None else f', m={stage.magnitude}'
    return f'stage {stage.index}, B={stage.size}{m}'


def epoch_text(plan, stage, epoch, per, eta=''):
    """The line printed at the start of an epoch: its stage, batch, lr scale, replay and progress."""
    replay = f', replay {stage.replay_times}x (buffer {stage.buffer_size})' if stage.replay_times > 1 else ''
    if stage.lr_scale != 1.0:
        replay = f', lr x{stage.lr_scale:g}' + replay
    return (f'Epoch {epoch}: {describe(stage)}, batch {stage.batch_size} x {stage.update_freq} per {per}{replay}, '
            f'progress {plan.progress(epoch):.2f}/{plan.total_progress:.2f} {plan.progress_unit}{eta}')


_NOTES_SHOWN = set()


@dataclass
class StepParts:
    """The engine.TrainStep arguments that stay the same from stage to stage."""
    criterion: Any
    optimizer: Any
    loss_scaler: Any
    device: Any
    model_ema: Any = None
    mixup_fn: Any = None
    amp_dtype: Any = None
    device_transform: Any = None


class StageSwitch:
    """Training's state between stages: the model at the current B and its DDP / compiled
    wrapper, the low-pass operator, the replay buffer and the stage's engine.TrainStep.

    enter() moves to an epoch's stage and positions the loader; train_step() gives the
    stage's step, a `step_class` (engine.TrainStep's constructor) built from `parts`
    (StepParts) and the stage.
    """
    step_class = TrainStep

    def __init__(self, args, plan, model, size, loader, batch_sampler, parts):
        self.args, self.plan, self.model, self.size = args, plan, model, size
        self.loader, self.batch_sampler, self.parts = loader, batch_sampler, parts
        self.train_model = wrap_ddp(model, args)
        self.per_rank = len(batch_sampler.sampler)
        self.lowfreq = self.replay = self.replay_stage = self.step = None

    def steps_in(self, epoch):
        """Loader batches of `epoch` per rank."""
        return self.per_rank // self.plan.stage_at(epoch).loader_batch

    def enter(self, stage, epoch, skip=0, refill=False):
        """Ready `stage` for `epoch`, whose first `skip` batches are done; `refill`: the run resumes
        in this epoch, so a replay buffer is reloaded with the batches it held."""
        parts = self.parts
        if stage.size != self.size:
            if adapt_model(self.model, stage.size, parts.optimizer, parts.model_ema):
                self.train_model = wrap_ddp(self.model, self.args)
            self.size = stage.size
            print(f'Stage {stage.index}: model adapted to {stage.size}x{stage.size}')
        base = self.plan.base_size
        self.lowfreq = FourierCrop(stage.size) if self.plan.lowfreq == 'fourier' and stage.size < base else None
        if stage.replay_times > 1 and self.replay_stage != stage.index:
            self.replay, self.replay_stage = ReplayBuffer(stage.buffer_size, stage.replay_times), stage.index
            if refill:
                refill_replay(self.replay, stage, epoch, skip, self.steps_in, self.loader, self.batch_sampler,
                              parts.device, parts.device_transform, self.lowfreq)
        elif stage.replay_times == 1:
            self.replay, self.replay_stage = None, None
        self.batch_sampler.set_epoch(epoch, skip=skip)

    def train_step(self, stage):
        """The stage's engine.TrainStep: kept while the model, B and the micro-batch stay (a captured
        CUDA graph is reused), else built anew; the per-stage host-side pieces are swapped in."""
        args, parts = self.args, self.parts
        key = (id(self.train_model), stage.size, stage.batch_size, stage.update_freq)
        if self.step is None or self.step.key != key:
            if self.step is not None:
                self.step.release()  # its graphs' memory, before the new shape captures (engine.TrainStep)
            self.step = self.step_class(
                self.train_model, parts.criterion, parts.optimizer, parts.loss_scaler, parts.device,
                update_freq=stage.update_freq, max_norm=args.clip_grad, model_ema=parts.model_ema,
                mixup_fn=parts.mixup_fn, amp_dtype=parts.amp_dtype, device_transform=parts.device_transform,
                cuda_graph=getattr(args, 'cuda_graph', False),
                weight_decay_varies=args.weight_decay_end not in (None, args.weight_decay),
                compiled=getattr(args, 'compile', False))
            self.step.key, self.step.warmed = key, False
            if self.step.graph_note and self.step.graph_note not in _NOTES_SHOWN:
                _NOTES_SHOWN.add(self.step.graph_note)  # once per run, not at every stage
                print(self.step.graph_note, flush=True)
        self.step.lowfreq, self.step.replay, self.step.stage_desc = self.lowfreq, self.replay, describe(stage)
        return self.step
