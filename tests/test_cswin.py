import math

import pytest
import timm
import torch

from models.cswin import CSWinTransformer, cswin_split_sizes


def tiny(img_size=64, num_classes=5, **kwargs):
    args = dict(img_size=img_size, embed_dim=16, depths=(1, 2, 1, 1), num_heads=(2, 2, 4, 4),
                num_classes=num_classes)
    args.update(kwargs)
    return CSWinTransformer(**args)


def official_keys(embed_dim, depths, num_heads, num_classes, mlp_ratio=4):
    """Names and shapes of microsoft/CSWin-Transformer's CSWinTransformer, from its layout:
    stem conv(7, s4, p2) + Rearrange + LayerNorm, blocks (qkv, norm1, attns.i.get_v, proj,
    mlp.fc1/fc2, norm2; two half-width branches except the last stage), Merge_Block
    (conv 3x3 s2, norm), final norm, head."""
    keys = {
        'stage1_conv_embed.0.weight': (embed_dim, 3, 7, 7), 'stage1_conv_embed.0.bias': (embed_dim,),
        'stage1_conv_embed.2.weight': (embed_dim,), 'stage1_conv_embed.2.bias': (embed_dim,),
    }
    dim = embed_dim
    for s in range(4):
        for j in range(depths[s]):
            p = f'stage{s + 1}.{j}.'
            keys.update({
                p + 'qkv.weight': (3 * dim, dim), p + 'qkv.bias': (3 * dim,),
                p + 'norm1.weight': (dim,), p + 'norm1.bias': (dim,),
                p + 'proj.weight': (dim, dim), p + 'proj.bias': (dim,),
                p + 'mlp.fc1.weight': (mlp_ratio * dim, dim), p + 'mlp.fc1.bias': (mlp_ratio * dim,),
                p + 'mlp.fc2.weight': (dim, mlp_ratio * dim), p + 'mlp.fc2.bias': (dim,),
                p + 'norm2.weight': (dim,), p + 'norm2.bias': (dim,),
            })
            branch_dim = dim if s == 3 else dim // 2
            for b in range(1 if s == 3 else 2):
                keys[p + f'attns.{b}.get_v.weight'] = (branch_dim, 1, 3, 3)
                keys[p + f'attns.{b}.get_v.bias'] = (branch_dim,)
        if s < 3:
            keys.update({
                f'merge{s + 1}.conv.weight': (2 * dim, dim, 3, 3), f'merge{s + 1}.conv.bias': (2 * dim,),
                f'merge{s + 1}.norm.weight': (2 * dim,), f'merge{s + 1}.norm.bias': (2 * dim,),
            })
            dim *= 2
    keys.update({'norm.weight': (dim,), 'norm.bias': (dim,),
                 'head.weight': (num_classes, dim), 'head.bias': (num_classes,)})
    return keys


@pytest.mark.parametrize('name,embed_dim,depths,heads', [
    ('CSWin_64_12211_tiny_224', 64, (1, 2, 21, 1), (2, 4, 8, 16)),
    ('CSWin_64_24322_small_224', 64, (2, 4, 32, 2), (2, 4, 8, 16)),
    ('CSWin_96_24322_base_224', 96, (2, 4, 32, 2), (4, 8, 16, 32)),
])
def test_registered_configs_have_official_names_and_shapes(name, embed_dim, depths, heads):
    with torch.device('meta'):
        model = timm.create_model(name, num_classes=1000)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_keys(embed_dim, depths, heads, 1000)
    assert [b.num_heads for b in (model.stage1[0], model.stage2[0], model.stage3[0], model.stage4[0])] == list(heads)
    assert model.split_size == [1, 2, 7, 7]
    assert model.pretrained_cfg['classifier'] == 'head'
    assert model.pretrained_cfg['architecture'] == name


def test_official_state_dict_loads_strict():
    ref = tiny()
    sd = {k: torch.randn(s) for k, s in official_keys(16, (1, 2, 1, 1), (2, 2, 4, 4), 5).items()}
    ref.load_state_dict(sd, strict=True)


def test_timm_create_model_kwargs():
    with torch.device('meta'):  # structure only; forward passes are tested on the tiny config
        model = timm.create_model('CSWin_64_12211_tiny_224', num_classes=10, drop_path_rate=0.2, img_size=96)
    assert isinstance(model, CSWinTransformer)
    assert model.num_classes == 10 and model.head.out_features == 10
    assert model.split_size == [1, 2, 3, 3] and model.img_size == (96, 96)
    assert model.stage1[0].resolution == 24 and model.stage4[0].resolution == 3
    rates = [blk.drop_path.drop_prob if hasattr(blk.drop_path, 'drop_prob') else 0.
             for s in (model.stage1, model.stage2, model.stage3, model.stage4) for blk in s]
    assert rates[0] == 0. and math.isclose(rates[-1], 0.2, rel_tol=1e-6)
    assert all(a <= b for a, b in zip(rates, rates[1:]))
    with pytest.raises(ValueError, match='pretrained'):
        timm.create_model('CSWin_64_12211_tiny_224', pretrained=True)


