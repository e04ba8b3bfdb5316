"""The command line of `python -m udi.train`: presets, flags (DINO's and the reference's names, their aliases) and
every check a flag or a combination of flags needs, done when the flags are parsed (argparse's error naming the
flag, exit status 2). What needs the data or the output folder is checked by udi.run_setup before anything is
written."""
import argparse
import hashlib
import os
import re
import shlex

from .digits import TRAIN_DIGITS
from .distributed import DEFAULT_MASTER_PORT, launch_from_env
from .flags import (NON_NEGATIVE_FLOAT, SEED_RANGE, TEMPERATURE, HelpFormatter, float_in, int_in, str2bool,
                    unwritable)
from .model import DINO_ARCHS, POS_EMBED_RESAMPLING

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
                 embedded_images=1280, num_workers=0, saveckp_freq=0, final_eval=True),
}
# width and heads of DINO's architecture names (timm's defaults); other timm names are looked up in timm
DINO_ARCH_SHAPES = {"vit_tiny": (192, 3, 12), "vit_small": (384, 6, 12), "vit_base": (768, 12, 12)}  # C, H, depth
# The labelled embedded data live in memory (images and pixel labels, float32 and int64, and what generating them
# holds at its peak): bytes per pixel of a --global_crop_size image, measured as the peak RSS of 1280 images at
# 64 px (digits 162 KiB, scenes 654 KiB per image); at most EMBEDDED_MEMORY_LIMIT of them.
EMBEDDED_BYTES_PER_PIXEL = {"digits": 40, "scenes": 164}
EMBEDDED_MEMORY_LIMIT = 4 * 2 ** 30
# The student's parameters (the run holds four float32 copies: student, teacher and AdamW's two moments) and one
# batch of views per process (float32, before the network), at most:
MAX_PARAMETERS = 2 ** 31
MAX_VIEW_BYTES = 2 ** 34
OUTPUT_ROOT = "udi_output"
# Flags that may differ between a checkpoint and the run resuming it (udi.run_setup; said when they do, and in
# --help): schedules, seed, batch, precision and how the same computation runs, workers, output and evaluation.
RESUMABLE = frozenset({
    "preset", "epochs", "lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end", "clip_grad",
    "freeze_last_layer", "momentum_teacher", "warmup_teacher_temp", "teacher_temp", "warmup_teacher_temp_epochs",
    "batch_size_per_gpu", "seed", "precision", "optimizer", "saveckp_freq", "num_workers", "final_eval",
    "knn_data_path", "output_dir", "resume_anyway", "dist_url", "local_rank", "accum_iter",
    "fuse_last_layer", "grad_checkpointing", "compile"})  # the same numbers either way (tests/test_train_fused.py,
# test_model.py, test_compile.py)


LAUNCHERS = (
    "Several processes, on one node or several (README, Multi-node): `torchrun --nnodes N --nproc-per-node G "
    "--rdzv-backend c10d --rdzv-endpoint HOST:PORT -m udi.train ...` on every node (RANK, WORLD_SIZE, LOCAL_RANK, "
    "MASTER_ADDR, MASTER_PORT are read), or `srun python -m udi.train ...` without torchrun, one task per GPU "
    "(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR: exported, else the first host of SLURM_JOB_NODELIST; "
    f"MASTER_PORT: exported, else {DEFAULT_MASTER_PORT} + SLURM_JOB_ID % 1000). --batch_size_per_gpu is per "
    "process; each global rank reads its shard of every global batch and draws its own seed (--seed + rank); rank 0 "
    "alone prints and writes --output_dir, which every node must see (a shared file system); a checkpoint resumes "
    "with as many processes as wrote it, on any number of nodes.")


def use_fp16(value: str) -> str:
    """DINO's --use_fp16 BOOL as a --precision value."""
    return "fp16" if str2bool(value) else "fp32"


