"""--stage_batch auto: a larger micro-batch at low B, update_freq shrunk, the global batch unchanged."""
import pytest

import main as main_mod
from curriculum import PlanError, build_plan


def plan(*extra, model='resnet50', curriculum='etpp', bs=256, uf=16):
    args = main_mod.get_args_parser().parse_args(['--model', model, '--curriculum', curriculum, '--epochs', '200',
                                                  '--batch_size', str(bs), '--update_freq', str(uf), *extra])
    return build_plan(args, 32)


@pytest.mark.parametrize('curriculum', ['etpp', 'et'])
def test_auto_grows_low_b_micro_batches_and_keeps_the_recipe(curriculum):
    """etpp: B=96 grows 4x.  et: its published 2x at B=160 is already past (224/160)^2 = 1.96, so it stays."""
    published, auto = plan(curriculum=curriculum), plan('--stage_batch', 'auto', curriculum=curriculum)
    assert [s.size for s in auto.stages] == [s.size for s in published.stages]
    assert [s.epochs for s in auto.stages] == [s.epochs for s in published.stages]
    assert auto.total_compute == published.total_compute
    grew = False
    for a, p in zip(auto.stages, published.stages):
        assert a.batch_size * a.update_freq == p.batch_size * p.update_freq  # the global batch
        assert a.batch_size >= p.batch_size
        # about the base stage's activation memory: batch x B^2 at most the base's
        assert a.batch_size * a.size ** 2 <= max(p.batch_size * p.size ** 2, 256 * 224 ** 2)
        if a.size == 224:
            assert (a.batch_size, a.update_freq) == (p.batch_size, p.update_freq)
        grew |= a.batch_size > p.batch_size
    assert grew == (curriculum == 'etpp')
    table = auto.table(300)
    assert ('1024 x 4' in table) == (curriculum == 'etpp')
    assert '--stage_batch auto' in table


def test_max_micro_batch_caps_the_growth():
    capped = plan('--stage_batch', 'auto', '--max_micro_batch', '768')
    assert max(s.batch_size for s in capped.stages) == 512  # 768/256 = 3 -> the largest divisor of 16 below: 2
    assert all(s.batch_size * s.update_freq == 4096 for s in capped.stages)


def test_no_room_to_trade_says_so():
    p = plan('--stage_batch', 'auto', bs=512, uf=1)
    assert all((s.batch_size, s.update_freq) == (512, 1) for s in p.stages)
    assert any('no growth possible' in n for n in p.notes)


def test_published_is_the_default_and_unchanged():
    assert [(s.batch_size, s.update_freq) for s in plan().stages] == [(256, 16)] * 10


@pytest.mark.parametrize('extra, needle', [
    (['--max_micro_batch', '512'], 'applies to --stage_batch auto or large'),
    (['--stage_batch', 'auto', '--max_micro_batch', '-1'], '>= 0'),
])
def test_bad_combinations(extra, needle):
    with pytest.raises(PlanError, match=needle):
        plan(*extra)


def test_through_main_a_bad_combination_is_a_user_error(capsys):
    with pytest.raises(SystemExit) as e:
        main_mod.cli(['--data_set', 'SYNTH', '--model', 'resnet18', '--curriculum', 'etpp', '--base_input_size',
                      '64', '--epochs', '1', '--device', 'cpu', '--max_micro_batch', '64'])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and '--stage_batch auto' in err[0]
