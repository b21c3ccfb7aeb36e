"""The first hour of a user: --help, one-line errors, evaluation at the trained size, file modes,
the plan table's text, the whole-run ETA and the training-curve plot."""
import argparse
import os
import re
import stat
import sys

import pytest
import torch

import main as main_mod
from runner.args import input_size_given
from runner.stage import compared_baseline_epochs, plan_text, whole_run_eta
import utils
from curriculum import build_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import fault_inject  # noqa: E402
import plot_log  # noqa: E402
import visualize_curriculum  # noqa: E402

ACC_RE = re.compile(r'^\* Acc@1 (\d+\.\d{3}) Acc@5 (\d+\.\d{3}) loss (\d+\.\d{3})(.*)$', re.M)

# a scaled-down EfficientTrain++ run: B = 32, 32, 48, 64 over 4 short epochs; it ends at 64
ETPP = ['--data_set', 'SYNTH', '--synth_classes', '4', '--synth_per_class', '8', '--synth_val_per_class', '4',
        '--synth_image_size', '72', '--model', 'test_convnext', '--curriculum', 'etpp', '--base_input_size', '64',
        '--epochs', '2', '--batch_size', '16', '--device', 'cpu', '--num_workers', '0', '--print_freq', '100',
        '--model_ema', 'true', '--model_ema_eval', 'true']
EVAL = ETPP[:ETPP.index('--curriculum')] + ['--device', 'cpu', '--num_workers', '0', '--eval', 'true']


def one_line_error(argv, capsys, code=2):
    with pytest.raises(SystemExit) as e:
        main_mod.cli(argv)
    assert e.value.code == code
    err = capsys.readouterr().err.strip()
    assert err and '\n' not in err and 'Traceback' not in err, err
    return err


@pytest.fixture(scope='module')
def etpp_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('etpp') / 'run')
    main_mod.cli(ETPP + ['--output_dir', out])
    return out


# ---------------------------------------------------------------------------
# --help
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('entry', ['main', 'main_pretrain'])
def test_every_flag_has_help_a_default_a_group_and_bool_metavar(entry):
    p = __import__(entry).get_args_parser()
    fmt = p._get_formatter()
    assert not p.allow_abbrev
    default_group = {id(a) for a in p._optionals._group_actions}
    for a in p._actions:
        if a.dest == 'help':
            continue
        name = a.option_strings[0]
        assert a.help and a.help is not argparse.SUPPRESS, f'{name} has no help text'
        assert 'default' in fmt._get_help_string(a), f'{name}: its default is not shown'
        assert id(a) not in default_group, f'{name} is in no argument group'
        if a.type is utils.str2bool:
            assert a.metavar == '{true,false}', f'{name}: a boolean should show {{true,false}}'
    text = p.format_help()
    for title in ('model', 'optimisation', 'schedule', 'curriculum', 'augmentation', 'data',
                  'run and checkpoints', 'distributed', 'performance'):
        assert f'\n{title}' in text
    assert '--model_ema {true,false}' in text and '(default: false)' in text


def test_abbreviations_and_parse_errors_are_one_line(capsys):
    err = one_line_error(['--epoch', '1'], capsys)
    assert '--epoch' in err and '--help' in err


def test_helper_scripts_list_their_own_options_first(capsys):
    with pytest.raises(SystemExit):
        visualize_curriculum.get_args_parser().parse_args(['--help'])
    out = capsys.readouterr().out
    assert '--images' in out and 'main.py --help' in out and '--lr' not in out and '--warmup_epochs' not in out
    # main.py's flags are still accepted
    args = visualize_curriculum.get_args_parser().parse_args(['--images', 'x', '--lr', '1e-3'])
    assert args.lr == 1e-3
    with pytest.raises(SystemExit):
        fault_inject.main(['--help'])
    out = capsys.readouterr().out
    assert out.count('(default:') >= 6 and 'main.py --help' in out


