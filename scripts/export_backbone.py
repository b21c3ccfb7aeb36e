#!/usr/bin/env python3
"""Write a checkpoint with the official parameter names of its family, for detection and
segmentation code that loads backbones as it loads the released files.

    python scripts/export_backbone.py output/run/checkpoint-best.pth --output convnext_tiny_etpp.pth
    python scripts/export_backbone.py CKPT --output backbone.pth --ema --no_head

The input is a checkpoint of this codebase (training, resumed or best: 'model', optionally
'model_ema', 'args', 'input_size') or any file load_into accepts. The model is rebuilt by
name (default: the one recorded in the checkpoint's args), brought to the size the
checkpoint was saved at (a mid-curriculum checkpoint may be at B < 224), loaded, brought to
--input_size (default 224: standard position-embedding and window shapes) and written as
{'model': state_dict} in the official naming of ConvNeXt, Swin, CSWin, PVT, DeiT, CAFormer
or ResNet-50 (models/official_names.py; every export is verified by converting it back).
The file is written atomically; an existing --output is never replaced without --overwrite.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import utils  # noqa: E402
from curriculum.adapt import adapt_model, check_input_size  # noqa: E402
from models import create_model  # noqa: E402
from models.checkpoint_compat import classifier_prefixes, load_into, unwrap_state_dict  # noqa: E402
from models.official_names import ExportError, official_family, to_official  # noqa: E402
from utils import UserError  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(
        'export_backbone.py', allow_abbrev=False,
        description='Write a checkpoint with the official parameter names of its model family '
                    "({'model': state_dict}), for detection/segmentation code.")
    p.add_argument('checkpoint', help='checkpoint to export (this codebase\'s, or a released file)')
    p.add_argument('--output', required=True, help='file to write (.pth)')
    p.add_argument('--model', default=None,
                   help="recipe or timm model name (default: the 'model' recorded in the checkpoint's args)")
    p.add_argument('--nb_classes', default=None, type=int,
                   help="classes of the checkpoint's classifier (default: from its args, else from the "
                        'classifier weights)')
    p.add_argument('--model_key', default='model|module', help="entry holding the weights, '|'-separated "
                                                                "alternatives (default: model|module)")
    p.add_argument('--ema', action='store_true', help="export the 'model_ema' entry (EMA weights)")
    p.add_argument('--input_size', default=224, type=int,
                   help='input size the exported weights are for: position embeddings and window tables '
                        'are resized to it (default 224)')
    p.add_argument('--no_head', action='store_true', help='leave out the classifier (backbone only)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing --output')
    return p


def _state(ckpt, keys, ema, path):
    if ema:
        if 'model_ema' not in ckpt:
            raise UserError(f"{path} has no 'model_ema' entry (trained without --model_ema true?): drop --ema")
        return unwrap_state_dict(ckpt['model_ema'])
    for k in keys.split('|'):
        if k in ckpt and isinstance(ckpt[k], dict):
            return unwrap_state_dict(ckpt[k])
    if ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        return unwrap_state_dict(ckpt)
    raise UserError(f'{path} has none of the entries {keys.split("|")} (it has {sorted(ckpt)[:5]}): '
                    f'pass --model_key')


def _num_classes(model, state):
    """Rows of the checkpoint's last classifier weight, under timm or official names."""
    for prefix in reversed(classifier_prefixes(model)):
        for key in (f'{prefix}.weight', 'head.weight', 'fc.weight', 'head.fc2.weight'):
            t = state.get(key)
            if torch.is_tensor(t) and t.ndim == 2:
                return int(t.shape[0])
    return None


def build_loaded_model(name, state, nb_classes=None, saved_size=None):
    """The model ``name`` with ``state`` loaded, at the size the state was saved at."""
    try:
        probe = create_model(name, num_classes=nb_classes or 1000)
        if nb_classes is None:
            nb_classes = _num_classes(probe, state) or 0
            probe = create_model(name, num_classes=nb_classes)
    except ValueError as e:
        raise UserError(str(e)) from None
    model = probe
    if saved_size:
        try:
            adapt_model(model, int(saved_size))
        except ValueError as e:
            raise UserError(f'the checkpoint\'s input_size: {e}') from None
    try:
        report = load_into(model, state, strict_arch=True)
    except ValueError as e:
        raise UserError(str(e)) from None
    if report.missing or report.unexpected or report.dropped_head:
        raise UserError(f'the checkpoint does not fill model {name} exactly (missing {report.missing[:3]}, '
                        f'unexpected {report.unexpected[:3]}, classifier of another shape {report.dropped_head[:2]}): '
                        f'pass the matching --model / --nb_classes')
    return model.eval()


def export(args):
    if os.path.abspath(args.output) == os.path.abspath(args.checkpoint):
        raise UserError('--output is the input checkpoint: write the export to another file')
    if os.path.isdir(args.output):
        raise UserError(f'--output {args.output} is a folder: name the file to write, e.g. {args.output}/backbone.pth')
    if os.path.exists(args.output) and not args.overwrite:
        raise UserError(f'{args.output} exists: pass --overwrite to replace it, or choose another --output')
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise UserError(f'the folder of --output ({out_dir}) does not exist: create it first')
    if not os.path.isfile(args.checkpoint):
        # checked here: utils.load_checkpoint_file's message names main.py's flags
        raise UserError(f'{args.checkpoint} is not a file: pass the checkpoint (.pth) to export')
    ckpt = utils.load_checkpoint_file(args.checkpoint)
    saved = utils.checkpoint_args(ckpt)
    name = args.model or saved.get('model')
    if not name:
        raise UserError(f'{args.checkpoint} records no model name: pass --model')
    state = _state(ckpt, args.model_key, args.ema, args.checkpoint)
    nb = args.nb_classes or saved.get('nb_classes')
    model = build_loaded_model(name, state, nb, ckpt.get('input_size'))
    if official_family(model) is None:
        raise UserError(f'model {name} ({type(model).__name__}) has no official naming to export to: '
                        f'supported are ConvNeXt, Swin, CSWin, PVT, DeiT, CAFormer and ResNet')
    try:
        check_input_size(model, args.input_size)
        adapt_model(model, args.input_size)
    except ValueError as e:
        raise UserError(f'--input_size: {e}') from None
    try:
        official = to_official(model, drop_head=args.no_head)
    except ExportError as e:
        raise UserError(str(e)) from None
    try:
        # atomic: on failure the temporary file is removed and an existing --output is untouched
        utils.atomic_save({'model': official}, args.output)
    except OSError as e:
        raise UserError(f'cannot write {args.output} ({e.strerror or e}): choose a writable --output') from None
    print(f'Wrote {args.output}: {len(official)} tensors of {name} in the official {official_family(model)} '
          f'naming at {args.input_size}x{args.input_size}{", without the classifier" if args.no_head else ""}'
          f'{" (EMA weights)" if args.ema else ""}')
    return args.output


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        export(args)
    except UserError as e:
        print(f'export_backbone.py: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(cli())