@pytest.mark.parametrize('size', [64, 96, 160, 224])
def test_forward_backward_sizes(size):
    torch.manual_seed(0)
    model = tiny(depths=(1, 1, 1, 1), drop_path_rate=0.1)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.set_input_size((size, size))
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert model.split_size == list(cswin_split_sizes(size)) == [1, 2, size // 32, size // 32]
    model.train()
    x = torch.randn(1, 3, size, size)
    out = model(x)
    assert out.shape == (1, 5)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_set_input_size_round_trip_same_function():
    torch.manual_seed(0)
    model = tiny(img_size=224).eval()
    x = torch.randn(1, 3, 224, 224)
    before = model(x)
    model.set_input_size((96, 96))
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 5)
    model.set_input_size((224, 224))
    assert torch.allclose(model(x), before, atol=1e-6)
    model.set_input_size(img_size=160)
    assert model.img_size == (160, 160)


def test_invalid_sizes():
    model = tiny()
    with pytest.raises(ValueError, match='nearest valid size: 96$'):
        model.set_input_size((100, 100))
    with pytest.raises(ValueError, match='96 or 128'):
        model.set_input_size((112, 112))
    with pytest.raises(ValueError, match='nearest valid size: 32'):
        model.set_input_size((20, 20))
    with pytest.raises(ValueError, match='square'):
        model.set_input_size((64, 96))
    with pytest.raises(ValueError, match='nearest valid size: 224'):
        CSWinTransformer(img_size=230, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2))
    assert model.split_size == [1, 2, 2, 2]  # untouched by the refused calls
    with pytest.raises(ValueError, match='set_input_size'):
        model(torch.randn(1, 3, 96, 96))


def _reference_block(blk, x, res):
    """Cross-shaped window attention written as masked full attention over the map:
    a token attends to the tokens of its own vertical stripe (first half of the channels)
    or horizontal stripe (second half); LePE is the depthwise conv of V inside each stripe."""
    B, L, C = x.shape
    q, k, v = blk.qkv(blk.norm1(x)).chunk(3, dim=-1)
    rows = torch.arange(L) // res
    cols = torch.arange(L) % res
    outs = []
    branches = [(0, C, None)] if len(blk.attns) == 1 else [(0, C // 2, cols), (C // 2, C, rows)]
    for attn, (lo, hi, stripe_coord) in zip(blk.attns, branches):
        heads, c = attn.num_heads, hi - lo
        d = c // heads
        if stripe_coord is None:
            mask = torch.ones(L, L, dtype=torch.bool)
            stripes = [(slice(None), slice(None))]
        else:
            sid = stripe_coord // blk.split
            mask = sid[:, None] == sid[None, :]
            n = res // blk.split
            if stripe_coord is cols:
                stripes = [(slice(None), slice(i * blk.split, (i + 1) * blk.split)) for i in range(n)]
            else:
                stripes = [(slice(i * blk.split, (i + 1) * blk.split), slice(None)) for i in range(n)]
        qh, kh, vh = (t[..., lo:hi].reshape(B, L, heads, d).transpose(1, 2) for t in (q, k, v))
        logits = (qh @ kh.transpose(-1, -2)) / math.sqrt(d)
        out = logits.masked_fill(~mask, float('-inf')).softmax(-1) @ vh
        v_map = v[..., lo:hi].transpose(1, 2).reshape(B, c, res, res)
        lepe = torch.zeros_like(v_map)
        for rs, cs in stripes:
            lepe[:, :, rs, cs] = attn.get_v(v_map[:, :, rs, cs])
        lepe = lepe.reshape(B, heads, d, L).transpose(-1, -2)
        outs.append((out + lepe).transpose(1, 2).reshape(B, L, c))
    y = x + blk.proj(torch.cat(outs, dim=-1))
    return y + blk.mlp(blk.norm2(y))


@pytest.mark.parametrize('size', [64, 128])
def test_blocks_match_masked_reference(size):
    torch.manual_seed(1)
    model = tiny(img_size=size).eval()
    for p in model.parameters():  # non-trivial biases / norms so that mixups of halves show
        p.data.add_(torch.randn_like(p) * 0.1)
    res = size // 4
    for stage in (model.stage1, model.stage2, model.stage3, model.stage4):
        blk = stage[0]
        x = torch.randn(2, blk.resolution ** 2, blk.dim)
        with torch.no_grad():
            assert torch.allclose(blk(x), _reference_block(blk, x, blk.resolution), atol=1e-5)
        assert blk.resolution == res
        res //= 2


def test_classifier_api_and_weight_decay():
    model = tiny()
    assert model.get_classifier() is model.head
    assert model.no_weight_decay() == set()
    model.reset_classifier(7)
    assert model.head.out_features == 7 and model.num_classes == 7
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, model.num_features)
    assert model.forward_head(model.forward_features(torch.randn(1, 3, 64, 64)), pre_logits=True).shape == (1, 128)


def test_grad_checkpointing_same_result():
    torch.manual_seed(0)
    model = tiny().eval()
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    ref = model(x)
    model.set_grad_checkpointing(True)
    out = model(x)
    assert torch.allclose(out, ref, atol=1e-6)
    out.sum().backward()
    assert x.grad is not None
