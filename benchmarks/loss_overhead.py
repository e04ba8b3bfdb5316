"""Host-side cost of the losses per forward+backward at a tiny K (issue 4): ops dispatched and wall time.

    python -m benchmarks.loss_overhead [--iters N] [--threads T] [--verbose]

The losses run on the native CPU kernels (the extension must be built) at K=64 and B=2, where the kernels are
a small, separately measured part of a call: per loss (DINOLoss 2 + 10 crops, IBOTPatchLoss, UDILoss with
L=10 from teacher logits and from UDITargets) it prints the ops one forward+backward dispatches (a
TorchDispatchMode counter: aten ops and the udi_kernels ops), the median wall time of N calls, the time inside
the udi_kernels ops (the CPU kernels) and their difference, the host's own work. On a GPU the host work is what
must stay below the kernel time; these are numbers of the machine it runs on, not GPU measurements.
"""
import os as _os
import sys as _sys

if not __package__:  # `python benchmarks/x.py`: the repository root on the path, as `python -m benchmarks.x` has it
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import argparse
import functools
import statistics
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from udi_kernels.losses import DINOLoss, IBOTPatchLoss, UDILoss, cls_plus_targets
from udi_kernels.testing.losses import random_udi_inputs

K = 64


class OpCounter(TorchDispatchMode):
    """Counts every op that reaches the dispatcher's Python mode (aten and custom ops), by name, and times the
    udi_kernels ops (the mode is off while an op runs, so that is the kernels' own time)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()
        self.kernel_s = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        self.counts[name] += 1
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        if name.startswith("udi_kernels::"):
            self.kernel_s += time.perf_counter() - start
        return out


def dino_case(B=2, ncrops=12):
    student = torch.randn(ncrops * B, K, requires_grad=True)
    teacher = torch.randn(2 * B, K)
    loss = DINOLoss(K, ncrops, 0.04, 0.07, 30, 100, backend="native")
    return lambda: loss(student, teacher, 0), [student]


def ibot_case(images=4, tokens=16):
    student = torch.randn(images, tokens, K, requires_grad=True)
    teacher = torch.randn(images, tokens, K)
    mask = torch.rand(images, tokens) < 0.5
    loss = IBOTPatchLoss(K, 0.04, 0.07, 30, 100, backend="native")
    return lambda: loss(student, teacher, mask, 0), [student]


def udi_case(from_targets, B=2, L=10, Sg=16, Sl=9):
    student, teacher = random_udi_inputs(B, L, K, Sg, Sl, seed=None, valid_fraction=0.8)
    given = cls_plus_targets(teacher) if from_targets else teacher
    loss = UDILoss(K, 2 + L, backend="native")
    return lambda: loss(student, given, 0)[0], list(student)


CASES = {
    "DINO 12 crops": dino_case,
    "iBOT patch": ibot_case,
    "UDI L=10 (teacher logits)": functools.partial(udi_case, from_targets=False),
    "UDI L=10 (UDITargets)": functools.partial(udi_case, from_targets=True),
}


def forward_backward(loss_of, leaves):
    def step():
        for leaf in leaves:
            leaf.grad = None
        loss_of().backward()
    return step


def count_ops(step, repeats):
    """(ops of one call by name, median µs per call inside the udi_kernels ops)."""
    kernel_s = []
    for _ in range(repeats):
        with OpCounter() as counter:
            step()
        kernel_s.append(counter.kernel_s)
    return counter.counts, statistics.median(kernel_s) * 1e6


def median_us(step, iters):
    for _ in range(max(10, iters // 10)):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--iters", type=int, default=1000, help="timed calls per loss (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--verbose", action="store_true", help="print the ops of each loss by name")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"native CPU kernels, {args.threads} thread(s), K={K}, median of {args.iters} fwd+bwd calls; "
          "host = per call - kernels")
    print(f"{'loss':<28}{'ops':>6}{'udi_kernels ops':>17}{'us per call':>13}{'kernels us':>12}{'host us':>9}")
    for name, make in CASES.items():
        step = forward_backward(*make())
        step()  # warm-up: cached tables, first-call dispatch
        counts, kernel_us = count_ops(step, repeats=max(3, args.iters // 20))
        custom = sum(n for op, n in counts.items() if op.startswith("udi_kernels::"))
        per_call = median_us(step, args.iters)
        print(f"{name:<28}{sum(counts.values()):>6}{custom:>17}{per_call:>13.0f}{kernel_us:>12.0f}"
              f"{per_call - kernel_us:>9.0f}")
        if args.verbose:
            print("   ", ", ".join(f"{op} {n}" for op, n in sorted(counts.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
