"""Crash safety and input safety: kills, SIGTERM, divergence, damaged files, bad input."""
import hashlib
import io
import json
import os
import signal
import sys
import time

import pytest
import torch
from PIL import Image

import main as main_mod
from curriculum import build_plan
from runner.checkpoint import check_finite, write_config
from runner.resume import ResumePoint, _steps_on, check_same_run
from runner.stage import checked_plan
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import fault_inject  # noqa: E402

# etpp at base 64 with E=2: B=32 -> 48 -> 64 inside 3 short epochs; mixup, cutmix, drop path,
# RandAugment, random erasing and EMA all draw random numbers.
RUN = ['--data_set', 'SYNTH', '--synth_classes', '4', '--synth_per_class', '24', '--synth_val_per_class', '4',
       '--synth_image_size', '72', '--model', 'test_convnext', '--curriculum', 'etpp', '--base_input_size', '64',
       '--epochs', '2', '--batch_size', '16', '--device', 'cpu', '--num_workers', '0', '--deterministic', 'true',
       '--drop_path', '0.1', '--model_ema', 'true', '--save_ckpt_steps', '2']

# a normal run takes seconds; a hung one is killed instead of stalling the suite
RUN_TIMEOUT = 300
LIMIT = ['--run_timeout', str(RUN_TIMEOUT)]

TINY = ['--data_set', 'SYNTH', '--synth_classes', '4', '--synth_per_class', '8', '--synth_val_per_class', '2',
        '--synth_image_size', '36', '--input_size', '32', '--model', 'test_convnext', '--batch_size', '8',
        '--device', 'cpu', '--num_workers', '0', '--epochs', '1', '--print_freq', '100']


def cli_error(argv, capsys, code=2):
    with pytest.raises(SystemExit) as e:
        main_mod.cli(argv)
    assert e.value.code == code
    err = capsys.readouterr().err.strip()
    assert err and '\n' not in err, err
    assert 'Traceback' not in err
    return err


