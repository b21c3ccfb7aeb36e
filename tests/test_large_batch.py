"""--stage_batch large (a larger global batch below the base size, lr scaled with it) and --plan_only:
plan arithmetic, the lr as a function of progress, resume checks, the stage switch, bad input, and
two gloo processes through main.py across a batch change, killed right after it and resumed exactly."""
import hashlib
import json
import math
import multiprocessing
import os
import signal
import socket
import sys
import traceback
from types import SimpleNamespace

import pytest
import torch

import main as main_mod
from conftest import ROOT
from curriculum import PlanError, build_plan
from runner.resume import check_same_run
from runner.stage import StageSwitch, StepParts, make_hparams
import utils

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import fault_inject  # noqa: E402


def parse(argv):
    return main_mod.get_args_parser().parse_args(argv)


def plan(*extra, model='CSWin_96_24322_base_224', curriculum='etpp', bs=64, uf=1, epochs=200, multiple=32):
    args = parse(['--model', model, '--curriculum', curriculum, '--epochs', str(epochs), '--batch_size', str(bs),
                  '--update_freq', str(uf), *extra])
    return build_plan(args, multiple)


# ---------------------------------------------------------------------------
# plan arithmetic
# ---------------------------------------------------------------------------

def same_images(large, published):
    """Everything but the batches is the published plan's: stages, data epochs (so images), replay,
    compute, warmup and budget; the base-size stages keep their batches."""
    assert [(s.size, s.magnitude, s.epochs, s.replay_times, s.buffer_size) for s in large.stages] == \
        [(s.size, s.magnitude, s.epochs, s.replay_times, s.buffer_size) for s in published.stages]
    assert large.total_compute == published.total_compute and large.num_epochs == published.num_epochs
    assert large.warmup == published.warmup and large.budget == published.budget
    for a, p in zip(large.stages, published.stages):
        growth = (a.batch_size * a.update_freq) / (p.batch_size * p.update_freq)
        assert a.lr_scale == growth  # lr x the stage's global batch / the published one
        if a.size == large.base_size:
            assert (a.batch_size, a.update_freq, a.lr_scale) == (p.batch_size, p.update_freq, 1.0)
        # fewer optimizer steps by the factor, the same images (a data set large enough that the
        # loader's whole batches hardly round it)
        steps_a, steps_p = (x.optimizer_steps(s, 10 ** 8, 8) for x, s in ((large, a), (published, p)))
        assert steps_a == pytest.approx(steps_p / growth, rel=1e-3)


