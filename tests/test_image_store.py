"""The reduced-size image store (--image_store, pipelines/store.py, scripts/build_image_store.py)."""
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets as tv_datasets

from pipelines import datasets
import main as main_mod
from curriculum import build_plan
from pipelines import store as store_mod
from pipelines.fastpath import DraftRandomResizedCrop, LazyImageFolder
from pipelines.store import ImageStore, StoredCopies, reduced_size
from scripts import build_image_store
from test_fastpath import MIN_MEAN_PSNR, MIN_P5_PSNR, SAMPLES, jpeg_paths, natural_image, psnr, published_at
from utils import UserError


pytestmark = pytest.mark.usefixtures('one_intra_op_thread')


def make_folder(root, n=24, seed=0):
    rng = np.random.default_rng(seed)
    for k in range(n):
        d = os.path.join(root, f'class_{k % 3}')
        os.makedirs(d, exist_ok=True)
        h, w = int(rng.integers(280, 520)), int(rng.integers(280, 520))
        natural_image(rng, h, w).save(os.path.join(d, f'{k}.jpg'), quality=90)
    return root


def build(data, out, *extra):
    logs = []
    args = build_image_store.parse(['--data_path', data, '--out', out, '--workers', '1', *extra])
    return build_image_store.build(args, log=logs.append), logs


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    """(image folder, store) of 24 generated JPEGs, 280-520 px per side."""
    data = make_folder(str(tmp_path_factory.mktemp('train')))
    out = str(tmp_path_factory.mktemp('store'))
    build(data, out)
    return data, out


def open_store(data, out):
    folder = LazyImageFolder(tv_datasets.ImageFolder(data))
    folder.store = ImageStore.open(out, folder.root, folder.relpaths())
    return folder


def spy_levels(monkeypatch):
    """The level of every copy the fast path asks for (1: none usable, the original is decoded)."""
    levels = []
    real_open = StoredCopies.open

    def spy(self, scale, full_size):
        img, k = real_open(self, scale, full_size)
        levels.append(k)
        return img, k

    monkeypatch.setattr(StoredCopies, 'open', spy)
    return levels


def test_build_writes_box_reduced_copies_and_manifest(built):
    data, out = built
    manifest = json.load(open(os.path.join(out, 'store.json')))
    assert manifest['levels'] == [2, 4] and manifest['images'] == 24 and manifest['unreadable'] == []
    for path in jpeg_paths(data):
        rel = os.path.relpath(path, data)
        original = Image.open(path)
        for k in (2, 4):
            copy = Image.open(os.path.join(out, str(k), rel))
            assert copy.size == reduced_size(original.size, k)
            # the quality-95 JPEG of the box average; these dense 1/f textures are the hard
            # case for JPEG (measured 36.8-45 dB; the ImageNet samples: 41-52 dB)
            assert psnr(copy.convert('RGB'), store_mod.reduce_image(original, k)) > 35
    leftovers = [f for _, _, fs in os.walk(out) for f in fs if 'tmp' in f]
    assert leftovers == []


def test_worker_processes_write_the_same_copies(tmp_path):
    data = make_folder(str(tmp_path / 'train'), n=4)
    stores = [str(tmp_path / f'store{w}') for w in (1, 2)]
    for out, workers in zip(stores, ('1', '2')):
        args = build_image_store.parse(['--data_path', data, '--out', out, '--workers', workers])
        build_image_store.build(args, log=lambda line: None)
    for path in jpeg_paths(data):
        rel = os.path.relpath(path, data)
        for k in ('2', '4'):
            a, b = (open(os.path.join(out, k, rel), 'rb').read() for out in stores)
            assert a == b, (rel, k)


@pytest.mark.parametrize('size', [96, 160])
def test_same_crop_close_to_published_and_copies_used(built, size, monkeypatch):
    """The bound of tests/test_fastpath.py: closer to the published order than the Fourier crop is."""
    data, out = built
    folder = open_store(data, out)
    used = spy_levels(monkeypatch)
    random.seed(size)
    crop = DraftRandomResizedCrop(size)
    got = []
    for r in range(3):
        for i in range(len(folder)):
            img, _ = folder[i]
            full = Image.open(folder.samples[i][0]).convert('RGB')
            params = crop.get_params(img)
            got.append(psnr(published_at(full, params, False, size)[1], crop.crop_resize(img, params)))
    got = np.array(got)
    assert got.mean() >= MIN_MEAN_PSNR and np.percentile(got, 5) >= MIN_P5_PSNR, (got.mean(), got.min())
    assert used.count(2) > 5 and (size > 96 or used.count(4) > 0), used


def _crop_with(folder, i, size=96, params=None):
    img, _ = folder[i]
    crop = DraftRandomResizedCrop(size)
    return np.asarray(crop.crop_resize(img, params or (0, 0, img.size[1], img.size[0])))


