"""UDI pre-training: `python -m udi.train` (demo preset on embedded data) or `torchrun ... -m udi.train --preset
reference --data_path /imagenet/train ...`. Reads like DINO's main_dino.py: train_udi, train_one_epoch; the flags
and their checks are udi.cli's, the checks of the output folder and the data before a run starts udi.run_setup's,
the checkpoint file udi.checkpoint's, the final evaluation udi.final_report's."""
import argparse
import dataclasses
import math
import os
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from udi_kernels import SampledPairs, stratified_sample
from udi_kernels.layout import stack_crops, student_taps, teacher_taps
from udi_kernels.losses import DINOLoss, UDILoss

from . import run_setup, utils
from .checkpoint import load_states, write_checkpoint
from .cli import PRESETS, changed_args, get_args_parser, parse_args  # noqa: F401 (udi.train's public names)
from .data import MultiCropAugmentation, ShardedBatchSampler, collate_multicrop, pretraining_dataset
from .errors import RunError, one_line
from .final_report import final_report
from .model import build_model, split_last_layer

def precision_dtype(args, device) -> Optional[torch.dtype]:
    """The autocast dtype that --precision asks for on `device` (None: float32, no autocast)."""
    if args.precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]


def seen_boxes(boxes: Tensor, args) -> Tensor:
    """boxes [B, 2 + L, 4] -> the boxes of the pixels the patch grid sees. A crop side that is not a multiple of the
    patch size is floored (udi.model): the grid covers the first `grid * patch` of `size` pixels, so the box keeps
    its start (the view's top-left, flips included) and its extent shrinks by (grid * patch - 1) / (size - 1).
    Crops without remainder keep their boxes bit for bit."""
    sizes = [args.global_crop_size] * 2 + [args.local_crop_size] * (boxes.shape[1] - 2)
    p = args.patch_size
    factors = [1.0 if size % p == 0 else (size // p * p - 1) / (size - 1) for size in sizes]
    if all(f == 1.0 for f in factors):
        return boxes
    factor = torch.tensor(factors, dtype=boxes.dtype, device=boxes.device)[:, None]
    start, end = boxes[..., :2], boxes[..., 2:]
    return torch.cat([start, torch.where(factor == 1, end, start + (end - start) * factor)], -1)


def sample_pairs(boxes, args, seed, rank=0) -> SampledPairs:
    """This rank's rows of the global batch's draw (every rank holds the same number of images): image b of
    rank r draws as global image r * B + b, so DDP samples as one process would, without gathering boxes."""
    return stratified_sample(seen_boxes(boxes, args), global_grid=args.global_crop_size // args.patch_size,
                             global_window=args.global_window,
                             local_grid=args.local_crop_size // args.patch_size, local_window=args.local_window,
                             target_grid=args.global_crop_size // args.patch_size, seed=seed,
                             image_offset=rank * boxes.shape[0])


class DINOObjective(DINOLoss):
    """DINOLoss returning (loss, parts) like UDILoss, parts = {"cls": the loss}."""

    def forward(self, student_output, teacher_output, epoch, **last_layers):
        loss = super().forward(student_output, teacher_output, epoch, **last_layers)
        return loss, {"cls": loss.detach()}


def build_loss(args):
    """UDILoss (UDI_SPEC §5) or, with --objective dino, DINO's cls loss; their centers update inside forward,
    after the loss, from the step's teacher rows."""
    loss = DINOObjective if args.objective == "dino" else UDILoss
    return loss(args.out_dim, 2 + args.local_crops_number, args.warmup_teacher_temp, args.teacher_temp,
                args.warmup_teacher_temp_epochs, args.epochs)


def loss_state_key(args) -> str:
    """The checkpoint entry of the loss's state (its centers): "udi_loss" or "dino_loss"."""
    return f"{args.objective}_loss"


def build_data(args, rank, world_size, device):
    """The multi-crop dataset, its sampler and loader; RunError naming the flag when the data give no batch."""
    augmentation = MultiCropAugmentation(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                                         args.global_crop_size, args.local_crop_size)
    dataset = pretraining_dataset(args.data_path, augmentation, args.seed, args.embedded_data,
                                  args.embedded_images)
    data = f"--data_path {args.data_path}" if args.data_path else f"--embedded_data {args.embedded_data}"
    run_setup.check_batches(len(dataset), args, world_size, data)
    sampler = ShardedBatchSampler(len(dataset), args.batch_size_per_gpu, rank, world_size, args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                                         collate_fn=collate_multicrop, pin_memory=device.type == "cuda")
    return dataset, sampler, loader


def build_networks(args, device, world_size):
    """Student and teacher (the teacher a frozen copy), and the student as the steps call it (DDP-wrapped)."""
    student, teacher = build_model(args).to(device), build_model(args, teacher=True).to(device)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    if world_size > 1 and device.type == "cuda" and args.use_bn_in_head:  # as DINO: one batch across the GPUs
        student, teacher = map(torch.nn.SyncBatchNorm.convert_sync_batchnorm, (student, teacher))
    student_ddp = torch.nn.parallel.DistributedDataParallel(student) if world_size > 1 else student
    return student, teacher, student_ddp


def build_schedules(args, iters, world_size) -> dict:
    """Per-iteration lr (linear scaling with the total batch, warm-up, cosine), weight decay and momentum."""
    return dict(
        lr=utils.cosine_scheduler(args.lr * args.batch_size_per_gpu * world_size / 256.0, args.min_lr,
                                  args.epochs, iters, warmup_epochs=args.warmup_epochs),
        wd=utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, iters),
        momentum=utils.cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, iters))