@pytest.mark.parametrize('script', ['bench_step', 'bench_e2e'])
def test_benchmark_scripts_help_their_own_options(script, capsys):
    # their own flags come first, each with help and its default; main.py's go to its parser
    sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
    mod = __import__(script)
    with pytest.raises(SystemExit):
        mod.parse(['--help'])
    out = capsys.readouterr().out
    options = out.split('options:', 1)[1]
    own = re.findall(r'^  (--\w+)', options, re.M)
    assert own and '--lr' not in out and 'main.py --help' in out
    for flag in own:
        entry = options.split(flag, 1)[1].split('\n  --', 1)[0]
        assert 'default' in entry, f'{script} {flag}: no default shown'
    assert "leaves torch's default" not in out  # main.py's --cudnn_benchmark is true now


# ---------------------------------------------------------------------------
# one-line errors
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('entry', ['main.py', 'main_pretrain.py'])
def test_ctrl_c_while_starting_is_one_line_and_130(tmp_path, entry):
    # as from a terminal: SIGINT at its default; it arrives while torch is still being
    # imported (or, on a slow machine, later, where training's own handling answers)
    import signal
    import subprocess
    argv = ETPP if entry == 'main.py' else ['--model', 'mae_vit_tiny_patch16', '--data_set', 'SYNTH',
                                            '--base_input_size', '64', '--curriculum', 'etpp', '--epochs', '2',
                                            '--batch_size', '8', '--device', 'cpu', '--num_workers', '0']
    cmd = [sys.executable, os.path.join(ROOT, entry)] + argv + ['--output_dir', str(tmp_path / 'run')]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, 'OMP_NUM_THREADS': '1'},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        import time
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    lines = [line for line in err.splitlines() if line.strip()]
    assert p.returncode == 130, err
    assert len(lines) == 1 and 'Traceback' not in err and 'KeyboardInterrupt' not in err, err


def test_directory_as_checkpoint_is_named_as_one(capsys, tmp_path):
    (tmp_path / 'checkpoint-3.pth').write_bytes(b'')
    err = one_line_error(EVAL + ['--resume', str(tmp_path)], capsys)
    assert 'is a directory (it holds checkpoint-3.pth)' in err and 'does not exist' not in err


def test_bad_device_is_one_line(capsys):
    err = one_line_error(EVAL + ['--device', 'cpuu', '--resume', 'x.pth'], capsys)
    assert '--device cpuu' in err


def test_text_file_as_checkpoint_names_it_and_never_suggests_weights_only(capsys, tmp_path):
    readme = os.path.join(ROOT, 'README.md')
    err = one_line_error(EVAL + ['--resume', readme], capsys)
    assert readme in err and 'not a readable checkpoint' in err and 'torch.save' in err
    assert 'weights_only' not in err and '(101)' not in err

    import fractions
    pickled = tmp_path / 'objects.pth'
    torch.save({'model': {}, 'thing': fractions.Fraction(1, 3)}, pickled)  # not loaded without running code
    err = one_line_error(EVAL + ['--resume', str(pickled)], capsys)
    assert 'weights_only' not in err and 'could run code' in err


# ---------------------------------------------------------------------------
# evaluation at the size the checkpoint was trained at
# ---------------------------------------------------------------------------

def test_eval_uses_the_checkpoints_size_unless_given(etpp_run, capsys):
    best = os.path.join(etpp_run, 'checkpoint-best.pth')
    assert utils.load_checkpoint_file(best)['input_size'] == 64
    capsys.readouterr()
    stats = main_mod.main(main_mod.get_args_parser().parse_args(EVAL + ['--resume', best]))
    out = capsys.readouterr().out
    assert 'Evaluating at 64x64' in out and 'pass --input_size' in out
    acc = ACC_RE.findall(out)
    assert len(acc) == 1 and acc[0][3] == ' at 64x64'
    assert float(acc[0][0]) == pytest.approx(stats['acc1'], abs=1e-3)
    # the log's last epoch evaluated the same weights at 64 on the same images
    last = [line for line in open(os.path.join(etpp_run, 'log.txt'))][-1]
    assert f'"test_acc1": {stats["acc1"]}' in last

    # an explicit --input_size wins, with a one-line note; the default value typed out counts as given
    main_mod.main(main_mod.get_args_parser().parse_args(EVAL + ['--resume', best, '--input_size', '224']))
    out = capsys.readouterr().out
    assert 'trained at 64x64; evaluating at --input_size 224' in out and ACC_RE.findall(out)[0][3] == ' at 224x224'

    # a checkpoint of the B=48 stage is evaluated at 48
    main_mod.main(main_mod.get_args_parser().parse_args(
        EVAL + ['--resume', os.path.join(etpp_run, 'checkpoint-1.pth')]))
    assert ACC_RE.findall(capsys.readouterr().out)[0][3] == ' at 48x48'


