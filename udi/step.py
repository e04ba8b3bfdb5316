"""The method, one class per --objective, after DINOv2's SSLMetaArch: UDIStep and DINOStep own the student, the
teacher (its EMA update included), the loss, what a step computes from a batch (sampling and taps, the teacher's
targets, the student's outputs, the collapse diagnostics, the loss), its checkpoint entries and its epoch line.
udi.train's loop keeps the schedules, the optimizer and the logging, and benchmarks/train_step.py times the same
step.

    step = build_step(args, device, world_size)
    with torch.autocast(...):
        loss, scalars = step(views, boxes, epoch, seed, rank)   # scalars: loss, its parts, the teacher entropies
    loss.backward(); optimizer.step(); step.update_teacher(momentum)

The crop-geometry rules (the boxes the patch grid sees, the global batch's draw of SRS pairs) are UDIStep's: DINO
samples nothing.
"""
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from udi_kernels import SampledPairs, stratified_sample
from udi_kernels.layout import stack_crops, student_taps, teacher_taps
from udi_kernels.losses import DINOLoss, UDILoss, cls_plus_targets

from .compiled import compile_step
from .model import LastLayerInput, UDIModel, build_model, split_last_layer

# collapse_warning: an epoch's mean teacher entropy above this fraction of ln K (uniform targets) or its batch
# entropy below (1 - this fraction) of ln K (the same target for every image)
COLLAPSE_FRACTION = 0.95


def collapse_warning(stats: dict, out_dim: int) -> Optional[str]:
    """A warning when the teacher's cls targets collapse (the epoch means of udi_kernels.losses.teacher_entropies
    in `stats`), else None."""
    ln_k = math.log(out_dim)
    entropy, batch = stats["teacher_entropy"], stats["teacher_batch_entropy"]
    if entropy >= COLLAPSE_FRACTION * ln_k:
        return (f"warning: teacher entropy {entropy:.3f} is near ln K = {ln_k:.3f}: uniform targets (collapse); "
                "a lower --teacher_temp sharpens them")
    if batch <= (1 - COLLAPSE_FRACTION) * ln_k:
        return (f"warning: teacher entropy {entropy:.3f} and batch entropy {batch:.3f} are near 0: every image "
                "gets the same target (collapse to one dimension); a higher --teacher_temp softens them")
    return None