def restore(resume, run, rank, student, teacher) -> list:
    """Load a checked checkpoint (run_setup.open_output) into the run; returns its log records."""
    load_states(resume.checkpoint, resume.path, student=student, teacher=teacher, optimizer=run.optimizer,
                scaler=run.scaler, **{loss_state_key(run.args): run.loss_module},
                rng=lambda states: utils.set_rng_state(states[rank]))
    for group in run.optimizer.param_groups:  # checkpoints of the non-fused AdamW (before 2026-11-30) say None
        group["fused"] = True
    return list(resume.checkpoint["log"])


def train_udi(args, stop_after_epoch=None, argv=None):
    """Train; `stop_after_epoch` ends the run early (after that epoch's checkpoint), as a preemption would. Nothing
    is written before the output folder and the data are checked (udi.run_setup); argv: the command line, for the
    resume command printed on Ctrl-C."""
    rank, world_size, device = utils.init_distributed()
    utils.fix_random_seeds(args.seed)
    defaults = vars(get_args_parser(args.preset).parse_args([]))
    resume = run_setup.open_output(args, loss_state_key(args), world_size, defaults)
    dataset, sampler, loader = build_data(args, rank, world_size, device)
    student, teacher, student_ddp = build_networks(args, device, world_size)
    dtype = precision_dtype(args, device)
    optimizer = torch.optim.AdamW(utils.param_groups(student), fused=True)  # one kernel for all parameters
    run = TrainingRun(args, student_ddp, teacher, build_loss(args).to(device), optimizer,
                      torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
                      build_schedules(args, len(loader), world_size), device, dtype, rank, world_size)
    log = restore(resume, run, rank, student, teacher) if resume else []
    args_path = run_setup.write_args(args, resume) if utils.is_main_process() else None
    utils.restore_log(args.output_dir, log)
    if utils.is_main_process():
        print(run_summary(args, dataset, len(loader), world_size, device, dtype, resume, args_path), flush=True)
    train_epochs(run, student, loader, sampler, dataset, log, stop_after_epoch,
                 sys.argv[1:] if argv is None else argv)
    return student, teacher


def train_epochs(run, student, loader, sampler, dataset, log, stop_after_epoch, argv):
    """The epochs from the checkpoint's (len(log)) to --epochs, a checkpoint after each; Ctrl-C or an unreadable
    image stops the run saying which epochs the checkpoint holds and how to resume."""
    args, start_time, start_epoch = run.args, time.time(), len(log)
    saved = start_epoch  # the epochs checkpoint.pth holds
    checkpoint_path = os.path.join(args.output_dir, "checkpoint.pth")
    try:
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            epoch_start = time.time()
            stats = train_one_epoch(run, loader, epoch)
            record = {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch}
            log.append(record)
            # checkpoint first, then log.txt: a run killed in between resumes with log.txt rebuilt from the checkpoint
            save_checkpoint(args, student, run.teacher, run.optimizer, run.loss_module, run.scaler, epoch + 1,
                            run.world_size, log)
            saved = epoch + 1
            utils.log_json(args.output_dir, record)
            if utils.is_main_process():
                print(epoch_line(epoch, args.epochs, stats, time.time() - epoch_start), flush=True)
                warning = collapse_warning(stats, args.out_dim)
                if warning:
                    print(warning, flush=True)
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                break
    except (KeyboardInterrupt, RunError) as stop:
        if utils.is_main_process():
            print("\n".join(([] if isinstance(stop, KeyboardInterrupt) else [f"error: {one_line(stop)}"])
                            + run_setup.interrupted_lines(args, saved, argv)), file=sys.stderr, flush=True)
        raise SystemExit(130 if isinstance(stop, KeyboardInterrupt) else 1) from None
    if utils.is_main_process() and len(log) > start_epoch:
        print(f"training time {time.time() - start_time:.0f} s (epochs {start_epoch}-{len(log) - 1}); checkpoint "
              f"{checkpoint_path}, log {os.path.join(args.output_dir, 'log.txt')}", flush=True)


