"""The et/etpp presets train the stage epochs and warmup of the official drivers.

The released checkpoints were trained by LeapLabTHU/EfficientTrain's drivers, which launch
the training script once per segment. `run_drivers` re-enacts that launch by launch (the
newest checkpoint, its epoch and args, the start mapped on resume, one epoch at a time);
curriculum/presets.py computes the same in closed form.
"""
import os
import sys

import pytest

import main as main_mod
from curriculum import build_plan
from runner.stage import compared_baseline_epochs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import recipes  # noqa: E402


def run_drivers(budget, sizes, replays, warmup, segments, base=224, map_start=True):
    """[(segment, in warmup)] for every data epoch the drivers train, in order.

    Launch k gets --epochs N = int(E x (base/B)^2 / r), --end_epoch int(N / segments x (k+1)) and
    --warmup_epochs warmup(N, B, r); it resumes from the newest checkpoint at its epoch + 1, which
    main_buffer.py maps into its own unit (replay ratio, then B^2 ratio, each rounded); the ICCV
    main.py does not map (map_start=False).
    """
    newest, trained = None, []
    for k, (b, rt) in enumerate(zip(sizes, replays)):
        n = int(budget * ((base * base) / (b * b)) / rt)
        end = int(n / segments * (k + 1))
        start = 0
        if newest is not None:
            epoch, b_ckpt, rt_ckpt = newest
            start = epoch + 1
            if map_start:
                if rt_ckpt != rt:
                    start = round(start * (rt_ckpt / rt))
                start = round(start * b_ckpt ** 2 / b ** 2)
        for epoch in range(start, end):
            trained.append((k, epoch < warmup(n, b, rt)))
            newest = (epoch, b, rt)  # a checkpoint every epoch
    return trained


def deit_warmup(budget):
    return lambda n, b, rt: int(0.2 * budget * ((224 * 224) / (b * b)) / rt)


def plain_warmup(epochs=20):
    return lambda n, b, rt: int(epochs / rt)


def counts(trained, segments):
    return [sum(1 for k, _ in trained if k == s) for s in range(segments)]


def preset_plan(model, variant, budget, replay=False):
    cmd, _ = recipes.build_command(['train', model, '--variant', variant, '--budget', str(budget), '--gpus', '8',
                                    '--data_path', '/d'] + (['--replay'] if replay else []))
    i = next(k for k, a in enumerate(cmd) if os.path.basename(a) == 'main.py')
    return build_plan(main_mod.get_args_parser().parse_args(cmd[i + 1:]), 16)


_S3_OFFICIAL = [108, 109, 39, 39, 40, 39, 20, 20, 20, 20]


@pytest.mark.parametrize('model,epochs,equivalent', [
    # issue 18 3c: the official drivers' stages at E=200
    ('swin_tiny', _S3_OFFICIAL, 199.959), ('swin_small', _S3_OFFICIAL, 199.959),
    ('CSWin_64_12211_tiny_224', _S3_OFFICIAL, 199.959), ('CSWin_96_24322_base_224', _S3_OFFICIAL, 199.959),
    ('resnet50', _S3_OFFICIAL, 199.959),
    ('convnext_tiny', [39, 39, 39, 39, 40, 39, 20, 20, 20, 20], 199.898),
    ('convnext_base', [39, 39, 39, 39, 40, 39, 20, 20, 20, 20], 199.898),
    ('deit_small_patch16_224', [108, 109, 39, 39, 40, 39, 27, 27, 21, 20], 200.633),
])
def test_official_stage_epochs_at_e200(model, epochs, equivalent):
    plan = preset_plan(model, 'etpp', 200)
    assert [s.epochs for s in plan.stages] == epochs
    assert plan.num_epochs == sum(epochs)
    assert round(plan.total_compute, 3) == equivalent


def check_against_drivers(plan, variant, budget, deit=False, warmup_epochs=20):
    """The plan's stage epochs and end of warmup against run_drivers."""
    sizes = [s.size for s in plan.stages]
    replays = [s.replay_times for s in plan.stages]
    if variant == 'et':
        assert sizes == [160, 160, 160, 192, 224] and plan.progress_unit == 'epochs'
        trained = run_drivers(budget, [224] * 5, [1] * 5, plain_warmup(warmup_epochs), 5, map_start=False)
    else:
        assert len(sizes) == 10 and plan.progress_unit == 'compute'
        warmup = deit_warmup(budget) if deit else plain_warmup(warmup_epochs)
        trained = run_drivers(budget, sizes, replays, warmup, 10)
    assert [s.epochs for s in plan.stages] == counts(trained, len(sizes))
    # at these budgets the drivers warm up over one prefix of the run, and so does the plan
    warm = [w for _, w in trained]
    n = warm.index(False)
    assert all(warm[:n]) and not any(warm[n:])
    assert plan.warmup == pytest.approx(plan.progress(n))
    assert not [x for x in plan.notes if 'warmup' in x]


