"""UDI pre-training: `python -m udi.train` (demo preset on embedded data) or `torchrun ... -m udi.train --preset
reference --data_path /imagenet/train ...`. Reads like DINO's main_dino.py: arguments, train_udi, train_one_epoch."""
import argparse
import dataclasses
import json
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

from . import utils
from .data import MultiCropAugmentation, ShardedBatchSampler, collate_multicrop, pretraining_dataset
from .digits import TRAIN_DIGITS
from .model import POS_EMBED_RESAMPLING, build_model, split_last_layer

PRESETS = {
    # ViT-S/16 as in the reference's ImageNet run.
    "reference": dict(arch="vit_small", patch_size=16, global_crop_size=224, local_crop_size=96, out_dim=65536,
                      local_crops_number=10, batch_size_per_gpu=128, epochs=100, final_eval=False),
    # A tiny ViT (64-d, 4 blocks, 4 heads, patch 4: an 8 x 8 grid) pre-trained on scikit-learn's 1280 train digits
    # (udi.digits, upscaled to 32 px, labels unused), 640 steps of 32 images with 2 global and 2 local crops: under
    # 5 minutes on 2 CPU cores. BatchNorm in the head (DINO's --use_bn_in_head) is what keeps the teacher's targets
    # image-dependent at this length; K = 256, τt 0.04, a fast teacher (momentum 0.97), lr 0.02, global crops of
    # 40-100 %, the head's last layer trained from the first step (no frozen epoch: 1/16 of the run). What the
    # entropy logs and the k-NN showed for each choice: benchmarks/NOTES.md, "The demo learns".
    "demo": dict(arch="vit_tiny", embed_dim=64, depth=4, num_heads=4, patch_size=4, global_crop_size=32,
                 local_crop_size=16, local_crops_number=2, global_window=2, local_window=2, out_dim=256,
                 head_hidden_dim=256, use_bn_in_head=True, batch_size_per_gpu=32, epochs=16, warmup_epochs=1,
                 freeze_last_layer=0,
                 warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0, lr=0.02,
                 momentum_teacher=0.97, drop_path_rate=0.0, global_crops_scale=(0.4, 1.0), embedded_data="digits",
                 embedded_images=1280, num_workers=0, saveckp_freq=0, output_dir="udi_demo_output", final_eval=True),
}


def str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def int_at_least(low: int):
    """An argparse type: an int >= low."""
    def parse(value: str) -> int:
        number = int(value)
        if number < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return number
    parse.__name__ = f"int >= {low}"  # argparse's "invalid <name> value" message
    return parse


def float_in(low: float, high: float, low_open: bool = False):
    """An argparse type: a finite float in [low, high] (in (low, high] with low_open)."""
    interval = f"{'(' if low_open else '['}{low}, {high}]"

    def parse(value: str) -> float:
        number = float(value)
        if not math.isfinite(number) or not (low < number if low_open else low <= number) or number > high:
            raise argparse.ArgumentTypeError(f"expected a finite number in {interval}, got {value}")
        return number
    parse.__name__ = f"float in {interval}"
    return parse


POSITIVE, NON_NEGATIVE, FRACTION = int_at_least(1), int_at_least(0), float_in(0.0, 1.0)
NON_NEGATIVE_FLOAT, POSITIVE_FLOAT = float_in(0.0, math.inf), float_in(0.0, math.inf, low_open=True)


