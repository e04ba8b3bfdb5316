"""UDI pre-training: `python -m udi.train` (demo preset on embedded data) or `torchrun ... -m udi.train --preset
reference --data_path /imagenet/train ...`. Reads like DINO's main_dino.py: arguments, train_udi, train_one_epoch."""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from udi_kernels import PairTaps, SampledPairs, stratified_sample
from udi_kernels.losses import DINOLoss, UDILoss

from . import utils
from .data import MultiCropAugmentation, ShardedBatchSampler, collate_multicrop, pretraining_dataset
from .model import build_model, student_taps

PRESETS = {
    # ViT-S/16 as in the reference's ImageNet run.
    "reference": dict(arch="vit_small", patch_size=16, global_crop_size=224, local_crop_size=96, out_dim=65536,
                      local_crops_number=10, batch_size_per_gpu=128, epochs=100, final_eval=False),
    # A tiny ViT (64-d, 4 blocks, 4 heads, patch 4: an 8 x 8 grid) pre-trained on 1024 generated scenes (udi.scenes,
    # labels unused), 256 steps of 32 images: a few minutes on 2 CPU cores. The teacher is sharp and fast (0.02,
    # momentum 0.97; at 0.03-0.04 its cls targets drift to uniform), K = 256, global crops of 40-100 %. What the
    # entropy logs showed for each choice, and what is still missing: benchmarks/NOTES.md, "The demo learns".
    "demo": dict(arch="vit_tiny", embed_dim=64, depth=4, num_heads=4, patch_size=4, global_crop_size=32,
                 local_crop_size=16, local_crops_number=4, global_window=2, local_window=2, out_dim=256,
                 head_hidden_dim=256, batch_size_per_gpu=32, epochs=8, warmup_epochs=1,
                 warmup_teacher_temp=0.02, teacher_temp=0.02, warmup_teacher_temp_epochs=0, lr=0.01,
                 momentum_teacher=0.97, drop_path_rate=0.0, global_crops_scale=(0.4, 1.0), embedded_data="scenes",
                 embedded_images=1024, num_workers=0, saveckp_freq=0, output_dir="udi_demo_output", final_eval=True),
}


def str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def get_args_parser():
    p = argparse.ArgumentParser("UDI", add_help=True)
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="defaults; explicit flags win")
    p.add_argument("--objective", default="udi", choices=["udi", "dino"],
                   help="udi: UDI's loss (cls, cls+, SRS patch terms); dino: DINO's cls loss alone on the same "
                        "backbone with one class token and no SRS head (same data, crops and schedules)")
    # model
    p.add_argument("--arch", default="vit_small", help="a DINO name (vit_tiny/small/base) or any timm vit_* name")
    p.add_argument("--patch_size", default=16, type=int)
    p.add_argument("--embed_dim", default=None, type=int, help="override the arch's width")
    p.add_argument("--depth", default=None, type=int, help="override the arch's depth")
    p.add_argument("--num_heads", default=None, type=int, help="override the arch's heads")
    p.add_argument("--drop_path_rate", default=0.1, type=float)
    p.add_argument("--out_dim", default=65536, type=int, help="K, the head's output size")
    p.add_argument("--head_hidden_dim", default=2048, type=int)
    p.add_argument("--head_bottleneck_dim", default=256, type=int)
    p.add_argument("--norm_last_layer", default=False, type=str2bool)
    p.add_argument("--momentum_teacher", default=0.996, type=float)
    p.add_argument("--alpha", default=0.5, type=float, help="cls+ target: alpha * patch mean + (1 - alpha) * cls")
    # temperatures
    p.add_argument("--warmup_teacher_temp", default=0.04, type=float)
    p.add_argument("--teacher_temp", default=0.07, type=float)
    p.add_argument("--warmup_teacher_temp_epochs", default=30, type=int)
    # optimisation
    p.add_argument("--use_fp16", default=False, type=str2bool, help="fp16 autocast + GradScaler instead of bf16")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on CUDA (fp16 with --use_fp16), fp32 on CPU")
    p.add_argument("--weight_decay", default=0.04, type=float)
    p.add_argument("--weight_decay_end", default=0.4, type=float)
    p.add_argument("--clip_grad", default=3.0, type=float, help="per-parameter gradient norm clip; 0 disables")
    p.add_argument("--batch_size_per_gpu", default=64, type=int)
    p.add_argument("--epochs", default=100, type=int)
    p.add_argument("--freeze_last_layer", default=1, type=int)
    p.add_argument("--lr", default=0.0005, type=float, help="peak lr at batch 256 (scaled linearly)")
    p.add_argument("--warmup_epochs", default=10, type=int)
    p.add_argument("--min_lr", default=1e-6, type=float)
    # multi-crop and sampling
    p.add_argument("--global_crops_scale", default=(0.25, 1.0), type=float, nargs=2)
    p.add_argument("--local_crops_scale", default=(0.05, 0.25), type=float, nargs=2)
    p.add_argument("--local_crops_number", default=10, type=int)
    p.add_argument("--global_crop_size", default=224, type=int)
    p.add_argument("--local_crop_size", default=96, type=int)
    p.add_argument("--global_window", default=3, type=int, help="SRS window on the global grid")
    p.add_argument("--local_window", default=2, type=int, help="SRS window on the local grid")
    # misc
    p.add_argument("--data_path", default=None, help="ImageFolder root; default: embedded data")
    p.add_argument("--embedded_data", default="scenes", choices=["scenes", "images"],
                   help="without --data_path: generated labelled scenes (train split; udi.scenes) or regions of "
                        "scikit-image's sample images")
    p.add_argument("--embedded_images", default=2048, type=int, help="dataset length of --embedded_data")
    p.add_argument("--output_dir", default=".")
    p.add_argument("--saveckp_freq", default=20, type=int)
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--num_workers", default=10, type=int)
    p.add_argument("--final_eval", default=False, type=str2bool,
                   help="after training: udi.eval_scenes (k-NN, linear, dense probes) of the teacher and of a "
                        "random network, attention PNGs of both")
    p.add_argument("--knn_data_path", default=None,
                   help="labelled ImageFolder (train/, val/) for an extra final k-NN beside the scenes' evaluation")
    return p


