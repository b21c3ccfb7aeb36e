"""One training epoch and one evaluation pass, with explicit arguments."""
import contextlib
import math

import torch
import torch.nn.functional as F

import utils
from optim_factory import apply_hparams


class TrainingDiverged(RuntimeError):
    pass


def _autocast(device, amp_dtype):
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, loss_scaler, *,
                    hparams_at, update_freq=1, max_norm=None, model_ema=None, mixup_fn=None,
                    amp_dtype=None, lowfreq=None, replay=None, log_writer=None, global_step=0,
                    print_freq=10, header=None, stage_desc='', device_transform=None,
                    start_step=0, meter_state=None, stop_requested=None, on_update=None):
    """Train over one pass of data_loader.

    hparams_at(frac) -> (lr, weight_decay) at fraction frac of this epoch; it is
    asked before every optimizer update. device_transform finishes the batch on the
    device (the fast data path's uint8 -> normalised float and random erasing), first.
    lowfreq crops the normalised batch on the
    device (EfficientTrain's Fourier path); replay mixes in buffered chunks; both run
    before mixup, as published. Returns the epoch's averaged metrics.

    Resuming mid-epoch: data_loader yields only the batches after start_step and
    meter_state continues the epoch's averages. Every micro-step the ranks agree on two
    flags, a non-finite loss anywhere (all stop with TrainingDiverged) and
    stop_requested() anywhere (all stop at the next update, after on_update).
    on_update(batches_done, metric_logger, stop) runs after every optimizer update.
    """
    model.train(True)
    metric_logger = utils.MetricLogger(delimiter='  ')
    metric_logger.load_state_dict(meter_state)
    header = header or f'Epoch: [{epoch}]'
    num_steps = start_step + len(data_loader)
    if num_steps == 0:
        raise utils.UserError('the training loader yields no batch: lower --batch_size')
    distributed = utils.is_dist_avail_and_initialized()
    optimizer.zero_grad(set_to_none=True)
    lr = wd = 0.0
    stop = False
    batches = metric_logger.log_every(data_loader, print_freq, header, start_index=start_step)
    for it, (samples, targets) in enumerate(batches, start=start_step):
        if it % update_freq == 0:
            lr, wd = hparams_at(it / num_steps)
            apply_hparams(optimizer, lr, wd)
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if device_transform is not None:
            samples = device_transform(samples, epoch, it)
        if lowfreq is not None:
            samples = lowfreq(samples)
        if replay is not None:
            samples, targets = replay.step(samples, targets)
        hard_targets = targets
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        update = (it + 1) % update_freq == 0
        sync = model.no_sync() if (not update and hasattr(model, 'no_sync')) else contextlib.nullcontext()
        with sync:
            with _autocast(device, amp_dtype):
                output = model(samples)
                loss = criterion(output, targets)
            loss_value = loss.item()
            flags = [0.0 if math.isfinite(loss_value) else 1.0,
                     1.0 if (stop_requested is not None and stop_requested()) else 0.0]
            if distributed:
                # one rank alone raising would leave the others waiting in DDP's all-reduce
                flags = utils.all_reduce_sum(flags, device)
            stop = stop or flags[1] > 0
            if flags[0] > 0:
                where = loss_value if not math.isfinite(loss_value) else 'non-finite on another rank'
                raise TrainingDiverged(f'loss is {where} at epoch {epoch}, step {it}/{num_steps}'
                                       f'{" (" + stage_desc + ")" if stage_desc else ""}: training diverged; '
                                       f'lower --lr, enable --clip_grad, or use --amp_dtype bfloat16')
            norm = loss_scaler(loss / update_freq, optimizer, clip_grad=max_norm,
                               parameters=model.parameters(), update_grad=update)
        if update:
            optimizer.zero_grad(set_to_none=True)
            if model_ema is not None:
                model_ema.update(model)
        if mixup_fn is None:
            acc = (output.argmax(-1) == hard_targets).float().mean().item()
            metric_logger.update(class_acc=acc)
        metric_logger.update(loss=loss_value, lr=lr, wd=wd)
        if norm is not None:
            metric_logger.update(grad_norm=float(norm))
        if log_writer is not None and update:
            log_writer.add_scalars(global_step + it, 'train', loss=loss_value, lr=lr, weight_decay=wd)
        if update and on_update is not None:
            on_update(it + 1, metric_logger, stop)
    optimizer.zero_grad(set_to_none=True)
    metric_logger.synchronize_between_processes(device)
    print('Averaged stats:', metric_logger, flush=True)
    return {k: m.global_avg for k, m in metric_logger.meters.items()}


@torch.no_grad()
def evaluate(data_loader, model, device, amp_dtype=None, reduce=False, print_freq=50, header='Test:', size=None):
    """Top-1, top-5 and mean cross-entropy over the loader (summed over ranks if reduce)."""
    model.eval()
    loss_sum = top1 = top5 = count = 0.0
    metric_logger = utils.MetricLogger(delimiter='  ')
    for images, target in metric_logger.log_every(data_loader, print_freq, header):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            output = model(images)
        output = output.float()
        loss_sum += F.cross_entropy(output, target, reduction='sum').item()
        k = min(5, output.shape[-1])
        topk = output.topk(k, dim=-1).indices
        hits = topk.eq(target[:, None])
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=-1).sum().item()
        count += target.numel()
    if reduce:
        loss_sum, top1, top5, count = utils.all_reduce_sum([loss_sum, top1, top5, count], device)
    count = max(count, 1.0)
    stats = {'acc1': 100.0 * top1 / count, 'acc5': 100.0 * top5 / count, 'loss': loss_sum / count,
             'num_images': int(count)}
    # `size` (the evaluated resolution) goes after the three numbers, so parsers of
    # '* Acc@1 <x> Acc@5 <y> loss <z>' keep working
    at = f' at {size}x{size}' if size else ''
    print(f'* Acc@1 {stats["acc1"]:.3f} Acc@5 {stats["acc5"]:.3f} loss {stats["loss"]:.3f}{at}', flush=True)
    return stats
