"""Draw a curriculum: its schedules (plan.png) and what the network sees at each stage (stages.png).

    python scripts/visualize_curriculum.py --model resnet50 --curriculum etpp --epochs 200 \
        --images ../shared/data/imagenet-samples --out out/viz

Every flag of main.py is accepted and the plan is built the way main.py builds it, so the
pictures show the run those flags would train. plan.png needs matplotlib
(requirements-dev.txt); without it the grid is still written and the exit status is 1.
stages.png needs only Pillow.
"""
import os
import re
import sys
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402
from torchvision import transforms  # noqa: E402

import main as train_main  # noqa: E402
import utils  # noqa: E402
from curriculum.lowfreq import LanczosResize, fourier_crop  # noqa: E402
from pipelines.datasets import IMG_EXTENSIONS, eval_transform, seeded, train_transform  # noqa: E402
from models import create_model  # noqa: E402
from runner.stage import checked_plan, compared_baseline_epochs, make_hparams  # noqa: E402
from utils import UserError, str2bool  # noqa: E402

MATPLOTLIB_MISSING = 'plan.png needs matplotlib: pip install matplotlib'


def get_args_parser():
    p = train_main.script_parser('visualize_curriculum.py', __doc__.split('\n\n')[0])
    g = p.add_argument_group('visualisation')
    g.add_argument('--images', required=True, type=str,
                   help='an ImageFolder tree (<root>/<class>/<image>) or a flat folder of images')
    g.add_argument('--out', default='out/viz', type=str, help='folder for plan.png and stages.png')
    g.add_argument('--num_images', default=4, type=int, help='rows of stages.png')
    g.add_argument('--no_augment', default=False, type=str2bool, nargs='?', const=True, metavar='{true,false}',
                   help='show only the low-frequency operation: centre crop at the base size, then '
                        'Lanczos or Fourier crop to B (one column per distinct B)')
    g.add_argument('--cell_size', default=None, type=int,
                   help='display size of a grid cell (default: the largest B, i.e. the base size)')
    return p


# ---------------------------------------------------------------------------
# the plan and its schedules, as main.py computes them
# ---------------------------------------------------------------------------

def build_training_plan(args):
    """The Plan main.py would build from these flags, checked against the model the same way."""
    train_main.check_args(args)
    try:
        # The plan needs only the model's size grid; on the meta device building even a
        # large model allocates nothing, so this stays instant.
        with torch.device('meta'):
            model = create_model(args.model, num_classes=args.nb_classes or 1000)
    except ValueError as e:
        raise UserError(str(e)) from None
    return checked_plan(args, model)


def compute_starts(plan):
    """Compute (equivalent epochs at the base size) spent before each data epoch, plus the total."""
    out, acc = [], 0.0
    for e in range(plan.num_epochs):
        out.append(acc)
        acc += plan.stage_at(e).epoch_compute(plan.base_size)
    out.append(acc)
    return out


def progress_to_compute(plan, progress, starts=None):
    """Where on the compute axis a progress value lies (they differ for epoch-unit plans)."""
    starts = starts or compute_starts(plan)
    for e in range(plan.num_epochs):
        lo, hi = plan.progress(e), plan.progress(e + 1)
        if progress < hi or e == plan.num_epochs - 1:
            frac = 0.0 if hi == lo else min(max((progress - lo) / (hi - lo), 0.0), 1.0)
            return starts[e] + frac * (starts[e + 1] - starts[e])
    return starts[-1]


def schedule_samples(args, plan, per_epoch=16):
    """(compute, B, m, lr, wd) rows along the whole run, `per_epoch` samples per data epoch."""
    hp, starts, rows = make_hparams(args, plan), compute_starts(plan), []
    for e in range(plan.num_epochs):
        s = plan.stage_at(e)
        for i in range(per_epoch):
            frac = i / per_epoch
            lr, wd = hp(plan.progress(e, frac))
            rows.append((starts[e] + frac * (starts[e + 1] - starts[e]), s.size, s.magnitude, lr, wd))
    last = plan.stages[-1]
    lr, wd = hp(plan.total_progress)
    rows.append((starts[-1], last.size, last.magnitude, lr, wd))
    return rows


def magnitude_label(args, magnitude):
    """m of a stage; a stage without one (the baseline) uses --aa's own magnitude."""
    if magnitude is not None:
        return str(magnitude)
    found = re.search(r'-m(\d+(?:\.\d+)?)', args.aa or '')
    return found.group(1) if found and args.aa.startswith('rand') else '-'


