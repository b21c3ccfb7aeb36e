"""MAE pre-training model (models/mae.py) and HOG targets (models/hog.py)."""
import glob
import math
import os

import numpy as np
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from models import create_model
from models.hog import hog_features, hog_patch_targets, patch_targets_to_cells
from models.mae import (MAE_CONFIGS, check_mae_size, check_mae_target, check_mask_ratio, infer_mae_model,
                        load_mae_state_dict, mae_to_vit_state_dict, num_kept, random_masking, sincos_pos_embed_2d)
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, '..', 'shared', 'data', 'imagenet-samples')
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

pytestmark = pytest.mark.usefixtures('one_intra_op_thread')


# ---------------------------------------------------------------------------
# HOG against a straightforward per-pixel implementation
# ---------------------------------------------------------------------------

def hog_by_loops(img):
    """(C, H, W) nested lists of floats -> [c][bin][cell_y][cell_x], written from the definition."""
    c_n, h, w = len(img), len(img[0]), len(img[0][0])
    kx = [[1, 0, -1], [2, 0, -2], [1, 0, -1]]
    ky = [[kx[j][i] for j in range(3)] for i in range(3)]

    def reflect(i, n):
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    g1 = [math.exp(-0.5 * ((i - 7.5) / 8.0) ** 2) for i in range(16)]
    total = sum(g1) ** 2
    out = []
    for c in range(c_n):
        hist = [[[0.0] * (w // 8) for _ in range(h // 8)] for _ in range(9)]
        for y in range(h):
            for x in range(w):
                gx = gy = 0.0
                for a in range(3):
                    for b in range(3):
                        v = img[c][reflect(y + a - 1, h)][reflect(x + b - 1, w)]
                        gx += kx[a][b] * v
                        gy += ky[a][b] * v
                mag = math.sqrt(gx * gx + gy * gy) * g1[y % 16] * g1[x % 16] / total
                k = math.floor(9 * math.atan2(gx, gy) / math.pi) % 9
                hist[k][y // 8][x // 8] += mag
        for cy in range(h // 8):
            for cx in range(w // 8):
                norm = math.sqrt(sum(hist[k][cy][cx] ** 2 for k in range(9)))
                for k in range(9):
                    hist[k][cy][cx] /= max(norm, 1e-12)
        out.append(hist)
    return out


def _check_against_loops(images, atol=1e-5):
    got = hog_features(images)
    assert got.shape == (images.shape[0], 3, 9, images.shape[2] // 8, images.shape[3] // 8)
    for i in range(images.shape[0]):
        ref = torch.tensor(hog_by_loops(images[i].double().tolist()), dtype=torch.float64)
        torch.testing.assert_close(got[i].double(), ref, atol=atol, rtol=0)


def test_hog_matches_loops_on_random_images():
    g = torch.Generator().manual_seed(0)
    _check_against_loops(torch.randn(2, 3, 32, 40, generator=g, dtype=torch.float64))
    # float32 input (computed in float32) against the float64 loops
    _check_against_loops(torch.rand(1, 3, 24, 24, generator=g))


def _sample_images(n, size):
    from PIL import Image
    paths = sorted(glob.glob(os.path.join(SAMPLES, '*', '*.JPEG')))[:n]
    if len(paths) < n:
        pytest.skip(f'real sample images not found in {SAMPLES}')
    out = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert('RGB').resize((size, size), Image.BICUBIC)
            out.append(torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 255)
    return torch.stack(out)


def test_hog_matches_loops_on_real_images():
    x = _sample_images(2, 48)
    x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    _check_against_loops(x)


def test_hog_is_the_same_for_normalised_and_unit_range_images():
    # the Sobel kernels sum to zero and each cell is normalised per channel: a per-channel
    # (x - mean) / std changes nothing but rounding
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    normalised = (x - torch.tensor(MEAN, dtype=x.dtype).view(3, 1, 1)) / torch.tensor(STD, dtype=x.dtype).view(3, 1, 1)
    torch.testing.assert_close(hog_features(normalised), hog_features(x), atol=1e-9, rtol=0)


def test_hog_patch_targets_layout():
    x = torch.randn(2, 3, 48, 32, generator=torch.Generator().manual_seed(2))
    t = hog_patch_targets(x, 16)
    assert t.shape == (2, 3 * 2, 108)
    cells = hog_features(x)
    torch.testing.assert_close(patch_targets_to_cells(t, (3, 2), 16), cells)
    # patch (row 1, column 0) holds cells rows 2-3, columns 0-1, in (cell row, cell column, channel, bin) order
    expected = cells[0, :, :, 2:4, 0:2].permute(2, 3, 0, 1).reshape(-1)
    torch.testing.assert_close(t[0, 2], expected)
    with pytest.raises(ValueError, match='multiple of 8'):
        hog_patch_targets(x, 14)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_hog_on_cuda_equals_cpu():
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(hog_features(x.cuda()).cpu(), hog_features(x), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------
# masking and position embeddings
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('length,ratio', [(36, 0.75), (100, 0.75), (196, 0.75), (64, 0.6), (49, 0.9), (16, 0.5)])
def test_masking_keeps_round_l_times_one_minus_ratio(length, ratio):
    keep = round(length * (1 - ratio))
    assert num_kept(length, ratio) == keep
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, length, 8, generator=g)
    kept, mask, ids_restore = random_masking(x, keep, torch.rand(5, length, generator=g))
    assert kept.shape == (5, keep, 8)
    assert mask.sum(1).tolist() == [length - keep] * 5
    for i in range(5):
        visible = (mask[i] == 0).nonzero().flatten()
        # the kept tokens are exactly the unmasked ones (as a set; their order is the noise's)
        assert sorted(map(tuple, kept[i].tolist())) == sorted(map(tuple, x[i, visible].tolist()))
    assert len({tuple(m.tolist()) for m in mask}) > 1  # per sample
    assert sorted(ids_restore[0].tolist()) == list(range(length))


def test_masking_is_reproducible_from_the_generator():
    m = create_model('mae_vit_tiny_patch16')
    x = torch.randn(3, 3, 32, 32)
    _, _, m1 = m(x, generator=torch.Generator().manual_seed(7))
    _, _, m2 = m(x, generator=torch.Generator().manual_seed(7))
    _, _, m3 = m(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)


def sincos_by_formula(dim, grid):
    rows = [[0.0] * dim]
    q = dim // 4
    for i in range(grid):
        for j in range(grid):
            row = []
            for pos in (j, i):  # column half first, then row half
                row += [math.sin(pos / 10000 ** (k / q)) for k in range(q)]
                row += [math.cos(pos / 10000 ** (k / q)) for k in range(q)]
            rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize('grid', [6, 10, 14])
def test_sincos_embedding_equals_the_formula(grid):
    for dim in (192, 64):
        got = sincos_pos_embed_2d(dim, grid, dtype=torch.float64)
        assert got.shape == (1, grid * grid + 1, dim)
        torch.testing.assert_close(got[0], sincos_by_formula(dim, grid), atol=1e-12, rtol=0)


def test_model_uses_the_exact_table_of_each_grid():
    m = create_model('mae_vit_tiny_patch16')
    for size in (32, 96, 64):
        m(torch.randn(2, 3, size, size))
    grids = sorted({(k[0], k[1]) for k in m._pos_cache})
    assert grids == [(2, 128), (2, 192), (4, 128), (4, 192), (6, 128), (6, 192)]
    torch.testing.assert_close(m.pos_embed(6, False), sincos_pos_embed_2d(192, 6))
    assert not any('pos_embed' in k for k in m.state_dict())


# ---------------------------------------------------------------------------
# compute model
# ---------------------------------------------------------------------------

def _counted(model, size, backward):
    x = torch.randn(1, 3, size, size, device='meta')
    noise = torch.rand(1, (size // model.patch_size) ** 2, device='meta')
    with FlopCounterMode(display=False) as fc:
        loss, _, _ = model(x, noise=noise)
        if backward:
            loss.backward()
    return fc.get_total_flops()


@pytest.mark.parametrize('name,target', [('mae_vit_tiny_patch16', 'hog'), ('mae_vit_base_patch16', 'pixel'),
                                         ('mae_vit_base_patch16', 'hog')])
def test_compute_model_matches_flop_counter(name, target):
    # on the meta device (shapes only: counting ViT-B costs no memory and little time) the
    # attention of timm's blocks, fused or not, reaches the counter as operations it has
    # formulas for (on a real CPU the fused kernel has none and would be missed)
    with torch.device('meta'):
        model = create_model(name, target=target)
    assert model.blocks[0].attn.fused_attn
    for size in (96, 160, 224):
        flops = model.flops(size)
        fwd, train = _counted(model, size, False), _counted(model, size, True)
        assert abs(fwd - flops['forward']) <= 0.05 * flops['forward'], (size, fwd, flops['forward'])
        assert abs(train - flops['train']) <= 0.05 * flops['train'], (size, train, flops['train'])
    # the attention products are counted, not absorbed in the tolerance: the explicit
    # products (timm's non-fused path) count the same
    for blk in list(model.blocks) + list(model.decoder_blocks):
        blk.attn.fused_attn = False
    assert abs(_counted(model, 96, False) - model.flops(96)['forward']) <= 1e-6 * model.flops(96)['forward']


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_compute_model_matches_flop_counter_on_cuda():
    # real tensors under bf16 autocast: the attention runs in a fused CUDA kernel, which the
    # counter has formulas for (flash / memory-efficient attention)
    model = create_model('mae_vit_base_patch16', target='hog').cuda()
    for size in (96, 160, 224):
        x = torch.randn(2, 3, size, size, device='cuda')
        with FlopCounterMode(display=False) as fc:
            with torch.autocast('cuda', dtype=torch.bfloat16):
                loss, _, _ = model(x, generator=torch.Generator(device='cuda').manual_seed(0))
            loss.backward()
        flops = model.flops(size)
        assert abs(fc.get_total_flops() / 2 - flops['train']) <= 0.05 * flops['train']


def test_compute_model_counts_visible_tokens_and_attention():
    cfg = MAE_CONFIGS['mae_vit_base_patch16']
    f = cfg.flops(224)
    # encoder on 49 + 1 tokens, decoder on 196 + 1
    assert f['encoder_linear'] == 12 * 2 * 50 * 12 * 768 * 768
    assert f['decoder_attention'] == 8 * 4 * 197 ** 2 * 512
    assert cfg.flops(224, 0.5)['encoder_linear'] == 12 * 2 * 99 * 12 * 768 * 768
    assert cfg.flops(224, target='hog')['decoder_pred'] == 2 * 196 * 512 * 108
    assert f['encoder_attention'] + f['decoder_attention'] > 0.03 * f['forward']


# ---------------------------------------------------------------------------
# fine-tuning into timm's ViT
# ---------------------------------------------------------------------------

def _encoder_features_all_tokens(mae, x):
    """The MAE encoder on every patch (no masking), built from its own pieces."""
    t = mae.patch_embed(x)
    pos = mae.pos_embed(x.shape[-1] // 16, False)
    t = torch.cat([(mae.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1), t + pos[:, 1:]], dim=1)
    for blk in mae.blocks:
        t = blk(t)
    return mae.norm(t)


@pytest.mark.parametrize('pool', ['token', 'avg'])
def test_mae_state_loads_into_timm_vit(pool):
    torch.manual_seed(0)
    mae = create_model('mae_vit_tiny_patch16', target='hog')
    vit = timm.create_model('vit_tiny_patch16_224', num_classes=10, global_pool=pool)
    state, skipped = mae_to_vit_state_dict({'model': mae.state_dict(), 'epoch': 3}, vit)
    result = vit.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == sorted(
        ['head.weight', 'head.bias'] + (['fc_norm.weight', 'fc_norm.bias'] if pool == 'avg' else []))
    assert not result.unexpected_keys
    assert 'mask_token' in skipped and 'decoder_pred.weight' in skipped and 'decoder_blocks.1.mlp.fc2.bias' in skipped
    assert ('norm.weight' in skipped) == (pool == 'avg')  # avg pooling: timm's fresh fc_norm instead
    vs = vit.state_dict()
    for k, v in mae.state_dict().items():
        if k in vs and k not in skipped:
            assert torch.equal(vs[k], v), k
    torch.testing.assert_close(vs['pos_embed'], sincos_pos_embed_2d(192, 14))
    if pool == 'token':
        x = torch.randn(2, 3, 224, 224)
        with torch.no_grad():
            torch.testing.assert_close(vit.forward_features(x), _encoder_features_all_tokens(mae, x))


def _official_tiny_state(patch=16, dim=192, depth=12, dec=128, dec_depth=2, out=768, grid=14):
    """A state dict with the official MAE code's parameter names and shapes (models_mae.py)."""
    s = {'cls_token': (1, 1, dim), 'pos_embed': (1, grid * grid + 1, dim),
         'patch_embed.proj.weight': (dim, 3, patch, patch), 'patch_embed.proj.bias': (dim,), 'norm.weight': (dim,), 'norm.bias': (dim,),
         'mask_token': (1, 1, dec), 'decoder_pos_embed': (1, grid * grid + 1, dec),
         'decoder_embed.weight': (dec, dim), 'decoder_embed.bias': (dec,), 'decoder_norm.weight': (dec,),
         'decoder_norm.bias': (dec,), 'decoder_pred.weight': (out, dec), 'decoder_pred.bias': (out,)}
    for prefix, n, d in (('blocks', depth, dim), ('decoder_blocks', dec_depth, dec)):
        for i in range(n):
            b = f'{prefix}.{i}.'
            s.update({b + 'norm1.weight': (d,), b + 'norm1.bias': (d,), b + 'attn.qkv.weight': (3 * d, d),
                      b + 'attn.qkv.bias': (3 * d,), b + 'attn.proj.weight': (d, d), b + 'attn.proj.bias': (d,),
                      b + 'norm2.weight': (d,), b + 'norm2.bias': (d,), b + 'mlp.fc1.weight': (4 * d, d),
                      b + 'mlp.fc1.bias': (4 * d,), b + 'mlp.fc2.weight': (d, 4 * d), b + 'mlp.fc2.bias': (d,)})
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v, generator=g) for k, v in s.items()}
    state['pos_embed'] = sincos_pos_embed_2d(dim, grid)
    state['decoder_pos_embed'] = sincos_pos_embed_2d(dec, grid)
    return state


def test_official_mae_checkpoint_loads():
    official = _official_tiny_state()
    vit = timm.create_model('vit_tiny_patch16_224', num_classes=5)
    state, skipped = mae_to_vit_state_dict({'model': official}, vit)
    vit.load_state_dict(state, strict=False)
    assert set(skipped) == {k for k in official if k.startswith('decoder') or k in ('mask_token', 'pos_embed')}
    for k in ('blocks.11.attn.qkv.weight', 'patch_embed.proj.weight', 'cls_token', 'norm.bias'):
        assert torch.equal(vit.state_dict()[k], official[k])
    # the generated table is the official one at the pre-training grid
    torch.testing.assert_close(vit.state_dict()['pos_embed'], official['pos_embed'])
    # and the MAE model itself takes the official names (the fixed tables are regenerated)
    assert infer_mae_model(official) == 'mae_vit_tiny_patch16'
    mae = create_model('mae_vit_tiny_patch16')
    assert sorted(load_mae_state_dict(mae, {'model': official})) == ['decoder_pos_embed', 'pos_embed']
    assert torch.equal(mae.decoder_pred.weight, official['decoder_pred.weight'])


def test_encoder_that_does_not_fit_is_one_line_with_the_fix():
    base = _official_tiny_state(dim=768, dec=512, dec_depth=8)
    vit = timm.create_model('vit_tiny_patch16_224')
    with pytest.raises(UserError) as e:
        mae_to_vit_state_dict(base, vit, what='pre.pth')
    msg = str(e.value)
    assert '\n' not in msg and 'width 768' in msg and 'width 192' in msg and '--model vit_base_patch16_224' in msg
    with pytest.raises(UserError, match='no MAE pre-training weights'):
        mae_to_vit_state_dict({'model': vit.state_dict()}, vit)


# ---------------------------------------------------------------------------
# training and bad input
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('target', ['pixel', 'hog'])
def test_loss_decreases_on_a_tiny_batch(target):
    torch.manual_seed(0)
    model = create_model('mae_vit_tiny_patch16', target=target)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    losses = []
    for step in range(12):
        loss, pred, mask = model(x, generator=torch.Generator().manual_seed(step % 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert pred.shape == (4, 4, 108 if target == 'hog' else 768)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_loss_is_on_masked_patches_only():
    model = create_model('mae_vit_tiny_patch16', norm_pix_loss=False)
    x = torch.randn(2, 3, 32, 32)
    loss, pred, mask = model(x, generator=torch.Generator().manual_seed(0))
    target = model.targets(x)
    per_patch = ((pred - target) ** 2).mean(-1)
    torch.testing.assert_close(loss, per_patch[mask.bool()].mean())
    norm = create_model('mae_vit_tiny_patch16', norm_pix_loss=True).targets(x)
    torch.testing.assert_close(norm.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)


def test_bad_input_is_one_line_with_the_fix():
    for bad in (0, 1, -0.1, 1.5, float('nan'), True):
        with pytest.raises(UserError, match='--mask_ratio'):
            check_mask_ratio(bad)
    assert check_mask_ratio(0.75) == 0.75
    with pytest.raises(UserError, match=r'--input_size 100 .*patch size 16.*nearest valid 96$'):
        check_mae_size(100, 16)
    with pytest.raises(UserError, match=r'nearest valid 112 or 128$'):
        check_mae_size(120, 16, 'B')
    with pytest.raises(UserError, match=r'too small.*nearest valid 32$'):
        check_mae_size(16, 16)
    assert check_mae_size(32, 16) == 32
    with pytest.raises(UserError, match=r'nearest valid 98$'):
        check_mae_size(96, 14)
    assert check_mae_size(224, 14) == 224
    with pytest.raises(UserError, match=r'--target hog needs a patch size that is a multiple of 8.*14.*--target pixel'):
        check_mae_target('hog', 14, 'mae_vit_huge_patch14')
    assert check_mae_target('hog', 16) == 'hog' and check_mae_target('hog', 8) == 'hog'
    with pytest.raises(UserError, match='--target pixel or --target hog'):
        check_mae_target('rgb', 16)
    with pytest.raises(UserError, match='--target hog'):
        create_model('mae_vit_huge_patch14', target='hog')
    with pytest.raises(UserError, match='--mask_ratio'):
        create_model('mae_vit_tiny_patch16', mask_ratio=1.0)


def test_published_sizes():
    for name, (dim, depth, heads, patch) in {'mae_vit_base_patch16': (768, 12, 12, 16),
                                             'mae_vit_large_patch16': (1024, 24, 16, 16),
                                             'mae_vit_huge_patch14': (1280, 32, 16, 14)}.items():
        c = MAE_CONFIGS[name]
        assert (c.embed_dim, c.depth, c.num_heads, c.patch_size) == (dim, depth, heads, patch)
        assert (c.decoder_embed_dim, c.decoder_depth, c.decoder_num_heads) == (512, 8, 16)
        with torch.device('meta'):
            vit = timm.create_model(c.vit)
        assert (vit.embed_dim, len(vit.blocks), vit.patch_embed.patch_size[0]) == (dim, depth, patch)
    with torch.device('meta'):
        m = create_model('mae_vit_base_patch16')
    # MAE ViT-B: 111.9M parameters with the two fixed tables MAE keeps in its state dict
    fixed = 197 * 768 + 197 * 512
    assert round((sum(p.numel() for p in m.parameters()) + fixed) / 1e6, 1) == 111.9
    blk = m.blocks[0]
    assert blk.attn.num_heads == 12 and blk.norm1.eps == 1e-6 and blk.attn.qkv.bias is not None


# ---------------------------------------------------------------------------
# the plan's compute model and the MAE ET++ preset
# ---------------------------------------------------------------------------

def _plan_args(model, epochs=400, base=224, **kw):
    import argparse
    return argparse.Namespace(model=model, curriculum='etpp', curriculum_file=None, epochs=epochs,
                              base_input_size=base, input_size=base, batch_size=64, update_freq=1,
                              warmup_epochs=40, **kw)


def test_etpp_plan_counts_mae_compute():
    from curriculum import build_plan
    from curriculum.adapt import size_multiple
    with torch.device('meta'):
        model = create_model('mae_vit_base_patch16')
    plan = build_plan(_plan_args('mae_vit_base_patch16'), size_multiple(model), cost=model.train_flops)
    assert [s.size for s in plan.stages] == [96, 96, 128, 128, 160, 160, 192, 192, 224, 224]
    for s in plan.stages:
        assert s.cost == model.train_flops(s.size) / model.train_flops(224)
        # equal compute per segment under the MAE cost (up to one data epoch: the boundaries are rounded)
        assert abs(s.compute(224) - 40) <= s.cost
    assert abs(plan.total_compute - 400) < 0.5 and plan.progress(plan.num_epochs) == plan.total_progress
    # 96: the encoder's 9 + 1 tokens cost more than (96/224)^2 of its 49 + 1
    assert plan.stages[0].cost > (96 / 224) ** 2
    # MAE's 40 of 400 epochs, ended on a whole data epoch of the first stage (the drivers' cut,
    # presets.driver_warmup_end, applied to the model's own cost)
    assert abs(plan.warmup - 0.1 * plan.total_progress) <= plan.stages[0].cost
    assert plan.summary()['stages'][0]['cost'] == plan.stages[0].cost
    # without a compute model the papers' (B/base)^2 and the unchanged summary
    area = build_plan(_plan_args('mae_vit_base_patch16'), 16)
    assert all(s.cost is None for s in area.stages) and 'cost' not in area.summary()['stages'][0]
    assert abs(area.stages[0].compute(224) - 40) <= (96 / 224) ** 2


def test_mae_presets_follow_the_patch_grid():
    from curriculum import build_plan
    from curriculum.adapt import check_input_size, size_multiple
    with torch.device('meta'):
        huge = create_model('mae_vit_huge_patch14')
        tiny = create_model('mae_vit_tiny_patch16')
    plan = build_plan(_plan_args('mae_vit_huge_patch14'), size_multiple(huge), cost=huge.train_flops)
    assert sorted({s.size for s in plan.stages}) == [98, 126, 154, 196, 224]
    for s in plan.stages:
        check_input_size(huge, s.size)
    with pytest.raises(ValueError, match='nearest valid sizes: 224 or 238'):
        check_input_size(huge, 230)
    # the tiny demo at base 64: the ramp scaled onto multiples of 16
    demo = build_plan(_plan_args('mae_vit_tiny_patch16', epochs=20, base=64), size_multiple(tiny), cost=tiny.train_flops)
    assert sorted({s.size for s in demo.stages}) == [32, 48, 64]


def test_curriculum_file_with_the_mae_compute_model(tmp_path):
    import json
    from curriculum import build_plan
    model = create_model('mae_vit_tiny_patch16')
    f = tmp_path / 'c.json'
    f.write_text(json.dumps({'stages': [{'share': 0.5, 'size': 96}, {'share': 0.5, 'size': 224}]}))
    args = _plan_args('mae_vit_tiny_patch16', epochs=100)
    args.curriculum_file = str(f)
    plan = build_plan(args, 16, cost=model.train_flops)
    rel = model.train_flops(96) / model.train_flops(224)
    assert plan.stages[0].cost == rel and plan.stages[0].epochs == round(50 / rel)


# ---------------------------------------------------------------------------
# scripts/visualize_mae.py and bench_step.py --task mae
# ---------------------------------------------------------------------------

def _save_tiny(path, target, **args):
    torch.manual_seed(0)
    model = create_model('mae_vit_tiny_patch16', target=target)
    saved = {'model': 'mae_vit_tiny_patch16', 'target': target, 'mask_ratio': 0.75, 'norm_pix_loss': True,
             'base_input_size': 64, **args}
    torch.save({'model': model.state_dict(), 'args': saved, 'epoch': 0}, path)
    return model


def _image_folder(tmp_path):
    from PIL import Image
    folder = tmp_path / 'imgs' / 'a'
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        arr = (torch.rand(40, 56, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f'{i}.png')
    return str(tmp_path / 'imgs')


@pytest.mark.parametrize('target', ['pixel', 'hog'])
def test_visualize_mae_writes_the_grid(tmp_path, target):
    import scripts.visualize_mae as vis
    from PIL import Image
    ckpt = tmp_path / 'checkpoint-0.pth'
    model = _save_tiny(ckpt, target)
    out = tmp_path / 'grid.png'
    args = vis.get_args_parser().parse_args(['--checkpoint', str(ckpt), '--images', _image_folder(tmp_path),
                                             '--size', '32', '--out', str(out), '--cell', '32'])
    cols = vis.main(args)
    names = [c[0] for c in cols]
    assert names[:2] == ['original', 'masked (75%)']
    assert names[2:] == (['reconstruction', 'reconstruction + visible'] if target == 'pixel'
                         else ['HOG target', 'HOG prediction (visible dimmed)'])
    assert all(c[1].shape == (2, 3, 32, 32) and 0 <= c[1].min() and c[1].max() <= 1 for c in cols)
    with Image.open(out) as im:
        assert im.format == 'PNG' and im.width == 6 + 4 * (32 + 6)
    # the checkpoint's weights were used: the loaded model's loss on the same mask is the saved one's
    x = vis.load_batch(vis.list_images(args.images, 2), 32)
    loaded, _, _ = vis.load_model(args)
    with torch.no_grad():
        expected = float(model.eval()(x, generator=torch.Generator().manual_seed(0))[0])
    assert vis.columns_for(loaded, target, x, 0)[1] == pytest.approx(expected, abs=1e-6)


def test_visualize_mae_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    import scripts.visualize_mae as vis
    ckpt = tmp_path / 'm.pth'
    _save_tiny(ckpt, 'pixel')
    images = _image_folder(tmp_path)
    out = tmp_path / 'grid.png'
    sup = tmp_path / 'sup.pth'
    torch.save({'model': timm.create_model('vit_tiny_patch16_224').state_dict(), 'epoch': 3}, sup)
    for argv, msg in ((['--checkpoint', str(ckpt), '--size', '100'], 'nearest valid 96'),
                      (['--checkpoint', str(sup)], 'not an MAE pre-training checkpoint'),
                      (['--checkpoint', str(ckpt), '--mask_ratio', '1'], '--mask_ratio 1.0 is outside')):
        with pytest.raises(SystemExit) as e:
            vis.cli(argv + ['--images', images, '--out', str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and err.count('\n') == 1, err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith('.tmp')]


def test_bench_step_mae_task():
    import sys
    sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
    import bench_step
    threads = torch.get_num_threads()
    try:
        res = bench_step.main(['--task', 'mae', '--model', 'mae_vit_tiny_patch16', '--base_input_size', '64',
                               '--batch_size', '2', '--device', 'cpu', '--bench_steps', '1', '--bench_warmup', '1',
                               '--threads', '1', '--target', 'hog'])
    finally:
        torch.set_num_threads(threads)
    rows = {r['size']: r for r in res['rows']}
    assert sorted(rows) == [32, 48, 64] and rows[64]['ratio'] == 1.0
    assert rows[32]['compute_model'] > 1 and all(r['img_s'] > 0 for r in rows.values())
    assert res['task'] == 'mae' and res['target'] == 'hog'