def digest(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---------------------------------------------------------------------------
# kills and signals
# ---------------------------------------------------------------------------

def test_sigkill_at_random_points_resumes_exactly(tmp_path):
    rc = fault_inject.main(LIMIT + ['--kills', '2', '--seed', '1', '--workdir', str(tmp_path), '--'] + RUN)
    assert rc == 0


def test_sigkill_with_replay_and_fast_path_resumes_exactly(tmp_path, replay_curriculum):
    # the replay buffer is rebuilt from the stage's last batches; the fast path's device
    # random erasing is seeded per batch, so the rebuilt buffer is the one that was lost
    argv = replay_curriculum(RUN) + ['--batch_size', '64', '--synth_per_class', '48', '--data_pipeline', 'fast',
                                     '--reprob', '0.5']
    rc = fault_inject.main(LIMIT + ['--kills', '2', '--seed', '1', '--workdir', str(tmp_path), '--'] + argv)
    assert rc == 0
    assert open(tmp_path / 'faulty.out').read().count('Rebuilding the replay buffer') >= 1


def test_sigterm_two_processes_gloo_resumes_exactly(tmp_path):
    argv = [a for a in RUN]
    argv[argv.index('--batch_size') + 1] = '8'
    rc = fault_inject.main(LIMIT + ['--kills', '1', '--signal', 'TERM', '--nproc', '2', '--seed', '3',
                            '--workdir', str(tmp_path), '--'] + argv + ['--num_workers', '1'])
    assert rc == 0


def test_sigterm_saves_recovery_checkpoint_and_exits_cleanly(tmp_path):
    out = str(tmp_path / 'run')
    log = io.StringIO()
    rc, _ = fault_inject.run_once(fault_inject.command(RUN, out, 1), kill_after=1, sig=signal.SIGTERM, log=log,
                                  timeout=RUN_TIMEOUT)
    assert rc == 143
    assert 'stopped by SIGTERM' in log.getvalue() and 'Traceback' not in log.getvalue()
    ckpt = utils.load_checkpoint_file(os.path.join(out, utils.RECOVERY_NAME))
    assert ckpt['epoch'] == 0 and ckpt['step'] >= 1 and len(ckpt['meters']) == 1 and len(ckpt['rng']) == 1


def test_sigint_saves_recovery_checkpoint_and_exits_130(tmp_path):
    # Ctrl-C: the same stop as SIGTERM (every rank at the same step, a recovery checkpoint,
    # one line), exit 128 + SIGINT
    out = str(tmp_path / 'run')
    log = io.StringIO()
    rc, _ = fault_inject.run_once(fault_inject.command(RUN, out, 1), kill_after=1, sig=signal.SIGINT, log=log,
                                  timeout=RUN_TIMEOUT)
    text = log.getvalue()
    assert rc == 130, text[-2000:]
    assert 'stopped by SIGINT' in text and 'Traceback' not in text and 'KeyboardInterrupt' not in text
    ckpt = utils.load_checkpoint_file(os.path.join(out, utils.RECOVERY_NAME))
    assert ckpt['epoch'] == 0 and ckpt['step'] >= 1 and len(ckpt['meters']) == 1


def test_second_ctrl_c_aborts_at_once():
    stop = utils.StopRequest()
    stop._handle(signal.SIGINT, None)
    assert stop.requested() and stop.name == 'SIGINT'
    stop._handle(signal.SIGTERM, None)  # a scheduler's SIGTERM after a Ctrl-C still waits for the save
    stop._handle(signal.SIGINT, None)  # the same Ctrl-C delivered twice (torchrun forwards it) too
    assert stop.name == 'SIGINT'
    stop.first -= 2 * stop.REPEAT_S
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


def test_in_process_training_gives_the_sigterm_handler_back(tmp_path, capsys):
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    previous_int = signal.getsignal(signal.SIGINT)
    try:
        main_mod.main(main_mod.get_args_parser().parse_args(TINY + ['--output_dir', str(tmp_path / 'ok')]))
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is previous_int
        cli_error(TINY + ['--output_dir', str(tmp_path / 'div'), '--lr', '1e30', '--warmup_epochs', '0'], capsys,
                  code=3)
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is previous_int
    finally:
        signal.signal(signal.SIGTERM, previous)


def process_gone(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] == 'Z'  # dead, not yet reaped by its new parent
    except FileNotFoundError:
        return True


def test_a_hung_run_is_killed_with_all_its_processes(tmp_path):
    # the child waits on a grandchild in a session of its own (as torchrun's workers are)
    # that shares the output pipe: both must go, or the read of that pipe would never end
    pid_file = tmp_path / 'grandchild.pid'
    code = ('import subprocess, sys; p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], '
            f'start_new_session=True); open({str(pid_file)!r}, "w").write(str(p.pid)); p.wait()')
    with pytest.raises(SystemExit, match='still running after 3s'):
        fault_inject.run_once([sys.executable, '-c', code], timeout=3)
    grandchild = int(pid_file.read_text())
    deadline = time.time() + 10
    while not process_gone(grandchild) and time.time() < deadline:
        time.sleep(0.1)
    assert process_gone(grandchild)


# ---------------------------------------------------------------------------
# divergence
# ---------------------------------------------------------------------------

def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    out = str(tmp_path / 'div')
    main_mod.cli(TINY + ['--epochs', '2', '--output_dir', out])
    good = os.path.join(out, 'checkpoint-1.pth')
    before = digest(good)
    log_before = open(os.path.join(out, 'log.txt')).read()
    capsys.readouterr()
    # resume the finished 2-epoch run into a longer one with an absurd learning rate
    err = cli_error(TINY + ['--epochs', '4', '--output_dir', out, '--lr', '1e30', '--warmup_epochs', '0',
                            '--resume_override', 'epochs,lr,warmup_epochs'], capsys, code=3)
    assert 'diverged' in err and 'epoch 2' in err and 'step' in err and 'stage 0' in err
    assert digest(good) == before
    assert not os.path.exists(os.path.join(out, 'checkpoint-2.pth'))
    assert open(os.path.join(out, 'log.txt')).read() == log_before


def test_grad_scaler_skipped_steps_are_not_divergence():
    scaler = utils.LossScaler('cpu', enabled=True)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    # a finite loss whose scaled gradient overflows: GradScaler skips the step, nothing raises
    loss = (w * torch.tensor([3e38, 1.0, 1.0])).sum()
    assert torch.isfinite(loss)
    scaler(loss, opt, parameters=[w])
    assert scaler.last_step_skipped
    assert torch.equal(w.detach(), torch.ones(3))


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------

def test_auto_resume_skips_damaged_and_picks_furthest(tmp_path, capsys):
    out = str(tmp_path / 'ck')
    main_mod.cli(TINY + ['--epochs', '2', '--output_dir', out])
    # a newer-numbered but truncated file, and a non-checkpoint
    data = open(os.path.join(out, 'checkpoint-1.pth'), 'rb').read()
    with open(os.path.join(out, 'checkpoint-7.pth'), 'wb') as f:
        f.write(data[: len(data) // 2])
    with open(os.path.join(out, 'checkpoint-9.pth'), 'w') as f:
        f.write('not a checkpoint')
    capsys.readouterr()
    path, ckpt = utils.find_resume_checkpoint(out)
    assert path.endswith('checkpoint-1.pth') and ckpt['epoch'] == 1
    assert 'skipping damaged checkpoint' in capsys.readouterr().out


def test_rotation_keeps_newest_and_leaves_no_temp_files(tmp_path):
    out = str(tmp_path / 'rot')
    main_mod.cli(TINY + ['--epochs', '4', '--output_dir', out, '--save_ckpt_num', '2'])
    names = sorted(os.listdir(out))
    assert 'checkpoint-2.pth' in names and 'checkpoint-3.pth' in names and 'checkpoint-1.pth' not in names
    assert not [n for n in names if n.startswith('.tmp')]
    assert utils.RECOVERY_NAME not in names


def test_full_disk_is_a_clear_error_and_keeps_checkpoints(tmp_path, capsys, monkeypatch):
    import errno
    out = str(tmp_path / 'full')
    main_mod.cli(TINY + ['--output_dir', out])
    before = digest(os.path.join(out, 'checkpoint-0.pth'))
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(torch, 'save', full_disk)
    capsys.readouterr()
    err = cli_error(TINY + ['--output_dir', out, '--epochs', '2', '--resume_override', 'epochs'], capsys)
    assert 'No space left on device' in err and 'intact' in err
    assert digest(os.path.join(out, 'checkpoint-0.pth')) == before
    assert not [n for n in os.listdir(out) if n.startswith('.tmp')]


def test_atomic_save_failure_leaves_old_file(tmp_path):
    path = str(tmp_path / 'checkpoint-0.pth')
    utils.atomic_save({'model': {'w': torch.ones(2)}, 'epoch': 0}, path)
    before = digest(path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError('disk full')
    with pytest.raises(RuntimeError):
        utils.atomic_save({'model': Unpicklable()}, path)
    assert digest(path) == before
    assert os.listdir(tmp_path) == ['checkpoint-0.pth']


@pytest.mark.parametrize('content,needle', [
    (b'', 'not a readable checkpoint'),
    (b'hello world', 'not a readable checkpoint'),
])
def test_bad_checkpoint_files(tmp_path, capsys, content, needle):
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(content)
    err = cli_error(TINY + ['--eval', 'true', '--resume', str(bad)], capsys)
    assert needle in err and str(bad) in err


def test_truncated_checkpoint_and_other_architecture(tmp_path, capsys):
    out = str(tmp_path / 'arch')
    main_mod.cli(TINY + ['--output_dir', out])
    good = os.path.join(out, 'checkpoint-0.pth')
    trunc = tmp_path / 'trunc.pth'
    trunc.write_bytes(open(good, 'rb').read()[:5000])
    capsys.readouterr()
    err = cli_error(TINY + ['--eval', 'true', '--resume', str(trunc)], capsys)
    assert 'not a readable checkpoint' in err
    err = cli_error(TINY[:TINY.index('--model')] + ['--model', 'resnet18'] + TINY[TINY.index('--model') + 2:]
                    + ['--eval', 'true', '--resume', good], capsys)
    assert 'does not match model' in err and '--model' in err


def test_resume_with_another_optimizer_is_refused(tmp_path, capsys):
    out = str(tmp_path / 'opt')
    main_mod.cli(TINY + ['--output_dir', out])
    capsys.readouterr()
    err = cli_error(TINY + ['--output_dir', out, '--epochs', '2', '--opt', 'sgd'], capsys)
    assert 'adamw' in err and '--opt' in err


def test_bad_resume_does_not_touch_output_dir(tmp_path, capsys):
    out = str(tmp_path / 'keep')
    main_mod.cli(TINY + ['--output_dir', out])
    snapshot = {n: digest(os.path.join(out, n)) for n in os.listdir(out) if n.endswith(('.pth', '.txt'))}
    bad = tmp_path / 'bad.pth'
    bad.write_text('x')
    capsys.readouterr()
    cli_error(TINY + ['--output_dir', out, '--resume', str(bad), '--epochs', '3'], capsys)
    assert {n: digest(os.path.join(out, n)) for n in snapshot} == snapshot


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------

def _folder(root, classes, n=3, size=40):
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n):
            Image.new('RGB', (size, size), (i * 40, 80, 160)).save(os.path.join(root, c, f'{i}.png'))
    return str(root)


def folder_args(train, val, extra=()):
    return ['--data_set', 'image_folder', '--data_path', train, '--eval_data_path', val, '--model', 'test_convnext',
            '--input_size', '32', '--batch_size', '4', '--device', 'cpu', '--num_workers', '0', '--epochs', '1',
            '--print_freq', '100'] + list(extra)


def test_missing_and_empty_data_dirs(tmp_path, capsys):
    err = cli_error(['--data_path', str(tmp_path / 'nope'), '--device', 'cpu'], capsys)
    assert 'nope' in err and 'data' in err
    empty = tmp_path / 'empty'
    (empty / 'train').mkdir(parents=True)
    (empty / 'val').mkdir()
    err = cli_error(['--data_path', str(empty), '--device', 'cpu'], capsys)
    assert 'class folders' in err or 'no images' in err


def test_class_lists_differ(tmp_path, capsys):
    train = _folder(tmp_path / 'train', ['a', 'b'])
    val = _folder(tmp_path / 'val', ['a', 'c'])
    err = cli_error(folder_args(train, val), capsys)
    assert 'differ' in err and "'b'" in err and "'c'" in err


def test_nb_classes_disagrees(tmp_path, capsys):
    train = _folder(tmp_path / 'train', ['a', 'b'])
    val = _folder(tmp_path / 'val', ['a', 'b'])
    err = cli_error(folder_args(train, val, ['--nb_classes', '1000']), capsys)
    assert '--nb_classes 1000' in err and '2 classes' in err


def _with_bad_images(tmp_path):
    train = _folder(tmp_path / 'train', ['a', 'b'], n=4)
    val = _folder(tmp_path / 'val', ['a', 'b'], n=2)
    good = open(os.path.join(train, 'a', '0.png'), 'rb').read()
    with open(os.path.join(train, 'a', 'truncated.png'), 'wb') as f:
        f.write(good[: len(good) // 2])
    with open(os.path.join(train, 'b', 'notes.jpg'), 'w') as f:
        f.write('this is not an image')
    return train, val


def test_bad_image_fails_naming_the_file(tmp_path, capsys):
    train, val = _with_bad_images(tmp_path)
    err = cli_error(folder_args(train, val, ['--output_dir', str(tmp_path / 'o')]), capsys)
    assert ('truncated.png' in err or 'notes.jpg' in err) and '--skip_bad_images' in err


def test_bad_images_skipped_and_counted(tmp_path, capsys):
    train, val = _with_bad_images(tmp_path)
    main_mod.cli(folder_args(train, val, ['--skip_bad_images', 'true', '--output_dir', str(tmp_path / 'o'),
                                          '--batch_size', '2']))
    out = capsys.readouterr().out
    assert 'unreadable training images skipped so far' in out
    assert json.loads(open(tmp_path / 'o' / 'log.txt').readline())['epoch'] == 0


def test_unknown_model_suggests_names(capsys):
    err = cli_error(TINY[:TINY.index('--model')] + ['--model', 'convnext_tiyn'] + TINY[TINY.index('--model') + 2:],
                    capsys)
    assert 'convnext_tiny' in err


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    err = cli_error(TINY + ['--output_dir', str(blocker / 'sub')], capsys)
    assert 'cannot be written' in err


def test_impossible_curriculum_settings(capsys):
    # E=3: at E=1 and 2 the drivers' cut leaves no epoch to a replayed (B < 64) segment
    err = cli_error(TINY + ['--curriculum', 'etpp', '--base_input_size', '64', '--replay_times', '2',
                            '--replay_buffer_size', '4', '--update_freq', '2', '--epochs', '3'], capsys)
    assert 'update_freq' in err
    err = cli_error(TINY + ['--curriculum', 'etpp', '--batch_size', '100000', '--base_input_size', '64'], capsys)
    assert 'batch' in err


def test_global_batch_that_does_not_divide(capsys, tmp_path):
    err = cli_error(TINY + ['--global_batch_size', '100'], capsys)
    assert '--global_batch_size 100' in err and 'divide' in err
    main_mod.cli(TINY + ['--global_batch_size', '32', '--output_dir', str(tmp_path)])
    rec = json.loads(open(tmp_path / 'log.txt').readline())
    assert (rec['batch_size'], rec['update_freq']) == (8, 4)


def test_bad_flag_values(capsys):
    err = cli_error(TINY + ['--save_ckpt_steps', '-1'], capsys)
    assert 'save_ckpt_steps' in err
    err = cli_error(TINY + ['--batch_size', '0'], capsys)
    assert 'batch_size' in err


# ---------------------------------------------------------------------------
# resume continues the same run (issue 11)
# ---------------------------------------------------------------------------

# etpp on a tiny SYNTH set: 2 equivalent epochs, stages at B = 32, 48, 64
ETPP = ['--data_set', 'SYNTH', '--synth_classes', '4', '--synth_per_class', '8', '--synth_val_per_class', '2',
        '--synth_image_size', '72', '--model', 'test_convnext', '--curriculum', 'etpp', '--base_input_size', '64',
        '--batch_size', '8', '--device', 'cpu', '--num_workers', '0', '--print_freq', '100', '--epochs', '2']


def snapshot(out):
    return {n: digest(os.path.join(out, n)) for n in os.listdir(out) if os.path.isfile(os.path.join(out, n))}


@pytest.fixture(scope='module')
def etpp_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('etpp'))
    main_mod.cli(ETPP + ['--output_dir', out])
    return out


def test_resume_with_another_plan_is_refused_and_writes_nothing(etpp_run, capsys):
    before = snapshot(etpp_run)
    capsys.readouterr()
    for change, needle in ((['--epochs', '4'], '--epochs 4 differs'), (['--curriculum', 'et'], '--curriculum et'),
                           (['--base_input_size', '96', '--synth_image_size', '108'], '--base_input_size 96'),
                           (['--lr', '0.01'], '--lr 0.01'), (['--model_ema', 'true'], '--model_ema True')):
        argv = ETPP + ['--output_dir', etpp_run] + change
        err = cli_error(argv, capsys)
        assert needle in err and etpp_run in err and '--resume_override' in err, err
        assert snapshot(etpp_run) == before  # nothing written: no config-N.json, no log line, no checkpoint
    # a flag that does not change what is computed may differ
    main_mod.cli(ETPP + ['--output_dir', etpp_run, '--print_freq', '5', '--num_workers', '1'])
    assert 'continuing at epoch' in capsys.readouterr().out


def test_fresh_start_over_another_runs_checkpoints_is_refused(etpp_run, capsys):
    # --auto_resume false where checkpoints exist: the new run's checkpoint-0.pth would be rotated
    # away in favour of the old run's higher numbers, and checkpoint-best.pth mixed
    before = snapshot(etpp_run)
    err = cli_error(ETPP + ['--output_dir', etpp_run, '--auto_resume', 'false', '--epochs', '1'], capsys)
    assert '--auto_resume false' in err and 'checkpoint-' in err and 'new --output_dir' in err, err
    assert snapshot(etpp_run) == before


def test_resume_file_older_than_output_dir_warns(etpp_run, tmp_path, capsys):
    import shutil
    out = str(tmp_path / 'copy')
    shutil.copytree(etpp_run, out)
    older = str(tmp_path / 'older.pth')
    shutil.copy(os.path.join(out, 'checkpoint-1.pth'), older)
    os.remove(os.path.join(out, 'checkpoint-best.pth'))
    capsys.readouterr()
    main_mod.cli(ETPP + ['--output_dir', out, '--resume', older, '--epochs', '2'])
    text = capsys.readouterr().out
    assert 'checkpoint-2.pth in --output_dir is further along than --resume' in text, text
    assert f'Resumed from {older}; continuing at epoch 2' in text


def test_resume_override_changes_deliberately_and_keeps_configs(etpp_run, tmp_path, capsys):
    import shutil
    out = str(tmp_path / 'longer')
    shutil.copytree(etpp_run, out)
    first = open(os.path.join(out, 'config.json')).read()
    assert json.loads(first)['resumed'] is None
    cli_error(ETPP + ['--output_dir', out, '--epochs', '3', '--resume_override', 'nosuchflag'], capsys)
    capsys.readouterr()
    main_mod.cli(ETPP + ['--output_dir', out, '--epochs', '3', '--resume_override', 'epochs'])
    text = capsys.readouterr().out
    assert 'WARNING: resuming' in text and '--epochs 3 (was 2)' in text
    assert open(os.path.join(out, 'config.json')).read() == first  # the first run's record is kept
    second = json.loads(open(os.path.join(out, 'config-1.json')).read())
    assert second['args']['epochs'] == 3 and second['resumed'].endswith('.pth') and second['start_epoch'] > 0


def test_plan_difference_and_gpu_count(etpp_run):
    path, ckpt = utils.find_resume_checkpoint(etpp_run)
    args = main_mod.get_args_parser().parse_args(ETPP + ['--output_dir', etpp_run])
    main_mod.check_args(args)
    args.nb_classes = 4
    model, _ = main_mod.build_model(args, 4)
    plan = checked_plan(args, model)
    check_same_run(args, ckpt, path, plan, world=1)  # the same run
    # a plan that changed although no flag did (an edited --curriculum_file, another preset)
    ckpt['plan']['stages'][1]['size'] += 16
    with pytest.raises(utils.UserError, match='plan differs.*stage 1 size'):
        check_same_run(args, ckpt, path, plan, world=1)
    args.resume_override = 'plan'
    check_same_run(args, ckpt, path, plan, world=1)
    args.resume_override = ''
    ckpt['plan']['stages'][1]['size'] -= 16
    # another GPU count with the same global batch in every stage (--global_batch_size): allowed
    saved = ckpt['plan']['stages']
    with pytest.raises(utils.UserError, match='stage 0 update_freq'):  # same GPU count: the split is checked
        saved[0]['update_freq'] += 1
        check_same_run(args, ckpt, path, plan, world=1)
    saved[0]['update_freq'] -= 1
    ckpt['rng'] = ckpt['rng'] * 2  # written by 2 processes
    for s in saved:
        s['batch_size'] //= 2
    check_same_run(args, ckpt, path, plan, world=1)
    for s in saved:  # 2 GPUs x the same per-GPU batch: twice the global batch, refused
        s['batch_size'] *= 2
    with pytest.raises(utils.UserError, match='stage 0 global batch .* x 1 GPU.*global_batch_size'):
        check_same_run(args, ckpt, path, plan, world=1)


def test_checkpoint_of_the_older_rounded_preset_is_refused_in_one_line():
    """Presets before issue 18 rounded a running total: ResNet-50 at E=200 trained 109, 109, 39,
    39, 39, 40, 20 x 4 (455 epochs), the drivers 108, 109, 39, 39, 40, 39, 20 x 4 (454). Such a
    checkpoint's plan is refused with one line; --resume_override plan continues it."""
    args = main_mod.get_args_parser().parse_args(['--model', 'resnet50', '--curriculum', 'etpp', '--epochs', '200',
                                                  '--batch_size', '512', '--data_set', 'SYNTH'])
    main_mod.check_args(args)
    plan = build_plan(args)
    old, start = plan.summary(), 0
    for stage, n in zip(old['stages'], [109, 109, 39, 39, 39, 40, 20, 20, 20, 20]):
        stage['epochs'], stage['start_epoch'] = n, start
        start += n
    old['num_epochs'] = start
    ckpt = {'epoch': 120, 'args': utils.plain_args(args), 'rng': [None], 'plan': old}
    path = 'out/x/checkpoint-120.pth'
    with pytest.raises(utils.UserError) as e:
        check_same_run(args, ckpt, path, plan, world=1)
    msg = str(e.value)
    assert '\n' not in msg and 'num_epochs 454 (was 455)' in msg and '--resume_override plan' in msg
    old['num_epochs'] = plan.num_epochs  # the stages themselves are compared too
    with pytest.raises(utils.UserError, match='stage 0 epochs 108 \\(was 109\\).*--resume_override plan'):
        check_same_run(args, ckpt, path, plan, world=1)
    args.resume_override = 'plan'
    check_same_run(args, ckpt, path, plan, world=1)


def _check(argv, ckpt_args, plan_summary=None, world=1, rng_world=1):
    """check_same_run of `argv` (ETPP's data) against a checkpoint whose args are `ckpt_args`."""
    args = main_mod.get_args_parser().parse_args(argv)
    main_mod.check_args(args)
    saved = main_mod.get_args_parser().parse_args(ckpt_args)
    main_mod.check_args(saved)
    ckpt = {'epoch': 0, 'args': utils.plain_args(saved), 'rng': [None] * rng_world}
    if plan_summary is not None:
        ckpt['plan'] = plan_summary
    return check_same_run(args, ckpt, 'ck.pth', None if plan_summary is None else _Plan(args), world)


class _Plan:
    def __init__(self, args):
        model, _ = main_mod.build_model(args, 4)
        self.s = checked_plan(args, model).summary()

    def summary(self):
        return self.s


def test_resume_check_ignores_what_changes_nothing(tmp_path):
    """No false refusals: flags that are inert in both runs, a moved --curriculum_file, and
    --batch_size with the same --global_batch_size on another GPU count."""
    base = ETPP + ['--nb_classes', '4']
    # inert: the AMP dtype without AMP, the EMA decay without EMA, erasing settings without erasing,
    # the mixup settings without mixup or cutmix
    _check(base + ['--amp_dtype', 'bfloat16', '--model_ema_decay', '0.5'], base)
    _check(base + ['--reprob', '0', '--remode', 'const'], base + ['--reprob', '0'])
    _check(base + ['--mixup', '0', '--cutmix', '0', '--mixup_prob', '0.3', '--mixup_mode', 'elem'],
           base + ['--mixup', '0', '--cutmix', '0'])
    _check(base + ['--input_size', '96'], base)  # a curriculum trains up to --base_input_size
    with pytest.raises(utils.UserError, match='--base_input_size 96 differs'):
        _check(base + ['--base_input_size', '96'], base)
    with pytest.raises(utils.UserError, match='--amp_dtype bfloat16 differs'):  # live with AMP
        _check(base + ['--use_amp', 'true', '--amp_dtype', 'bfloat16'], base + ['--use_amp', 'true'])
    with pytest.raises(utils.UserError, match='--remode const differs'):
        _check(base + ['--remode', 'const'], base)
    # a moved curriculum file: its content (the plan) is compared, not its path
    spec = {'name': 'two', 'progress': 'epochs', 'stages': [{'share': 0.5, 'size': 48, 'magnitude': 0},
                                                           {'share': 0.5, 'size': 64, 'magnitude': 9}]}
    old, new = tmp_path / 'a.json', tmp_path / 'b.json'
    old.write_text(json.dumps(spec))
    new.write_text(json.dumps(spec))
    cf = ETPP[:ETPP.index('--curriculum')] + ETPP[ETPP.index('--curriculum') + 2:] + ['--nb_classes', '4']
    saved_plan = _Plan(main_mod.get_args_parser().parse_args(cf + ['--curriculum_file', str(old)])).summary()
    _check(cf + ['--curriculum_file', str(new)], cf + ['--curriculum_file', str(old)], saved_plan)
    spec['stages'][0]['size'] = 32  # an edited copy is refused, also when --epochs is overridden
    new.write_text(json.dumps(spec))
    with pytest.raises(utils.UserError, match='plan differs.*stage 0 size 32 \\(was 48\\)'):
        _check(cf + ['--curriculum_file', str(new)], cf + ['--curriculum_file', str(old)], saved_plan)
    with pytest.raises(utils.UserError, match='plan differs.*stage 0 size 32'):
        _check(cf + ['--curriculum_file', str(new), '--epochs', '4', '--resume_override', 'epochs'],
               cf + ['--curriculum_file', str(old)], saved_plan)
    # the global batch kept on another GPU count: 1 x 8 x 2 steps, now 2 x 4 x 2 steps
    one = base + ['--global_batch_size', '16']
    saved = main_mod.get_args_parser().parse_args(one)
    main_mod.check_args(saved)
    saved.update_freq = 2
    saved_plan = _Plan(saved).summary()
    two = list(one)
    two[two.index('--batch_size') + 1] = '4'
    args2 = main_mod.get_args_parser().parse_args(two)
    args2.update_freq = 2  # what setup_run derives on 2 GPUs
    ckpt = {'epoch': 0, 'args': utils.plain_args(saved), 'rng': [None], 'plan': saved_plan}
    check_same_run(args2, ckpt, 'ck.pth', _Plan(args2), world=2)
    # ... but not on the same GPU count (a mid-epoch position counts per-GPU batches)
    with pytest.raises(utils.UserError, match='stage 0 batch_size'):
        check_same_run(args2, ckpt, 'ck.pth', _Plan(args2), world=1)
    # the split set by hand on another GPU count: 1 x 8 x 2 steps, now 2 x 8 x 1 (no --global_batch_size)
    saved = main_mod.get_args_parser().parse_args(base + ['--update_freq', '2'])
    ckpt = {'epoch': 0, 'args': utils.plain_args(saved), 'rng': [None], 'plan': _Plan(saved).summary()}
    args2 = main_mod.get_args_parser().parse_args(base)
    check_same_run(args2, ckpt, 'ck.pth', _Plan(args2), world=2)
    with pytest.raises(utils.UserError, match='--update_freq 1 differs'):  # on the same count: refused
        check_same_run(args2, ckpt, 'ck.pth', _Plan(args2), world=1)
    with pytest.raises(utils.UserError, match='stage 0 global batch 8 x 1 x 3 GPU'):  # 24 is not 16
        check_same_run(args2, ckpt, 'ck.pth', _Plan(args2), world=3)


def test_mid_epoch_position_on_another_gpu_count():
    """A recovery checkpoint's batches done are converted to as many images on another GPU count."""
    args = main_mod.get_args_parser().parse_args(ETPP + ['--nb_classes', '4'])
    main_mod.check_args(args)
    plan = _Plan(args)
    real = checked_plan(args, main_mod.build_model(args, 4)[0])
    point = ResumePoint(epoch=0, step=6)
    ckpt = {'rng': [None], 'plan': plan.summary()}
    assert _steps_on(point, ckpt, real, world=1) == 6
    assert _steps_on(point, ckpt, real, world=2) == 3
    ckpt['rng'] = [None] * 4
    assert _steps_on(point, ckpt, real, world=2) == 12


# ---------------------------------------------------------------------------
# nothing poisoned is saved or chosen (issue 11)
# ---------------------------------------------------------------------------

def test_nan_evaluation_is_divergence_and_saves_nothing(tmp_path, capsys):
    # one optimizer update per epoch with a huge lr: epoch 1's update leaves finite weights whose
    # evaluation is NaN while the training loss was finite (the recipe)
    out = str(tmp_path / 'nan')
    err = cli_error(TINY + ['--batch_size', '32', '--epochs', '3', '--lr', '1e4', '--warmup_epochs', '0',
                            '--output_dir', out], capsys, code=3)
    assert 'evaluation loss (nan) not finite' in err and 'after epoch 1' in err and 'diverged' in err
    names = os.listdir(out)
    assert 'checkpoint-0.pth' in names and 'checkpoint-1.pth' not in names
    assert utils.load_checkpoint_file(os.path.join(out, 'checkpoint-best.pth'))['epoch'] == 0
    assert [json.loads(line)['epoch'] for line in open(os.path.join(out, 'log.txt'))] == [0]
    # a re-run resumes from the last good checkpoint (and diverges again with the same lr)
    with pytest.raises(SystemExit) as e:
        main_mod.cli(TINY + ['--batch_size', '32', '--epochs', '3', '--lr', '1e4', '--warmup_epochs', '0',
                             '--output_dir', out])
    assert e.value.code == 3
    assert f'Resumed from {os.path.join(out, "checkpoint-0.pth")}; continuing at epoch 1' in capsys.readouterr().out


def test_non_finite_weights_buffers_or_ema_are_divergence():
    from timm.utils import ModelEmaV3
    from engine import TrainingDiverged
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ema = ModelEmaV3(model, decay=0.9)
    check_finite(model, ema, 'here')
    model[1].running_var[2] = float('inf')  # a BatchNorm statistic, not a parameter
    with pytest.raises(TrainingDiverged, match='weights or buffers not finite here'):
        check_finite(model, ema, 'here')
    model[1].running_var.fill_(1.0)
    ema.module[0].weight.data[0, 0, 0, 0] = float('nan')
    with pytest.raises(TrainingDiverged, match='^EMA weights not finite'):
        check_finite(model, ema, 'here')
    assert utils.all_finite([torch.full((4,), 3e38), torch.arange(3)])  # large but finite; ints skipped
    assert not utils.all_finite([torch.ones(2, dtype=torch.bfloat16), torch.tensor([float('-inf')])])


def test_config_records_are_never_overwritten(tmp_path):
    # a fresh start in a directory that holds another start's record numbers its own
    args = main_mod.get_args_parser().parse_args(['--output_dir', str(tmp_path)])
    write_config(args, {'name': 'a'}, 1, ResumePoint())
    write_config(args, {'name': 'b'}, 1, ResumePoint())
    write_config(args, {'name': 'c'}, 1, ResumePoint(epoch=2, resumed_from='x.pth'))
    names = {json.load(open(tmp_path / n))['plan']['name']: n for n in os.listdir(tmp_path)}
    assert names == {'a': 'config.json', 'b': 'config-1.json', 'c': 'config-2.json'}
    assert json.load(open(tmp_path / 'config-1.json'))['resumed'] is None
