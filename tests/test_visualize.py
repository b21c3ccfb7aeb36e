import os
import random
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))

import visualize_curriculum as viz  # noqa: E402
from utils import UserError  # noqa: E402


@pytest.fixture(autouse=True, scope='module')
def _one_intra_op_thread():
    # The transforms work on single small images: intra-op threads only add
    # synchronisation, and on a busy 2-core machine their spin-waiting dominates.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_images(folder, n, seed=0):
    """Noisy photographs-to-be: a smooth gradient (low band) under per-pixel noise (high band).

    256 px is the size the eval-style crop resizes to, so the noise reaches the base
    size at full bandwidth and a low-B stage has something visible to remove.
    """
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:280] / 256.0
    for i in range(n):
        base = np.stack([xx * 200, yy * 200, (1 - xx) * 150 + 50], -1)
        img = np.clip(base + rng.normal(0, 45, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f'img_{i}.png'))


@pytest.fixture(scope='module')
def flat_folder(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('flat'))
    _write_images(d, 3)
    return d


@pytest.fixture(scope='module')
def tree_folder(tmp_path_factory):
    # An ImageFolder tree: images come class by class, so 3 images span 2 classes.
    d = str(tmp_path_factory.mktemp('tree'))
    _write_images(os.path.join(d, 'class_a'), 2, seed=1)
    _write_images(os.path.join(d, 'class_b'), 2, seed=2)
    return d


def _args(*argv):
    return viz.get_args_parser().parse_args(['--model', 'resnet50', *argv])


# resnet50's published EfficientTrain++ recipe has 10 (B, m) stages; EfficientTrain has 5.
CASES = [('etpp', 'flat_folder', 10, (96, 160, 224)), ('et', 'tree_folder', 5, (160, 192, 224))]


@pytest.mark.parametrize('curriculum,folder,n_cols,sizes', CASES)
def test_writes_plan_and_stage_grid(curriculum, folder, n_cols, sizes, request, tmp_path, capsys):
    images = request.getfixturevalue(folder)
    out = str(tmp_path / 'viz')
    res = viz.main(_args('--curriculum', curriculum, '--epochs', '200', '--images', images,
                         '--out', out, '--num_images', '3'))
    printed = capsys.readouterr().out
    assert 'Training plan' in printed and f'wrote {res.stages_png}' in printed
    assert [c.size for c in res.columns] == sorted(c.size for c in res.columns)
    assert sorted({c.size for c in res.columns}) == list(sizes)
    assert len(res.columns) == n_cols and res.layout.rows == 3 and res.layout.cols == n_cols
    assert len({os.path.dirname(p) for p in res.images}) == (1 if folder == 'flat_folder' else 2)
    with Image.open(res.stages_png) as im:
        assert im.size == (res.layout.width, res.layout.height)
        # cells are shown at the base size, n_cols across and 3 down
        assert im.size[0] >= n_cols * 224 and 3 * 224 < im.size[1] < 4 * 224
        grid = np.asarray(im.convert('RGB'))
    for c in range(n_cols):
        left, top, right, bottom = res.layout.box(0, c)
        assert grid[top:bottom, left:right].std() > 5, f'column {c} is blank'
    # left of the training views: the same centre crop without augmentation at every distinct B,
    # so the bandwidth shows on its own
    band = res.band_layout
    assert band is not None and band.cols == len(sizes) and band.rows == 3 and band.width < res.layout.left
    band_cells = [grid[t:b, l:r] for l, t, r, b in (band.box(0, c) for c in range(band.cols))]
    edge = sizes[0] / 2 / band.cell
    assert _high_frequency_fraction(band_cells[0], edge) < _high_frequency_fraction(band_cells[-1], edge)

    pytest.importorskip('matplotlib')
    assert res.plan_png and os.path.isfile(res.plan_png)
    with Image.open(res.plan_png) as im:
        assert im.size[0] >= 800 and im.size[1] >= 600


def _high_frequency_fraction(cell, band):
    """Share of a cell's (mean-free, grey) spectral energy beyond `band` cycles per pixel."""
    g = cell.astype(np.float64).mean(-1)
    power = np.abs(np.fft.fft2(g - g.mean())) ** 2
    f = np.fft.fftfreq(g.shape[0])
    beyond = np.maximum(np.abs(f)[:, None], np.abs(f)[None, :]) > band
    return power[beyond].sum() / power.sum()


@pytest.mark.parametrize('curriculum,folder,n_cols,sizes', CASES)
def test_no_augment_low_band_loses_high_frequencies(curriculum, folder, n_cols, sizes, request, tmp_path):
    images = request.getfixturevalue(folder)
    res = viz.main(_args('--curriculum', curriculum, '--epochs', '200', '--images', images,
                         '--out', str(tmp_path), '--num_images', '2', '--no_augment'))
    # one column per distinct B without augmentation
    assert [c.size for c in res.columns] == list(sizes)
    with Image.open(res.stages_png) as im:
        grid = np.asarray(im.convert('RGB'))
    low, base = sizes[0], sizes[-1]
    band = low / 2 / res.layout.cell  # the low stage's band edge, in cycles per display pixel
    for r in range(res.layout.rows):
        cells = []
        for c in (0, len(sizes) - 1):
            left, top, right, bottom = res.layout.box(r, c)
            cells.append(grid[top:bottom, left:right])
        hf_low, hf_base = (_high_frequency_fraction(x, band) for x in cells)
        assert hf_low < 0.6 * hf_base, (r, low, base, hf_low, hf_base)


def test_cells_are_reproducible_and_leave_caller_rng_alone(flat_folder):
    args = _args('--curriculum', 'etpp', '--epochs', '200', '--images', flat_folder)
    plan = viz.build_training_plan(args)
    cols = viz.stage_columns(plan)[:2]
    img = viz.load_rgb(viz.list_images(flat_folder, 1)[0])
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    a = viz.stage_cells(args, plan, [img], cols, no_augment=False)
    b = viz.stage_cells(args, plan, [img], cols, no_augment=False)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    for x, y in zip(a[0], b[0]):
        np.testing.assert_array_equal(x, y)
    assert a[0][0].shape == (96, 96, 3) and a[0][0].dtype == np.uint8


def test_missing_folder_is_a_clear_error(tmp_path, capsys):
    missing = str(tmp_path / 'no_such_folder')
    with pytest.raises(UserError, match='no_such_folder is not a directory'):
        viz.main(_args('--curriculum', 'etpp', '--images', missing, '--out', str(tmp_path / 'o')))
    with pytest.raises(SystemExit) as e:
        viz.cli(['--curriculum', 'etpp', '--images', missing, '--out', str(tmp_path / 'o')])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and err.startswith('error: --images') and 'no_such_folder' in err


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / 'empty' / 'class_a').mkdir(parents=True)
    with pytest.raises(UserError, match='holds no images'):
        viz.list_images(str(tmp_path / 'empty'), 4)


def test_without_matplotlib_the_grid_is_still_written(flat_folder, tmp_path, capsys, monkeypatch):
    # None in sys.modules makes `import matplotlib` raise ImportError, as on a bare install.
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    out = tmp_path / 'viz'
    with pytest.raises(SystemExit) as e:
        viz.cli(['--curriculum', 'etpp', '--epochs', '200', '--images', flat_folder, '--out', str(out),
                 '--num_images', '1', '--no_augment'])
    assert e.value.code == 1
    assert viz.MATPLOTLIB_MISSING in capsys.readouterr().err.splitlines()
    assert (out / 'stages.png').is_file() and not (out / 'plan.png').exists()
