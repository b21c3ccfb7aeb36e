"""What an MAE checkpoint reconstructs: a PNG grid, one row per image, at a chosen B.

    python scripts/visualize_mae.py --checkpoint OUT/checkpoint-399.pth \
        --images ../shared/data/imagenet-samples --size 160 --out mae.png

Columns: the original (at B), the masked input the encoder sees, then for a pixel-target
model the reconstruction and the reconstruction with the visible patches pasted back
(with --norm_pix_loss the prediction is in per-patch normalised units and is shown with
the original patch's mean and variance, as MAE's own demo does), for a HOG-target model
the HOG target of the image next to the prediction (each 8x8 cell drawn as its 9
orientation bins, channels summed, edges perpendicular to the binned gradient; visible
patches are not predicted and show dimmed).

The checkpoint is `{'model': MAE state dict, 'args': plain dict or Namespace, 'epoch': N}`
(main_pretrain.py's checkpoints) or an official MAE file `{'model': ...}`; it is read with
weights_only=True.  The model is the checkpoint's args['model'], else recognised from its
shapes; the target follows from the decoder's output width.  Images: the folder's first
--num_images (an ImageFolder tree is taken class by class), resized (bicubic) so the shorter
side is B, centre-cropped to B and normalised with ImageNet's mean and std.  The mask is
drawn from --seed.
"""
import argparse
import io
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402
from torchvision import transforms  # noqa: E402

import utils  # noqa: E402
from models import create_model  # noqa: E402
from models.hog import HOG_BINS, HOG_CELL, hog_features, patch_targets_to_cells  # noqa: E402
from models.mae import (MAE_CONFIGS, check_mae_size, check_mask_ratio, infer_mae_model, load_mae_state_dict,  # noqa: E402
                        mae_state_from_checkpoint, patchify, unpatchify)
from scripts.visualize_curriculum import list_images, load_rgb  # noqa: E402
from utils import UserError, str2bool  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--checkpoint', required=True, help='MAE pre-training checkpoint (.pth)')
    p.add_argument('--images', required=True, help='an ImageFolder tree or a flat folder of images')
    p.add_argument('--size', default=None, type=int,
                   help='B, a multiple of the patch size (default: the checkpoint\'s --base_input_size, else 224)')
    p.add_argument('--out', default='mae.png', help='the PNG to write')
    p.add_argument('--num_images', default=4, type=int, help='rows of the grid')
    p.add_argument('--mask_ratio', default=None, type=float, help='default: the checkpoint\'s, else 0.75')
    p.add_argument('--model', default=None, help='MAE model name (default: from the checkpoint)')
    p.add_argument('--norm_pix_loss', default=None, type=str2bool,
                   help='whether the pixel prediction is per-patch normalised (default: the checkpoint\'s, else true)')
    p.add_argument('--cell', default=224, type=int, help='display size of a grid cell (upscaled, nearest)')
    p.add_argument('--seed', default=0, type=int, help='seed of the mask')
    p.add_argument('--device', default='cpu', help='cpu or cuda')
    return p


def load_model(args):
    """(model, target, B) for the checkpoint; UserError when it is not an MAE one."""
    ckpt = utils.load_checkpoint_file(args.checkpoint)
    state = mae_state_from_checkpoint(ckpt)
    saved = utils.checkpoint_args(ckpt)
    name = args.model or (saved.get('model') if saved.get('model') in MAE_CONFIGS else None) or infer_mae_model(state)
    if name is None or 'decoder_pred.weight' not in state:
        raise UserError(f'{args.checkpoint} is not an MAE pre-training checkpoint (no decoder of a known MAE model): '
                        f'pass one written by main_pretrain.py or an official MAE file with its decoder, '
                        f'or name the model with --model')
    if name not in MAE_CONFIGS:
        raise UserError(f'--model {name} is not an MAE model: use one of {", ".join(MAE_CONFIGS)}')
    cfg = MAE_CONFIGS[name]
    out = int(state['decoder_pred.weight'].shape[0])
    targets = {cfg.out_dim(t): t for t in ('pixel', 'hog') if t == 'pixel' or cfg.patch_size % HOG_CELL == 0}
    if out not in targets:
        raise UserError(f'{args.checkpoint}: its decoder predicts {out} values per patch, which is neither target '
                        f'of {name} ({", ".join(f"{t}: {d}" for d, t in targets.items())}): check --model')
    target = targets[out]
    ratio = check_mask_ratio(args.mask_ratio if args.mask_ratio is not None else saved.get('mask_ratio', 0.75))
    norm_pix = args.norm_pix_loss if args.norm_pix_loss is not None else bool(saved.get('norm_pix_loss', True))
    model = create_model(name, target=target, mask_ratio=ratio, norm_pix_loss=norm_pix)
    try:
        load_mae_state_dict(model, state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f'{args.checkpoint} does not fit {name}: {first[1].strip() if len(first) > 1 else first[0]}; '
                        f'check --model') from None
    size = args.size or int(saved.get('base_input_size') or saved.get('input_size') or 224)
    check_mae_size(size, cfg.patch_size, '--size')
    return model.eval(), target, size


def load_batch(paths, size):
    tf = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.CenterCrop(size), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    return torch.stack([tf(load_rgb(p)) for p in paths])


