"""Activation checkpointing of the backbone blocks (issue 23 §2): memory and time of one UDI training step with and
without `--grad_checkpointing`.

    python -m benchmarks.grad_checkpointing [--batch B] [--local_crops_number L] [--out DIR | --record]

The step is udi.step.UDIStep's (the reference preset's ViT-S/16 and crops, K = --out_dim), forward + backward +
AdamW on the random batch of benchmarks/train_step.py, each setting in a fresh process: one warm-up step, then the
peak RSS of one step beyond the RSS before it (CPU; on a GPU torch.cuda.max_memory_allocated beyond the memory
allocated before it) and the median time of `--steps` further steps.
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

SETTINGS = (False, True)


def step_config(args, grad_checkpointing: bool):
    return parse_args(["--preset", "reference", "--batch_size_per_gpu", str(args.batch), "--local_crops_number",
                       str(args.local_crops_number), "--out_dim", str(args.out_dim), "--grad_checkpointing",
                       str(grad_checkpointing).lower()])


def measure_here(args, grad_checkpointing: bool) -> dict:
    """One setting in this process -> dict(peak_extra_bytes, step_ms); printed as JSON by the child."""
    device = common.pick_device()
    utils.fix_random_seeds(0)
    cfg = step_config(args, grad_checkpointing)
    step = UDIStep(cfg, device)
    optimizer = torch.optim.AdamW(step.student.parameters(), lr=1e-4)
    views, boxes = make_batch(cfg, args.batch, device)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss, _ = step(views, boxes, 0, 1234)
        loss.backward()
        optimizer.step()
        step.update_teacher(0.996)

    train_step()  # warm-up: optimizer states, thread pools
    return common.step_memory_and_times(train_step, device, args.steps)


def main():
    args = common.parse_args(__doc__.split("\n\n")[0], **{
        "--batch": dict(type=int, default=2, help="images per step (2: a CPU-sized step)"),
        "--local_crops_number": dict(type=int, default=2, help="local crops per image"),
        "--out_dim": dict(type=int, default=4096, help="K, the head's output size"),
        "--steps": dict(type=int, default=2, help="timed steps after the memory step"),
        "--measure": dict(choices=["false", "true"], help=argparse.SUPPRESS),  # the child of a fresh process
    })
    if args.measure:
        print(json.dumps(measure_here(args, args.measure == "true")))
        return
    flags = ["--batch", str(args.batch), "--local_crops_number", str(args.local_crops_number), "--out_dim",
             str(args.out_dim), "--steps", str(args.steps)]
    results = {setting: common.fresh_process_json("benchmarks.grad_checkpointing",
                                                  flags + ["--measure", str(setting).lower()])
               for setting in SETTINGS}
    device = common.pick_device()
    off = results[False]
    rows = [dict(setting=str(setting).lower(), mib=common.mib(r["peak_extra_bytes"]), ms=r["step_ms"],
                 memory=r["peak_extra_bytes"] / off["peak_extra_bytes"], time=r["step_ms"] / off["step_ms"])
            for setting, r in results.items()]
    columns = [("setting", "grad_checkpointing", "{}"), ("mib", "peak extra MiB", "{:.1f}"),
               ("ms", "step ms", "{:.0f}"), ("memory", "memory vs off", "{:.3f}x"), ("time", "time vs off", "{:.2f}x")]
    caption = (f"one UDI step, ViT-S/16 reference crops, B={args.batch}, L={args.local_crops_number}, "
               f"K={args.out_dim}")
    chart = (caption, [row["setting"] for row in rows], {"peak extra MiB": [row["mib"] for row in rows],
                                                         "step ms": [row["ms"] for row in rows]}, "MiB / ms")
    payload = {"config": dict(preset="reference", batch=args.batch, local_crops_number=args.local_crops_number,
                              out_dim=args.out_dim, steps=args.steps),
               "results": {str(setting).lower(): r for setting, r in results.items()}}
    common.finish(args.out, "grad_checkpointing", device, payload, chart, rows, columns, caption=caption)


if __name__ == "__main__":
    main()