def get_args_parser(preset: str = "demo"):
    """The flags (DINO's and the reference's names) with the defaults of `preset`; --help shows them."""
    p = argparse.ArgumentParser(
        "python -m udi.train", usage="%(prog)s [--preset {demo,reference}] [--FLAG VALUE ...]",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=f"UDI pre-training. The defaults shown are those of --preset {preset}; explicit flags win "
                    "(`--preset reference --help` shows the reference preset's).")
    p.add_argument("--preset", default=preset, choices=sorted(PRESETS),
                   help="a set of defaults: demo (a tiny ViT on embedded data, minutes on a CPU) or reference "
                        "(ViT-S/16 on ImageNet as in the reference)")
    p.add_argument("--objective", default="udi", choices=["udi", "dino"],
                   help="udi: UDI's loss (cls, cls+, SRS patch terms); dino: DINO's cls loss alone on the same "
                        "backbone with one class token and no SRS head (same data, crops and schedules)")
    model = p.add_argument_group("model")
    model.add_argument("--arch", default="vit_small", help="a DINO name (vit_tiny/small/base) or any timm vit_* name")
    model.add_argument("--patch_size", default=16, type=POSITIVE,
                       help="patch side in pixels; crop sides are floored to multiples of it")
    model.add_argument("--embed_dim", type=POSITIVE, help="the width C, overriding the arch's")
    model.add_argument("--depth", type=POSITIVE, help="the number of blocks, overriding the arch's")
    model.add_argument("--num_heads", type=POSITIVE, help="the attention heads, overriding the arch's")
    model.add_argument("--drop_path_rate", default=0.1, type=FRACTION,
                       help="the student's stochastic depth (the teacher has none)")
    model.add_argument("--pos_embed_resampling", default="reference", choices=POS_EMBED_RESAMPLING,
                       help="position embeddings for other grids: the reference's (DINO's) bicubic rule or timm's "
                            "antialiased one")
    model.add_argument("--out_dim", default=65536, type=POSITIVE, help="K, the head's output size")
    model.add_argument("--head_hidden_dim", default=2048, type=POSITIVE, help="width of the DINO head's MLP")
    model.add_argument("--head_bottleneck_dim", default=256, type=POSITIVE,
                       help="the DINO head's bottleneck before the last layer")
    model.add_argument("--use_bn_in_head", default=False, type=str2bool,
                       help="BatchNorm after the DINO head's hidden layers (DINO's flag): statistics over each head "
                            "call, the student's one call over all its rows (cls, cls+, patch samples), the teacher's "
                            "cls rows and sample rows separately; synchronised across GPUs, per process on the CPU")
    model.add_argument("--norm_last_layer", default=False, type=str2bool,
                       help="freeze the last layer's weight norm (DINO; False for ViT-S as in the reference)")
    model.add_argument("--fuse_last_layer", default=True, type=str2bool,
                       help="the loss takes the head's bottleneck rows and its last layer and forms the logits chunk "
                            "by chunk (udi_kernels.linear_distill_cross_entropy): no [rows, K] tensor, student or "
                            "teacher; false: the head forms the [rows, K] logits and the loss takes them "
                            "(distill_cross_entropy), the same numbers, for comparison")
    model.add_argument("--momentum_teacher", default=0.996, type=FRACTION,
                       help="initial EMA momentum of the teacher, raised to 1 by a cosine schedule")
    model.add_argument("--alpha", default=0.5, type=FRACTION,
                       help="cls+ target: alpha * patch mean + (1 - alpha) * cls")
    temperatures = p.add_argument_group("teacher temperature")
    temperatures.add_argument("--warmup_teacher_temp", default=0.04, type=POSITIVE_FLOAT,
                              help="teacher temperature at epoch 0")
    temperatures.add_argument("--teacher_temp", default=0.07, type=POSITIVE_FLOAT,
                              help="teacher temperature after the warm-up")
    temperatures.add_argument("--warmup_teacher_temp_epochs", default=30, type=NON_NEGATIVE,
                              help="epochs of the linear warm-up of the teacher temperature")
    optimisation = p.add_argument_group("optimisation")
    optimisation.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                              help="autocast dtype; auto: bf16 on CUDA, fp32 on the CPU; fp16 adds a GradScaler "
                                   "(DINO's --use_fp16 true)")
    optimisation.add_argument("--weight_decay", default=0.04, type=NON_NEGATIVE_FLOAT,
                              help="initial weight decay (cosine schedule)")
    optimisation.add_argument("--weight_decay_end", default=0.4, type=NON_NEGATIVE_FLOAT, help="final weight decay")
    optimisation.add_argument("--clip_grad", default=3.0, type=NON_NEGATIVE_FLOAT,
                              help="per-parameter gradient norm clip; 0 disables")
    optimisation.add_argument("--batch_size_per_gpu", default=64, type=POSITIVE, help="images per process (per GPU)")
    optimisation.add_argument("--epochs", default=100, type=POSITIVE, help="training epochs")
    optimisation.add_argument("--freeze_last_layer", default=1, type=NON_NEGATIVE,
                              help="epochs during which the head's last layer is not updated")
    optimisation.add_argument("--lr", default=0.0005, type=NON_NEGATIVE_FLOAT,
                              help="peak learning rate at a total batch of 256 (scaled linearly with the total batch)")
    optimisation.add_argument("--warmup_epochs", default=10, type=NON_NEGATIVE,
                              help="epochs of linear learning-rate warm-up")
    optimisation.add_argument("--min_lr", default=1e-6, type=NON_NEGATIVE_FLOAT,
                              help="final learning rate of the cosine schedule")
    crops = p.add_argument_group("multi-crop and sampling")
    crops.add_argument("--global_crops_scale", default=[0.25, 1.0], type=float, nargs=2,
                       help="area range of the global crops, as fractions of the image")
    crops.add_argument("--local_crops_scale", default=[0.05, 0.25], type=float, nargs=2,
                       help="area range of the local crops, as fractions of the image")
    crops.add_argument("--local_crops_number", default=10, type=NON_NEGATIVE,
                       help="local crops per image (0: DINO's 2-crop setting)")
    crops.add_argument("--global_crop_size", default=224, type=POSITIVE,
                       help="global crop side in pixels (also the model's img_size)")
    crops.add_argument("--local_crop_size", default=96, type=POSITIVE, help="local crop side in pixels")
    crops.add_argument("--global_window", default=3, type=POSITIVE, help="SRS window on the global patch grid")
    crops.add_argument("--local_window", default=2, type=POSITIVE, help="SRS window on the local patch grid")
    misc = p.add_argument_group("data, output, evaluation")
    misc.add_argument("--data_path", help="ImageFolder root of the training images; without it: embedded data")
    misc.add_argument("--embedded_data", default="digits", choices=["digits", "scenes", "images"],
                      help="without --data_path: scikit-learn's digits (udi.digits) or generated scenes (udi.scenes), "
                           "their train split without labels, or regions of scikit-image's sample images")
    misc.add_argument("--embedded_images", default=1280, type=POSITIVE,
                      help=f"dataset length of --embedded_data (digits: at most {TRAIN_DIGITS}, the train split)")
    misc.add_argument("--output_dir", default=".", help="checkpoint.pth, log.txt, args.json and the evaluation's files")
    misc.add_argument("--saveckp_freq", default=20, type=NON_NEGATIVE,
                      help="also keep checkpointNNNN.pth every this many epochs; 0: never")
    misc.add_argument("--seed", default=0, type=int, help="seed of the initialisation, the views and the sampling")
    misc.add_argument("--num_workers", default=10, type=NON_NEGATIVE, help="data-loader worker processes")
    misc.add_argument("--final_eval", default=False, type=str2bool,
                      help="after training: udi.eval_embedded (k-NN, linear, dense probes) of the teacher and of a "
                           "random network, attention PNGs of both")
    misc.add_argument("--knn_data_path",
                      help="labelled ImageFolder (train/, val/) for an extra final k-NN beside the embedded evaluation")
    p.set_defaults(**PRESETS[preset])
    return p


