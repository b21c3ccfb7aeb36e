"""The launchers in scripts/ (recipe table, torchrun/SLURM command lines) and the
released-checkpoint path through main.py, on CPU."""
import argparse
import os
import re
import shlex
import stat
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import main as main_mod
from curriculum import build_plan
from pipelines.datasets import SynthDataset, eval_transform
from models import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, 'scripts')
sys.path.insert(0, SCRIPTS)
import recipes  # noqa: E402
from test_checkpoint_compat import to_official_convnext  # noqa: E402  (one inverse name mapping)

MODELS = list(recipes.RECIPES)
PUBLISHED = ['resnet50', 'convnext_tiny', 'convnext_small', 'convnext_base', 'deit_tiny_patch16_224',
             'deit_small_patch16_224', 'swin_tiny', 'swin_small', 'swin_base', 'CSWin_64_12211_tiny_224',
             'CSWin_64_24322_small_224', 'CSWin_96_24322_base_224', 'caformer_s18', 'caformer_s36',
             'caformer_m36', 'pvt_tiny', 'pvt_small', 'pvt_medium', 'pvt_large']

# METHOD.md, transcribed independently of scripts/recipes.py.
BASE_DROP_PATH = {
    # PVT: whai362/PVT classification/configs/pvt/pvt_*.py
    'pvt_tiny': 0.1, 'pvt_small': 0.1, 'pvt_medium': 0.3, 'pvt_large': 0.3,
    'resnet50': 0.0, 'convnext_tiny': 0.1, 'convnext_small': 0.4, 'convnext_base': 0.5,
    'deit_tiny_patch16_224': 0.1, 'deit_small_patch16_224': 0.1,
    'swin_tiny': 0.2, 'swin_small': 0.3, 'swin_base': 0.5,
    'CSWin_64_12211_tiny_224': 0.2, 'CSWin_64_24322_small_224': 0.4, 'CSWin_96_24322_base_224': 0.5,
}
_S3 = [96] * 2 + [160] * 4 + [224] * 4
_T_BATCH = {96: (512, 1), 160: (512, 1), 224: (256, 2)}
_SB_BATCH = {96: (512, 1), 160: (256, 2), 224: (128, 4)}
# model -> (B of the 10 segments, {B: per-GPU batch x update_freq on 8 GPUs})
METHOD_SCHEDULE = {
    'resnet50': (_S3, {96: (512, 1), 160: (512, 1), 224: (512, 1)}),
    'swin_tiny': (_S3, _T_BATCH), 'CSWin_64_12211_tiny_224': (_S3, _T_BATCH),
    'swin_small': (_S3, _SB_BATCH), 'swin_base': (_S3, _SB_BATCH),
    'CSWin_64_24322_small_224': (_S3, _SB_BATCH), 'CSWin_96_24322_base_224': (_S3, _SB_BATCH),
    'convnext_tiny': ([160] * 6 + [224] * 4, {160: (256, 2), 224: (128, 4)}),
    'convnext_small': ([160] * 6 + [224] * 4, {160: (128, 4), 224: (64, 8)}),
    'convnext_base': ([160] * 6 + [224] * 4, {160: (128, 4), 224: (64, 8)}),
    'deit_tiny_patch16_224': ([96] * 2 + [160] * 4 + [192] * 2 + [224] * 2,
                              {96: (512, 1), 160: (512, 1), 192: (256, 2), 224: (256, 2)}),
    'deit_small_patch16_224': ([96] * 2 + [160] * 4 + [192] * 2 + [224] * 2,
                               {96: (512, 1), 160: (512, 1), 192: (256, 2), 224: (256, 2)}),
}
# model -> {B: (replay_times, buffer_size)}
METHOD_REPLAY = {
    'resnet50': {96: (4, 1920), 160: (2, 256), 224: (1, 0)},
    # METHOD.md names no setting for DeiT's 192 stage: no replay there
    'deit_small_patch16_224': {96: (4, 1920), 160: (2, 256), 192: (1, 0), 224: (1, 0)},
    'swin_tiny': {96: (2, 1024), 160: (1, 0), 224: (1, 0)},
    'CSWin_64_12211_tiny_224': {96: (2, 1024), 160: (1, 0), 224: (1, 0)},
}


