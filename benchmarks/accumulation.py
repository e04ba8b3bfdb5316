"""Gradient accumulation (issue 23 §3): memory and time of one optimizer step of B images in one batch and as
`--accum_iter` micro-batches of B / accum_iter.

    python -m benchmarks.accumulation [--batch B] [--local_crops_number L] [--out DIR | --record]

The step is udi.train's (accumulate_gradients, optimizer_step, the teacher's EMA) on UDIStep with the reference
preset's ViT-S/16 and crops (K = --out_dim), on the random batch of benchmarks/train_step.py, each setting in a fresh
process: one warm-up step, then the peak RSS of one step beyond the RSS before it (CPU; on a GPU
torch.cuda.max_memory_allocated beyond the memory allocated before it) and the median time of `--steps` further
steps.
"""
import os as _os
import sys as _sys

if not __package__:  # `python benchmarks/x.py`: the repository root on the path, as `python -m benchmarks.x` has it
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import argparse
import json

import torch

from benchmarks import common
from benchmarks.train_step import make_batch
from udi import utils
from udi.cli import parse_args
from udi.step import UDIStep
from udi.train import TrainingRun, accumulate_gradients, optimizer_step

SETTINGS = (1, 2, 4)  # --accum_iter


def step_config(args, accum_iter: int):
    return parse_args(["--preset", "reference", "--batch_size_per_gpu", str(args.batch // accum_iter),
                       "--accum_iter", str(accum_iter), "--local_crops_number", str(args.local_crops_number),
                       "--out_dim", str(args.out_dim), "--precision", "fp32"])


def measure_here(args, accum_iter: int) -> dict:
    """One setting in this process -> dict(peak_extra_bytes, step_ms); printed as JSON by the child."""
    device = common.pick_device()
    utils.fix_random_seeds(0)
    cfg = step_config(args, accum_iter)
    step = UDIStep(cfg, device)
    optimizer = torch.optim.AdamW(utils.param_groups(step.student), lr=1e-4)
    run = TrainingRun(cfg, step, optimizer, torch.amp.GradScaler(device.type, enabled=False), {}, device, None, 0, 1)
    views, boxes = make_batch(cfg, args.batch, device)
    micro = cfg.batch_size_per_gpu
    batches = [([v[m * micro:(m + 1) * micro] for v in views], boxes[m * micro:(m + 1) * micro])
               for m in range(accum_iter)]

    def train_step():
        accumulate_gradients(run, batches, 0, 0)
        optimizer_step(run, 1)
        step.update_teacher(0.996)

    train_step()  # warm-up: optimizer states, thread pools
    return common.step_memory_and_times(train_step, device, args.steps)


def main():
    args = common.parse_args(__doc__.split("\n\n")[0], **{
        "--batch": dict(type=int, default=4, help="images per optimizer step (4: a CPU-sized step)"),
        "--local_crops_number": dict(type=int, default=2, help="local crops per image"),
        "--out_dim": dict(type=int, default=4096, help="K, the head's output size"),
        "--steps": dict(type=int, default=2, help="timed steps after the memory step"),
        "--measure": dict(type=int, help=argparse.SUPPRESS),  # the child of a fresh process: its --accum_iter
    })
    if args.measure:
        print(json.dumps(measure_here(args, args.measure)))
        return
    flags = ["--batch", str(args.batch), "--local_crops_number", str(args.local_crops_number), "--out_dim",
             str(args.out_dim), "--steps", str(args.steps)]
    results = {n: common.fresh_process_json("benchmarks.accumulation", flags + ["--measure", str(n)])
               for n in SETTINGS if args.batch % n == 0}
    device = common.pick_device()
    whole = results[1]
    rows = [dict(setting=str(n), micro=args.batch // n, mib=common.mib(r["peak_extra_bytes"]), ms=r["step_ms"],
                 memory=r["peak_extra_bytes"] / whole["peak_extra_bytes"], time=r["step_ms"] / whole["step_ms"])
            for n, r in results.items()]
    columns = [("setting", "accum_iter", "{}"), ("micro", "images per batch", "{}"),
               ("mib", "peak extra MiB", "{:.1f}"), ("ms", "step ms", "{:.0f}"), ("memory", "memory vs 1", "{:.3f}x"),
               ("time", "time vs 1", "{:.2f}x")]
    caption = (f"one UDI optimizer step of {args.batch} images, ViT-S/16 reference crops, L={args.local_crops_number}, "
               f"K={args.out_dim}, fp32")
    chart = (caption, [row["setting"] for row in rows], {"peak extra MiB": [row["mib"] for row in rows],
                                                         "step ms": [row["ms"] for row in rows]}, "MiB / ms")
    payload = {"config": dict(preset="reference", batch=args.batch, local_crops_number=args.local_crops_number,
                              out_dim=args.out_dim, steps=args.steps),
               "results": {str(n): r for n, r in results.items()}}
    common.finish(args.out, "accumulation", device, payload, chart, rows, columns, caption=caption)


if __name__ == "__main__":
    main()