SIZE, COUNT, EPOCHS = int_in(1, 4096), int_in(0, 4096), int_in(0, 100_000)
FRACTION, SCALE = float_in(0.0, 1.0), float_in(0.0, 1.0, low_open=True)


def add_model_flags(p):
    model = p.add_argument_group("model")
    model.add_argument("--arch", default="vit_small", help="a DINO name (vit_tiny/small/base) or any timm vit_* name")
    model.add_argument("--patch_size", default=16, type=int_in(1, 64),
                       help="patch side in pixels; crop sides are floored to multiples of it")
    model.add_argument("--embed_dim", type=int_in(1, 8192), help="the width C, overriding the arch's")
    model.add_argument("--depth", type=int_in(1, 64), help="the number of blocks, overriding the arch's")
    model.add_argument("--num_heads", type=int_in(1, 64),
                       help="the attention heads, overriding the arch's; must divide the width")
    model.add_argument("--drop_path_rate", default=0.1, type=float_in(0.0, 0.99),
                       help="the student's stochastic depth (the teacher has none)")
    model.add_argument("--pos_embed_resampling", default="reference", choices=POS_EMBED_RESAMPLING,
                       help="position embeddings for other grids: the reference's (DINO's) bicubic rule or timm's "
                            "antialiased one")
    model.add_argument("--out_dim", default=65536, type=int_in(1, 2 ** 20), help="K, the head's output size")
    model.add_argument("--head_hidden_dim", default=2048, type=int_in(1, 16384), help="width of the DINO head's MLP")
    model.add_argument("--head_bottleneck_dim", default=256, type=int_in(1, 16384),
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
    model.add_argument("--grad_checkpointing", default=False, type=str2bool,
                       help="activation checkpointing of the student's backbone blocks (timm's flag): each block's "
                            "activations are recomputed in the backward instead of kept, the same gradients bit for "
                            "bit, less memory for about one more forward of the backbone")
    model.add_argument("--compile", default=False, type=str2bool,
                       help="torch.compile (inductor) of the student's and the teacher's forward, one graph each, and "
                            "of the loss once the teacher temperature is constant (eager during its warm-up); the "
                            "SRS draw, the teacher's EMA and the optimizer stay eager (udi/compiled.py). The first "
                            "step compiles (about a minute on 2 CPU cores); the same numbers as eager within float32 "
                            "rounding (tests/test_compile.py). Measured CPU figures: README, 'torch.compile'")
    model.add_argument("--momentum_teacher", default=0.996, type=FRACTION,
                       help="initial EMA momentum of the teacher, raised to 1 by a cosine schedule")
    model.add_argument("--alpha", default=0.5, type=FRACTION,
                       help="cls+ target: alpha * patch mean + (1 - alpha) * cls")
    temperatures = p.add_argument_group("teacher temperature")
    temperatures.add_argument("--warmup_teacher_temp", default=0.04, type=TEMPERATURE,
                              help="teacher temperature at epoch 0")
    temperatures.add_argument("--teacher_temp", default=0.07, type=TEMPERATURE,
                              help="teacher temperature after the warm-up")
    temperatures.add_argument("--warmup_teacher_temp_epochs", default=30, type=EPOCHS,
                              help="epochs of the linear warm-up of the teacher temperature (at most --epochs)")


def add_optimisation_flags(p):
    o = p.add_argument_group("optimisation")
    o.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast dtype; auto: bf16 on CUDA, fp32 on the CPU; fp16 adds a GradScaler")
    o.add_argument("--use_fp16", dest="precision", type=use_fp16, default=argparse.SUPPRESS, metavar="BOOL",
                   help="DINO's flag: true is --precision fp16, false is --precision fp32")
    o.add_argument("--optimizer", default="adamw", choices=["adamw"],
                   help="DINO's flag; AdamW (DINO's choice for ViTs) is the one implemented")
    o.add_argument("--weight_decay", default=0.04, type=NON_NEGATIVE_FLOAT, help="initial weight decay (cosine)")
    o.add_argument("--weight_decay_end", default=0.4, type=NON_NEGATIVE_FLOAT, help="final weight decay")
    o.add_argument("--clip_grad", default=3.0, type=NON_NEGATIVE_FLOAT,
                   help="per-parameter gradient norm clip; 0 disables")
    o.add_argument("--batch_size_per_gpu", default=64, type=SIZE, help="images per process (per GPU)")
    o.add_argument("--accum_iter", default=1, type=int_in(1, 4096),
                   help="gradient accumulation (MAE's / DeiT's flag): an optimizer step per this many batches, each "
                        "loss divided by it, DDP's all-reduce, clipping and the GradScaler once per step; the "
                        "schedules, the teacher's EMA and the centers (from the exact mean over all the step's "
                        "batches) advance once per step, the lr scales with batch_size_per_gpu x processes x "
                        "accum_iter; L_patch over the valid samples of all the step's batches. The numbers of a "
                        "batch accum_iter times larger (not BatchNorm's statistics, per batch) with the memory of "
                        "one batch")
    o.add_argument("--epochs", default=100, type=int_in(1, 100_000), help="training epochs")
    o.add_argument("--freeze_last_layer", default=1, type=EPOCHS,
                   help="epochs during which the head's last layer is not updated")
    o.add_argument("--lr", default=0.0005, type=NON_NEGATIVE_FLOAT,
                   help="peak learning rate at a total batch of 256 (scaled linearly with the total batch)")
    o.add_argument("--warmup_epochs", default=10, type=EPOCHS,
                   help="epochs of linear learning-rate warm-up (at most --epochs)")
    o.add_argument("--min_lr", default=1e-6, type=NON_NEGATIVE_FLOAT, help="final learning rate of the cosine schedule")


def add_crop_flags(p):
    crops = p.add_argument_group("multi-crop and sampling")
    crops.add_argument("--global_crops_scale", default=[0.25, 1.0], type=SCALE, nargs=2, metavar=("MIN", "MAX"),
                       help="area range of the global crops, as fractions of the image (0 < MIN <= MAX <= 1)")
    crops.add_argument("--local_crops_scale", default=[0.05, 0.25], type=SCALE, nargs=2, metavar=("MIN", "MAX"),
                       help="area range of the local crops, as fractions of the image (0 < MIN <= MAX <= 1)")
    crops.add_argument("--local_crops_number", default=10, type=int_in(0, 64),
                       help="local crops per image (0: DINO's 2-crop setting)")
    crops.add_argument("--global_crop_size", default=224, type=SIZE,
                       help="global crop side in pixels (also the model's img_size)")
    crops.add_argument("--local_crop_size", default=96, type=SIZE, help="local crop side in pixels")
    crops.add_argument("--global_window", "--global_sampling_window_size", default=3, type=SIZE,
                       help="SRS window on the global patch grid (the reference's --global_sampling_window_size)")
    crops.add_argument("--local_window", "--local_sampling_window_size", default=2, type=SIZE,
                       help="SRS window on the local patch grid (the reference's --local_sampling_window_size)")


def add_run_flags(p):
    misc = p.add_argument_group("data, output, evaluation")
    misc.add_argument("--data_path", help="ImageFolder root of the training images (class folders of pictures; an "
                                          "unreadable picture stops the run naming it); without it: embedded data")
    misc.add_argument("--embedded_data", default="digits", choices=["digits", "scenes", "images"],
                      help="without --data_path: scikit-learn's digits (udi.digits) or generated scenes (udi.scenes), "
                           "their train split without labels, or regions of scikit-image's sample images")
    misc.add_argument("--embedded_images", default=1280, type=int_in(1, 10 ** 6),
                      help=f"dataset length of --embedded_data (digits: at most {TRAIN_DIGITS}, the train split; "
                           f"digits and scenes: what fits in {EMBEDDED_MEMORY_LIMIT // 2 ** 30} GiB)")
    misc.add_argument("--output_dir", default=None,
                      help=f"checkpoint.pth, log.txt, args.json and the evaluation's files; default: "
                           f"{OUTPUT_ROOT}/PRESET-OBJECTIVE-DATA, one folder per preset, objective and data")
    misc.add_argument("--resume_anyway", default=False, type=str2bool, metavar="BOOL",
                      help="resume output_dir's checkpoint even when it was written with other data, model or "
                           "objective flags (refused by default, naming them)")
    misc.add_argument("--saveckp_freq", default=20, type=EPOCHS,
                      help="also keep checkpointNNNN.pth every this many epochs; 0: never")
    misc.add_argument("--seed", default=0, type=int_in(0, SEED_RANGE - 1),
                      help="seed of the initialisation, the views and the sampling")
    misc.add_argument("--num_workers", default=10, type=int_in(0, 256), help="data-loader worker processes")
    misc.add_argument("--final_eval", default=False, type=str2bool,
                      help="after training on embedded labelled data: udi.eval_embedded (k-NN, linear, dense probes) "
                           "of the teacher and of a random network, attention PNGs of both (other data: skipped, "
                           "saying how to evaluate)")
    misc.add_argument("--knn_data_path",
                      help="labelled ImageFolder with train/ and val/ for a final k-NN beside the embedded evaluation")
    misc.add_argument("--dist_url", default="env://", choices=["env://"],
                      help="DINO's flag; torchrun's or srun's environment sets up the processes (below)")
    misc.add_argument("--local_rank", "--local-rank", default=0, type=int_in(0, 4096),
                      help="DINO's flag, set by torch.distributed.launch; LOCAL_RANK (torchrun) or SLURM_LOCALID "
                           "(srun) is what is used")


def get_args_parser(preset: str = "demo"):
    """The flags (DINO's and the reference's names, aliases for theirs) with the defaults of `preset`."""
    p = argparse.ArgumentParser(
        "python -m udi.train", usage="%(prog)s [--preset {demo,reference}] [--FLAG VALUE ...]",
        formatter_class=HelpFormatter,
        description=f"UDI pre-training. The defaults shown are those of --preset {preset}; explicit flags win "
                    "(`--preset reference --help` shows the reference preset's). A flag of DINO's main_dino.py or "
                    "the reference's main_udi.py with a counterpart here is accepted under its own name too.",
        epilog="Resuming: a run whose --output_dir holds a checkpoint.pth resumes it. These flags may differ from "
               "the checkpoint's: " + ", ".join(f"--{flag}" for flag in sorted(RESUMABLE))
               + "; the run says which did and writes its arguments to args.resumeNNNN.json beside args.json, "
               "which is never rewritten. Any other flag that differs (data, model, crops, objective) is refused, "
               "naming it; --resume_anyway true resumes anyway. " + LAUNCHERS)
    p.add_argument("--preset", default=preset, choices=sorted(PRESETS),
                   help="a set of defaults: demo (a tiny ViT on embedded data, minutes on a CPU) or reference "
                        "(ViT-S/16 on ImageNet as in the reference)")
    p.add_argument("--objective", default="udi", choices=["udi", "dino"],
                   help="udi: UDI's loss (cls, cls+, SRS patch terms); dino: DINO's cls loss alone on the same "
                        "backbone with one class token and no SRS head (same data, crops and schedules)")
    for add_flags in (add_model_flags, add_optimisation_flags, add_crop_flags, add_run_flags):
        add_flags(p)
    p.set_defaults(**PRESETS[preset])
    return p


def check_sizes(parser, args):
    """Crop, patch and window sizes that give no SRS grid are refused, naming the flags. A crop side that is not a
    multiple of the patch size is floored, as DINO's patch embedding does (udi.model)."""
    for level in ("global", "local"):
        size, window = getattr(args, f"{level}_crop_size"), getattr(args, f"{level}_window")
        grid = size // args.patch_size
        if grid < max(2, window):
            parser.error(f"--{level}_crop_size {size} with --patch_size {args.patch_size} gives a {grid}x{grid} "
                         f"patch grid; SRS needs at least 2x2 and at least --{level}_window ({window})")


def check_scales(parser, args):
    for level in ("global", "local"):
        low, high = getattr(args, f"{level}_crops_scale")
        if low > high:
            parser.error(f"--{level}_crops_scale {low} {high}: MIN must not exceed MAX")


def arch_shape(parser, arch: str) -> tuple:
    """(width, heads, depth) of --arch: DINO's names from a table, other timm names from timm (built on the meta
    device)."""
    if arch in DINO_ARCH_SHAPES:
        return DINO_ARCH_SHAPES[arch]
    import timm
    import torch
    if not arch.startswith("vit_") or not timm.is_model(DINO_ARCHS.get(arch, arch)):
        parser.error(f"--arch {arch}: not a DINO name ({', '.join(DINO_ARCH_SHAPES)}) nor a timm vit_* model")
    with torch.device("meta"):
        vit = timm.create_model(arch, pretrained=False, num_classes=0)
    return vit.embed_dim, vit.blocks[0].attn.num_heads, len(vit.blocks)


def check_network(parser, args):
    """The heads must divide the width; the network must have at most MAX_PARAMETERS parameters (estimated: 12·C²
    per block, 4·C² for the SRS head path, the DINO head's MLP and its last layer)."""
    width, heads, depth = arch_shape(parser, args.arch)
    width, heads, depth = args.embed_dim or width, args.num_heads or heads, args.depth or depth
    if width % heads:
        parser.error(f"--num_heads {heads} does not divide the width {width} (--embed_dim or --arch {args.arch})")
    hidden, bottleneck = args.head_hidden_dim, args.head_bottleneck_dim
    parameters = (12 * depth + 4) * width ** 2 + width * hidden + hidden ** 2 + hidden * bottleneck \
        + bottleneck * args.out_dim
    if parameters > MAX_PARAMETERS:
        parser.error(f"the network of --arch {args.arch} (width {width}, depth {depth}), --head_hidden_dim {hidden}, "
                     f"--head_bottleneck_dim {bottleneck} and --out_dim {args.out_dim} would have about "
                     f"{parameters / 1e9:.1f} billion parameters; at most {MAX_PARAMETERS / 1e9:.1f} billion (a run "
                     "holds four float32 copies)")


def check_views(parser, args):
    """One batch of views per process (2 global, L local crops, float32) must fit MAX_VIEW_BYTES."""
    pixels = 2 * args.global_crop_size ** 2 + args.local_crops_number * args.local_crop_size ** 2
    size = args.batch_size_per_gpu * pixels * 3 * 4
    if size > MAX_VIEW_BYTES:
        parser.error(f"--batch_size_per_gpu {args.batch_size_per_gpu} with --global_crop_size "
                     f"{args.global_crop_size}, --local_crops_number {args.local_crops_number} and --local_crop_size "
                     f"{args.local_crop_size} gives {size / 2 ** 30:.1f} GiB of views per batch; at most "
                     f"{MAX_VIEW_BYTES // 2 ** 30} GiB")


def check_schedules(parser, args):
    for flag in ("warmup_epochs", "warmup_teacher_temp_epochs"):
        if getattr(args, flag) > args.epochs:
            parser.error(f"--{flag} {getattr(args, flag)} exceeds --epochs {args.epochs}")


def world_size() -> int:
    """The processes of this run (udi.distributed: torchrun's or srun's environment; RunError when inconsistent)."""
    return launch_from_env().world_size


def check_embedded_data(parser, args):
    """More embedded images than the data hold, than memory allows, or too few for one batch are refused."""
    if args.data_path is not None:
        return
    count, data = args.embedded_images, args.embedded_data
    if data == "digits" and count > TRAIN_DIGITS:
        parser.error(f"--embedded_images {count}: --embedded_data digits has {TRAIN_DIGITS} train images")
    per_image = args.global_crop_size ** 2 * EMBEDDED_BYTES_PER_PIXEL.get(data, 0)
    if count * per_image > EMBEDDED_MEMORY_LIMIT:
        parser.error(f"--embedded_images {count}: generated {data} of --global_crop_size "
                     f"{args.global_crop_size} px would hold {count * per_image / 2 ** 30:.1f} GiB in memory; at "
                     f"most {EMBEDDED_MEMORY_LIMIT // per_image} images (train on more from an ImageFolder: "
                     "--data_path)")
    if count < args.batch_size_per_gpu * world_size() * args.accum_iter:
        parser.error(f"--embedded_images {count} give no full batch of --batch_size_per_gpu "
                     f"{args.batch_size_per_gpu} x {world_size()} process(es){accumulation_text(args)}")


def accumulation_text(args) -> str:
    """What --accum_iter adds to a batch's size in a message."""
    return f" x --accum_iter {args.accum_iter} (one optimizer step)" if args.accum_iter > 1 else ""


def check_paths(parser, args):
    if args.data_path is not None and not os.path.isdir(args.data_path):
        parser.error(f"--data_path {args.data_path}: no such folder")
    if args.knn_data_path is not None:
        missing = [s for s in ("train", "val") if not os.path.isdir(os.path.join(args.knn_data_path, s))]
        if missing:
            parser.error(f"--knn_data_path {args.knn_data_path}: needs the folders train/ and val/ (missing: "
                         f"{', '.join(missing)})")
    if args.knn_data_path is not None and not args.final_eval:
        parser.error(f"--knn_data_path {args.knn_data_path} is read by the final evaluation, which --final_eval "
                     "false skips: add --final_eval true, or run udi.eval_knn on the checkpoint afterwards")
    reason = unwritable(args.output_dir) if args.output_dir is not None else None
    if reason:
        parser.error(f"--output_dir {args.output_dir}: {reason}")


def data_tag(args) -> str:
    """A folder-name tag of the training data: the embedded data's name, or the ImageFolder's name and a hash of
    its absolute path (two folders of one name do not share a tag)."""
    if args.data_path is None:
        return args.embedded_data
    path = os.path.abspath(args.data_path)
    name = re.sub(r"[^A-Za-z0-9_.]+", "_", os.path.basename(path.rstrip(os.sep)) or "root")
    return f"{name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def default_output_dir(args) -> str:
    return os.path.join(OUTPUT_ROOT, f"{args.preset}-{args.objective}-{data_tag(args)}")


def parse_args(argv=None):
    preset_parser = argparse.ArgumentParser(add_help=False)
    preset_parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser = get_args_parser(preset_parser.parse_known_args(argv)[0].preset)
    args = parser.parse_args(argv)
    for check in (check_sizes, check_scales, check_network, check_views, check_schedules, check_paths,
                  check_embedded_data):
        check(parser, args)
    args.output_dir = args.output_dir or default_output_dir(args)
    return args


def changed_args(args) -> str:
    """The arguments that differ from their preset's defaults, as flags."""
    defaults = vars(get_args_parser(args.preset).parse_args([]))
    defaults["output_dir"] = args.output_dir  # shown on its own line
    changed = {k: v for k, v in vars(args).items() if defaults.get(k) != v}
    return " ".join(f"--{k} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                    for k, v in changed.items())


def resume_command(args, argv=None) -> str:
    """The command line that resumes this run: its own flags, with its --output_dir."""
    argv = list(argv or [])
    if "--output_dir" not in argv:
        argv += ["--output_dir", args.output_dir]
    return "python -m udi.train " + shlex.join(argv)