@pytest.fixture(autouse=True)
def _launch_env(monkeypatch):
    for name in ('GPUS_PER_NODE', 'NNODES', 'NODE_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'RDZV_ID', 'DATA_PATH',
                 'OUTPUT_DIR', 'OUTPUT_ROOT', 'BUDGET', 'DRY_RUN', 'SLURM_NTASKS', 'SLURM_PROCID'):
        monkeypatch.delenv(name, raising=False)


def split_command(cmd):
    """(launcher part, main.py argv) of a launcher command."""
    i = next(k for k, a in enumerate(cmd) if os.path.basename(a) == 'main.py')
    return cmd[:i], cmd[i + 1:]


def parsed(cmd):
    return main_mod.get_args_parser().parse_args(split_command(cmd)[1])


def train_cmd(*argv):
    cmd, dry = recipes.build_command(['train', *argv])
    return cmd


def bash_dry_run(script, *argv, env=None):
    e = dict(os.environ, DRY_RUN='1', PYTHON=sys.executable, **(env or {}))
    r = subprocess.run(['bash', os.path.join(SCRIPTS, script), *argv], capture_output=True, text=True, env=e,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if 'main.py' in ln]
    assert len(lines) == 1, r.stdout
    return shlex.split(lines[0]), r.stdout


# ----------------------------------------------------------------------- recipe table

def test_every_published_model_has_a_recipe_and_a_wrapper():
    assert MODELS == PUBLISHED
    for model in MODELS:
        path = os.path.join(SCRIPTS, f'train_{model}.sh')
        with open(path, encoding='utf-8') as f:
            assert f.read() == recipes.wrapper_text(model), f'{path} drifted: run scripts/recipes.py wrappers'
        assert os.stat(path).st_mode & stat.S_IXUSR


def test_bash_scripts_parse():
    for name in sorted(os.listdir(SCRIPTS)):
        if name.endswith('.sh'):
            r = subprocess.run(['bash', '-n', os.path.join(SCRIPTS, name)], capture_output=True, text=True)
            assert r.returncode == 0, (name, r.stderr)


@pytest.mark.parametrize('variant', ['etpp', 'et', 'baseline'])
def test_dry_runs_parse_and_follow_method(variant):
    for model in MODELS:
        budgets = recipes.PUBLISHED_BUDGETS if variant == 'etpp' else (300,)
        for e in budgets:
            a = parsed(train_cmd(model, '--variant', variant, '--budget', str(e), '--gpus', '8',
                                 '--data_path', '/data/in1k'))
            assert a.model == model and a.epochs == e and a.data_path == '/data/in1k'
            assert a.curriculum == {'etpp': 'etpp', 'et': 'et', 'baseline': 'none'}[variant]
            assert a.batch_size * a.update_freq * 8 == 4096
            base = BASE_DROP_PATH.get(model, recipes.RECIPES[model].drop_path)
            want = base * e / 200 if variant == 'etpp' else base
            assert a.drop_path == pytest.approx(want, abs=1e-9), (model, e)
            check_family_flags(model, a, variant)


def check_family_flags(model, a, variant='etpp'):
    fam = recipes.RECIPES[model].family
    ema = fam in ('convnext', 'cswin')
    assert a.model_ema is ema and a.model_ema_eval is ema
    assert a.use_amp is (fam in ('deit', 'swin', 'cswin', 'pvt'))
    # PVT: whai362/PVT configs clip at 1.0 for Medium and Large only
    clip = {'deit': 5.0, 'swin': 5.0}.get(fam, 1.0 if model in ('pvt_medium', 'pvt_large') else None)
    assert a.clip_grad == clip
    assert a.warmup_epochs == 20 and a.min_lr == 1e-6
    if model == 'CSWin_96_24322_base_224' and variant == 'et':  # ET_training.py: the CSWin flags only
        assert (a.opt, a.opt_eps, a.lr, a.weight_decay, a.model_ema_decay) == ('adamw', 1e-8, 4e-3, 0.05, 0.9999)
    elif model == 'CSWin_96_24322_base_224':
        assert (a.opt, a.opt_eps, a.lr, a.weight_decay, a.model_ema_decay) == ('lamb', 1e-6, 8e-3, 0.1, 0.9998)
    elif fam == 'caformer':  # not in METHOD.md: the sail-sg/metaformer recipe
        assert (a.opt, a.lr, a.weight_decay) == ('lamb', 8e-3, 0.05)
    else:
        assert (a.opt, a.lr, a.weight_decay, a.model_ema_decay) == ('adamw', 4e-3, 0.05, 0.9999)