def test_input_size_default_is_stored_as_a_plain_int():
    args = main_mod.get_args_parser().parse_args([])
    assert not input_size_given(args) and args.input_size == 224
    assert type(utils.plain_args(args).input_size) is int
    assert input_size_given(main_mod.get_args_parser().parse_args(['--input_size', '224']))


# ---------------------------------------------------------------------------
# file modes
# ---------------------------------------------------------------------------

def test_checkpoints_config_and_store_copies_follow_the_umask(etpp_run, tmp_path):
    for name in ('checkpoint-best.pth', 'checkpoint-2.pth', 'config.json', 'log.txt'):
        # the module's run was made under the test process's umask
        assert stat.S_IMODE(os.stat(os.path.join(etpp_run, name)).st_mode) == utils.file_mode(), name
    old = os.umask(0o027)
    try:
        assert utils.file_mode() == 0o640
        utils.atomic_save({'a': torch.ones(1)}, str(tmp_path / 'c.pth'))
        utils.atomic_write_text(str(tmp_path / 'c.json'), '{}')
        from PIL import Image
        from pipelines import store
        Image.new('RGB', (16, 12), (10, 200, 30)).save(tmp_path / 'src.jpg')
        os.makedirs(tmp_path / 'store' / store.TMP_DIR)
        res = store.write_copies(str(tmp_path / 'src.jpg'), 'a/src.jpg', str(tmp_path / 'store'), (2,), 95, '4:4:4')
        assert res['written'] == 1
        for p in (tmp_path / 'c.pth', tmp_path / 'c.json', tmp_path / 'store' / '2' / 'a' / 'src.jpg'):
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o640, p
    finally:
        os.umask(old)
    os.umask(0o022)
    try:
        utils.atomic_save({'a': torch.ones(1)}, str(tmp_path / 'd.pth'))
        assert stat.S_IMODE(os.stat(tmp_path / 'd.pth').st_mode) == 0o644
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------
# the plan table and the ETA
# ---------------------------------------------------------------------------

def plan_args(argv):
    return main_mod.get_args_parser().parse_args(argv)


def test_plan_table_for_a_small_budget():
    args = plan_args(['--model', 'test_convnext', '--curriculum', 'etpp', '--epochs', '2', '--base_input_size', '64'])
    text = plan_text(args, build_plan(args), torch.device('cpu'), 2)
    assert 'vs the same 3 data epochs at 64: 1.66x' in text
    assert '300-epoch' not in text and 'per GPU' not in text
    assert 'Lanczos resize on the CPU, published pipeline' in text
    assert '2 processes ("batch x freq" is per process): global batch 128' in text
    notes = [line for line in text.splitlines() if line.startswith('note:')]
    assert sum('skipped' in n for n in notes) == 1
    assert sum('warmup clipped' in n for n in notes) == 1
    plan = build_plan(args)
    assert plan.warmup == pytest.approx(0.2 * plan.total_progress)
    fast = plan_args(['--model', 'test_convnext', '--curriculum', 'etpp', '--epochs', '2', '--base_input_size', '64',
                      '--data_pipeline', 'fast'])
    assert 'bicubic resize' in plan_text(fast, build_plan(fast), torch.device('cpu'), 1)
    assert not [n for n in notes if 'no stage trains at the base size' in n]
    # the drivers' last segment always trains (it ends at epoch E of E), even at E=1 ...
    tiny = build_plan(plan_args(['--model', 'test_convnext', '--curriculum', 'etpp', '--epochs', '1',
                                 '--base_input_size', '64']))
    assert [s.size for s in tiny.stages] == [64] and not [n for n in tiny.notes if 'no stage trains' in n]
    # ... but a base off the size grid leaves no stage at the base size: the plan says what is missing
    off = build_plan(plan_args(['--model', 'test_convnext', '--curriculum', 'etpp', '--epochs', '2',
                                '--base_input_size', '56']))
    assert off.stages[-1].size < 56
    assert [n for n in off.notes if 'no stage trains at the base size 56' in n and 'checkpoint-best' in n]
    et = build_plan(plan_args(['--model', 'test_convnext', '--curriculum', 'et', '--epochs', '3',
                               '--base_input_size', '64']))
    assert len(et.stages) == 3
    # ET_training.py's ends int(3/5 x (k+1)) = 0, 1, 1, 2, 3: segments 0 and 2 get no epoch
    assert [n for n in et.notes if n.startswith('segments 0 (B=48), 2 (B=48) of 5 round to 0 data epochs')]
    assert [n for n in et.notes if n.startswith('segments 1, 3: batch not doubled')]  # the kept ones only


