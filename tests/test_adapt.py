import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3

from curriculum.adapt import adapt_model, check_input_size, size_multiple

NUM_CLASSES = 5
# Small configurations keep the whole file to a few seconds on 2 CPU cores; the
# resizing logic only depends on the class and the patch / window geometry.
VIT = ("vit_tiny_patch16_224", dict(embed_dim=32, depth=2, num_heads=2))
DEIT_DISTILLED = ("deit_tiny_distilled_patch16_224", dict(embed_dim=32, depth=1, num_heads=2))
# A second block in a stage is a shifted-window block (with an attention mask); the
# first stage, the costliest on CPU, gets none.
SWIN = ("swin_tiny_patch4_window7_224", dict(embed_dim=16, depths=(1, 2, 2, 2), num_heads=(1, 2, 2, 2)))
RESNET = ("resnet10t", {})


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _make(spec, seed=0):
    torch.manual_seed(seed)
    name, kwargs = spec
    return timm.create_model(name, num_classes=NUM_CLASSES, **kwargs)


def _train_step(model, optimizer, size, ema=None):
    model.train()
    x = torch.randn(1, 3, size, size)
    out = model(x)
    if isinstance(out, tuple):  # distilled DeiT in train mode: (class, distillation) logits
        out = out[0] + out[1]
    loss = F.cross_entropy(out, torch.tensor([1]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if ema is not None:
        ema.update(model)


def _check_optimizer_consistent(model, optimizer):
    params = list(model.parameters())
    in_groups = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in in_groups} == {id(p) for p in params}
    assert len(in_groups) == len(params)
    for p, state in optimizer.state.items():
        assert any(p is q for q in params), "stale parameter left in optimizer.state"
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                assert value.shape == p.shape, (key, value.shape, p.shape)


def _assert_loads_into_fresh_224(spec, module):
    fresh = _make(spec, seed=1)
    standard = {n: t.shape for n, t in fresh.state_dict().items()}
    assert {n: t.shape for n, t in module.state_dict().items()} == standard
    fresh.load_state_dict(module.state_dict(), strict=True)
    # Same computation as the standard 224 model, non-persistent buffers included
    # (Swin's relative_position_index and attention masks).
    fresh.eval()
    module.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(module(x), fresh(x))


def _grid_resize(t, old, new, prefix):
    """Independent bilinear resize of a (1, prefix + old*old, D) embedding."""
    d = t.shape[-1]
    g = t[:, prefix:].reshape(1, old, old, d).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=(new, new), mode="bilinear", align_corners=False)
    return torch.cat([t[:, :prefix], g.permute(0, 2, 3, 1).reshape(1, new * new, d)], dim=1)