@pytest.mark.parametrize('model', sorted(METHOD_SCHEDULE))
def test_plan_on_8_gpus_has_the_published_batches(model):
    sizes, batches = METHOD_SCHEDULE[model]
    a = parsed(train_cmd(model, '--gpus', '8', '--data_path', '/d'))
    plan = build_plan(a, 16)
    assert not plan.notes
    assert [s.magnitude for s in plan.stages] == list(range(10))  # m = segment index, none skipped
    for s in plan.stages:
        assert s.size == sizes[s.magnitude], (model, s)
        assert (s.batch_size, s.update_freq) == batches[s.size], (model, s)
    assert plan.total_compute == pytest.approx(200, rel=0.01)
    if model.startswith('deit'):  # DeiT: the drivers' int(0.2 x 200 x (224/96)^2) = 217 epochs at 96
        assert plan.warmup == pytest.approx(217 * (96 / 224) ** 2)
    else:
        assert plan.warmup == pytest.approx(plan.progress_after_plain_epochs(20))


@pytest.mark.parametrize('gpus', [1, 4, 16, 32])
def test_global_batch_is_kept_on_other_gpu_counts(gpus):
    for model in MODELS:
        a = parsed(train_cmd(model, '--gpus', str(gpus), '--data_path', '/d'))
        for s in build_plan(a, 16).stages:
            assert s.batch_size * s.update_freq * gpus == 4096, (model, gpus, s)
            assert s.batch_size <= max(METHOD_SCHEDULE.get(model, (0, {0: (512, 1)}))[1].values())[0]


@pytest.mark.parametrize('model', sorted(METHOD_REPLAY))
def test_replay_preset_follows_method(model):
    a = parsed(train_cmd(model, '--replay', '--gpus', '8', '--data_path', '/d'))
    assert a.replay_preset is True
    plan = build_plan(a, 16)
    for s in plan.stages:
        assert (s.replay_times, s.buffer_size) == METHOD_REPLAY[model][s.size]
        assert s.replay_times == 1 or s.update_freq == 1
    assert plan.total_compute == pytest.approx(200, rel=0.01)


def test_launcher_errors_are_one_line(capsys):
    cases = [
        ['train', 'caformer_s18', '--replay', '--gpus', '8', '--data_path', '/d'],  # nothing published
        ['train', 'swin_tiny', '--variant', 'et', '--replay', '--gpus', '8', '--data_path', '/d'],
        ['train', 'swin_tiny', '--gpus', '8'],  # no data
        ['train', 'swin_tiny', '--gpus', '6', '--data_path', '/d'],  # 4096 not divisible
        ['train', 'swin_tiny', '--gpus', '8', '--nnodes', '2', '--data_path', '/d'],  # no rendezvous host
    ]
    for argv in cases:
        assert recipes.cli(argv + ['--dry_run']) == 2
        err = capsys.readouterr().err
        assert err.startswith('recipes.py: error: ') and err.count('\n') == 1, err


# ----------------------------------------------------------------------- launch modes

def test_single_node_torchrun():
    from torch.distributed.run import get_args_parser as torchrun_parser
    launcher, _ = split_command(train_cmd('swin_tiny', '--gpus', '8', '--data_path', '/d'))
    t = torchrun_parser().parse_args(launcher[3:] + ['main.py'])
    assert launcher[:3] == [sys.executable, '-m', 'torch.distributed.run']
    assert t.nproc_per_node == '8' and t.standalone
    launcher, _ = split_command(train_cmd('swin_tiny', '--gpus', '4', '--master_port', '29611', '--data_path', '/d'))
    t = torchrun_parser().parse_args(launcher[3:] + ['main.py'])
    assert t.master_port == 29611 and not t.standalone
    launcher, _ = split_command(train_cmd('swin_tiny', '--gpus', '1', '--data_path', '/d'))
    assert launcher == [sys.executable]