def parse_args(argv=None):
    parser = get_args_parser()
    preset, _ = parser.parse_known_args(argv)
    parser.set_defaults(**PRESETS[preset.preset])
    return parser.parse_args(argv)


def autocast_dtype(args, device):
    if args.precision == "auto":
        return (torch.float16 if args.use_fp16 else torch.bfloat16) if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]


def sample_pairs(boxes, args, seed, rank, world_size) -> SampledPairs:
    """Sample the global batch (boxes gathered in rank order), keep this rank's images: DDP = one process."""
    if world_size > 1:
        gathered = [torch.empty_like(boxes) for _ in range(world_size)]
        dist.all_gather(gathered, boxes)
        boxes = torch.cat(gathered)
    pairs = stratified_sample(boxes, global_grid=args.global_crop_size // args.patch_size,
                              global_window=args.global_window,
                              local_grid=args.local_crop_size // args.patch_size, local_window=args.local_window,
                              target_grid=args.global_crop_size // args.patch_size, seed=seed)
    B = boxes.shape[0] // world_size
    mine = slice(rank * B, (rank + 1) * B)
    return SampledPairs(*(PairTaps(*(t[mine] for t in taps)) for taps in pairs))


class DINOObjective(DINOLoss):
    """DINOLoss returning (loss, parts) like UDILoss, parts = {"cls": the loss}."""

    def forward(self, student_output, teacher_output, epoch):
        loss = super().forward(student_output, teacher_output, epoch)
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
        print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))

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
    student_ddp = torch.nn.parallel.DistributedDataParallel(student) if world_size > 1 else student

    # ============ loss, optimizer, schedules ... ============
    loss_module = build_loss(args).to(device)
    optimizer = torch.optim.AdamW(utils.param_groups(student))
    dtype = autocast_dtype(args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    iters = len(loader)
    schedules = dict(
        lr=utils.cosine_scheduler(args.lr * args.batch_size_per_gpu * world_size / 256.0, args.min_lr,
                                  args.epochs, iters, warmup_epochs=args.warmup_epochs),
        wd=utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, iters),
        momentum=utils.cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, iters))

    # ============ optionally resume ... ============
    checkpoint = utils.restart_from_checkpoint(os.path.join(args.output_dir, "checkpoint.pth"), student=student,
                                               teacher=teacher, optimizer=optimizer, scaler=scaler,
                                               **{loss_state_key(args): loss_module})
    start_epoch = checkpoint["epoch"] if checkpoint else 0
    if checkpoint:
        utils.set_rng_state(checkpoint["rng"][rank])

    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        stats = train_one_epoch(student_ddp, teacher, loss_module, loader, optimizer, scaler, schedules, epoch, args,
                                device, dtype, rank, world_size)
        save_checkpoint(args, student, teacher, optimizer, loss_module, scaler, epoch + 1, world_size)
        utils.log_json(args.output_dir, {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch})
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
    if utils.is_main_process():
        print(f"Training time {time.time() - start_time:.0f} s")
    return student, teacher