def run_summary(args, dataset, iters, world_size, device, dtype, resume, args_path) -> str:
    """What a run is about to do, in a few lines: changed flags, data, device, output files, what resumes."""
    data = args.data_path or f"embedded {args.embedded_data}"
    written = f"  (all arguments: {args_path})" if args_path else ""
    lines = [f"udi.train --preset {args.preset} {changed_args(args)}".rstrip() + written,
             f"data: {data}, {len(dataset)} images; {iters} steps of {args.batch_size_per_gpu} x {world_size} "
             f"images per epoch; {device.type}, {'fp32' if dtype is None else str(dtype).replace('torch.', '')}",
             f"output: {os.path.abspath(args.output_dir)}: checkpoint.pth after every epoch, log.txt (a JSON line "
             f"per epoch)"]
    for level in ("global", "local"):
        size = getattr(args, f"{level}_crop_size")
        if size % args.patch_size:
            lines.append(f"note: --{level}_crop_size {size} is not a multiple of --patch_size {args.patch_size}: "
                         f"the last {size % args.patch_size} pixel rows and columns are not seen (as in DINO)")
    if resume:
        lines += run_setup.resume_lines(resume, args)
    return "\n".join(lines)


def epoch_line(epoch, epochs, stats, seconds) -> str:
    """The epoch's persistent line: the loss (UDI's with its cls / cls+ / patch terms, or DINO's cls loss), the
    teacher's entropies, the learning rate, the seconds."""
    if "cls_plus" in stats:
        loss = (f"loss {stats['loss']:.4f} = (cls {stats['cls']:.4f} + cls+ {stats['cls_plus']:.4f} + patch "
                f"{stats['patch']:.4f}) / 3")
    else:
        loss = f"loss (DINO, cls) {stats['loss']:.4f}"
    return (f"epoch [{epoch}/{epochs}] {loss} | teacher entropy {stats['teacher_entropy']:.3f}, batch "
            f"{stats['teacher_batch_entropy']:.3f} | lr {stats['lr']:.2e} | {seconds:.0f} s")


# collapse_warning: an epoch's mean teacher entropy above this fraction of ln K (uniform targets) or its batch
# entropy below (1 - this fraction) of ln K (the same target for every image)
COLLAPSE_FRACTION = 0.95


def collapse_warning(stats, out_dim):
    """A warning when the teacher's cls targets collapse (udi_kernels.losses.teacher_entropies), else None."""
    ln_k = math.log(out_dim)
    entropy, batch = stats["teacher_entropy"], stats["teacher_batch_entropy"]
    if entropy >= COLLAPSE_FRACTION * ln_k:
        return (f"warning: teacher entropy {entropy:.3f} is near ln K = {ln_k:.3f}: uniform targets (collapse); "
                "a lower --teacher_temp sharpens them")
    if batch <= (1 - COLLAPSE_FRACTION) * ln_k:
        return (f"warning: teacher entropy {entropy:.3f} and batch entropy {batch:.3f} are near 0: every image "
                "gets the same target (collapse to one dimension); a higher --teacher_temp softens them")
    return None


@dataclasses.dataclass
class TrainingRun:
    """What every step of a run uses: its arguments, networks (the student possibly DDP-wrapped), loss, optimizer,
    GradScaler, per-iteration schedules (lr, wd, momentum), device, autocast dtype (None: float32) and process."""
    args: argparse.Namespace
    student: torch.nn.Module
    teacher: torch.nn.Module
    loss_module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedules: dict
    device: torch.device
    dtype: Optional[torch.dtype]
    rank: int
    world_size: int