def test_multinode_rendezvous(monkeypatch):
    from torch.distributed.run import get_args_parser as torchrun_parser
    monkeypatch.setenv('NNODES', '4')
    monkeypatch.setenv('GPUS_PER_NODE', '8')
    monkeypatch.setenv('MASTER_ADDR', 'node-a')
    monkeypatch.setenv('MASTER_PORT', '29400')
    cmd = train_cmd('convnext_base', '--data_path', '/d', '--output_dir', '/shared/out')
    launcher, argv = split_command(cmd)
    t = torchrun_parser().parse_args(launcher[3:] + ['main.py'])
    assert (t.nnodes, t.nproc_per_node, t.rdzv_backend, t.rdzv_endpoint) == ('4', '8', 'c10d', 'node-a:29400')
    assert t.rdzv_id == 'convnext_base_etpp_E200'
    a = main_mod.get_args_parser().parse_args(argv)
    assert (a.batch_size, a.update_freq, a.output_dir) == (64, 2, '/shared/out')  # 64 x 2 x 32 GPUs = 4096

    monkeypatch.setenv('NODE_RANK', '3')
    cmd = train_cmd('convnext_base', '--rdzv_backend', 'static', '--data_path', '/d')
    t = torchrun_parser().parse_args(split_command(cmd)[0][3:] + ['main.py'])
    assert (t.rdzv_backend, t.node_rank, t.master_addr, t.master_port) == ('static', 3, 'node-a', 29400)

    out, _ = bash_dry_run('multinode_train.sh', 'swin_tiny', '--data_path', '/d',
                          env={'NNODES': '2', 'MASTER_ADDR': 'h0', 'MASTER_PORT': '29401', 'GPUS_PER_NODE': '8'})
    t = torchrun_parser().parse_args(split_command(out)[0][3:] + ['main.py'])
    assert (t.nnodes, t.rdzv_endpoint) == ('2', 'h0:29401')


def test_slurm_script_with_stub_commands(tmp_path):
    # scontrol / srun stand-ins: srun runs the command once, as one task of a 16-task job
    (tmp_path / 'scontrol').write_text('#!/usr/bin/env bash\nprintf "gpu-node-07\\ngpu-node-08\\n"\n')
    (tmp_path / 'srun').write_text('#!/usr/bin/env bash\nshift\nexec "$@"\n')
    for f in ('scontrol', 'srun'):
        os.chmod(tmp_path / f, 0o755)
    env = {'PATH': f'{tmp_path}:{os.environ["PATH"]}', 'SLURM_JOB_NODELIST': 'gpu-node-[07-08]',
           'SLURM_JOB_ID': '123456', 'SLURM_NTASKS': '16', 'SLURM_PROCID': '5'}
    cmd, out = bash_dry_run('slurm_train.sh', 'swin_small', '--data_path', '/d', '--budget', '150', env=env)
    assert 'MASTER_ADDR=gpu-node-07 MASTER_PORT=23456 tasks=16' in out
    launcher, argv = split_command(cmd)
    assert launcher == [sys.executable]  # one process per task, no torchrun
    a = main_mod.get_args_parser().parse_args(argv)
    assert (a.batch_size, a.update_freq, a.epochs, a.drop_path) == (128, 2, 150, pytest.approx(0.225))


def test_user_strings_are_never_evaluated(tmp_path):
    marker = tmp_path / 'pwned'
    evil = f'{tmp_path}/my data/$(touch {marker}); `touch {marker}`'
    cmd, _ = bash_dry_run('train_resnet50.sh', '--gpus', '8', '--data_path', evil, '--output_dir', evil + ' out')
    a = main_mod.get_args_parser().parse_args(split_command(cmd)[1])
    assert a.data_path == evil and a.output_dir == evil + ' out'
    assert not marker.exists()