@pytest.mark.parametrize("spec", [VIT, SWIN], ids=["vit", "swin"])
def test_stage_sequence_with_adamw_and_ema(spec):
    model = _make(spec)
    ema = ModelEmaV3(model, decay=0.9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    assert adapt_model(model, 224, optimizer, ema) is False  # created at 224: no-op

    steps = 0
    for size in (64, 96, 224):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        assert adapt_model(model, size, optimizer, ema) is True
        _check_optimizer_consistent(model, optimizer)
        for n, p in model.named_parameters():
            if before[n].shape == p.shape:
                assert torch.equal(before[n], p.detach()), n  # untouched parameters
            assert ema.module.get_parameter(n).shape == p.shape, n
        for state in optimizer.state.values():
            assert int(state["step"]) == steps  # scalar state carried over
        _train_step(model, optimizer, size, ema)
        steps += 1
        _check_optimizer_consistent(model, optimizer)
        with torch.no_grad():
            assert ema.module.eval()(torch.randn(1, 3, size, size)).shape == (1, NUM_CLASSES)
        # Calling again at the current size changes nothing.
        ids = [id(p) for p in model.parameters()]
        assert adapt_model(model, size, optimizer, ema) is False
        assert ids == [id(p) for p in model.parameters()]

    _assert_loads_into_fresh_224(spec, model)
    _assert_loads_into_fresh_224(spec, ema.module)


@pytest.mark.parametrize("opt_name", ["adamw", "sgd", "lamb"])
def test_vit_pos_embed_and_moments_resized_bilinearly(opt_name):
    model = _make(VIT)
    params = model.parameters()
    optimizer = {
        "adamw": lambda: torch.optim.AdamW(params, lr=1e-3),
        "sgd": lambda: torch.optim.SGD(params, lr=1e-3, momentum=0.9),
        "lamb": lambda: timm.optim.Lamb(params, lr=1e-3),
    }[opt_name]()
    _train_step(model, optimizer, 224)
    old_param = model.pos_embed.detach().clone()
    old_state = {k: v.clone() for k, v in optimizer.state[model.pos_embed].items()}
    moments = [k for k, v in old_state.items() if torch.is_tensor(v) and v.shape == old_param.shape]
    assert moments  # exp_avg / exp_avg_sq, or momentum_buffer

    assert adapt_model(model, 96, optimizer) is True
    assert model.pos_embed.shape == (1, 1 + 6 * 6, 32)
    # Bilinear like the reference (timm's own set_input_size would be bicubic).
    torch.testing.assert_close(model.pos_embed.detach(), _grid_resize(old_param, 14, 6, 1))
    new_state = optimizer.state[model.pos_embed]
    for k in moments:
        torch.testing.assert_close(new_state[k], _grid_resize(old_state[k], 14, 6, 1))
    for k, v in old_state.items():
        if k not in moments:
            assert torch.equal(torch.as_tensor(new_state[k]), torch.as_tensor(v)), k
    if "exp_avg_sq" in new_state:
        assert (new_state["exp_avg_sq"] >= 0).all()
    _train_step(model, optimizer, 96)
    _check_optimizer_consistent(model, optimizer)


def test_deit_distilled_keeps_prefix_tokens():
    model = _make(DEIT_DISTILLED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train_step(model, optimizer, 224)
    prefix = model.pos_embed[:, :2].detach().clone()
    assert adapt_model(model, 160, optimizer) is True
    assert model.pos_embed.shape == (1, 2 + 10 * 10, 32)
    assert torch.equal(model.pos_embed[:, :2].detach(), prefix)
    _train_step(model, optimizer, 160)
    assert adapt_model(model, 224, optimizer) is True
    _assert_loads_into_fresh_224(DEIT_DISTILLED, model)


def test_swin_windows_follow_size():
    model = _make(SWIN)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train_step(model, optimizer, 224)
    table = "layers.1.blocks.1.attn.relative_position_bias_table"
    old = model.get_parameter(table).detach().clone()
    old_avg = optimizer.state[model.get_parameter(table)]["exp_avg"].clone()
    assert adapt_model(model, 160, optimizer) is True
    for layer in model.layers:
        for block in layer.blocks:
            assert block.window_size == (5, 5)
            assert block.attn.relative_position_bias_table.shape == (9 * 9, block.attn.num_heads)
    # Stage 3 (res 10) keeps shifted windows at window 5; the last stage (res 5) does not.
    assert model.layers[2].blocks[1].shift_size == (2, 2)
    assert model.layers[3].blocks[1].shift_size == (0, 0)

    def resize(t):  # independent: (13*13, heads) offset grid -> (9*9, heads)
        g = t.reshape(13, 13, -1).permute(2, 0, 1)[None]
        g = F.interpolate(g, size=(9, 9), mode="bilinear", align_corners=False)
        return g[0].permute(1, 2, 0).reshape(81, -1)

    new = model.get_parameter(table)
    torch.testing.assert_close(new.detach(), resize(old))
    torch.testing.assert_close(optimizer.state[new]["exp_avg"], resize(old_avg))
    _train_step(model, optimizer, 160)


def test_resnet_is_untouched():
    model = _make(RESNET)
    ema = ModelEmaV3(model, decay=0.9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train_step(model, optimizer, 64, ema)
    ids = [id(p) for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    for size in (96, 128):
        assert adapt_model(model, size, optimizer, ema) is False
        _train_step(model, optimizer, size, ema)
    assert ids == [id(p) for p in model.parameters()]
    assert set(state) == {id(p) for p in optimizer.state}


def test_plain_module_as_ema_and_wrapped_model():
    # A DataParallel (like a DDP) wrapper is looked through; the caller rebuilds it.
    wrapped = torch.nn.DataParallel(_make(VIT))
    model = wrapped.module.cpu()  # DataParallel moves the module to a GPU if there is one
    ema_copy = _make(VIT).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert adapt_model(wrapped, 128, optimizer, ema_copy) is True
    assert ema_copy.pos_embed.shape == model.pos_embed.shape == (1, 65, 32)
    assert not any(p.requires_grad for p in ema_copy.parameters())
    assert model.pos_embed.requires_grad
    _train_step(model, optimizer, 128)
    _check_optimizer_consistent(model, optimizer)
    with torch.no_grad():
        ema_copy.eval()(torch.randn(1, 3, 128, 128))


def test_invalid_sizes_name_nearest_valid():
    vit, swin, resnet = _make(VIT), _make(SWIN), _make(RESNET)
    with pytest.raises(ValueError, match=r"100.*multiple of the patch size 16.*96 or 112"):
        check_input_size(vit, 100)
    with pytest.raises(ValueError, match=r"100.*multiple of 32.*96 or 128"):
        check_input_size(swin, 100)
    with pytest.raises(ValueError, match=r"16.*at least 32.*: 32"):
        check_input_size(swin, 16)
    with pytest.raises(ValueError, match=r"8.*multiple of the patch size 16 and at least 16.*: 16"):
        check_input_size(vit, 8)
    with pytest.raises(ValueError, match=r"20.*at least 32.*: 32"):
        check_input_size(resnet, 20)
    for model, size in ((vit, 16), (vit, 96), (vit, 192), (swin, 32), (swin, 96), (swin, 160), (resnet, 100), (resnet, 32)):
        check_input_size(model, size)
    # Nothing is modified when the size is rejected.
    optimizer = torch.optim.AdamW(swin.parameters(), lr=1e-3)
    ids = [id(p) for p in swin.parameters()]
    with pytest.raises(ValueError):
        adapt_model(swin, 100, optimizer)
    assert ids == [id(p) for p in swin.parameters()]
    assert swin.patch_embed.img_size == (224, 224)


def test_size_multiple():
    assert size_multiple(_make(VIT)) == 16
    assert size_multiple(_make(SWIN)) == 32
    assert size_multiple(_make(RESNET)) == 16


def test_cswin_adaptation():
    cswin = pytest.importorskip("models.cswin", reason="models/cswin.py is not importable")
    torch.manual_seed(0)
    model = cswin.CSWinTransformer(img_size=224, num_classes=NUM_CLASSES, embed_dim=16,
                                   depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = [id(p) for p in model.parameters()]
    for size in (96, 160, 224):
        assert adapt_model(model, size, optimizer) is False  # no parameter changes shape
        _train_step(model, optimizer, size)
    assert ids == [id(p) for p in model.parameters()]
    assert list(model.split_size) == [1, 2, 7, 7]
    assert size_multiple(model) == 32
    with pytest.raises(ValueError, match=r"100.*multiple of 32.*96 or 128"):
        check_input_size(model, 100)
