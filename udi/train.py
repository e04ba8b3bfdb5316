"""UDI pre-training: `python -m udi.train` (demo preset on embedded data) or `torchrun ... -m udi.train --preset
reference --data_path /imagenet/train ...`. Reads like DINO's main_dino.py: train_udi, train_one_epoch, with the
schedules, the optimizer and the logging; what a step computes (networks, loss, sampling, EMA, diagnostics) is the
objective's step, udi.step's; the flags and their checks are udi.cli's, the checks of the output folder and the
data before a run starts udi.run_setup's, the checkpoint file udi.checkpoint's, the final evaluation
udi.final_report's."""
import argparse
import contextlib
import dataclasses
import itertools
import math
import os
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm
from udi_kernels.losses import defer_center_updates

from . import distributed, run_setup, utils
from .checkpoint import load_states, write_checkpoint
from .cli import PRESETS, changed_args, get_args_parser, parse_args  # noqa: F401 (udi.train's public names)
from .data import MultiCropAugmentation, ShardedBatchSampler, collate_multicrop, pretraining_dataset
from .errors import RunError, one_line
from .final_report import final_report
from .step import TrainingStep, build_step, step_class


def precision_dtype(args, device) -> Optional[torch.dtype]:
    """The autocast dtype that --precision asks for on `device` (None: float32, no autocast)."""
    if args.precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]


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


def optimizer_steps(loader, args) -> int:
    """Optimizer steps per epoch: the loader's batches in full groups of --accum_iter micro-batches (the rest of an
    epoch's batches is dropped)."""
    return len(loader) // args.accum_iter


def build_schedules(args, iters, world_size) -> dict:
    """Per-optimizer-step lr (linear scaling with the total batch, batch_size_per_gpu x world_size x accum_iter;
    warm-up, cosine), weight decay and momentum; iters: optimizer steps per epoch."""
    return dict(
        lr=utils.cosine_scheduler(args.lr * args.batch_size_per_gpu * world_size * args.accum_iter / 256.0,
                                  args.min_lr, args.epochs, iters, warmup_epochs=args.warmup_epochs),
        wd=utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, iters),
        momentum=utils.cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, iters))


def restore(resume, run) -> list:
    """Load a checked checkpoint (run_setup.open_output) into the run; returns its log records."""
    load_states(resume.checkpoint, resume.path, **run.step.checkpoint_entries(), optimizer=run.optimizer,
                scaler=run.scaler, rng=lambda states: utils.set_rng_state(states[run.rank]))
    for group in run.optimizer.param_groups:  # a checkpoint of a non-fused AdamW says fused=None
        group["fused"] = True
    return list(resume.checkpoint["log"])


def train_udi(args, stop_after_epoch=None, argv=None):
    """Train; `stop_after_epoch` ends the run early (after that epoch's checkpoint), as a preemption would. Nothing
    is written before the output folder and the data are checked (udi.run_setup); argv: the command line, for the
    resume command printed on Ctrl-C."""
    rank, world_size, device = distributed.init_distributed()
    utils.fix_random_seeds(args.seed)  # the same initialisation on every rank
    defaults = vars(get_args_parser(args.preset).parse_args([]))
    resume = run_setup.open_output(args, step_class(args).loss_state_key, world_size, defaults)
    run_setup.check_same_output(args, resume)
    dataset, sampler, loader = build_data(args, rank, world_size, device)
    step = build_step(args, device, world_size)
    utils.fix_random_seeds(args.seed, rank)  # each rank its own stream from here (a resumed run: the checkpoint's)
    dtype = precision_dtype(args, device)
    optimizer = torch.optim.AdamW(utils.param_groups(step.student), fused=True)  # one kernel for all parameters
    run = TrainingRun(args, step, optimizer, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
                      build_schedules(args, optimizer_steps(loader, args), world_size), device, dtype, rank,
                      world_size)
    log = restore(resume, run) if resume else []
    args_path = run_setup.write_args(args, resume) if utils.is_main_process() else None
    utils.restore_log(args.output_dir, log)
    if utils.is_main_process():
        print(run_summary(args, dataset, optimizer_steps(loader, args), world_size, device, dtype, resume, args_path),
              flush=True)
    train_epochs(run, loader, sampler, log, stop_after_epoch, sys.argv[1:] if argv is None else argv)
    return step.student, step.teacher