class TrainingStep:
    """What both objectives share: the networks (student, teacher a frozen copy of it; `student_ddp` the student as
    a step calls it, DDP-wrapped with several processes), the loss (`loss`, its state the checkpoint entry
    `loss_state_key`), the step's order (teacher, student, diagnostics before the loss moves the centers, loss), the
    teacher's EMA and the epoch line. Subclasses: `loss_state_key`, `build_loss`, `outputs`, `loss_and_parts`,
    `loss_text`."""
    loss_state_key: str

    def __init__(self, args, device=torch.device("cpu"), world_size: int = 1):
        self.args = args
        self.student, self.teacher = build_model(args).to(device), build_model(args, teacher=True).to(device)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        if world_size > 1 and device.type == "cuda" and args.use_bn_in_head:  # as DINO: one batch across the GPUs
            self.student, self.teacher = map(torch.nn.SyncBatchNorm.convert_sync_batchnorm, (self.student, self.teacher))
        self.student_ddp = torch.nn.parallel.DistributedDataParallel(self.student) if world_size > 1 else self.student
        self.world_size = world_size
        self.loss = self.build_loss(args).to(device)
        if getattr(args, "compile", False):  # --compile: networks and loss through torch.compile (udi.compiled)
            compile_step(self)

    def __call__(self, views: list, boxes: Tensor, epoch: int, seed: int, rank: int = 0,
                 on_phase: Callable[[], None] = lambda: None, micro_batch: int = 0, **loss_options):
        """views: 2 + L crops [B, 3, s, s] (udi.data.collate_multicrop, on the device), boxes [B, 2 + L, 4];
        seed: the optimizer step's (udi.utils.step_seed), rank: this process's, micro_batch: the index of this batch
        among the step's --accum_iter micro-batches, loss_options: the loss's keywords of the whole step
        (accumulation_options) -> (loss, scalars: dict of 0-d tensors, the loss, its parts and the teacher
        entropies). on_phase() runs after the teacher and after the student (a timer)."""
        global_crops, local_crops = stack_crops(views)
        outputs, targets = self.outputs(global_crops, local_crops, boxes, seed, rank, on_phase, micro_batch)
        (outputs, weight), (targets, teacher_weight) = split_last_layer(outputs), split_last_layer(targets)
        entropies = self.loss.teacher_entropies(targets, epoch, teacher_weight=teacher_weight)
        loss, parts = self.loss_and_parts(outputs, targets, epoch, weight=weight, teacher_weight=teacher_weight,
                                          **loss_options)
        return loss, {"loss": loss, **parts, **entropies}

    def accumulation_options(self, boxes: list, seed: int, rank: int) -> dict:
        """The loss's keywords that gradient accumulation needs, from the boxes of all the optimizer step's
        micro-batches (on the device): none for a loss that is a mean over equal shares of the images."""
        return {}

    @torch.no_grad()
    def update_teacher(self, momentum: float):
        """teacher = momentum * teacher + (1 - momentum) * student, parameter by parameter."""
        teacher_params, student_params = list(self.teacher.parameters()), list(self.student.parameters())
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, [p.detach() for p in student_params], alpha=1 - momentum)

    def checkpoint_entries(self) -> dict:
        """The checkpoint entries this step's state fills, name -> object with state_dict / load_state_dict."""
        return {"student": self.student, "teacher": self.teacher, self.loss_state_key: self.loss}

    def epoch_lines(self, epoch: int, stats: dict, seconds: float, speed: dict) -> list:
        """An epoch's printed lines: the loss, the teacher's entropies, the learning rate, the seconds, images per
        second and (CUDA) the peak memory (udi.train.throughput's `speed`); then a collapse warning if the
        teacher's targets collapse."""
        memory = f", {speed['max_memory_allocated_mib']:.0f} MiB" if "max_memory_allocated_mib" in speed else ""
        line = (f"epoch [{epoch}/{self.args.epochs}] {self.loss_text(stats)} | teacher entropy "
                f"{stats['teacher_entropy']:.3f}, batch {stats['teacher_batch_entropy']:.3f} | lr {stats['lr']:.2e} | "
                f"{seconds:.0f} s, {speed['images_per_second']:.0f} img/s{memory}")
        warning = collapse_warning(stats, self.args.out_dim)
        return [line] + ([warning] if warning else [])


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


def sample_pairs(boxes: Tensor, args, seed: int, rank: int = 0, micro_batch: int = 0,
                 world_size: int = 1) -> SampledPairs:
    """This rank's rows of the optimizer step's draw (every rank holds the same number of images): image b of
    micro-batch m (of --accum_iter) on rank r draws as image (m * world_size + r) * B + b of the step's global
    batch, where udi.data.ShardedBatchSampler puts it, so DDP and gradient accumulation sample as one process
    with the whole batch would, without gathering boxes."""
    return stratified_sample(seen_boxes(boxes, args), global_grid=args.global_crop_size // args.patch_size,
                             global_window=args.global_window,
                             local_grid=args.local_crop_size // args.patch_size, local_window=args.local_window,
                             target_grid=args.global_crop_size // args.patch_size, seed=seed,
                             image_offset=(micro_batch * world_size + rank) * boxes.shape[0])


@torch.no_grad()
def udi_teacher_targets(teacher: UDIModel, global_crops: Tensor, pairs: SampledPairs, alpha: float):
    """UDILoss's targets (udi_kernels.losses.cls_plus_targets with `alpha`) from the teacher's bottleneck rows of
    global_crops [2B, 3, Hg, Wg] at the taps of `pairs`: UDITargets taken to K by its last layer, or with
    fuse_last_layer handed over in the bottleneck, LastLayerInput(UDITargets of [.., D] rows, the last layer's
    weight [K, D])."""
    rows, last_layer = teacher.teacher_bottleneck(global_crops, teacher_taps(pairs)), teacher.head.last_layer
    if teacher.fuse_last_layer:
        return LastLayerInput(cls_plus_targets(rows, alpha), last_layer.weight)
    return cls_plus_targets(rows, alpha, last_layer=last_layer)