def test_plan_table_compares_with_the_papers_baseline_only_for_its_settings():
    args = plan_args(['--model', 'resnet50', '--curriculum', 'etpp', '--epochs', '200'])
    plan = build_plan(args)
    text = plan.table(compared_baseline_epochs(args), world=8, per='GPU')
    assert 'vs the 300-epoch baseline at 224: 1.50x' in text and '8 GPUs' in text
    assert not [n for n in plan.notes if 'warmup' in n]
    et = plan_args(['--curriculum', 'et', '--epochs', '300'])
    assert 'vs the same 300 data epochs at 224: 1.53x' in build_plan(et).table(compared_baseline_epochs(et))


def test_whole_run_eta_from_compute_progress():
    args = plan_args(['--model', 'test_convnext', '--curriculum', 'etpp', '--epochs', '2', '--base_input_size', '64'])
    plan = build_plan(args)  # epochs cost 0.25, 0.5625, 1.0 (total 1.8125)
    assert whole_run_eta(plan, 0, 0, 5.0) == ''
    # 0.25 compute took 5 s: 1.5625 left at 20 s per unit
    assert whole_run_eta(plan, 0, 1, 5.0) == ', whole-run ETA 0:00:31'
    # a resumed process measures only its own part
    assert whole_run_eta(plan, 1, 2, 11.25) == ', whole-run ETA 0:00:20'


# ---------------------------------------------------------------------------
# training curves
# ---------------------------------------------------------------------------

def test_plot_log_draws_a_real_run(etpp_run, tmp_path, capsys):
    pytest.importorskip('matplotlib')
    from PIL import Image
    png = str(tmp_path / 'curves.png')
    assert plot_log.cli([etpp_run, '--out', png]) == 0
    with Image.open(png) as im:
        assert im.size[0] > 400 and im.size[1] > 400
    records, base = plot_log.read_log(etpp_run)
    s = plot_log.series(records, base)
    assert base == 64 and s['epoch'] == [1, 2, 3] and s['boundaries'] == [1, 2]
    assert s['compute'] == pytest.approx([0.25, 0.8125, 1.8125])
    assert all(v is not None for v in s['test_ema_acc1'])
    assert plot_log.cli([str(tmp_path / 'nothing')]) == 2
    assert 'log.txt does not exist' in capsys.readouterr().err
    # without --out, an unwritable curves.png is one line too
    blocked = tmp_path / 'blocked'
    os.makedirs(blocked / 'curves.png')
    with open(os.path.join(etpp_run, 'log.txt')) as f, open(blocked / 'log.txt', 'w') as g:
        g.write(f.read())
    assert plot_log.cli([str(blocked)]) == 2
    assert capsys.readouterr().err.strip() == 'error: cannot write the PNG (Is a directory)'
    with pytest.raises(SystemExit):
        plot_log.cli(['--help'])
    assert 'None' not in capsys.readouterr().out
