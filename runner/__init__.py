"""The run machinery every entry point shares (main.py; a pre-training entry point alike).

args.py        ArgumentParser (no abbreviations, one-line errors), the help formatter and one
               add_*_args(parser) per argument group (model, optim, schedule, curriculum,
               augment, data, run, dist, perf), the checks of the data and run groups
setup.py       device check, distributed init, --global_batch_size, seeding and determinism
               (setup_run), a model's EMA/optimizer/loss scaler (training_parts), DDP/compile
resume.py      resume_training (--resume or the furthest checkpoint in --output_dir) and the
               same-run checks (check_same_run, RESUME_CHECKED, --resume_override)
checkpoint.py  atomic checkpoints (save_training_checkpoint, Checkpointer: epoch, best,
               recovery), check_finite before each, config.json, log.txt lines, weight loading
stage.py       the plan for the flags (checked_plan), lr/wd as functions of progress
               (make_hparams), the switch between stages (StageSwitch: model at B, low-pass,
               replay buffer, loader position, the stage's TrainStep), ETA and log fields
evaluation.py  --eval of a checkpoint, the evaluation after each epoch with the best
               accuracies (Evaluator), the final evaluation at the base size
loop.py        the epoch loop (fit): stage -> train -> [evaluate] -> log -> checkpoint
entry.py       around an entry point's train(): the start-up Ctrl-C guard, the caller's
               signal handlers back, exit statuses (guard_startup, run_guarded, run_cli)

Nothing here imports an entry point; main.py is the wiring of these for supervised training,
main_pretrain.py for MAE pre-training.
"""
