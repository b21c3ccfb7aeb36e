"""Draw a run's training curves from its log.txt to a PNG.

    python scripts/plot_log.py OUT_DIR            # writes OUT_DIR/curves.png
    python scripts/plot_log.py OUT_DIR --out curves.png

One row per quantity (train loss; test top-1 and EMA top-1; learning rate; weight decay;
bandwidth B and RandAugment magnitude m), plotted against data epochs (left) and against
compute progress (right: equivalent epochs at the base size, the unit EfficientTrain++
spends its budget in). Dashed lines mark stage boundaries. The values are log.txt's:
one point per epoch, the learning rate and weight decay averaged over the epoch. A row
with nothing to show is left out: a pre-training run (main_pretrain.py) has its loss (the
MAE reconstruction loss), lr, weight decay and B, no accuracy and no magnitude; its compute
is the plan's own measure, MAE's compute model (log.txt's `compute`).
Needs matplotlib (requirements-dev.txt); draws off-screen (Agg), so it runs on a server.
"""
import argparse
import json
import os
import sys

MATPLOTLIB_MISSING = 'plot_log.py needs matplotlib: pip install matplotlib'


class PlotError(Exception):
    """A problem with the input; cli() prints it on one line and exits 2."""


def read_log(out_dir):
    """(epoch records sorted by epoch, base size) from OUT_DIR/log.txt and config.json.

    A line cut short by a kill is skipped; a resumed run rewrote its repeated epochs, so
    the last record of an epoch wins.
    """
    path = os.path.join(out_dir, 'log.txt')
    if not os.path.isfile(path):
        raise PlotError(f'{path} does not exist: pass the --output_dir of a training run')
    by_epoch = {}
    with open(path, encoding='utf-8') as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and 'epoch' in rec:
                by_epoch[int(rec['epoch'])] = rec
    if not by_epoch:
        raise PlotError(f'{path} has no epoch records yet: plot after the first epoch has ended')
    records = [by_epoch[e] for e in sorted(by_epoch)]
    base = None
    try:
        with open(os.path.join(out_dir, 'config.json'), encoding='utf-8') as f:
            base = json.load(f)['plan']['base_size']
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if not base:
        base = max(r.get('input_size') or 0 for r in records) or 1
    return records, base


def series(records, base):
    """Plain lists for the plots: x axes (epoch end, compute at epoch end) and the y values."""
    ends, compute, compute_starts, total = [], [], [], 0.0
    for r in records:
        b = r.get('input_size') or base
        compute_starts.append(total)
        if r.get('compute') is not None:
            total = r['compute']  # the plan's measure, the model's own cost where it has one (MAE)
        else:
            # older logs: one data epoch at B costs (B/base)^2 of an epoch at base, times its replays
            total += (b / base) ** 2 * (r.get('replay_times') or 1)
        ends.append(r['epoch'] + 1)
        compute.append(total)

    def col(key):
        return [r.get(key) for r in records]
    boundaries = [i for i in range(1, len(records)) if records[i].get('stage') != records[i - 1].get('stage')]
    return {'epoch': ends, 'compute': compute, 'boundaries': boundaries,
            # B and m hold over a whole epoch: steps from each epoch's start to the last end
            'epoch_steps': [r['epoch'] for r in records] + ends[-1:], 'compute_steps': compute_starts + compute[-1:],
            'train_loss': col('train_loss'), 'test_acc1': col('test_acc1'), 'test_ema_acc1': col('test_ema_acc1'),
            'lr': col('train_lr'), 'wd': col('train_wd'), 'size': col('input_size'), 'magnitude': col('magnitude')}


def _present(xs, ys):
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(out_dir, png=None, dpi=80):
    """Write the curves of OUT_DIR's run; returns the PNG's path."""
    try:
        import matplotlib
        matplotlib.use('Agg')  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError(MATPLOTLIB_MISSING) from None
    records, base = read_log(out_dir)
    s = series(records, base)
    png = png or os.path.join(out_dir, 'curves.png')
    rows = [('train loss', [('train_loss', 'train loss', 'C0')]),
            ('top-1 (%)', [('test_acc1', 'test', 'C1'), ('test_ema_acc1', 'test, EMA', 'C2')]),
            ('learning rate', [('lr', 'lr (epoch mean)', 'C3')]),
            ('weight decay', [('wd', 'weight decay (epoch mean)', 'C4')]),
            ('B (px, solid)', [('size', 'B', 'C5')])]
    rows = [row for row in rows if any(v is not None for key, _, _ in row[1] for v in s[key])]
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 2.0 * len(rows)), sharex='col', squeeze=False)
    xkeys = (('epoch', 'data epochs'), ('compute', f'compute (equivalent epochs at {base})'))
    for c, (xkey, xlabel) in enumerate(xkeys):
        xs = s[xkey]
        for r, (ylabel, lines) in enumerate(rows):
            ax = axes[r][c]
            for key, label, colour in lines:
                px, py = _present(xs, s[key])
                if py and key == 'size':
                    ax.step(s[xkey + '_steps'], s[key] + s[key][-1:], where='post', color=colour, label=label)
                elif py:
                    ax.plot(px, py, marker='.', color=colour, label=label)
            if ylabel.startswith('B') and any(v is not None for v in s['magnitude']):
                twin = ax.twinx()
                m = [-1 if v is None else v for v in s['magnitude']]  # -1: no RandAugment magnitude
                twin.step(s[xkey + '_steps'], m + m[-1:], where='post', color='C6', linestyle=':', label='m')
                twin.set_ylabel('m (dotted)', color='C6')
            for i in s['boundaries']:
                ax.axvline(xs[i - 1], color='grey', linestyle='--', linewidth=0.8)
            if c == 0:
                ax.set_ylabel(ylabel)
            if len(lines) > 1 and any(v is not None for v in s[lines[1][0]]):
                ax.legend(fontsize=7, loc='best')
            ax.grid(alpha=0.3)
        axes[-1][c].set_xlabel(xlabel)
    fig.suptitle(f'{os.path.basename(os.path.abspath(out_dir))}: {len(records)} epochs '
                 f'(dashed: stage boundaries)', fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=dpi)
    plt.close(fig)
    return png


def cli(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('output_dir', metavar='OUT_DIR', help="a training run's --output_dir (holds log.txt)")
    # SUPPRESS: no '(default: None)' after the default the help states
    p.add_argument('--out', default=argparse.SUPPRESS, help='the PNG to write (default: OUT_DIR/curves.png)',
                   metavar='FILE')
    p.add_argument('--dpi', default=80, type=int, help='resolution of the PNG')
    args = p.parse_args(argv)
    try:
        png = plot(args.output_dir, getattr(args, 'out', None), args.dpi)
    except PlotError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return 2
    except OSError as e:
        print(f'error: cannot write {getattr(args, "out", None) or "the PNG"} ({e.strerror or e})', file=sys.stderr, flush=True)
        return 2
    print(f'wrote {png}')
    return 0


if __name__ == '__main__':
    sys.exit(cli())