def check_sizes(parser, args):
    """Crop, patch and window sizes that give no SRS grid are refused here, naming the flags. A crop side that
    is not a multiple of the patch size is floored, as DINO's patch embedding does (udi.model)."""
    for level in ("global", "local"):
        size, window = getattr(args, f"{level}_crop_size"), getattr(args, f"{level}_window")
        grid = size // args.patch_size
        if grid < max(2, window):
            parser.error(f"--{level}_crop_size {size} with --patch_size {args.patch_size} gives a {grid}x{grid} "
                         f"patch grid; SRS needs at least 2x2 and at least --{level}_window ({window})")


def check_embedded_data(parser, args):
    """More embedded images than the data hold are refused here, naming the flags."""
    if args.data_path is None and args.embedded_data == "digits" and args.embedded_images > TRAIN_DIGITS:
        parser.error(f"--embedded_images {args.embedded_images}: --embedded_data digits has {TRAIN_DIGITS} train "
                     "images")


def parse_args(argv=None):
    preset_parser = argparse.ArgumentParser(add_help=False)
    preset_parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser = get_args_parser(preset_parser.parse_known_args(argv)[0].preset)
    args = parser.parse_args(argv)
    check_sizes(parser, args)
    check_embedded_data(parser, args)
    return args


def changed_args(args) -> str:
    """The arguments that differ from their preset's defaults, as flags."""
    defaults = vars(get_args_parser(args.preset).parse_args([]))
    changed = {k: v for k, v in vars(args).items() if defaults.get(k) != v}
    return " ".join(f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in changed.items())


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