def train_epochs(run, loader, sampler, log, stop_after_epoch, argv):
    """The epochs from the checkpoint's (len(log)) to --epochs, a checkpoint after each; Ctrl-C or an unreadable
    image stops the run saying which epochs the checkpoint holds and how to resume."""
    args, start_time, start_epoch = run.args, time.time(), len(log)
    saved = start_epoch  # the epochs checkpoint.pth holds
    checkpoint_path = os.path.join(args.output_dir, "checkpoint.pth")
    try:
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch)  # the epoch travels with the sampler's indices to the data set
            epoch_start = time.time()
            stats = train_one_epoch(run, loader, epoch)
            speed = throughput(run, optimizer_steps(loader, args), time.time() - epoch_start)
            record = {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch, **speed}
            log.append(record)
            # checkpoint first, then log.txt: a run killed in between resumes with log.txt rebuilt from the checkpoint
            save_checkpoint(run, epoch + 1, log)
            saved = epoch + 1
            utils.log_json(args.output_dir, record)
            if utils.is_main_process():
                print("\n".join(run.step.epoch_lines(epoch, stats, time.time() - epoch_start, speed)), flush=True)
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                break
    except (KeyboardInterrupt, RunError) as stop:
        if utils.is_main_process() or isinstance(stop, RunError):  # an unreadable image: the rank that read it
            where = f"rank {run.rank}: " if run.world_size > 1 else ""
            print("\n".join(([] if isinstance(stop, KeyboardInterrupt) else [f"error: {where}{one_line(stop)}"])
                            + run_setup.interrupted_lines(args, saved, argv)), file=sys.stderr, flush=True)
        raise SystemExit(130 if isinstance(stop, KeyboardInterrupt) else 1) from None
    if utils.is_main_process() and len(log) > start_epoch:
        print(f"training time {time.time() - start_time:.0f} s (epochs {start_epoch}-{len(log) - 1}); checkpoint "
              f"{checkpoint_path}, log {os.path.join(args.output_dir, 'log.txt')}", flush=True)


TIMING_FIELDS = ("images_per_second", "max_memory_allocated_mib")  # log.txt's fields that differ run to run