def train_one_epoch(run: TrainingRun, loader, epoch: int) -> dict:
    """One epoch over loader; returns the epoch means of the logged scalars (averaged over the processes)."""
    args, student, teacher, loss_module, optimizer = run.args, run.student, run.teacher, run.loss_module, run.optimizer
    device, dtype, scaler, schedules = run.device, run.dtype, run.scaler, run.schedules
    totals = {}
    progress = tqdm(loader, desc=f"epoch [{epoch}/{args.epochs}]", disable=not utils.is_main_process(), leave=False)
    for it_in_epoch, (views, boxes) in enumerate(progress):
        it = len(loader) * epoch + it_in_epoch
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = schedules["lr"][it]
            if i == 0:
                group["weight_decay"] = schedules["wd"][it]

        global_crops, local_crops = stack_crops([v.to(device, non_blocking=True) for v in views])

        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if args.objective == "udi":
                pairs = sample_pairs(boxes.to(device), args, utils.step_seed(args.seed, it), run.rank)
                targets = teacher.teacher_targets(global_crops, teacher_taps(pairs), args.alpha)
                outputs = student(global_crops, local_crops, student_taps(pairs))
            else:
                targets, outputs = teacher.teacher_targets(global_crops), student(global_crops, local_crops)
            (outputs, weight), (targets, teacher_weight) = split_last_layer(outputs), split_last_layer(targets)
            # before the loss, which moves the centers
            entropies = loss_module.teacher_entropies(targets, epoch, teacher_weight=teacher_weight)
            loss, parts = loss_module(outputs, targets, epoch, weight=weight, teacher_weight=teacher_weight)
        if not math.isfinite(loss.item()):
            print(f"Loss is {loss.item()}, stopping training", flush=True)
            sys.exit(1)

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad:
            scaler.unscale_(optimizer)
            utils.clip_gradients(student, args.clip_grad)
        utils.cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
        scaler.step(optimizer)
        scaler.update()
        ema_update(teacher, student, schedules["momentum"][it])

        scalars = {"loss": loss, **parts, **entropies}
        record = dict(zip(scalars, torch.stack([v.detach().float() for v in scalars.values()]).tolist()),
                      lr=schedules["lr"][it])  # one device sync for all of them
        for k, v in record.items():
            totals[k] = totals.get(k, 0.0) + v
        progress.set_postfix(loss=f"{record['loss']:.4f}")
    means = torch.tensor(list(totals.values()), dtype=torch.float64) / len(loader)
    if run.world_size > 1:
        dist.all_reduce(means)
        means /= run.world_size
    return dict(zip(totals, means.tolist()))


@torch.no_grad()
def ema_update(teacher, student, momentum):
    source = student.module if hasattr(student, "module") else student
    teacher_params, student_params = list(teacher.parameters()), list(source.parameters())
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, [p.detach() for p in student_params], alpha=1 - momentum)


def save_checkpoint(args, student, teacher, optimizer, loss_module, scaler, epoch, world_size, log):
    """checkpoint.pth (udi.checkpoint: atomic, with its checksum) and every --saveckp_freq epochs
    checkpointNNNN.pth, with the log records of every epoch so far (udi.utils.restore_log)."""
    rng = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(rng, utils.rng_state())
    else:
        rng[0] = utils.rng_state()
    if not utils.is_main_process():
        return
    state = dict(student=student.state_dict(), teacher=teacher.state_dict(), optimizer=optimizer.state_dict(),
                 epoch=epoch, args=vars(args), scaler=scaler.state_dict(), rng=rng, log=list(log),
                 **{loss_state_key(args): loss_module.state_dict()})
    write_checkpoint(state, os.path.join(args.output_dir, "checkpoint.pth"))
    if args.saveckp_freq and epoch % args.saveckp_freq == 0:
        write_checkpoint(state, os.path.join(args.output_dir, f"checkpoint{epoch:04}.pth"))


def main(argv=None):
    """The command line: a RunError (data, checkpoint, output folder) is one line on stderr and exit status 1."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        student, teacher = train_udi(args, argv=argv)
        if args.final_eval and utils.is_main_process():
            final_report(args, teacher, next(teacher.parameters()).device)
    except RunError as error:
        print(f"udi.train: error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