class UDIStep(TrainingStep):
    """UDI (UDI_SPEC §5): SRS pairs drawn from the boxes, the teacher's targets formed in its bottleneck with
    --alpha (cls_plus_targets, UDI_SPEC §6), the student on both crop levels, UDILoss's cls, cls+ and patch terms."""
    loss_state_key = "udi_loss"

    @staticmethod
    def build_loss(args) -> UDILoss:
        return UDILoss(args.out_dim, 2 + args.local_crops_number, args.warmup_teacher_temp, args.teacher_temp,
                       args.warmup_teacher_temp_epochs, args.epochs, alpha=args.alpha)

    def outputs(self, global_crops, local_crops, boxes, seed, rank, on_phase, micro_batch=0):
        pairs = sample_pairs(boxes, self.args, seed, rank, micro_batch, self.world_size)
        targets = udi_teacher_targets(self.teacher, global_crops, pairs, self.loss.alpha)
        on_phase()
        outputs = self.student_ddp(global_crops, local_crops, student_taps(pairs))
        on_phase()
        return outputs, targets

    def accumulation_options(self, boxes: list, seed: int, rank: int) -> dict:
        """patch_count: the mean over the micro-batches of their valid global samples on this rank (from their SRS
        draws, as the step's outputs draw them), so that the micro-batches' L_patch average to Σ_valid CE /
        #valid samples of the rank's whole step, as one batch of all their images gives (UDI_SPEC §5)."""
        counts = [sample_pairs(b, self.args, seed, rank, m, self.world_size).globals.count.sum()
                  for m, b in enumerate(boxes)]
        return {"patch_count": (torch.stack(counts).sum() / len(boxes)).clamp_min(1 / len(boxes))}

    def loss_and_parts(self, outputs, targets, epoch, **options):
        return self.loss(outputs, targets, epoch, **options)

    @staticmethod
    def loss_text(stats: dict) -> str:
        return (f"loss {stats['loss']:.4f} = (cls {stats['cls']:.4f} + cls+ {stats['cls_plus']:.4f} + patch "
                f"{stats['patch']:.4f}) / 3")


class DINOStep(TrainingStep):
    """DINO's cls loss alone on the same backbone with one class token and no SRS head (boxes unused)."""
    loss_state_key = "dino_loss"

    @staticmethod
    def build_loss(args) -> DINOLoss:
        return DINOLoss(args.out_dim, 2 + args.local_crops_number, args.warmup_teacher_temp, args.teacher_temp,
                        args.warmup_teacher_temp_epochs, args.epochs)

    def outputs(self, global_crops, local_crops, boxes, seed, rank, on_phase, micro_batch=0):
        targets = self.teacher.teacher_targets(global_crops)
        on_phase()
        outputs = self.student_ddp(global_crops, local_crops)
        on_phase()
        return outputs, targets

    def loss_and_parts(self, outputs, targets, epoch, **last_layers):
        loss = self.loss(outputs, targets, epoch, **last_layers)
        return loss, {"cls": loss.detach()}

    @staticmethod
    def loss_text(stats: dict) -> str:
        return f"loss (DINO, cls) {stats['loss']:.4f}"


STEPS = {"udi": UDIStep, "dino": DINOStep}  # the step of each --objective


def step_class(args) -> type:
    """The TrainingStep subclass of `args.objective`."""
    return STEPS[args.objective]


def build_step(args, device=torch.device("cpu"), world_size: int = 1) -> TrainingStep:
    """The step of `args.objective`, its networks and loss on `device`."""
    return step_class(args)(args, device, world_size)
