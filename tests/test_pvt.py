"""PVT v1 (models/pvt.py): the paper's sizes, the official names and forward, stage changes."""
import pytest
import torch
import torch.nn.functional as F

import tiny_models  # noqa: F401  (registers tiny_pvt)
from curriculum.adapt import adapt_model, check_input_size, size_multiple
from models import RECIPE_MODELS, create_model
from models.checkpoint_compat import LoadReport, guess_family, load_into
from models.pvt import PyramidVisionTransformer

pytestmark = pytest.mark.usefixtures('one_intra_op_thread')


def test_paper_sizes_and_registration():
    # whai362/PVT classification README: 13.2M / 24.5M / 44.2M / 61.4M parameters
    expected = {'pvt_tiny': 13.2, 'pvt_small': 24.5, 'pvt_medium': 44.2, 'pvt_large': 61.4}
    depths = {'pvt_tiny': (2, 2, 2, 2), 'pvt_small': (3, 4, 6, 3), 'pvt_medium': (3, 4, 18, 3),
              'pvt_large': (3, 8, 27, 3)}
    for name, millions in expected.items():
        assert name in RECIPE_MODELS
        with torch.device('meta'):
            m = create_model(name)
        assert isinstance(m, PyramidVisionTransformer)
        assert round(sum(p.numel() for p in m.parameters()) / 1e6, 1) == millions
        assert m.depths == depths[name] and m.embed_dims == (64, 128, 320, 512)
        assert [m.get_submodule(f'block{i + 1}.0.attn').num_heads for i in range(4)] == [1, 2, 5, 8]
        assert [m.get_submodule(f'block{i + 1}.0.mlp.fc1').out_features for i in range(4)] == [512, 1024, 1280, 2048]
        assert [m.get_submodule(f'block{i + 1}.0.attn').sr_ratio for i in range(4)] == [8, 4, 2, 1]
        assert m.pos_embed4.shape == (1, 7 * 7 + 1, 512) and m.pos_embed1.shape == (1, 56 * 56, 64)
        assert m.no_weight_decay() == {'cls_token'}


def test_official_parameter_names():
    m = create_model('tiny_pvt', num_classes=3)
    keys = set(m.state_dict())
    for k in ('patch_embed1.proj.weight', 'patch_embed1.norm.weight', 'pos_embed1', 'pos_embed4', 'cls_token',
              'block1.0.norm1.weight', 'block1.0.attn.q.weight', 'block1.0.attn.kv.weight',
              'block1.0.attn.proj.weight', 'block1.0.attn.sr.weight', 'block1.0.attn.norm.weight',
              'block1.0.norm2.weight', 'block1.0.mlp.fc1.weight', 'block1.0.mlp.fc2.weight',
              'block4.0.attn.q.bias', 'norm.weight', 'head.weight'):
        assert k in keys, k
    assert not any(k.startswith('block4.0.attn.sr') for k in keys)  # R = 1 in the last stage
    assert guess_family(keys) == 'pvt'


def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + '.weight'], sd[prefix + '.bias'], eps)