def train_one_epoch(student, teacher, loss_module, loader, optimizer, scaler, schedules, epoch, args, device, dtype,
                    rank, world_size):
    totals, progress = {}, tqdm(loader, desc=f"epoch {epoch}", disable=not utils.is_main_process(), leave=False)
    for it_in_epoch, (views, boxes) in enumerate(progress):
        it = len(loader) * epoch + it_in_epoch
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = schedules["lr"][it]
            if i == 0:
                group["weight_decay"] = schedules["wd"][it]

        views = [v.to(device, non_blocking=True) for v in views]
        global_crops = torch.cat(views[:2])
        local_crops = torch.cat(views[2:]) if len(views) > 2 else None

        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if args.objective == "udi":
                pairs = sample_pairs(boxes.to(device), args, utils.step_seed(args.seed, it), rank, world_size)
                targets = teacher.teacher_targets(global_crops, pairs, args.alpha)
                outputs = student(global_crops, local_crops, *student_taps(pairs))
                teacher_cls, cls_center = targets.cls, loss_module.center_cls.center
            else:
                targets = teacher_cls = teacher.teacher_targets(global_crops)
                outputs, cls_center = student(global_crops, local_crops), loss_module.center
            # before the loss, which moves the centers
            entropies = teacher_entropies(teacher_cls, cls_center, loss_module.teacher_temp(epoch))
            loss, parts = loss_module(outputs, targets, epoch)
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
    if world_size > 1:
        dist.all_reduce(means)
        means /= world_size
    return dict(zip(totals, means.tolist()))


@torch.no_grad()
def teacher_entropies(teacher_cls, center, tau_t):
    """Collapse diagnostics of the teacher's cls targets softmax((t - c)/τt), in nats: `teacher_entropy`, the mean
    entropy of a row, and `teacher_batch_entropy`, the entropy of the batch-mean distribution. Both near ln K:
    collapse to uniform; both near 0: collapse to one dimension; healthy: the first well below the second."""
    log_p = torch.log_softmax((teacher_cls.float() - center) / tau_t, dim=-1)
    p = log_p.exp()
    mean = p.mean(0)
    return {"teacher_entropy": -(p * log_p).sum(-1).mean(),
            "teacher_batch_entropy": -(mean * mean.clamp_min(torch.finfo(mean.dtype).tiny).log()).sum()}


@torch.no_grad()
def ema_update(teacher, student, momentum):
    source = student.module if hasattr(student, "module") else student
    teacher_params, student_params = list(teacher.parameters()), list(source.parameters())
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, [p.detach() for p in student_params], alpha=1 - momentum)


def save_checkpoint(args, student, teacher, optimizer, loss_module, scaler, epoch, world_size):
    rng = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(rng, utils.rng_state())
    else:
        rng[0] = utils.rng_state()
    state = dict(student=student.state_dict(), teacher=teacher.state_dict(), optimizer=optimizer.state_dict(),
                 epoch=epoch, args=vars(args), scaler=scaler.state_dict(), rng=rng,
                 **{loss_state_key(args): loss_module.state_dict()})
    utils.save_on_master(state, os.path.join(args.output_dir, "checkpoint.pth"))
    if args.saveckp_freq and epoch % args.saveckp_freq == 0:
        utils.save_on_master(state, os.path.join(args.output_dir, f"checkpoint{epoch:04}.pth"))


def final_report(args, teacher, device):
    """The embedded evaluation (udi.eval_scenes: k-NN and linear probe on cls / cls+, dense probe) of the teacher
    and of a randomly initialised network, and attention PNGs of both on held-out scenes."""
    from .eval_knn import knn_accuracies
    from .eval_scenes import evaluate, print_metrics
    from .visualize import held_out_scenes, save_attention_maps
    utils.fix_random_seeds(args.seed + 1)
    backbones = {"teacher": teacher.backbone, "random init": build_model(args).backbone.to(device)}
    report = {}
    for name, backbone in backbones.items():
        report[name] = evaluate(backbone, args.global_crop_size, device)
        print(f"{name} (held-out scenes): ", end="")
        print_metrics(report[name])
        if args.knn_data_path:
            report[name]["knn_data_path"] = knn_accuracies(backbone, args.knn_data_path, args.global_crop_size,
                                                           device)
            print(f"{name} k-NN top-1 on {args.knn_data_path}: {report[name]['knn_data_path']}")
    paths = save_attention_maps(backbones, os.path.join(args.output_dir, "attention"),
                                held_out_scenes(4, args.global_crop_size), device)
    print(f"attention maps: {', '.join(paths)}")
    with open(os.path.join(args.output_dir, "final_eval.json"), "w") as f:
        json.dump(report, f, indent=1)
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
