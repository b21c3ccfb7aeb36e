"""Two gloo processes through engine.train_one_epoch: every rank reaches the same collectives in the
same order, and a stop request or a non-finite loss seen by ONE rank stops both at the same update
(a rank acting alone would leave the other waiting in a collective: a hang under torchrun)."""
import json
import multiprocessing
import os
import traceback

import pytest
import torch

COLLECTIVES = ('all_reduce', 'all_gather_object', 'all_gather', 'broadcast', 'barrier', 'broadcast_object_list')


def _rank_main(rank, world, store_path, out_path, scenario):
    import contextlib
    import datetime
    import io

    import torch.distributed as dist

    import engine
    import utils
    torch.set_num_threads(1)
    trace, result = [], {'rank': rank}
    try:
        # a short timeout: a mismatch fails here in seconds instead of hanging the suite
        dist.init_process_group('gloo', init_method=f'file://{store_path}', rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=30))
        for name in COLLECTIVES:
            real = getattr(dist, name)

            def traced(*a, _real=real, _name=name, **k):
                t = a[0] if a and isinstance(a[0], torch.Tensor) else None
                trace.append(f'{_name}{tuple(t.shape) if t is not None else ""}')
                return _real(*a, **k)
            setattr(dist, name, traced)
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(torch.nn.Flatten(),
                                                                              torch.nn.Linear(12, 3)))
        step = engine.TrainStep(model, torch.nn.CrossEntropyLoss(),
                                torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                utils.LossScaler('cpu', enabled=False), torch.device('cpu'),
                                update_freq=scenario['update_freq'])
        g = torch.Generator().manual_seed(10 + rank)
        batches = []
        for i in range(scenario['batches']):
            x = torch.randn(4, 3, 2, 2, generator=g)
            if rank == scenario.get('poison_rank') and i == scenario.get('poison_at'):
                x[0, 0, 0, 0] = float('nan')
            batches.append((x, torch.randint(0, 3, (4,), generator=g)))
        loaded = {'n': 0}

        class Loader:
            def __len__(self):
                return len(batches)

            def __iter__(self):
                for b in batches:
                    loaded['n'] += 1
                    yield b

        # the signal reaches one rank only, after `stop_after` batches
        def stop_requested():
            return rank == scenario.get('stop_rank') and loaded['n'] > scenario['stop_after']

        updates = result.setdefault('updates', [])

        def on_update(done, meters, stop):
            updates.append(done)
            if done % scenario.get('save_every', 10 ** 9) == 0 or stop:
                # what runner.checkpoint.save_training_checkpoint gathers from every rank
                state = meters.state_dict()
                utils.gather_rng_states()
                gathered = [None] * world
                dist.all_gather_object(gathered, state)
            if stop:
                raise utils.TrainingInterrupted(f'stopped at {done}')

        with contextlib.redirect_stdout(io.StringIO()):
            engine.train_one_epoch(step, Loader(), 0, hparams_at=lambda f: (0.1, 0.0),
                                   print_freq=scenario['print_freq'], stop_requested=stop_requested,
                                   on_update=on_update)
        result['end'] = 'finished'
    except (utils.TrainingInterrupted, engine.TrainingDiverged) as e:
        result['end'] = f'{type(e).__name__}: {e}'
    except Exception:  # noqa: BLE001 - reported to the parent
        result['end'] = 'error: ' + traceback.format_exc()[-600:]
    result['trace'] = trace
    with open(out_path, 'w') as f:
        json.dump(result, f)
    os._exit(0)