@pytest.mark.parametrize('bs, uf, extra, expect', [
    # 64 GPUs at global 4096 (64 x 1): B=96 grows 4x (micro 256: the base micro-batch's memory at
    # 96 is 64 x 4), B=160 2x ((224/160)^2 = 1.96 -> 2), 224 stays
    (64, 1, [], {96: (256, 1, 4), 160: (128, 1, 2), 224: (64, 1, 1)}),
    # 8 GPUs (128 x 4): the published 512 x 1 at 96 is already that memory; the growth goes into
    # update_freq, never above the base stage's 4
    (128, 4, [], {96: (512, 4, 4), 160: (256, 4, 2), 224: (128, 4, 1)}),
    # memory: at most 128 per micro-batch with update_freq 1 holds B=96 at 2x
    (64, 1, ['--max_micro_batch', '128'], {96: (128, 1, 2), 160: (128, 1, 2), 224: (64, 1, 1)}),
    # the cap, a power of two at most (3 -> 2); a cap of 1 is the published plan
    (64, 1, ['--max_global_batch_factor', '3'], {96: (128, 1, 2), 160: (128, 1, 2), 224: (64, 1, 1)}),
    (64, 1, ['--max_global_batch_factor', '1'], {96: (64, 1, 1), 160: (64, 1, 1), 224: (64, 1, 1)}),
])
def test_large_global_batch_per_stage(bs, uf, extra, expect):
    large = plan('--stage_batch', 'large', *extra, bs=bs, uf=uf)
    published = plan(bs=bs, uf=uf)
    same_images(large, published)
    assert {s.size: (s.batch_size, s.update_freq, int(s.lr_scale)) for s in large.stages} == expect
    table = large.table(300, world=4096 // (bs * uf), images=1281167)
    assert 'lr x' in table and 'opt steps' in table and 'global' in table
    if expect[96][2] > 1:
        assert '--stage_batch large' in table and '4096 or' in table


@pytest.mark.parametrize('model, curriculum, extra', [
    ('resnet50', 'etpp', ['--replay_preset', 'true']),  # replay: update_freq stays 1
    ('deit_small_patch16_224', 'etpp', []),              # B=192: (224/192)^2 = 1.36 -> no growth
    ('convnext_tiny', 'et', []),                         # EfficientTrain (epochs progress)
    ('test_convnext', 'etpp', ['--base_input_size', '64', '--epochs', '2']),
])
def test_large_keeps_every_curriculums_images_and_budget(model, curriculum, extra):
    large = plan('--stage_batch', 'large', *extra, model=model, curriculum=curriculum, bs=512)
    published = plan(*extra, model=model, curriculum=curriculum, bs=512)
    same_images(large, published)
    for s in large.stages:
        if s.replay_times > 1:
            assert s.update_freq == 1 and s.loader_batch % 32 == 0
    if model.startswith('deit'):
        assert {s.size: s.lr_scale for s in large.stages}[192] == 1.0


def test_large_with_a_curriculum_file(tmp_path):
    path = tmp_path / 'c.json'
    path.write_text(json.dumps({'stages': [{'share': 0.5, 'size': 32}, {'share': 0.5, 'size': 64}]}))
    argv = ['--model', 'test_resnet', '--curriculum_file', str(path), '--base_input_size', '64', '--epochs', '4',
            '--batch_size', '16']
    large, published = build_plan(parse(argv + ['--stage_batch', 'large']), 16), build_plan(parse(argv), 16)
    same_images(large, published)
    assert [(s.batch_size, s.lr_scale) for s in large.stages] == [(64, 4.0), (16, 1.0)]


def test_lr_is_the_schedule_times_the_stage_scale_as_a_function_of_progress():
    args = parse(['--model', 'resnet50', '--curriculum', 'etpp', '--epochs', '200', '--batch_size', '64',
                  '--stage_batch', 'large'])
    large = build_plan(args, 32)
    published = build_plan(parse(['--model', 'resnet50', '--curriculum', 'etpp', '--epochs', '200',
                                  '--batch_size', '64']), 32)
    hl, hp = make_hparams(args, large), make_hparams(args, published)
    for e in range(large.num_epochs):
        for frac in (0.0, 0.5, 0.999):
            p = large.progress(e, frac)
            assert hl(p)[0] == pytest.approx(large.stage_at(e).lr_scale * hp(p)[0], rel=1e-12)
            assert hl(p)[1] == hp(p)[1]  # weight decay untouched
    # the stage starts at its first step: the scale changes exactly at the boundary
    first160 = next(s for s in large.stages if s.size == 160)
    p = large.progress(first160.start_epoch)
    assert large.stage_at_progress(p).size == 160 and large.stage_at_progress(math.nextafter(p, 0)).size == 96
    assert large.stage_at_progress(large.total_progress) is large.stages[-1]


def test_bad_factor_is_a_plan_error():
    with pytest.raises(PlanError, match='--max_global_batch_factor must be >= 1'):
        plan('--stage_batch', 'large', '--max_global_batch_factor', '0')


# ---------------------------------------------------------------------------
# resume, stage switch
# ---------------------------------------------------------------------------

def test_a_resume_that_changes_stage_batch_is_refused_as_a_plan_change(capsys):
    base = ['--model', 'resnet50', '--curriculum', 'etpp', '--epochs', '200', '--batch_size', '64']
    saved_args = parse(base)
    saved = build_plan(saved_args, 32)
    ckpt = {'args': utils.plain_args(saved_args), 'epoch': 3, 'plan': saved.summary(), 'rng': [None]}
    now = parse(base + ['--stage_batch', 'large'])
    with pytest.raises(utils.UserError, match=r'--stage_batch large differs .*--resume_override stage_batch'):
        check_same_run(now, ckpt, 'ckpt.pth', build_plan(now, 32), 1)
    # deliberately: allowed, the batches and lr scales may differ
    now = parse(base + ['--stage_batch', 'large', '--resume_override', 'stage_batch'])
    check_same_run(now, ckpt, 'ckpt.pth', build_plan(now, 32), 1)
    assert 'deliberately changed --stage_batch large' in capsys.readouterr().out
    # a large run's checkpoint: --max_global_batch_factor is checked with it
    large_args = parse(base + ['--stage_batch', 'large'])
    ckpt = {'args': utils.plain_args(large_args), 'epoch': 3, 'plan': build_plan(large_args, 32).summary(),
            'rng': [None]}
    now = parse(base + ['--stage_batch', 'large', '--max_global_batch_factor', '2'])
    with pytest.raises(utils.UserError, match='--max_global_batch_factor 2 differs'):
        check_same_run(now, ckpt, 'ckpt.pth', build_plan(now, 32), 1)
    summary = build_plan(large_args, 32).summary()
    assert [s.get('lr_scale', 1.0) for s in summary['stages']][::2] == [4.0, 2.0, 2.0, 1.0, 1.0]


class _Step:
    def __init__(self, *a, **k):
        self.graph_note, self.released = None, False

    def release(self):
        self.released = True


def test_the_switch_releases_the_previous_steps_graphs_on_a_batch_change():
    args = parse(['--model', 'resnet50', '--curriculum', 'etpp', '--epochs', '200', '--batch_size', '64',
                  '--stage_batch', 'large', '--device', 'cpu'])
    args.distributed = False
    p = build_plan(args, 32)
    parts = StepParts(None, SimpleNamespace(), None, torch.device('cpu'))
    switch = StageSwitch(args, p, torch.nn.Linear(2, 2), 96, None, SimpleNamespace(sampler=range(1024)), parts)
    switch.step_class = _Step
    first = switch.train_step(p.stages[0])
    assert switch.train_step(p.stages[1]) is first and not first.released  # same B and batch: kept
    second = switch.train_step(p.stages[2])  # B=160, 128 x 1: a new shape
    assert second is not first and first.released and not second.released


# ---------------------------------------------------------------------------
# --plan_only, bad input through main.py
# ---------------------------------------------------------------------------

def cli_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main_mod.cli(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err and '\n' not in err and 'Traceback' not in err, err
    return err


def test_plan_only_prints_the_plan_and_touches_no_data(tmp_path, capsys):
    out = tmp_path / 'never'
    main_mod.cli(['--plan_only', 'true', '--model', 'test_convnext', '--curriculum', 'etpp', '--epochs', '200',
                  '--base_input_size', '64', '--batch_size', '64', '--global_batch_size', '4096', '--world_size', '64',
                  '--stage_batch', 'large', '--data_path', str(tmp_path / 'missing'), '--output_dir', str(out),
                  '--resume', str(tmp_path / 'missing.pth'), '--device', 'cpu'])
    text = capsys.readouterr().out
    assert 'Training plan: EfficientTrain++ (E=200)' in text and 'theoretical speedup vs the 300-epoch' not in text
    assert 'theoretical speedup vs the same' in text
    assert '64 GPUs ("batch x freq" is per GPU): global batch 4096 or 8192 or 16384 (by stage)' in text
    assert 'for 1281167 training images per data epoch' in text  # ImageNet-1K's, without reading it
    rows = [ln.split() for ln in text.splitlines() if ln.strip()[:1].isdigit() and ' x ' in ln and '%' in ln]
    assert rows and {r[1]: r[11] for r in rows} == {'32': '4.00', '48': '2.00', '64': '1.00'}
    assert not out.exists() and not (tmp_path / 'missing').exists()
    assert not torch.cuda.is_initialized()


@pytest.mark.parametrize('argv, needle', [
    (['--plan_only', 'true', '--eval', 'true'], '--plan_only true prints a training plan and --eval true'),
    (['--plan_only', 'true', '--stage_batch', 'large', '--max_global_batch_factor', '0'],
     '--max_global_batch_factor must be >= 1'),
    (['--plan_only', 'true', '--world_size', '0'], '--world_size must be >= 1'),
    (['--stage_batch', 'large', '--max_global_batch_factor', '0', '--data_set', 'SYNTH'],
     '--max_global_batch_factor must be >= 1'),
    (['--world_size', '8', '--data_set', 'SYNTH'], '--world_size 8 plans for 8 processes with --plan_only'),
])
def test_bad_input_one_line_exit_2(argv, needle, capsys, tmp_path):
    base = ['--model', 'test_convnext', '--curriculum', 'etpp', '--epochs', '2', '--base_input_size', '64',
            '--device', 'cpu', '--output_dir', str(tmp_path / 'out')]
    assert needle in cli_error(base + argv, capsys)
    assert not (tmp_path / 'out').exists() or not os.listdir(tmp_path / 'out')


# ---------------------------------------------------------------------------
# two gloo processes across a batch change, killed right after it
# ---------------------------------------------------------------------------

# etpp at base 64, E=2: one data epoch each at B=32 (64 x 1, lr x4), 48 (32 x 1, lr x2), 64 (16 x 1)
# per process; 64 images per process, deterministic CPU kernels
RUN = ['--data_set', 'SYNTH', '--synth_classes', '4', '--synth_per_class', '32', '--synth_val_per_class', '2',
       '--synth_image_size', '72', '--model', 'test_resnet', '--curriculum', 'etpp', '--base_input_size', '64',
       '--epochs', '2', '--batch_size', '16', '--stage_batch', 'large', '--device', 'cpu', '--num_workers', '0',
       '--deterministic', 'true', '--save_ckpt_steps', '1', '--print_freq', '1000', '--warmup_epochs', '1',
       '--disable_eval', 'true', '--model_ema', 'true']


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _digest(model):
    """Of the weights (DDP keeps them equal on every rank; BatchNorm's running statistics, taken
    from rank 0 at each forward, differ after the last one)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _rank(rank, port, argv, result_path, kill_in_epoch):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    result = {'rank': rank}
    try:
        sys.stdout = sys.stderr = open(result_path + '.log', 'w', buffering=1)  # noqa: SIM115 - until os._exit
        if kill_in_epoch is not None:
            from runner import checkpoint

            original = checkpoint.Checkpointer.on_update

            def on_update(self, epoch, extra, steps, stop_request):
                callback = original(self, epoch, extra, steps, stop_request)

                def killed_after_the_first_update(done, meters, stop):
                    callback(done, meters, stop)  # rank 0 has written checkpoint-recovery.pth
                    if epoch == kill_in_epoch:
                        os.kill(os.getpid(), signal.SIGKILL)  # both ranks, at the same update
                return killed_after_the_first_update
            checkpoint.Checkpointer.on_update = on_update
        model = main_mod.main(main_mod.get_args_parser().parse_args(argv))
        result['digest'] = _digest(model)
    except BaseException:  # noqa: BLE001 - reported to the parent
        result['error'] = traceback.format_exc()[-1500:]
    with open(result_path, 'w') as f:
        json.dump(result, f)
    os._exit(0)


def _run_two(tmp_path, argv, name, kill_in_epoch=None):
    ctx = multiprocessing.get_context('fork')
    port = _free_port()
    paths = [str(tmp_path / f'{name}{r}.json') for r in range(2)]
    procs = [ctx.Process(target=_rank, args=(r, port, argv, paths[r], kill_in_epoch)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(240)
    finally:
        for p in procs:
            if p.exitcode is None:
                p.kill()
                p.join()
    return procs, paths


def test_two_gloo_processes_across_a_batch_change_resume_exactly_after_sigkill(tmp_path):
    ref, faulty = tmp_path / 'reference', tmp_path / 'faulty'
    procs, paths = _run_two(tmp_path, RUN + ['--output_dir', str(ref)], 'ref')
    results = [json.load(open(p)) for p in paths]
    assert [p.exitcode for p in procs] == [0, 0]
    assert all('error' not in r for r in results), [r.get('error') or open(p + '.log').read()[-1500:]
                                                    for r, p in zip(results, paths)]
    assert results[0]['digest'] == results[1]['digest']  # both ranks hold the same weights
    log = [json.loads(line) for line in open(ref / 'log.txt')]
    assert [(r['input_size'], r['batch_size'], r['update_freq']) for r in log] == [(32, 64, 1), (48, 32, 1),
                                                                                   (64, 16, 1)]
    assert all(math.isfinite(r['train_loss']) for r in log)
    # the stage's lr scale reached the optimizer: the B=48 epoch starts at 2x the schedule
    assert log[1]['train_lr'] > log[2]['train_lr']

    # killed (SIGKILL, both ranks) right after the first update of the B=48 stage, then the same command
    procs, _ = _run_two(tmp_path, RUN + ['--output_dir', str(faulty)], 'killed', kill_in_epoch=1)
    assert [p.exitcode for p in procs] == [-signal.SIGKILL] * 2
    recovery = utils.load_checkpoint_file(str(faulty / utils.RECOVERY_NAME))
    assert (recovery['epoch'], recovery['step'], recovery['input_size']) == (1, 1, 48)
    procs, paths = _run_two(tmp_path, RUN + ['--output_dir', str(faulty)], 'resumed')
    results = [json.load(open(p)) for p in paths]
    assert all('error' not in r for r in results), [r.get('error') for r in results]
    assert 'Resumed from' in open(paths[0] + '.log').read()
    assert results[0]['digest'] == results[1]['digest']
    assert fault_inject.compare(str(ref), str(faulty)) == []  # weights, EMA, optimizer and log.txt


def test_training_md_shows_what_plan_only_and_the_projection_print(capsys):
    doc = open(os.path.join(ROOT, 'TRAINING.md'), encoding='utf-8').read()
    main_mod.cli(['--plan_only', 'true', '--model', 'CSWin_96_24322_base_224', '--curriculum', 'etpp', '--epochs',
                  '200', '--batch_size', '64', '--global_batch_size', '4096', '--world_size', '64', '--stage_batch',
                  'large', '--data_path', '/data/imagenet'])
    assert capsys.readouterr().out.strip() in doc
    import project_scaling
    project_scaling.main(['--model', 'CSWin_96_24322_base_224', '--curriculum', 'etpp', '--epochs', '45',
                          '--baseline_epochs', '90', '--batch_size', '128', '--step_model', '3.3,20',
                          '--train_images', '14197122', '--plot', 'none'])
    summary = '\n'.join(capsys.readouterr().out.splitlines()[:10])
    assert summary in doc


def test_model_structure_on_the_meta_device_or_the_cpu():
    from runner.stage import model_structure

    def build(args, classes):
        if torch.empty(0).device.type == 'meta':
            raise RuntimeError('needs real tensors')
        return torch.nn.Linear(2, classes), 0

    assert model_structure(build, None, 3).weight.device.type == 'cpu'
    assert model_structure(lambda a, c: (torch.nn.Linear(2, c), 0), None, 3).weight.device.type == 'meta'

    def refused(args, classes):
        raise utils.UserError('--input_size: no')
    with pytest.raises(utils.UserError):
        model_structure(refused, None, 3)