def to_unit(x):
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def hog_glyphs(cell_px, bins=HOG_BINS):
    """(bins, cell_px, cell_px) line drawings: bin k's edge, perpendicular to its mean gradient angle."""
    c = (cell_px - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(cell_px) - c, torch.arange(cell_px) - c, indexing='ij')
    out = []
    for k in range(bins):
        phi = (k + 0.5) * math.pi / bins  # atan2(gx, gy): gradient (x, y) along (sin phi, cos phi)
        dx, dy = math.cos(phi), -math.sin(phi)  # the edge direction
        dist = (xx * dy - yy * dx).abs()
        along = (xx * dx + yy * dy).abs()
        out.append(((1 - dist).clamp(min=0) * (along <= c + 0.5)).float())
    return torch.stack(out)


def render_hog(cells, cell_px):
    """(N, C, 9, h, w) histograms -> (N, 3, h*cell_px, w*cell_px) grey drawings in [0, 1]."""
    per_bin = cells.clamp(min=0).sum(1)  # channels summed
    per_bin = per_bin / per_bin.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1, 1)
    g = hog_glyphs(cell_px).to(per_bin)
    n, _, h, w = per_bin.shape
    img = torch.einsum('nkhw,kyx->nhywx', per_bin, g).reshape(n, h * cell_px, w * cell_px).clamp(0, 1)
    return img.unsqueeze(1).expand(-1, 3, -1, -1)


def patch_mask_image(mask, grid, patch):
    """(N, L) patch mask -> (N, 1, B, B) pixel mask."""
    m = mask.reshape(-1, 1, grid, grid)
    return m.repeat_interleave(patch, 2).repeat_interleave(patch, 3)


@torch.no_grad()
def columns_for(model, target, images, seed, hog_scale=1):
    """[(title, (N, 3, B, B) images in [0, 1])] of the grid; HOG drawn hog_scale x larger."""
    p = model.patch_size
    grid = images.shape[-1] // p
    loss, pred, mask = model(images, generator=torch.Generator(device=images.device).manual_seed(seed))
    hidden = patch_mask_image(mask, grid, p)
    original = to_unit(images)
    cols = [('original', original), (f'masked ({100 * model.mask_ratio:.0f}%)', original * (1 - hidden) + 0.5 * hidden)]
    if target == 'pixel':
        rec = pred.float()
        if model.norm_pix_loss:
            t = patchify(images.float(), p)
            rec = rec * (t.var(-1, keepdim=True) + 1e-6) ** 0.5 + t.mean(-1, keepdim=True)
        rec = to_unit(unpatchify(rec, p))
        cols += [('reconstruction', rec), ('reconstruction + visible', original * (1 - hidden) + rec * hidden)]
    else:
        cell_px = HOG_CELL * hog_scale
        truth = render_hog(hog_features(images), cell_px)
        guess = render_hog(patch_targets_to_cells(pred.float(), (grid, grid), p), cell_px)
        visible = 1 - patch_mask_image(mask, grid, p * hog_scale)
        cols += [('HOG target', truth), ('HOG prediction (visible dimmed)', guess * (1 - 0.7 * visible))]
    return cols, float(loss)


def draw_grid(cols, title, cell):
    """A PIL image: a title line, column headers, then one row per image."""
    n = cols[0][1].shape[0]
    pad, head = 6, 18
    width = pad + len(cols) * (cell + pad)
    height = head * 2 + pad + n * (cell + pad)
    canvas = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 2), title, fill='black')
    for j, (name, imgs) in enumerate(cols):
        x = pad + j * (cell + pad)
        draw.text((x, head + 2), name, fill='black')
        for i in range(n):
            arr = (imgs[i].permute(1, 2, 0).cpu().numpy() * 255 + 0.5).clip(0, 255).astype('uint8')
            tile = Image.fromarray(arr).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (x, head * 2 + pad + i * (cell + pad)))
    return canvas


def write_png(image, path):
    """The PNG written atomically (a temporary file renamed over path): never a partial file."""
    buf = io.BytesIO()
    image.save(buf, format='PNG')
    utils.atomic_write_bytes(path, buf.getvalue())


def main(args):
    if args.num_images < 1:
        raise UserError(f'--num_images must be >= 1, got {args.num_images}')
    if args.cell < 16:
        raise UserError(f'--cell must be >= 16 pixels, got {args.cell}')
    out_dir = os.path.dirname(os.path.abspath(args.out))
    utils.check_writable_dir(out_dir, '--out\'s folder')
    model, target, size = load_model(args)
    paths = list_images(args.images, args.num_images)
    device = torch.device(args.device)
    images = load_batch(paths, size).to(device)
    model.to(device)
    cell = max(args.cell, size)
    cols, loss = columns_for(model, target, images, args.seed, hog_scale=max(cell // size, 1))
    name = os.path.basename(args.checkpoint)
    title = f'{name}: {target} target, B={size}, mask ratio {model.mask_ratio:g}, seed {args.seed}, loss {loss:.4f}'
    write_png(draw_grid(cols, title, cell), args.out)
    print(f'wrote {args.out} ({len(paths)} images, B={size}, {target} target, loss {loss:.4f})')
    return cols


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == '__main__':
    cli()