@pytest.mark.parametrize('model', list(recipes.RECIPES))
def test_every_preset_follows_the_drivers(model):
    """Every model, every budget the launcher offers, et and etpp (and etpp with the published
    replay where there is one): stage epochs and the end of warmup as the drivers run them."""
    cases = [('etpp', False), ('et', False)] + ([('etpp', True)] if recipes.RECIPES[model].replay else [])
    for variant, replay in cases:
        for budget in recipes.PUBLISHED_BUDGETS:
            plan = preset_plan(model, variant, budget, replay)
            check_against_drivers(plan, variant, budget, deit=model.startswith('deit'))


@pytest.mark.parametrize('model', list(recipes.IN22K_PRETRAIN))
def test_in22k_presets_follow_the_drivers(model):
    """ImageNet-22K pre-training: ET++ at 2/3, 1/2, 1/3 of the baseline's epochs, ET at all of it."""
    epochs = recipes.IN22K_PRETRAIN[model].epochs
    for variant, budget in [('etpp', epochs * a // b) for a, b in recipes.IN22K_FRACTIONS] + [('et', epochs)]:
        argv = recipes.in22k_args(model, variant, budget, data_path='/d')
        plan = build_plan(main_mod.get_args_parser().parse_args(argv), 16)
        check_against_drivers(plan, variant, budget, warmup_epochs=recipes.IN22K_PRETRAIN[model].warmup)


def test_deit_warmup_at_e200():
    plan = preset_plan('deit_small_patch16_224', 'etpp', 200)
    # int(0.2 x 200 x (224/96)^2) = 217 data epochs at 96, against 0.2 x 200.633 as a fraction
    assert plan.warmup == pytest.approx(217 * (96 / 224) ** 2)
    replayed = preset_plan('deit_small_patch16_224', 'etpp', 200, replay=True)
    assert [s.epochs for s in replayed.stages] == [27, 27, 19, 20, 20, 19, 28, 27, 21, 20]
    assert replayed.warmup == pytest.approx(54 * 4 * (96 / 224) ** 2)  # int(217.8 / 4) epochs of 4x replay


@pytest.mark.parametrize('budget', [1, 2, 3, 5, 10, 20, 50])
def test_small_budgets_follow_the_drivers(budget):
    """Segments the drivers leave empty are skipped; the next launch maps from the last one that trained."""
    plan = preset_plan('resnet50', 'etpp', budget, replay=True)
    segments = [96] * 2 + [160] * 4 + [224] * 4
    replays = [4, 4, 2, 2, 2, 2, 1, 1, 1, 1]
    trained = run_drivers(budget, segments, replays, plain_warmup(), 10)
    want = counts(trained, 10)
    assert [s.epochs for s in plan.stages] == [n for n in want if n]
    assert [s.magnitude for s in plan.stages] == [k for k, n in enumerate(want) if n]
    et = preset_plan('resnet50', 'et', budget)
    want = counts(run_drivers(budget, [224] * 5, [1] * 5, plain_warmup(), 5, map_start=False), 5)
    assert [s.epochs for s in et.stages] == [n for n in want if n]


def _training_md():
    with open(os.path.join(ROOT, 'TRAINING.md'), encoding='utf-8') as f:
        return f.read()


def test_training_md_shows_what_the_code_gives():
    """The per-stage epochs in TRAINING.md are the plans' own (regenerate them from the code)."""
    doc = _training_md()
    for e in recipes.PUBLISHED_BUDGETS:
        plan = preset_plan('resnet50', 'etpp', e)
        per = {b: sum(s.epochs for s in plan.stages if s.size == b) for b in (96, 160, 224)}
        row = f'| {e} | {per[96]} / {per[160]} / {per[224]} | {plan.num_epochs} | {plan.total_compute:.2f} |'
        assert row in doc, row
    for model, replay in (('resnet50', False), ('convnext_tiny', False), ('deit_small_patch16_224', False),
                          ('deit_small_patch16_224', True)):
        plan = preset_plan(model, 'etpp', 200, replay)
        row = (f'| {", ".join(str(s.epochs) for s in plan.stages)} | {plan.num_epochs} | '
               f'{plan.total_compute:.3f} |')
        assert row in doc, (model, row)
    args = main_mod.get_args_parser().parse_args(['--model', 'swin_tiny', '--curriculum', 'etpp', '--epochs', '200',
                                                  '--batch_size', '256', '--update_freq', '2'])
    table = build_plan(args, 32).table(compared_baseline_epochs(args), world=8, per='GPU', images=1281167)
    assert table in doc