def plot_plan(args, plan, path):
    """plan.png; raises ImportError when matplotlib is missing."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rows = schedule_samples(args, plan)
    x = [r[0] for r in rows]
    starts = compute_starts(plan)
    total = starts[-1]
    fig, axes = plt.subplots(4, 1, figsize=(11, 8.5), sharex=True,
                             gridspec_kw={'height_ratios': [1, 1, 1.3, 1]})
    mags = [float(magnitude_label(args, r[2])) if magnitude_label(args, r[2]) != '-' else np.nan for r in rows]
    series = [([r[1] for r in rows], 'B (px)', 'steps-post'), (mags, 'RandAugment m', 'steps-post'),
              ([r[3] for r in rows], 'learning rate', 'default'), ([r[4] for r in rows], 'weight decay', 'default')]
    for ax, (y, label, style) in zip(axes, series):
        for s in plan.stages:
            lo = starts[s.start_epoch]
            hi = starts[s.start_epoch + s.epochs]
            ax.axvspan(lo, hi, color='0.90' if s.index % 2 == 0 else 'white', zorder=0, lw=0)
        ax.plot(x, y, drawstyle=style, color='tab:blue', lw=1.6)
        ax.set_ylabel(label)
        ax.grid(axis='y', alpha=0.3)
    axes[0].set_ylim(0, max(s.size for s in plan.stages) * 1.15)
    mvals = [m for m in mags if not np.isnan(m)]
    axes[1].set_ylim(-0.5, (max(mvals) if mvals else 1) + 1)
    # From zero, so a constant weight decay reads as constant rather than as noise around it.
    axes[3].set_ylim(0, max(max(r[4] for r in rows), 1e-12) * 1.15)
    axes[2].ticklabel_format(axis='y', style='sci', scilimits=(-3, 3))
    if plan.warmup > 0:
        w = progress_to_compute(plan, plan.warmup, starts)
        axes[2].axvline(w, color='tab:red', ls='--', lw=1)
        axes[2].annotate(f'warmup ends ({w:.1f})', (w, 0.05), xycoords=('data', 'axes fraction'),
                         xytext=(4, 0), textcoords='offset points', color='tab:red', fontsize=8)
    # Stage labels sit above the top panel so they never cover a curve.
    for s in plan.stages:
        lo, hi = starts[s.start_epoch], starts[s.start_epoch + s.epochs]
        replay = f'\nreplay {s.replay_times}x' if s.replay_times > 1 else ''
        axes[0].text((lo + hi) / 2, 1.02, f'stage {s.index}\nB={s.size} m={magnitude_label(args, s.magnitude)}\n'
                     f'ep {s.start_epoch}-{s.start_epoch + s.epochs - 1}{replay}',
                     transform=axes[0].get_xaxis_transform(), ha='center', va='bottom', fontsize=7)
    axes[-1].set_xlim(0, total)
    axes[-1].set_xlabel(f'compute progress (equivalent epochs at {plan.base_size})')
    fig.suptitle(f'{plan.name}: {plan.num_epochs} data epochs, {total:.1f} equivalent epochs at '
                 f'{plan.base_size}; B by {plan.lowfreq}; lr/wd follow {plan.progress_unit}', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------
# what the network sees
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    size: int
    magnitude: Optional[int]
    stages: Tuple[int, ...]


def stage_columns(plan, no_augment=False):
    """One column per distinct (B, m) in order of first use; per distinct B without augmentation."""
    cols = {}
    for s in plan.stages:
        key = s.size if no_augment else (s.size, s.magnitude)
        if key in cols:
            c = cols[key]
            cols[key] = Column(c.size, c.magnitude, c.stages + (s.index,))
        else:
            cols[key] = Column(s.size, None if no_augment else s.magnitude, (s.index,))
    return list(cols.values())


def list_images(folder, n):
    """n image paths: a flat folder's first n, or an ImageFolder's taken class by class.

    Round-robin over classes so a tree with many classes shows different subjects
    rather than n images of its first class.
    """
    if not os.path.isdir(folder):
        raise UserError(f'--images {folder} is not a directory: pass an ImageFolder tree or a folder of images')

    def images_in(d):
        return sorted(os.path.join(d, f) for f in os.listdir(d)
                      if f.lower().endswith(IMG_EXTENSIONS) and os.path.isfile(os.path.join(d, f)))

    flat = images_in(folder)
    if flat:
        return flat[:n]
    per_class = [images_in(os.path.join(folder, d)) for d in sorted(os.listdir(folder))
                 if os.path.isdir(os.path.join(folder, d))]
    per_class = [c for c in per_class if c]
    out, depth = [], 0
    while len(out) < n and any(depth < len(c) for c in per_class):
        out.extend(c[depth] for c in per_class if depth < len(c))
        depth += 1
    if not out:
        raise UserError(f'--images {folder} holds no images ({", ".join(IMG_EXTENSIONS[:3])}, ...) '
                        f'directly or in its class folders')
    return out[:n]


def load_rgb(path):
    try:
        with Image.open(path) as im:
            return im.convert('RGB')
    except OSError as e:
        raise UserError(f'{path} cannot be read as an image ({e})') from None


def _split_at_to_tensor(compose):
    ts = list(compose.transforms)
    i = next(i for i, t in enumerate(ts) if isinstance(t, transforms.ToTensor))
    return transforms.Compose(ts[:i]), transforms.Compose(ts[i:])


def stage_view_fn(args, plan, column, no_augment):
    """PIL image -> the normalised tensor the network is fed at this column's stage."""
    if plan.lowfreq == 'none':
        return (eval_transform(column.size, args.crop_pct) if no_augment
                else train_transform(args, column.size, column.magnitude, 'none'))
    base = plan.base_size
    if no_augment:
        pil_part, tensor_part = _split_at_to_tensor(eval_transform(base, args.crop_pct))
        if plan.lowfreq == 'lanczos':
            cpu = transforms.Compose([pil_part, LanczosResize(column.size), tensor_part])
        else:
            cpu = transforms.Compose([pil_part, tensor_part])
    else:
        cpu = train_transform(args, column.size, column.magnitude, plan.lowfreq)
    if plan.lowfreq != 'fourier' or column.size >= base:
        return cpu
    # EfficientTrain crops the normalised batch on the device after the full-size CPU pipeline.
    return lambda img: fourier_crop(cpu(img), column.size)


