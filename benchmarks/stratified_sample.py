"""Stratified random sampling of a batch: reference, CPU C++, CUDA and Triton.

    python -m benchmarks.stratified_sample [--quick] [--out DIR | --record]

CPU numbers are per image (what a data loader pays); GPU numbers are per batch of B images,
median of per-call CUDA-event times; the backends in turn over common.ROUNDS rounds (medians). The reference UDI code builds dense maps per image in
Python at about 6.5 ms per image on a 2-core CPU (UDI_SPEC / issue 2): that is the baseline.
"""

import functools

import torch

from benchmarks import common
import udi_kernels
from udi_kernels.backends import why_unavailable

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


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    device = common.pick_device()
    rows, labels, us_by_backend = [], [], {}
    for dev in [torch.device("cpu")] + ([device] if device.type == "cuda" else []):
        boxes = realistic_boxes(B, L, dev)
        per = "image" if dev.type == "cpu" else "batch"
        for check in (False, True):
            labels.append(f"{dev.type} per {per}{', checked' if check else ''}")
            steps = {backend: functools.partial(udi_kernels.stratified_sample, boxes, seed=1234, backend=backend,
                                                check_boxes=check)
                     for backend in ("reference", "native", "triton")
                     if not why_unavailable(backend, "stratified_sample", dev)
                     and not (dev.type == "cpu" and backend == "triton")}
            for backend, r in common.interleaved(steps, dev, args.quick).items():
                us = r["ms"] * 1e3 / (B if per == "image" else 1)
                if backend == "reference":
                    reference_us = us
                goal = GOALS_US[dev.type] if backend == "native" or dev.type == "cuda" else None
                rows.append(dict(device=dev.type, backend=backend, check_boxes=check, us=us, per=per,
                                 goal_us=goal if backend != "reference" else None, speedup=reference_us / us,
                                 peak_extra_mib=common.mib(r["peak_extra_bytes"])))
                us_by_backend.setdefault(backend, {})[labels[-1]] = us
    series = {backend: [by_label.get(label) for label in labels] for backend, by_label in us_by_backend.items()}
    unchecked_cpu = {r["backend"]: r["us"] for r in rows if r["device"] == "cpu" and not r["check_boxes"]}
    fastest = common.fastest_backends({"any": unchecked_cpu})
    payload = {"B": B, "L": L, "copy_gb_per_s": common.copy_gb_per_s(device, args.quick),
               "rounds": common.ROUNDS, "rows": rows, "fastest": fastest}
    common.finish(args.out, "stratified_sample", device, payload,
                  (f"stratified_sample, B={B}, L={L}", labels, series, "µs (median)"), rows,
                  [("device", "device", "{}"), ("backend", "backend", "{}"), ("check_boxes", "checked", "{}"),
                   ("us", "µs", "{:.1f}"), ("per", "per", "{}"), ("goal_us", "goal µs", "{:.0f}"),
                   ("speedup", "speedup", "{:.1f}x"), ("peak_extra_mib", "peak MiB", "{:.2f}")])


if __name__ == "__main__":
    main()
