"""Stratified random sampling of a batch: reference, CPU C++, CUDA and Triton.

    python benchmarks/srs_sample.py [--quick] [--out DIR]

CPU numbers are per image (what a data loader pays); GPU numbers are per batch of B images,
median of per-call CUDA-event times. The reference UDI code builds dense maps per image in
Python at about 6.5 ms per image on a 2-core CPU (UDI_SPEC / issue 2): that is the baseline.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
import udi_kernels  # noqa: E402
from udi_kernels.backends import why_unavailable  # noqa: E402

B, L = 128, 10
GOALS_US = {"cpu": 65.0, "cuda": 50.0}  # CPU per image, GPU per batch (issue 2)


def realistic_boxes(batch, locals_, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = torch.cat([0.5 + 0.5 * torch.rand(batch, 2, 2, generator=g),
                      0.22 + 0.28 * torch.rand(batch, locals_, 2, generator=g)], 1)
    low = (1 - size) * torch.rand(batch, 2 + locals_, 2, generator=g)
    boxes = torch.cat([low, low + size], -1)
    flip = torch.rand(batch, 2 + locals_, generator=g) < 0.5
    boxes[..., [1, 3]] = torch.where(flip[..., None], boxes[..., [3, 1]], boxes[..., [1, 3]])
    return boxes.to(device)


def measure(device, backend, boxes, check_boxes):
    def run():
        udi_kernels.stratified_sample(boxes, seed=1234, backend=backend, check_boxes=check_boxes)
    return common.median_ms(run, device)


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    rows = []
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        boxes = realistic_boxes(B, L, device)
        for backend in ("reference", "native", "triton"):
            if why_unavailable(backend, "stratified_sample", device) or (device.type == "cpu" and backend == "triton"):
                continue
            for check in (False, True):
                ms = measure(device, backend, boxes, check)
                per = "image" if device.type == "cpu" else "batch"
                us = ms * 1e3 / (B if per == "image" else 1)
                goal = GOALS_US[device.type] if backend == "native" or device.type == "cuda" else None
                rows.append(dict(device=device.type, backend=backend, check_boxes=check, us=us, per=per,
                                 goal_us=goal if backend != "reference" else None))
    if not torch.cuda.is_available():
        print("No GPU here: CUDA and Triton numbers need a GPU (scripts/gpu_check.sh).")
    device = devices[-1]
    path = common.write_json(args.out, "srs_sample", device, {"B": B, "L": L, "rows": rows})
    print(f"wrote {path}")
    common.print_table(rows, [("device", "device", "{}"), ("backend", "backend", "{}"),
                              ("check_boxes", "checked", "{}"), ("us", "µs", "{:.1f}"), ("per", "per", "{}"),
                              ("goal_us", "goal µs", "{:.0f}")])


if __name__ == "__main__":
    main()
