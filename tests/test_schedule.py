"""Schedules and plans: pure functions of progress."""
import argparse
import json
import math

import pytest

from curriculum import PlanError, build_plan, load_plan_file
from curriculum.plan import split_rounded
from utils import cosine_schedule


def make_args(**kw):
    base = dict(curriculum='none', model='resnet50', epochs=300, base_input_size=224, input_size=224,
                batch_size=512, update_freq=1, warmup_epochs=20, lowfreq='auto', replay_times=1,
                replay_buffer_size=0, replay_preset=False, curriculum_file=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_cosine_warmup_end_and_final_step():
    total, warm = 100.0, 10.0
    assert cosine_schedule(0, total, 4e-3, 1e-6, warm) == 0.0
    assert cosine_schedule(5, total, 4e-3, 1e-6, warm) == pytest.approx(2e-3)
    # warmup ends exactly at the base value, and the cosine starts there
    assert cosine_schedule(warm, total, 4e-3, 1e-6, warm) == pytest.approx(4e-3)
    assert cosine_schedule(warm - 1e-9, total, 4e-3, 1e-6, warm) == pytest.approx(4e-3, rel=1e-6)
    mid = cosine_schedule(55, total, 4e-3, 1e-6, warm)
    assert mid == pytest.approx(1e-6 + 0.5 * (4e-3 - 1e-6))
    assert cosine_schedule(total, total, 4e-3, 1e-6, warm) == pytest.approx(1e-6)
    assert cosine_schedule(total + 5, total, 4e-3, 1e-6, warm) == pytest.approx(1e-6)


def test_weight_decay_cosine_without_warmup():
    assert cosine_schedule(0, 10, 0.05, 0.5) == pytest.approx(0.05)
    assert cosine_schedule(10, 10, 0.05, 0.5) == pytest.approx(0.5)


def test_baseline_plan_is_one_stage_in_epochs():
    plan = build_plan(make_args(epochs=7, warmup_epochs=2))
    assert plan.num_epochs == 7 and len(plan.stages) == 1
    assert plan.progress(3, 0.5) == pytest.approx(3.5)
    assert plan.total_progress == 7 and plan.warmup == 2
    assert plan.stage_at(6).size == 224 and plan.stage_at(0).magnitude is None
    with pytest.raises(IndexError):
        plan.stage_at(7)


def test_split_rounded_keeps_total():
    parts = split_rounded([108.89] * 2 + [39.2] * 4 + [20] * 4)
    assert sum(parts) == round(108.89 * 2 + 39.2 * 4 + 80)
    assert parts[:2] == [109, 109]


def test_et_relative_cost():
    plan = build_plan(make_args(curriculum='et', epochs=300, batch_size=128, update_freq=4))
    assert [s.size for s in plan.stages] == [160, 160, 160, 192, 224]
    assert [s.magnitude for s in plan.stages] == [1, 3, 5, 7, 9]
    assert [s.epochs for s in plan.stages] == [60] * 5
    assert plan.total_compute / 300 == pytest.approx(0.653, abs=5e-4)
    # doubled per-GPU batch while B < 224, global batch constant
    assert [(s.batch_size, s.update_freq) for s in plan.stages] == [(256, 2)] * 4 + [(128, 4)]
    assert plan.lowfreq == 'fourier' and plan.progress_unit == 'epochs'


def test_etpp_resnet50_epochs_and_compute():
    plan = build_plan(make_args(curriculum='etpp', epochs=200))
    per_b = {}
    for s in plan.stages:
        per_b[s.size] = per_b.get(s.size, 0) + s.epochs
    assert per_b[96] == pytest.approx(218, abs=1)
    assert per_b[160] == pytest.approx(157, abs=1)
    assert per_b[224] == 80
    assert plan.total_compute == pytest.approx(200, rel=0.01)
    assert [s.magnitude for s in plan.stages] == list(range(10))
    assert plan.lowfreq == 'lanczos' and plan.progress_unit == 'compute'
    # warmup: 20 epochs counted at the first stage's scale (B=96)
    assert plan.warmup == pytest.approx(20 * (96 / 224) ** 2)
    assert 300 / plan.total_compute == pytest.approx(1.5, abs=0.01)


def test_etpp_segments_have_equal_compute():
    plan = build_plan(make_args(curriculum='etpp', epochs=200))
    shares = [s.compute(224) / plan.total_compute for s in plan.stages]
    assert all(abs(x - 0.1) < 0.005 for x in shares)


@pytest.mark.parametrize('model,bs,uf,expect', [
    ('swin_tiny', 256, 2, [(512, 1)] * 6 + [(256, 2)] * 4),
    ('swin_small', 128, 4, [(512, 1)] * 2 + [(256, 2)] * 4 + [(128, 4)] * 4),
    ('convnext_tiny', 128, 4, [(256, 2)] * 6 + [(128, 4)] * 4),
    ('convnext_base', 64, 8, [(128, 4)] * 6 + [(64, 8)] * 4),
    ('deit_small_patch16_224', 256, 2, [(512, 1)] * 6 + [(256, 2)] * 4),
])
def test_etpp_published_batches(model, bs, uf, expect):
    plan = build_plan(make_args(curriculum='etpp', epochs=200, model=model, batch_size=bs, update_freq=uf))
    assert [(s.batch_size, s.update_freq) for s in plan.stages] == expect
    assert all(s.batch_size * s.update_freq == bs * uf for s in plan.stages)


def test_deit_warmup_ends_at_the_drivers_cut_of_a_fifth_of_e():
    plan = build_plan(make_args(curriculum='etpp', epochs=200, model='deit_small_patch16_224',
                                batch_size=256, update_freq=2))
    assert [s.size for s in plan.stages] == [96, 96, 160, 160, 160, 160, 192, 192, 224, 224]
    # int(0.2 x 200 x (224/96)^2) = 217 data epochs at 96: the end of stage 1 (108 + 109)
    assert plan.warmup == pytest.approx(217 * (96 / 224) ** 2)
    assert plan.warmup == pytest.approx(plan.progress(plan.stages[2].start_epoch))
    assert plan.warmup == pytest.approx(0.2 * plan.total_progress, rel=0.01)


def test_stage_lookup_at_boundaries():
    plan = build_plan(make_args(curriculum='etpp', epochs=200))
    for s in plan.stages:
        assert plan.stage_at(s.start_epoch).index == s.index
        assert plan.stage_at(s.start_epoch + s.epochs - 1).index == s.index
        if s.index:
            assert plan.stage_at(s.start_epoch - 1).index == s.index - 1
    # progress is continuous across a stage boundary
    s2 = plan.stages[2]
    assert plan.progress(s2.start_epoch - 1, 1.0) == pytest.approx(plan.progress(s2.start_epoch, 0.0))
    assert plan.progress(plan.num_epochs) == pytest.approx(plan.total_progress)


def test_replay_preset_divides_epochs_keeps_compute():
    plain = build_plan(make_args(curriculum='etpp', epochs=200))
    rep = build_plan(make_args(curriculum='etpp', epochs=200, replay_preset=True))
    assert [s.replay_times for s in rep.stages] == [4, 4, 2, 2, 2, 2, 1, 1, 1, 1]
    assert [s.buffer_size for s in rep.stages][:3] == [1920, 1920, 256]
    assert rep.stages[0].epochs == pytest.approx(plain.stages[0].epochs / 4, abs=1)
    assert rep.total_compute == pytest.approx(plain.total_compute, rel=0.02)
    assert rep.stages[0].loader_batch == 128


def test_replay_refuses_update_freq():
    with pytest.raises(PlanError, match='update_freq'):
        build_plan(make_args(curriculum='etpp', epochs=200, replay_times=2, replay_buffer_size=64,
                             batch_size=128, update_freq=4))


def test_scaled_down_sizes():
    plan = build_plan(make_args(curriculum='etpp', epochs=6, base_input_size=64, input_size=64,
                                batch_size=16), size_multiple=16)
    assert sorted({s.size for s in plan.stages}) == [32, 48, 64]


def _write(tmp_path, spec):
    p = tmp_path / 'c.json'
    p.write_text(json.dumps(spec))
    return str(p)


def test_curriculum_file(tmp_path):
    spec = {'progress': 'compute', 'lowfreq': 'fourier', 'warmup_fraction': 0.1,
            'stages': [{'share': 0.5, 'size': 112, 'magnitude': 2, 'batch_size': 64},
                       {'share': 0.5, 'size': 224, 'magnitude': 9}]}
    plan = load_plan_file(_write(tmp_path, spec), make_args(epochs=100, batch_size=32))
    assert [s.size for s in plan.stages] == [112, 224]
    assert plan.stages[0].epochs == 200 and plan.stages[1].epochs == 50
    assert plan.stages[0].batch_size == 64 and plan.stages[1].batch_size == 32
    assert plan.lowfreq == 'fourier'
    assert plan.warmup == pytest.approx(0.1 * plan.total_progress)


@pytest.mark.parametrize('spec,field', [
    ({'stages': [{'share': 1.0, 'size': 97}]}, 'stages[0].size'),
    ({'stages': [{'share': 0.5, 'size': 96}, {'share': 0.4, 'size': 224}]}, 'stages[*].share'),
    ({'stages': [{'share': 1.0, 'size': 224, 'magnitud': 3}]}, 'stages[0].magnitud'),
    ({'stages': [{'share': 1.0, 'size': 224, 'replay_times': 2}]}, 'stages[0].buffer_size'),
    ({'stages': [{'share': 1.0, 'size': 224, 'replay_times': 2, 'buffer_size': 8, 'update_freq': 2}]},
     'stages[0].update_freq'),
    ({'progress': 'time', 'stages': [{'share': 1.0, 'size': 224}]}, 'progress'),
    ({'stages': []}, 'stages'),
    ({'stages': [{'size': 224}]}, 'stages[0].share'),
])
def test_curriculum_file_errors_name_the_field(tmp_path, spec, field):
    with pytest.raises(PlanError) as e:
        load_plan_file(_write(tmp_path, spec), make_args(epochs=100))
    assert field in str(e.value)
    assert '\n' not in str(e.value)


def test_curriculum_file_bad_json(tmp_path):
    p = tmp_path / 'bad.json'
    p.write_text('{"stages": [')
    with pytest.raises(PlanError, match='not valid JSON'):
        load_plan_file(str(p), make_args())


def test_table_mentions_speedup():
    plan = build_plan(make_args(curriculum='et', epochs=300, batch_size=128, update_freq=4))
    text = plan.table(300)
    assert '1.53x' in text and 'equiv' in text
    assert not math.isnan(plan.total_compute)