def official_forward(sd, x, heads, srs):
    """The released forward, restated from whai362/PVT classification/pvt.py on a state dict
    by name: LayerNorm eps 1e-5 in patch embeddings and SR norms, 1e-6 in blocks and the final
    norm; explicit softmax(q k^T * d^-0.5) v; class token prepended in stage 4 only."""
    B = x.shape[0]
    for i in range(4):
        s = i + 1
        w = sd[f'patch_embed{s}.proj.weight']
        x = F.conv2d(x, w, sd[f'patch_embed{s}.proj.bias'], stride=w.shape[-1])
        H, W = x.shape[-2:]
        x = _ln(x.flatten(2).transpose(1, 2), sd, f'patch_embed{s}.norm', 1e-5)
        if i == 3:
            x = torch.cat([sd['cls_token'].expand(B, -1, -1), x], 1)
        x = x + sd[f'pos_embed{s}']
        j = 0
        while f'block{s}.{j}.norm1.weight' in sd:
            p = f'block{s}.{j}.'
            y = _ln(x, sd, p + 'norm1', 1e-6)
            N, C = y.shape[1:]
            q = F.linear(y, sd[p + 'attn.q.weight'], sd[p + 'attn.q.bias']).reshape(B, N, heads[i], -1).transpose(1, 2)
            kv_in = y
            if srs[i] > 1:
                m = F.conv2d(y.transpose(1, 2).reshape(B, C, H, W), sd[p + 'attn.sr.weight'],
                             sd[p + 'attn.sr.bias'], stride=srs[i])
                kv_in = _ln(m.flatten(2).transpose(1, 2), sd, p + 'attn.norm', 1e-5)
            kv = F.linear(kv_in, sd[p + 'attn.kv.weight'], sd[p + 'attn.kv.bias'])
            kv = kv.reshape(B, -1, 2, heads[i], C // heads[i]).permute(2, 0, 3, 1, 4)
            attn = (q @ kv[0].transpose(-2, -1) * (C // heads[i]) ** -0.5).softmax(-1)
            y = F.linear((attn @ kv[1]).transpose(1, 2).reshape(B, N, C), sd[p + 'attn.proj.weight'],
                         sd[p + 'attn.proj.bias'])
            x = x + y
            y = F.gelu(F.linear(_ln(x, sd, p + 'norm2', 1e-6), sd[p + 'mlp.fc1.weight'], sd[p + 'mlp.fc1.bias']))
            x = x + F.linear(y, sd[p + 'mlp.fc2.weight'], sd[p + 'mlp.fc2.bias'])
            j += 1
        if i < 3:
            x = x.transpose(1, 2).reshape(B, -1, H, W)
    x = _ln(x, sd, 'norm', 1e-6)[:, 0]
    return F.linear(x, sd['head.weight'], sd['head.bias'])


def perturbed_state(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict(keep_vars=True).values():
            t.add_(torch.randn(t.shape, generator=g) * 0.1)
    return model.eval()


def test_forward_matches_official_semantics():
    m = perturbed_state(create_model('tiny_pvt', num_classes=5), seed=0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = official_forward(m.state_dict(), x, heads=(1, 2, 5, 8), srs=(8, 4, 2, 1))
        assert torch.allclose(m(x), ref, atol=1e-5)


def test_official_layout_checkpoint_same_logits():
    """A released-layout file ({'model': ..., 'module.' prefixes}) into a fresh model: same logits."""
    src = perturbed_state(create_model('tiny_pvt', num_classes=5), seed=1)
    official = {f'module.{k}': v.clone() for k, v in src.state_dict().items()}
    dst = create_model('tiny_pvt', num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(dst(x), src(x))
    assert load_into(dst, {'model': official}) == LoadReport()
    assert torch.allclose(dst(x), src(x), atol=1e-6)


def test_stage_change_resizes_pos_embeds_and_adam_moments():
    torch.manual_seed(0)
    m = create_model('tiny_pvt', num_classes=3, img_size=64)
    assert size_multiple(m) == 32
    with pytest.raises(ValueError, match='multiple of 32.*nearest valid sizes: 32 or 64'):
        check_input_size(m, 48)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    opt.step()
    before = {i: getattr(m, f'pos_embed{i}').detach().clone() for i in range(1, 5)}
    sq = opt.state[m.pos_embed4]['exp_avg_sq'].clone()
    ema = create_model('tiny_pvt', num_classes=3, img_size=64)
    assert adapt_model(m, 96, opt, ema) is True
    assert [tuple(getattr(m, f'pos_embed{i}').shape) for i in range(1, 5)] == [
        (1, 24 * 24, 8), (1, 12 * 12, 16), (1, 6 * 6, 40), (1, 1 + 3 * 3, 64)]
    assert ema.pos_embed1.shape == m.pos_embed1.shape
    # the optimizer holds the new parameters, moments resized the same way (class entry kept)
    held = {id(p) for g in opt.param_groups for p in g['params']}
    assert all(id(getattr(m, f'pos_embed{i}')) in held for i in range(1, 5))
    new_sq = opt.state[m.pos_embed4]['exp_avg_sq']
    assert new_sq.shape == (1, 10, 64) and torch.equal(new_sq[:, 0], sq[:, 0]) and (new_sq >= 0).all()
    # bilinear resampling keeps the mean (roughly) and the class-token entry exactly
    assert torch.allclose(m.pos_embed1.mean(), before[1].mean(), atol=1e-3)
    assert torch.equal(m.pos_embed4[:, 0], before[4][:, 0])
    m(torch.randn(1, 3, 96, 96)).sum().backward()
    opt.step()
    assert adapt_model(m, 96, opt) is False  # same size: nothing to do


def test_224_checkpoint_loads_into_other_size():
    """Fine-tuning at 384 (here 96) from a 224 (here 64) file: position embeddings resampled at load."""
    src = perturbed_state(create_model('tiny_pvt', num_classes=5, img_size=64), seed=2)
    dst = create_model('tiny_pvt', num_classes=5, img_size=96)
    assert load_into(dst, {'model': src.state_dict()}) == LoadReport()
    ref = create_model('tiny_pvt', num_classes=5, img_size=64)
    ref.load_state_dict(src.state_dict())
    ref.set_input_size(96)
    assert torch.equal(dst.pos_embed2, ref.pos_embed2)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(dst.eval()(x), ref.eval()(x), atol=1e-6)
    with pytest.raises(ValueError, match='call model.set_input_size'):
        dst(torch.randn(1, 3, 64, 64))


def test_layer_groups_for_layer_decay():
    from timm.models import group_parameters
    m = create_model('tiny_pvt', num_classes=3)
    groups = list(group_parameters(m, m.group_matcher(), reverse=False).values())
    assert set(groups[0]) == {'pos_embed1', 'patch_embed1.proj.weight', 'patch_embed1.proj.bias',
                              'patch_embed1.norm.weight', 'patch_embed1.norm.bias'}
    stage4 = next(g for g in groups if 'cls_token' in g)
    assert 'pos_embed4' in stage4 and 'patch_embed4.proj.weight' in stage4 and 'block4.0.attn.q.weight' in stage4
    # the final norm joins the last block ((99999,) is timm's "previous group"), the head above all
    assert groups[-1] == ['head.weight', 'head.bias'] and {'norm.weight', 'block4.0.mlp.fc2.weight'} <= set(groups[-2])


def test_pvt_tiny_compute_matches_the_paper():
    # PVT paper Table 1 / EfficientTrain++ Table 7: 1.9 GFLOPs (multiply-adds) at 224; torch's
    # counter sees matmuls, convolutions and attention only (no norms, activations, softmax).
    from torch.utils.flop_counter import FlopCounterMode
    m = create_model('pvt_tiny').eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        m(torch.randn(1, 3, 224, 224))
    assert counter.get_total_flops() / 2e9 == pytest.approx(1.9, rel=0.05)


def official_keys(depths, size=224, num_classes=1000):
    """The state_dict of whai362/PVT classification/pvt.py's pvt_* models, restated by name and
    shape from that file's modules (embed dims 64/128/320/512, MLP ratios 8/8/4/4, SR 8/4/2/1,
    qkv bias, an SR conv + LayerNorm only where R > 1, the class token's slot in pos_embed4).
    Instantiating the official file gives 161 / 301 / 517 / 751 tensors for T / S / M / L."""
    dims, ratios, srs = (64, 128, 320, 512), (8, 8, 4, 4), (8, 4, 2, 1)
    out = {}
    for i in range(4):
        s, d, cin = i + 1, dims[i], 3 if i == 0 else dims[i - 1]
        p = 4 if i == 0 else 2
        out.update({f'patch_embed{s}.proj.weight': (d, cin, p, p), f'patch_embed{s}.proj.bias': (d,),
                    f'patch_embed{s}.norm.weight': (d,), f'patch_embed{s}.norm.bias': (d,),
                    f'pos_embed{s}': (1, (size // (4 * 2 ** i)) ** 2 + (i == 3), d)})
        for j in range(depths[i]):
            b, h = f'block{s}.{j}.', d * ratios[i]
            out.update({b + 'norm1.weight': (d,), b + 'norm1.bias': (d,), b + 'attn.q.weight': (d, d),
                        b + 'attn.q.bias': (d,), b + 'attn.kv.weight': (2 * d, d), b + 'attn.kv.bias': (2 * d,),
                        b + 'attn.proj.weight': (d, d), b + 'attn.proj.bias': (d,), b + 'norm2.weight': (d,),
                        b + 'norm2.bias': (d,), b + 'mlp.fc1.weight': (h, d), b + 'mlp.fc1.bias': (h,),
                        b + 'mlp.fc2.weight': (d, h), b + 'mlp.fc2.bias': (d,)})
            if srs[i] > 1:
                out.update({b + 'attn.sr.weight': (d, d, srs[i], srs[i]), b + 'attn.sr.bias': (d,),
                            b + 'attn.norm.weight': (d,), b + 'attn.norm.bias': (d,)})
    out.update({'norm.weight': (512,), 'norm.bias': (512,), 'cls_token': (1, 1, 512),
                'head.weight': (num_classes, 512), 'head.bias': (num_classes,)})
    return out


@pytest.mark.parametrize('name,depths,count', [('pvt_tiny', (2, 2, 2, 2), 161), ('pvt_small', (3, 4, 6, 3), 301),
                                               ('pvt_medium', (3, 4, 18, 3), 517),
                                               ('pvt_large', (3, 8, 27, 3), 751)])
def test_every_released_key_loads_strictly(name, depths, count):
    """A released file's keys and shapes are exactly the model's (load_state_dict strict=True);
    LayerNorm eps as released: 1e-6 (partial(nn.LayerNorm, eps=1e-6)) in blocks and the final
    norm, PyTorch's default in the patch embeddings and the SR norms, which the official code
    builds with a bare nn.LayerNorm."""
    keys = official_keys(depths)
    assert len(keys) == count
    with torch.device('meta'):
        m = create_model(name)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == keys
    m.load_state_dict({k: torch.empty(s, device='meta') for k, s in keys.items()}, strict=True, assign=True)
    eps = {n: mod.eps for n, mod in m.named_modules() if isinstance(mod, torch.nn.LayerNorm)}
    assert all(e == (1e-5 if n.startswith('patch_embed') or n.endswith('attn.norm') else 1e-6) for n, e in eps.items())
    assert len(eps) == 4 + 1 + sum(depths) * 2 + sum(d for d, r in zip(depths, (8, 4, 2, 1)) if r > 1)