def test_copy_is_read_and_damaged_copies_fall_back_to_the_original(tmp_path):
    data = make_folder(str(tmp_path / 'train'), n=3)
    out = str(tmp_path / 'store')
    build(data, out)
    folder = open_store(data, out)
    plain = LazyImageFolder(tv_datasets.ImageFolder(data))
    rel = os.path.relpath(folder.samples[0][0], data)
    w, h = Image.open(folder.samples[0][0]).size
    reference = _crop_with(plain, 0)
    # the whole image at B=96 allows a reduction by 2 (sides 280-520): the level-2 copy is read
    assert psnr(_crop_with(folder, 0), reference) > 36
    tag = store_mod.source_tag(os.path.getsize(folder.samples[0][0]))
    for k in (2, 4):
        Image.new('RGB', reduced_size((w, h), k), (255, 0, 0)).save(os.path.join(out, str(k), rel), comment=tag)
    red = np.abs(_crop_with(folder, 0).astype(int) - [255, 0, 0])
    assert red.max() <= 2  # JPEG's rounding of a flat red
    assert folder.store.misses.value == 0
    # copies of another original (tag), stale (size), missing, cut short or broken: the
    # original, exactly as without a store, and counted (main.py warns after the epoch)
    damaged = [
        lambda p, k: Image.new('RGB', reduced_size((w, h), k)).save(p, comment=store_mod.source_tag(123)),
        lambda p, k: Image.new('RGB', (w // k + 3, h // k)).save(p, comment=tag),
        lambda p, k: os.remove(p),
        lambda p, k: open(p, 'r+b').truncate(os.path.getsize(p) // 2),
        lambda p, k: open(p, 'wb').write(b'not a jpeg'),
    ]
    for n, damage in enumerate(damaged, 1):
        build(data, out)  # repaired
        for k in (2, 4):
            damage(os.path.join(out, str(k), rel), k)
        before = folder.store.misses.value
        assert np.array_equal(_crop_with(folder, 0), reference), n
        assert folder.store.misses.value > before, n


def test_interrupted_build_resumes_and_settings_must_match(tmp_path):
    data = make_folder(str(tmp_path / 'train'), n=6)
    out = str(tmp_path / 'store')
    build(data, out)
    os.remove(os.path.join(out, 'store.json'))  # as if killed before the end
    victim = os.path.join(out, '4', os.path.relpath(jpeg_paths(data)[0], data))
    os.remove(victim)
    cut = os.path.join(out, '2', os.path.relpath(jpeg_paths(data)[1], data))
    with open(cut, 'r+b') as f:  # renamed into place, but its data never reached the disk
        f.truncate(os.path.getsize(cut) // 2)
    manifest, logs = build(data, out)
    assert os.path.exists(victim) and manifest['images'] == 6
    assert '2 copies written, 10 kept' in logs[-1]
    Image.open(cut).load()
    with pytest.raises(SystemExit, match='quality'):
        build(data, out, '--quality', '90')
    assert os.path.exists(os.path.join(out, 'store.json'))  # refused before touching anything


def test_build_refuses_an_out_that_is_not_a_store(tmp_path):
    data = make_folder(str(tmp_path / 'train'), n=3)
    other = tmp_path / 'papers'
    (other / '.tmp').mkdir(parents=True)
    (other / 'draft.txt').write_text('keep me')
    with pytest.raises(SystemExit, match='not an image store'):
        build(data, str(other))
    with pytest.raises(SystemExit, match='inside --data_path'):
        build(data, os.path.join(data, 'store'))
    assert (other / 'draft.txt').read_text() == 'keep me' and (other / '.tmp').is_dir()
    assert sorted(os.listdir(data)) == ['class_0', 'class_1', 'class_2']


def test_unreadable_source_is_listed_without_copies(tmp_path):
    data = make_folder(str(tmp_path / 'train'), n=3)
    bad = os.path.join(data, 'class_0', 'broken.jpg')
    with open(bad, 'wb') as f:
        f.write(b'\xff\xd8\xff\xe0 truncated')
    manifest, logs = build(data, str(tmp_path / 'store'))
    assert manifest['unreadable'] == [os.path.join('class_0', 'broken.jpg')]
    assert any('broken.jpg: unreadable' in line for line in logs)
    folder = open_store(data, str(tmp_path / 'store'))
    copies = folder.store.copies(os.path.join('class_0', 'broken.jpg'), os.path.getsize(bad))
    assert copies.open(4, (400, 400)) == (None, 1) and folder.store.misses.value == 0  # known, not a miss


def test_bad_levels_and_quality_are_refused(tmp_path, capsys):
    for extra in (['--levels', '3'], ['--quality', '0']):
        with pytest.raises(SystemExit):
            build_image_store.parse(['--data_path', str(tmp_path), '--out', str(tmp_path / 's'), *extra])
        assert 'error:' in capsys.readouterr().err


def _loader_args(data, extra=()):
    argv = ['--model', 'resnet18', '--data_set', 'image_folder', '--data_path', data, '--batch_size', '8',
            '--num_workers', '0', '--pin_mem', 'false', '--epochs', '10', '--curriculum', 'etpp',
            '--base_input_size', '192', *extra]
    return main_mod.get_args_parser().parse_args(argv)


def test_trainer_refuses_unusable_stores(tmp_path, built):
    data, out = built
    base = tv_datasets.ImageFolder(data)
    cases = [
        (['--data_pipeline', 'fast', '--image_store', str(tmp_path / 'nothing')], 'not a directory'),
        (['--data_pipeline', 'fast', '--image_store', str(tmp_path)], 'no store.json'),
        (['--image_store', out], '--data_pipeline fast'),
    ]
    other = make_folder(str(tmp_path / 'other'), n=4)
    cases.append((['--data_pipeline', 'fast', '--image_store', out], 'another file list'))
    for extra, message in cases:
        args = _loader_args(data, extra)
        folder = base if message != 'another file list' else tv_datasets.ImageFolder(other)
        with pytest.raises(UserError, match=message) as e:
            datasets.build_train_loader(args, folder, build_plan(args), 0, 1)
        assert 'build_image_store.py' in str(e.value) or 'drop --image_store' in str(e.value)


def test_loader_with_store_draws_the_same_augmentation(built):
    """Same crops, flips and RandAugment draws with and without the store: only the decoding differs."""
    data, out = built
    base = tv_datasets.ImageFolder(data)
    batches = []
    for extra in ([], ['--image_store', out]):
        args = _loader_args(data, ['--data_pipeline', 'fast', *extra])
        loader, sampler = datasets.build_train_loader(args, base, build_plan(args), 0, 1)
        sampler.set_epoch(0)
        batches.append(next(iter(loader)))
    (x0, y0), (x1, y1) = batches
    assert torch.equal(y0, y1) and x0.shape == x1.shape and x0.dtype == torch.uint8
    per_sample = [psnr(a.numpy(), b.numpy()) for a, b in zip(x0, x1)]
    # different draws would give ~10-15 dB; some samples do not use a copy at all (inf)
    assert min(per_sample) > 28, per_sample


def test_tiny_training_run_reads_the_store(tmp_path, built, monkeypatch):
    data, out = built
    levels = spy_levels(monkeypatch)
    run = str(tmp_path / 'run')
    # one epoch at B=32, below the base size: the run ends with a test at the base size
    plan = tmp_path / 'b32.json'
    plan.write_text('{"progress": "epochs", "stages": [{"share": 1.0, "size": 32, "magnitude": 0}]}')
    argv = ['--data_set', 'image_folder', '--data_path', data, '--eval_data_path', data, '--model', 'resnet18',
            '--batch_size', '8', '--device', 'cpu', '--num_workers', '0', '--pin_mem', 'false',
            '--curriculum_file', str(plan), '--base_input_size', '64', '--epochs', '1', '--print_freq', '100',
            '--data_pipeline', 'fast', '--image_store', out, '--output_dir', run]
    main_mod.main(main_mod.get_args_parser().parse_args(argv))
    log = [json.loads(line) for line in open(os.path.join(run, 'log.txt'))]
    assert any('final_test_at_base' in r for r in log)
    assert json.load(open(os.path.join(run, 'config.json')))['args']['image_store'] == out
    assert levels.count(4) > 0 and levels.count(2) > 0  # B=32-48 crops of 280-520 px images


@pytest.mark.skipif(not os.path.isdir(SAMPLES), reason=f'ImageNet samples not found at {SAMPLES}')
@pytest.mark.parametrize('size', [96, 160])
def test_real_imagenet_samples_with_store_close_to_published(tmp_path_factory, size):
    # a store of every 5th sample, in a folder of links (the store is keyed by relative path)
    data = str(tmp_path_factory.mktemp('samples'))
    for path in jpeg_paths(SAMPLES)[::5]:
        d = os.path.join(data, os.path.basename(os.path.dirname(path)))
        os.makedirs(d, exist_ok=True)
        os.symlink(path, os.path.join(d, os.path.basename(path)))
    out = str(tmp_path_factory.mktemp('samples-store'))
    build(data, out)
    folder = open_store(data, out)
    random.seed(size)
    crop = DraftRandomResizedCrop(size)
    got = []
    for i in range(len(folder)):
        img, _ = folder[i]
        params = crop.get_params(img)
        full = Image.open(folder.samples[i][0]).convert('RGB')
        got.append(psnr(published_at(full, params, False, size)[1], crop.crop_resize(img, params)))
    got = np.array(got)
    assert got.mean() >= MIN_MEAN_PSNR and np.percentile(got, 5) >= MIN_P5_PSNR - 2, (got.mean(), got.min())


def test_cli_refuses_a_bad_store_before_writing_anything(tmp_path, built, capsys):
    data, _ = built
    run = tmp_path / 'run'
    base = ['--data_set', 'image_folder', '--data_path', data, '--eval_data_path', data, '--model', 'resnet18',
            '--device', 'cpu', '--num_workers', '0', '--output_dir', str(run)]
    for extra, message in ((['--image_store', str(tmp_path)], '--data_pipeline fast'),
                           (['--data_pipeline', 'fast', '--image_store', str(tmp_path)], 'no store.json')):
        with pytest.raises(SystemExit) as e:
            main_mod.cli(base + extra)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and '\n' not in err
        assert not (run / 'config.json').exists() and not (run / 'log.txt').exists()