def train_udi(args, stop_after_epoch=None):
    """Train; `stop_after_epoch` ends the run early (after that epoch's checkpoint), as a preemption would."""
    rank, world_size, device = utils.init_distributed()
    utils.fix_random_seeds(args.seed)
    if utils.is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)

    # ============ data: multi-crop views and their boxes ... ============
    augmentation = MultiCropAugmentation(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                                         args.global_crop_size, args.local_crop_size)
    dataset = pretraining_dataset(args.data_path, augmentation, args.seed, args.embedded_data,
                                  args.embedded_images)
    sampler = ShardedBatchSampler(len(dataset), args.batch_size_per_gpu, rank, world_size, args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                                         collate_fn=collate_multicrop, pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} images give no full global batch of {args.batch_size_per_gpu} x "
                         f"{world_size}")

    # ============ student and teacher networks ... ============
    student, teacher = build_model(args).to(device), build_model(args, teacher=True).to(device)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    if world_size > 1 and device.type == "cuda" and args.use_bn_in_head:  # as DINO: one batch across the GPUs
        student, teacher = map(torch.nn.SyncBatchNorm.convert_sync_batchnorm, (student, teacher))
    student_ddp = torch.nn.parallel.DistributedDataParallel(student) if world_size > 1 else student

    # ============ loss, optimizer, schedules ... ============
    loss_module = build_loss(args).to(device)
    optimizer = torch.optim.AdamW(utils.param_groups(student), fused=True)  # one kernel for all parameters
    dtype = precision_dtype(args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    iters = len(loader)
    schedules = dict(
        lr=utils.cosine_scheduler(args.lr * args.batch_size_per_gpu * world_size / 256.0, args.min_lr,
                                  args.epochs, iters, warmup_epochs=args.warmup_epochs),
        wd=utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, iters),
        momentum=utils.cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, iters))

    # ============ optionally resume ... ============
    checkpoint_path = os.path.join(args.output_dir, "checkpoint.pth")
    checkpoint = utils.restart_from_checkpoint(checkpoint_path, student=student, teacher=teacher,
                                               optimizer=optimizer, scaler=scaler,
                                               **{loss_state_key(args): loss_module})
    start_epoch, log = (checkpoint["epoch"], checkpoint["log"]) if checkpoint else (0, [])
    if checkpoint:
        utils.set_rng_state(checkpoint["rng"][rank])
        for group in optimizer.param_groups:  # checkpoints of the non-fused AdamW (before 2026-11-30) say None
            group["fused"] = True
    utils.restore_log(args.output_dir, log)
    if utils.is_main_process():
        print(run_summary(args, dataset, iters, world_size, device, dtype, start_epoch), flush=True)

    run = TrainingRun(args, student_ddp, teacher, loss_module, optimizer, scaler, schedules, device, dtype, rank,
                      world_size)
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        epoch_start = time.time()
        stats = train_one_epoch(run, loader, epoch)
        record = {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch}
        log.append(record)
        # checkpoint first, then log.txt: a run killed in between resumes with log.txt rebuilt from the checkpoint
        save_checkpoint(args, student, teacher, optimizer, loss_module, scaler, epoch + 1, world_size, log)
        utils.log_json(args.output_dir, record)
        if utils.is_main_process():
            print(epoch_line(epoch, args.epochs, stats, time.time() - epoch_start), flush=True)
            warning = collapse_warning(stats, args.out_dim)
            if warning:
                print(warning, flush=True)
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
    if utils.is_main_process():
        print(f"training time {time.time() - start_time:.0f} s; checkpoint {checkpoint_path}, "
              f"log {os.path.join(args.output_dir, 'log.txt')}", flush=True)
    return student, teacher