_MEAN = np.asarray(IMAGENET_DEFAULT_MEAN, np.float32)
_STD = np.asarray(IMAGENET_DEFAULT_STD, np.float32)


def to_uint8(x):
    """Normalised (3, H, W) tensor -> (H, W, 3) uint8; clipped first since Fourier crops ring."""
    # numpy, not torch: on a busy machine torch's intra-op threads spin on these tiny
    # tensors and cost far more than the arithmetic.
    hwc = x.detach().float().cpu().numpy().transpose(1, 2, 0)
    return (np.clip(hwc * _STD + _MEAN, 0, 1) * 255 + 0.5).astype(np.uint8)


def stage_cells(args, plan, images, columns, no_augment):
    """cells[row][col]: uint8 arrays at the stage's native size, each from a fixed seed.

    The seed depends on the row only, so a row keeps the same crop and flip across
    stages and differs only in what the stage changes (B, m).
    """
    fns = [stage_view_fn(args, plan, c, no_augment) for c in columns]
    cells = []
    for r, img in enumerate(images):
        row = []
        for fn in fns:
            with seeded(args.seed * 1000003 + r), torch.no_grad():
                row.append(to_uint8(fn(img)))
        cells.append(row)
    return cells


@dataclass(frozen=True)
class GridLayout:
    rows: int
    cols: int
    cell: int
    min_width: int = 0
    pad: int = 6
    title_h: int = 22
    header_h: int = 20
    left: int = 0  # where this grid starts in the image (a panel right of another)

    @property
    def width(self):
        """Of the image up to this grid's right edge."""
        return self.left + max(self.cols * self.cell + (self.cols + 1) * self.pad, self.min_width)

    @property
    def height(self):
        return self.title_h + self.header_h + self.rows * self.cell + (self.rows + 1) * self.pad

    def box(self, row, col):
        """(left, top, right, bottom) of a cell in the grid image."""
        x = self.left + self.pad + col * (self.cell + self.pad)
        y = self.title_h + self.header_h + self.pad + row * (self.cell + self.pad)
        return x, y, x + self.cell, y + self.cell


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, OSError):
        # Pillow builds without FreeType only have the fixed-size bitmap font.
        return ImageFont.load_default()


def column_header(args, column, no_augment):
    if no_augment:
        return f'B={column.size}'
    return f'B={column.size} m={magnitude_label(args, column.magnitude)}'


def render_grid(cells, headers, title, cell):
    title_font = _font(13)
    # A grid of one or two columns is narrower than its title; widen it rather than clip.
    title_w = int(ImageDraw.Draw(Image.new('RGB', (1, 1))).textlength(title, font=title_font)) + 2 * GridLayout.pad
    layout = GridLayout(len(cells), len(headers), cell, min_width=title_w)
    canvas = Image.new('RGB', (layout.width, layout.height), 'white')
    draw = ImageDraw.Draw(canvas)
    draw.text((layout.pad, 4), title, fill='black', font=title_font)
    header_font = _font(14)
    for c, text in enumerate(headers):
        left, top, right, _ = layout.box(0, c)
        draw.text(((left + right) / 2, top - layout.pad - 2), text, fill='black', font=header_font, anchor='md')
    for r, row in enumerate(cells):
        for c, arr in enumerate(row):
            # Nearest neighbour keeps each network-input pixel a visible block, so a
            # low-bandwidth stage looks as coarse as it is instead of being smoothed over.
            im = Image.fromarray(arr).resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(im, layout.box(r, c)[:2])
    return canvas, layout


