"""What every entry point (main.py, main_pretrain.py) does around its training function.

    from runner.entry import guard_startup
    guard_startup(__name__)          # first, before torch loads
    ...
    def main(args): return run_guarded(train, args)
    def cli(argv=None): run_cli(get_args_parser, main, argv)

guard_startup: a Ctrl-C while torch and timm load (seconds) is one line and exit 130, not a
traceback through the import machinery.  run_guarded: training installs its own SIGTERM /
SIGINT handlers (utils.StopRequest); an in-process caller (tests, notebooks) gets its own
back, and loader workers end on SIGTERM again on every way out.  run_cli: the exit status
and one line for each way a run ends (2 bad input, 3 divergence, 128 + signal after a
saved stop, 130 Ctrl-C).

This module imports only the standard library at its top: guard_startup runs before torch is
imported; everything else is imported where it is used.
"""
import os
import signal
import sys


def _interrupted_while_starting(signum, frame):
    # nothing has been read or written yet
    sys.stderr.write('interrupted (Ctrl-C) while starting: nothing written\n')
    sys.stderr.flush()
    os._exit(130)


def guard_startup(module_name):
    """Run as a script (`module_name` == '__main__'): Ctrl-C during the imports exits at once with
    one line; run_cli puts Python's handler back once the imports are done."""
    if module_name == '__main__' and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_while_starting)


def run_guarded(train, args):
    """train(args), with the caller's SIGTERM/SIGINT handlers and the loader workers' SIGTERM
    behaviour restored on every way out."""
    from pipelines import datasets
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    datasets.hold_workers()
    try:
        return train(args)
    finally:
        # on every way out (an error raised in a loader worker included) the workers end on
        # SIGTERM again, so shutting the loaders down cannot wait forever
        datasets.release_workers()
        for s, handler in previous.items():
            # None: a handler not set from Python, which cannot be put back; otherwise processes
            # forked later would inherit one that never exits
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def run_cli(get_parser, main, argv=None):
    """Parse argv with get_parser(), run main(args), and exit with the status of how it ended."""
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt, handled below
    args = get_parser().parse_args(argv)
    import torch
    import utils
    from engine import TrainingDiverged
    from pipelines.errors import BadImageError
    try:
        main(args)
    except BadImageError as e:
        # raised on the rank that read the file, maybe not rank 0, whose print() alone is on
        # (utils.setup_for_distributed): written directly. torchrun then ends the other ranks.
        sys.stderr.write(f'error: {e}\n')
        sys.stderr.flush()
        sys.exit(2)
    except utils.UserError as e:
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