def throughput(run, steps: int, seconds: float) -> dict:
    """An epoch's TIMING_FIELDS: images per second (all processes, all micro-batches of its `steps` optimizer
    steps) and, on CUDA, the peak memory allocated in it (this process, MiB; the peak is reset for the next
    epoch)."""
    images = steps * step_images(run)
    speed = {"images_per_second": images / max(seconds, 1e-9)}
    if run.device.type == "cuda":
        speed["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(run.device) / 2 ** 20
        torch.cuda.reset_peak_memory_stats(run.device)
    return speed


def run_summary(args, dataset, iters, world_size, device, dtype, resume, args_path) -> str:
    """What a run is about to do, in a few lines: changed flags, data, device, output files, what resumes."""
    data = args.data_path or f"embedded {args.embedded_data}"
    written = f"  (all arguments: {args_path})" if args_path else ""
    accumulated = f" x {args.accum_iter} (--accum_iter)" if args.accum_iter > 1 else ""
    lines = [f"udi.train --preset {args.preset} {changed_args(args)}".rstrip() + written,
             f"data: {data}, {len(dataset)} images; {iters} steps of {args.batch_size_per_gpu} x {world_size}"
             f"{accumulated} images per epoch; {device.type}, "
             f"{'fp32' if dtype is None else str(dtype).replace('torch.', '')}",
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


@dataclasses.dataclass
class TrainingRun:
    """What every step of a run uses: its arguments, the objective's step (udi.step: networks, loss), optimizer,
    GradScaler, per-iteration schedules (lr, wd, momentum), device, autocast dtype (None: float32) and process."""
    args: argparse.Namespace
    step: TrainingStep
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedules: dict
    device: torch.device
    dtype: Optional[torch.dtype]
    rank: int
    world_size: int


def train_one_epoch(run: TrainingRun, loader, epoch: int) -> dict:
    """One epoch over loader, an optimizer step per --accum_iter batches; returns the epoch means of the logged
    scalars (averaged over the processes)."""
    args, steps = run.args, optimizer_steps(loader, run.args)
    totals, batches = {}, iter(loader)
    progress = tqdm(range(steps), desc=f"epoch [{epoch}/{args.epochs}]", disable=not utils.is_main_process(),
                    leave=False)
    for it_in_epoch in progress:
        it = steps * epoch + it_in_epoch
        set_schedules(run, it)
        loss, scalars = accumulate_gradients(run, itertools.islice(batches, args.accum_iter), epoch, it)
        if not math.isfinite(loss.item()):
            print(f"Loss is {loss.item()}, stopping training", flush=True)
            sys.exit(1)
        optimizer_step(run, epoch)
        run.step.update_teacher(run.schedules["momentum"][it])
        record = dict(zip(scalars, torch.stack(list(scalars.values())).tolist()),
                      lr=run.schedules["lr"][it])  # one device sync for all of them
        for k, v in record.items():
            totals[k] = totals.get(k, 0.0) + v
        steps_per_second = progress.format_dict["rate"]
        images = f"{steps_per_second * step_images(run):.0f}" if steps_per_second else "-"
        progress.set_postfix({"loss": f"{record['loss']:.4f}", "img/s": images})
    means = torch.tensor(list(totals.values()), dtype=torch.float64) / steps
    if run.world_size > 1:
        dist.all_reduce(means)
        means /= run.world_size
    return dict(zip(totals, means.tolist()))


def step_images(run: TrainingRun) -> int:
    """The images of one optimizer step, all processes and micro-batches."""
    return run.args.batch_size_per_gpu * run.world_size * run.args.accum_iter


def accumulate_gradients(run: TrainingRun, micro_batches, epoch: int, it: int):
    """The forward and backward passes of optimizer step `it` over its --accum_iter micro-batches: each loss divided
    by accum_iter (through the GradScaler), so that the summed gradients are those of the whole batch; under DDP
    the gradients are all-reduced once, in the last backward (student_ddp.no_sync before); the centers take one
    EMA step from the exact mean over all micro-batches and ranks (udi_kernels.losses.defer_center_updates), every
    micro-batch's teacher targets using the centers from before the step. Every micro-batch draws its SRS pairs
    with the step's seed, as its images sit in the step's batch (udi.step.sample_pairs), and L_patch is normalised
    by the valid samples of all the step's micro-batches on this rank (TrainingStep.accumulation_options), as one
    batch of their images would be. Returns the loss and the logged scalars, means over the micro-batches
    (float32, detached; teacher_batch_entropy the mean of the micro-batches' own, as per process under DDP)."""
    args, device, dtype = run.args, run.device, run.dtype
    seed, sums = utils.step_seed(args.seed, it), {}
    batches = [(views, boxes.to(device)) for views, boxes in micro_batches]
    options = {} if args.accum_iter == 1 else run.step.accumulation_options([b for _, b in batches], seed, run.rank)
    run.optimizer.zero_grad(set_to_none=True)
    deferred = defer_center_updates(run.step.loss) if args.accum_iter > 1 else contextlib.nullcontext()
    with deferred:
        for micro_batch, (views, boxes) in enumerate(batches):
            last = micro_batch == args.accum_iter - 1
            sync = contextlib.nullcontext() if last or run.world_size == 1 else run.step.student_ddp.no_sync()
            views = [v.to(device, non_blocking=True) for v in views]
            with sync:
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss, scalars = run.step(views, boxes, epoch, seed, run.rank, micro_batch=micro_batch,
                                             **options)
                run.scaler.scale(loss / args.accum_iter).backward()
            for k, v in scalars.items():
                sums[k] = sums.get(k, 0) + v.detach().float() / args.accum_iter
    return sums["loss"], sums


def set_schedules(run: TrainingRun, it: int):
    """The learning rate of every parameter group and the weight decay of group 0 at optimizer step `it`."""
    for i, group in enumerate(run.optimizer.param_groups):
        group["lr"] = run.schedules["lr"][it]
        if i == 0:
            group["weight_decay"] = run.schedules["wd"][it]


def optimizer_step(run: TrainingRun, epoch: int):
    """On the accumulated gradients, once per optimizer step: the GradScaler's unscale, DINO's per-parameter
    clipping, the last layer frozen in its first epochs, the optimizer's step."""
    student, optimizer, scaler = run.step.student, run.optimizer, run.scaler
    if run.args.clip_grad:
        scaler.unscale_(optimizer)
        utils.clip_gradients(student, run.args.clip_grad)
    utils.cancel_gradients_last_layer(epoch, student, run.args.freeze_last_layer)
    scaler.step(optimizer)
    scaler.update()


def save_checkpoint(run: TrainingRun, epoch: int, log: list):
    """checkpoint.pth (udi.checkpoint: atomic, with its checksum) and every --saveckp_freq epochs
    checkpointNNNN.pth, with the log records of every epoch so far (udi.utils.restore_log)."""
    args = run.args
    rng = [None] * run.world_size
    if run.world_size > 1:
        dist.all_gather_object(rng, utils.rng_state())
    else:
        rng[0] = utils.rng_state()
    if not utils.is_main_process():
        return
    state = dict(student=run.step.student.state_dict(), teacher=run.step.teacher.state_dict(),
                 optimizer=run.optimizer.state_dict(), epoch=epoch, args=vars(args), scaler=run.scaler.state_dict(),
                 rng=rng, log=list(log), **{run.step.loss_state_key: run.step.loss.state_dict()})
    write_checkpoint(state, os.path.join(args.output_dir, "checkpoint.pth"))
    if args.saveckp_freq and epoch % args.saveckp_freq == 0:
        write_checkpoint(state, os.path.join(args.output_dir, f"checkpoint{epoch:04}.pth"))


def main(argv=None):
    """The command line: a RunError (data, checkpoint, output folder) is one line on stderr and exit status 1."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)  # a RunError here: the environment of torchrun or srun (udi.distributed)
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