def test_environment_and_passthrough(monkeypatch):
    monkeypatch.setenv('GPUS_PER_NODE', '8')
    monkeypatch.setenv('DATA_PATH', '/env/data')
    monkeypatch.setenv('OUTPUT_ROOT', '/env/out')
    monkeypatch.setenv('BUDGET', '150')
    a = parsed(train_cmd('swin_base', '--num_workers', '12', '--', '--model_ema_decay', '0.999'))
    assert (a.data_path, a.output_dir, a.epochs) == ('/env/data', '/env/out/swin_base_etpp_E150', 150)
    assert a.num_workers == 12 and a.model_ema_decay == 0.999
    # flags after the recipe's win: a user's --lr overrides the recipe's
    assert parsed(train_cmd('swin_base', '--lr', '1e-3')).lr == 1e-3


def test_eval_script_dry_run():
    cmd, _ = bash_dry_run('eval.sh', 'swin_tiny', '/ckpt/swin_t.pth', '--data_path', '/d', '--gpus', '8')
    launcher, argv = split_command(cmd)
    assert '--standalone' in launcher
    a = main_mod.get_args_parser().parse_args(argv)
    assert (a.model, a.eval, a.resume, a.input_size, a.model_ema_eval) == ('swin_tiny', True, '/ckpt/swin_t.pth',
                                                                           224, False)
    cmd, _ = bash_dry_run('eval.sh', 'convnext_tiny', '/c.pth', '--data_path', '/d', '--gpus', '1', '--ema')
    a = main_mod.get_args_parser().parse_args(split_command(cmd)[1])
    assert a.model_ema and a.model_ema_eval


# ------------------------------------------------- released checkpoints through main.py

EVAL_ARGV = ['--data_set', 'SYNTH', '--synth_classes', '4', '--synth_per_class', '2', '--synth_val_per_class', '4',
             '--synth_image_size', '40', '--input_size', '32', '--batch_size', '11', '--device', 'cpu',
             '--num_workers', '0', '--pin_mem', 'false', '--eval', 'true']
ACC_RE = re.compile(r'\* Acc@1 (\d+\.\d{3}) Acc@5 (\d+\.\d{3}) loss (\d+\.\d{3})')


def perturbed_convnext(seed):
    torch.manual_seed(seed)
    m = create_model('convnext_atto', num_classes=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return m.eval()


def direct_eval(model):
    val = SynthDataset(num_classes=4, per_class=4, image_size=40, seed=0, split='val')
    tf = eval_transform(32)
    x = torch.stack([tf(val[i][0]) for i in range(len(val))])
    y = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        logits = model(x)
    return 100.0 * (logits.argmax(-1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def test_released_convnext_checkpoint_evaluates_through_main(tmp_path, capsys):
    model, ema = perturbed_convnext(1), perturbed_convnext(2)
    names = to_official_convnext(model.state_dict())
    assert 'downsample_layers.0.0.weight' in names and 'stages.0.0.dwconv.weight' in names
    path = str(tmp_path / 'released.pth')
    torch.save({'model': names, 'model_ema': to_official_convnext(ema.state_dict()), 'epoch': 199,
                'args': argparse.Namespace(model='convnext_atto', lr=4e-3, drop_path=0.1)}, path)

    for extra, ref, entry in (([], model, 'model'), (['--model_ema', 'true', '--model_ema_eval', 'true'], ema,
                                                     'model_ema')):
        main_mod.main(main_mod.get_args_parser().parse_args(
            EVAL_ARGV + ['--model', 'convnext_atto', '--resume', path] + extra))
        out = capsys.readouterr().out
        assert f'[{entry}]' in out
        m = ACC_RE.search(out)
        assert m, out[-2000:]
        acc1, _, loss = map(float, m.groups())
        want_acc1, want_loss = direct_eval(ref)
        assert acc1 == pytest.approx(want_acc1, abs=1e-3)
        assert loss == pytest.approx(want_loss, abs=1.5e-3)
    assert direct_eval(model) != direct_eval(ema)


def test_checkpoint_of_another_architecture_exits_with_one_line(tmp_path, capsys):
    path = str(tmp_path / 'resnet.pth')
    torch.save({'model': create_model('resnet18', num_classes=4).state_dict()}, path)
    with pytest.raises(SystemExit) as e:
        main_mod.cli(EVAL_ARGV + ['--model', 'convnext_atto', '--resume', path])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and err.startswith('error: ')
    assert 'does not match model convnext_atto' in err and 'resnet checkpoint' in err
