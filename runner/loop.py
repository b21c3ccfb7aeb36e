"""The epoch loop every entry point runs: plan -> stage -> loader, model and step -> train ->
[evaluate] -> log -> checkpoint.

fit() is the same for supervised training (main.py, with an Evaluator) and for
pre-training (main_pretrain.py, without one: no evaluation, no best checkpoints, log lines
of training values only). The stage's step comes from the StageSwitch (its `step_class`),
so the task's loss is the step's business, not the loop's.
"""
import datetime
import time

import utils
from engine import train_one_epoch
from pipelines.datasets import warn_data_problems
from runner.checkpoint import check_finite, log_epoch, write_config
from runner.stage import describe, epoch_text, make_hparams, stage_record, warm_shape, whole_run_eta


def fit(args, plan, start, switch, checkpoints, epoch_loader, n_parameters, nb_classes, evaluator=None):
    """Train from `start` (runner.resume.ResumePoint) to the end of `plan`.

    evaluator: runner.evaluation.Evaluator (after each epoch, best checkpoints, the final test at
    the base size) or None (pre-training: nothing evaluated).
    """
    rank, world = utils.get_rank(), utils.get_world_size()
    if rank == 0 and args.output_dir and start.epoch < plan.num_epochs:
        write_config(args, checkpoints.plan_summary, world, start)
    if start.epoch >= plan.num_epochs:
        print(f'Nothing left to train: all {plan.num_epochs} data epochs of the plan are done '
              f'(--epochs and --resume_override epochs extend a finished run)')
    else:
        print(f'Start training for {plan.num_epochs} data epochs from epoch {start.epoch}')
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
        best = (evaluator.max_acc, evaluator.max_acc_ema) if evaluator is not None else ()
        extra = checkpoints.extra(switch.size, *best)
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
        test_stats, ema_stats, improved, improved_ema = {}, {}, False, False
        if evaluator is not None:
            test_stats, ema_stats, improved, improved_ema = evaluator.after_epoch(
                epoch, stage, describe(stage), switch.model, switch.parts.model_ema)
        log_epoch(args, log_writer, {**{f'train_{k}': v for k, v in train_stats.items()},
                                     **{f'test_{k}': v for k, v in test_stats.items()},
                                     **{f'test_ema_{k}': v for k, v in ema_stats.items()},
                                     'epoch': epoch, 'n_parameters': n_parameters, **stage_record(plan, epoch),
                                     # the training pass alone (no evaluation, no checkpoint); of a
                                     # resumed epoch, only the part after the resume
                                     'train_time_s': round(train_time, 3)})
        if evaluator is not None:
            extra.update(max_accuracy=evaluator.max_acc, max_accuracy_ema=evaluator.max_acc_ema)
        checkpoints.end_of_epoch(epoch, extra, epoch + 1 == plan.num_epochs, improved, improved_ema)

    if evaluator is not None and switch.size != plan.base_size and not args.disable_eval \
            and start.epoch < plan.num_epochs:
        evaluator.final_at_base(switch.model, switch.parts.optimizer, switch.parts.model_ema)
    print(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