def run_summary(args, dataset, iters, world_size, device, dtype, start_epoch) -> str:
    """What a run is about to do, in a few lines: changed flags, data, device, output files."""
    data = args.data_path or f"embedded {args.embedded_data}"
    lines = [f"udi.train --preset {args.preset} {changed_args(args)}".rstrip()
             + f"  (all arguments: {os.path.join(args.output_dir, 'args.json')})",
             f"data: {data}, {len(dataset)} images; {iters} steps of {args.batch_size_per_gpu} x {world_size} "
             f"images per epoch; {device.type}, {'fp32' if dtype is None else str(dtype).replace('torch.', '')}",
             f"output: {os.path.abspath(args.output_dir)}: checkpoint.pth after every epoch, log.txt (a JSON line "
             f"per epoch)"]
    for level in ("global", "local"):
        size = getattr(args, f"{level}_crop_size")
        if size % args.patch_size:
            lines.append(f"note: --{level}_crop_size {size} is not a multiple of --patch_size {args.patch_size}: "
                         f"the last {size % args.patch_size} pixel rows and columns are not seen (as in DINO)")
    if start_epoch:
        lines.append(f"resumed from checkpoint.pth at epoch {start_epoch}")
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
    """checkpoint.pth (replaced atomically), with the log records of every epoch so far (udi.utils.restore_log)."""
    rng = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(rng, utils.rng_state())
    else:
        rng[0] = utils.rng_state()
    state = dict(student=student.state_dict(), teacher=teacher.state_dict(), optimizer=optimizer.state_dict(),
                 epoch=epoch, args=vars(args), scaler=scaler.state_dict(), rng=rng, log=log,
                 **{loss_state_key(args): loss_module.state_dict()})
    utils.save_on_master(state, os.path.join(args.output_dir, "checkpoint.pth"))
    if args.saveckp_freq and epoch % args.saveckp_freq == 0:
        utils.save_on_master(state, os.path.join(args.output_dir, f"checkpoint{epoch:04}.pth"))


ATTENTION_IMAGES = 2  # held-out images drawn by final_report (python -m udi.visualize --num_images N for more)


def final_report(args, teacher, device):
    """The embedded evaluation (udi.eval_embedded: k-NN and linear probe on cls / cls+, dense probe) of the teacher
    and of a randomly initialised network, and attention PNGs of both on held-out images, on the embedded labelled
    data trained on (the digits after training on other data)."""
    from .data import LABELLED_DATA
    from .eval_embedded import evaluate, print_metrics
    from .eval_knn import embedded_data_of, knn_accuracies
    from .visualize import held_out_images, save_attention_maps
    utils.fix_random_seeds(args.seed + 1)
    backbones = {"teacher": teacher.backbone, "random init": build_model(args).backbone.to(device)}
    data = embedded_data_of(args)
    train_count, held_out = LABELLED_DATA[data]
    report = {}
    for name, backbone in backbones.items():
        report[name] = evaluate(backbone, args.global_crop_size, device, data)
        print(f"{name}, {held_out} held-out {data} (probes fit on {train_count} train {data}, k-NN k = 20): ", end="")
        print_metrics(report[name])
        if args.knn_data_path:
            r = report[name]["knn_data_path"] = knn_accuracies(backbone, args.knn_data_path, args.global_crop_size,
                                                               device)
            print(f"{r['k']}-NN top-1 on {r['data']} ({r['train_images']} train, {r['val_images']} held-out "
                  f"images), {name}: " + ", ".join(f"{t} {r[t]:.1f} %" for t in ("cls", "cls_plus") if t in r))
    paths = save_attention_maps(backbones, os.path.join(args.output_dir, "attention"),
                                held_out_images(data, ATTENTION_IMAGES, args.global_crop_size), device)
    print(f"attention maps: {', '.join(paths)}")
    path = os.path.join(args.output_dir, "final_eval.json")
    with open(path, "w") as f:
        json.dump(dict(report, data=data), f, indent=1)
    print(f"evaluation results: {path}")
    return report


def main(argv=None):
    args = parse_args(argv)
    student, teacher = train_udi(args)
    if args.final_eval and utils.is_main_process():
        final_report(args, teacher, next(teacher.parameters()).device)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