def display_size(args, plan):
    largest = max(s.size for s in plan.stages)
    cell = args.cell_size or largest
    if cell < largest:
        raise UserError(f'--cell_size {cell} is below the largest stage size {largest}: cells are only '
                        f'ever upscaled (nearest neighbour), so use at least {largest}')
    return cell


def draw_stages(args, plan, paths, path, no_augment):
    """stages.png; returns (columns, layout, band_layout): the training-view grid's, and the
    bandwidth-only grid's (None with --no_augment).

    Without --no_augment the grid of training views has the bandwidth-only grid (the same
    centre crop, no augmentation, at every distinct B) on its left: colour jitter, RandAugment
    and random erasing otherwise dominate what a low B changes.
    """
    columns = stage_columns(plan, no_augment)
    cell = display_size(args, plan)
    images = [load_rgb(p) for p in paths]
    cells = stage_cells(args, plan, images, columns, no_augment)
    lowfreq = {'lanczos': 'Lanczos resize to B', 'fourier': 'Fourier crop to B',
               'none': 'no low-frequency step'}[plan.lowfreq]
    mode = 'no augmentation (centre crop)' if no_augment else 'training transform'
    title = f'{plan.name}: {mode}, {lowfreq}; seed {args.seed}; shown at {cell} px, nearest neighbour'
    canvas, layout = render_grid(cells, [column_header(args, c, no_augment) for c in columns], title, cell)
    band_layout = None
    if not no_augment:
        band_columns = stage_columns(plan, no_augment=True)
        band_cells = stage_cells(args, plan, images, band_columns, True)
        band, band_layout = render_grid(band_cells, [column_header(args, c, True) for c in band_columns],
                                        f'bandwidth only: centre crop, {lowfreq}, no augmentation', cell)
        gap = 3 * GridLayout.pad
        both = Image.new('RGB', (band.width + gap + canvas.width, max(band.height, canvas.height)), 'white')
        both.paste(band, (0, 0))
        both.paste(canvas, (band.width + gap, 0))
        ImageDraw.Draw(both).line([(band.width + gap // 2, 0), (band.width + gap // 2, both.height)],
                                  fill='grey', width=1)
        canvas, layout = both, replace(layout, left=band.width + gap)
    canvas.save(path)
    return columns, layout, band_layout


# ---------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------

@dataclass
class Result:
    plan_png: Optional[str]
    stages_png: str
    columns: List[Column]
    layout: GridLayout
    images: List[str]
    band_layout: Optional[GridLayout] = None  # the bandwidth-only grid left of the training views


def main(args):
    """Write plan.png (if matplotlib is importable) and stages.png; UserError on bad input."""
    if args.num_images < 1:
        raise UserError(f'--num_images must be >= 1, got {args.num_images}')
    plan = build_training_plan(args)
    paths = list_images(args.images, args.num_images)
    display_size(args, plan)
    utils.check_writable_dir(args.out, '--out')
    print(plan.table(compared_baseline_epochs(args), pipeline=args.data_pipeline,
                     per='GPU' if str(args.device).startswith('cuda') else 'process'))
    if args.warmup_steps > 0:
        print('note: --warmup_steps depends on the training set size; plan.png shows the plan\'s '
              '--warmup_epochs warmup instead')
    plan_png = os.path.join(args.out, 'plan.png')
    try:
        plot_plan(args, plan, plan_png)
    except ImportError:
        print(MATPLOTLIB_MISSING, file=sys.stderr, flush=True)
        plan_png = None
    stages_png = os.path.join(args.out, 'stages.png')
    columns, layout, band_layout = draw_stages(args, plan, paths, stages_png, args.no_augment)
    for p in (plan_png, stages_png):
        if p:
            print(f'wrote {p}')
    return Result(plan_png, stages_png, columns, layout, paths, band_layout)


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    # Every transform here works on one small image, where extra intra-op threads only
    # add synchronisation; main() leaves the setting alone for callers that import it.
    torch.set_num_threads(1)
    try:
        result = main(args)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(2)
    # The grid was written, but the run did not deliver everything it was asked for.
    sys.exit(0 if result.plan_png else 1)


if __name__ == '__main__':
    cli()