def _run_two(tmp_path, scenario):
    ctx = multiprocessing.get_context('fork')
    outs = [str(tmp_path / f'rank{r}.json') for r in range(2)]
    procs = [ctx.Process(target=_rank_main, args=(r, 2, str(tmp_path / 'store'), outs[r], scenario))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(120)
        assert all(p.exitcode == 0 for p in procs), f'a rank hung or died: {[p.exitcode for p in procs]}'
    finally:
        for p in procs:
            if p.exitcode is None:
                p.kill()
                p.join()
    results = [json.load(open(o)) for o in outs]
    for r in results:
        assert not r['end'].startswith('error'), r['end']
    assert results[0]['trace'] == results[1]['trace'], 'ranks issued different collectives'
    assert results[0]['updates'] == results[1]['updates']
    return results


@pytest.mark.parametrize('update_freq,print_freq', [(1, 1000), (2, 1000), (3, 5)])
def test_a_stop_seen_by_one_rank_stops_both_at_the_same_update(tmp_path, update_freq, print_freq):
    scenario = dict(batches=60, update_freq=update_freq, print_freq=print_freq, stop_rank=1, stop_after=7,
                    save_every=4 * update_freq)
    results = _run_two(tmp_path, scenario)
    for r in results:
        assert r['end'].startswith('TrainingInterrupted'), r['end']
    assert results[0]['end'] == results[1]['end']
    done = results[0]['updates'][-1]
    # agreed at the first read after the request: at most STOP_CHECK_STEPS micro-steps later
    assert 7 < done <= 7 + engine_stop_check() + update_freq, done


def test_a_non_finite_loss_on_one_rank_stops_both_at_the_same_read(tmp_path):
    scenario = dict(batches=40, update_freq=2, print_freq=1000, poison_rank=1, poison_at=5)
    results = _run_two(tmp_path, scenario)
    for r in results:
        assert r['end'].startswith('TrainingDiverged'), r['end']
    assert 'step 5/40' in results[1]['end']


def test_a_full_epoch_with_periodic_saves_issues_the_same_collectives(tmp_path):
    scenario = dict(batches=53, update_freq=2, print_freq=7, stop_after=10 ** 9, save_every=6)
    results = _run_two(tmp_path, scenario)
    assert results[0]['end'] == results[1]['end'] == 'finished'
    # periodic reads, print steps, saves and the epoch's end all went through collectives
    assert len(results[0]['trace']) > 10


def engine_stop_check():
    import engine
    return engine.STOP_CHECK_STEPS


def test_dist_timeout_reaches_the_process_group(monkeypatch):
    import datetime

    import main as main_mod
    import utils
    seen = {}
    monkeypatch.setattr(torch.distributed, 'init_process_group', lambda **kw: seen.update(kw))
    monkeypatch.setattr(torch.distributed, 'barrier', lambda *a, **k: None)
    monkeypatch.setattr(utils, 'setup_for_distributed', lambda is_master: None)
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '2')
    for argv, minutes in (([], 30), (['--dist_timeout', '2.5'], 2.5)):
        args = main_mod.get_args_parser().parse_args(['--device', 'cpu'] + argv)
        utils.init_distributed_mode(args)
        assert seen['timeout'] == datetime.timedelta(minutes=minutes) and seen['backend'] == 'gloo'
    args = main_mod.get_args_parser().parse_args(['--device', 'cpu', '--dist_timeout', '0'])
    with pytest.raises(utils.UserError, match='--dist_timeout'):
        utils.init_distributed_mode(args)


def _eval_rank(rank, world, store_path, out_path, reduce):
    import datetime

    import torch.distributed as dist

    from runner import evaluation
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{store_path}', rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    # every rank evaluated everything and one image came out differently on rank 1 (GPU kernels)
    evaluation.evaluate = lambda *a, **k: {'acc1': 50.0 + rank, 'acc5': 100.0, 'loss': 1.0, 'num_images': 16}

    class Args:
        dist_eval = reduce
        model_ema_eval = False
    test_stats, _ = evaluation.evaluate_stage(Args(), None, None, None, torch.device('cpu'), None, world)
    with open(out_path, 'w') as f:
        json.dump(test_stats, f)
    os._exit(0)


def test_without_dist_eval_every_rank_takes_rank0s_accuracy(tmp_path):
    """--dist_eval false: the best-checkpoint decision (written with collectives) is the same on every rank."""
    ctx = multiprocessing.get_context('fork')
    outs = [str(tmp_path / f'rank{r}.json') for r in range(2)]
    procs = [ctx.Process(target=_eval_rank, args=(r, 2, str(tmp_path / 'store'), outs[r], False)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        if p.exitcode is None:
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    assert [json.load(open(o))['acc1'] for o in outs] == [50.0, 50.0]
