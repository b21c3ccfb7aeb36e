"""Shared helpers of the benchmark scripts: repository path, host description, preset arguments."""
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEFAULT_DATA = os.path.normpath(os.path.join(ROOT, '..', 'shared', 'data', 'imagenet-samples'))


def cpu_name():
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_info(device=None):
    import torch
    info = {'cpu': cpu_name(), 'cpu_count': os.cpu_count(), 'torch': torch.__version__}
    try:
        import timm
        info['timm'] = timm.__version__
    except ImportError:
        pass
    if device is not None and str(device).startswith('cuda'):
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


def train_args(argv):
    """The training Namespace for argv, exactly as main.py would parse it."""
    import main as main_mod
    return main_mod.get_args_parser().parse_args(argv)


def plan_for(args):
    """The curriculum plan main.py would build and check for args (the model only gives its size grid)."""
    from models import create_model
    from runner.stage import checked_plan
    return checked_plan(args, create_model(args.model, num_classes=10))


def report(res, table, json_path=None):
    """Print the benchmark's table and, if asked, keep the numbers as JSON."""
    import json
    print(table(res), flush=True)
    if json_path:
        with open(json_path, 'w', encoding='utf-8') as f:
            json.dump(res, f, indent=1)
    return res
