"""Centering of the teacher's logits: EMA centers updated from exact global means, DINOv2's Sinkhorn-Knopp
centering, and the torch.distributed helpers they share.

Centers are exact global means: the per-center weighted sum and count of the teacher rows come out of the
fused op and are all-reduced (when a torch.distributed process group exists) before the EMA step
c ← m·c + (1 − m)·sum/count; a zero count leaves the center unchanged. Statistics that are not finite (NaN or inf
teacher logits) leave the center unchanged too, and a RuntimeWarning says so: on CPU tensors at once, on CUDA at
a later update, once the device has finished (no host sync).
"""
import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..checks import check_float, check_int


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    if distributed():
        dist.all_reduce(tensor)
    return tensor


class EMACenter(nn.Module):
    """A [1, K] center updated from (sum [1, K], count [1]) statistics; global over ranks."""

    def __init__(self, out_dim: int, momentum: float, momentum_name: str = "momentum"):
        super().__init__()
        check_int(out_dim, "out_dim", 1)
        self.momentum = check_float(momentum, momentum_name, 0.0, 1.0)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def update(self, center_sum: Tensor, center_count: Tensor):
        update_centers([self], [center_sum], [center_count])


@torch.no_grad()
def update_centers(emas, sums, counts):
    """One EMA step of several centers (of one momentum) from their (sum [1, K], count [1]) statistics, as one
    batch of small ops and at most one all-reduce, in float32 (float64 for float64 centers: a loss moved with
    .double())."""
    if not len(emas) == len(sums) == len(counts) or not emas:
        raise ValueError(f"update_centers needs one sum and one count per center, got {len(emas)} centers, "
                         f"{len(sums)} sums and {len(counts)} counts")
    momentum = emas[0].momentum
    if any(ema.momentum != momentum for ema in emas):
        raise ValueError(f"centers updated together must share one momentum, got {[ema.momentum for ema in emas]}")
    centers = _stack([ema.center for ema in emas], torch.cat)
    dtype = torch.promote_types(centers.dtype, torch.float32)
    total = _stack(sums, torch.cat).to(dtype)      # [n, K]
    count = _stack(counts, torch.stack).to(dtype)  # [n, 1] ([1] for one center, which broadcasts the same)
    if distributed():
        stats = all_reduce_sum(torch.cat([total, count.reshape(-1, 1)], dim=1))
        total, count = stats[:, :-1], stats[:, -1:]
    # normal tensors even under inference_mode, so that a later training call can save the centers for backward
    with torch.inference_mode(False):
        mean = total / count.clamp_min(torch.finfo(torch.float32).tiny)
        finite = torch.isfinite(mean).all(dim=1, keepdim=True)  # False for NaN/inf teacher rows or counts
        # new tensors, not copy_: the loss's autograd graph saved the old centers
        updated = torch.where(finite & (count > 0), centers * momentum + mean * (1 - momentum), centers)
    _skipped_updates.report(finite)
    for ema, center in zip(emas, updated.split(1) if len(emas) > 1 else (updated,)):
        ema.center = center.to(ema.center.dtype)


class _SkippedUpdates:
    """Warns about center updates skipped for non-finite statistics without a host sync: the flags reach the host
    asynchronously and are read once the device has finished them (CPU flags at once, CUDA flags at a later
    update)."""

    def __init__(self):
        self.pending = []  # (flags on the host, CUDA event or None)

    def report(self, finite: Tensor):
        """finite: one flag per center, False where its update was skipped."""
        if torch.compiler.is_compiling():
            return
        event = None
        if finite.is_cuda:
            event = torch.cuda.Event()
            host = finite.to("cpu", non_blocking=True)
            event.record()
        else:
            host = finite
        self.pending.append((host, event))
        self.warn_finished()

    def warn_finished(self):
        while self.pending and (self.pending[0][1] is None or self.pending[0][1].query()):
            host, _ = self.pending.pop(0)
            if not host.numpy().all():  # a host read of finished memory, no dispatcher op (and no sync)
                warnings.warn("udi_kernels.losses: an EMA center update was skipped: its teacher statistics were "
                              "not finite (NaN or inf teacher logits); the center keeps its value", RuntimeWarning,
                              stacklevel=4)


_skipped_updates = _SkippedUpdates()


def _stack(tensors, join):
    return tensors[0] if len(tensors) == 1 else join(tensors)


@torch.no_grad()
def sinkhorn_knopp_center(teacher: Tensor, tau_t: float, iterations: int = 3) -> Tensor:
    """DINOv2's Sinkhorn-Knopp targets as a center: softmax((t − c)/τt) equals its assignment Q.

    Q = diag(β) exp(t/τt) diag(α) is rescaled so that prototypes have equal mass over the global batch
    (all-reduced) and each row sums to 1; the row scaling cancels in the softmax, so c = −τt·log α.
    Computed in log space (no overflow at small τt). teacher [R, K] -> center [1, K] float32 (float64 for float64
    logits); zeros for an empty batch (R = 0 on a single process).
    """
    if teacher.shape[0] == 0 and not distributed():
        return teacher.new_zeros(1, teacher.shape[1], dtype=torch.promote_types(teacher.dtype, torch.float32))
    u = teacher.to(torch.promote_types(teacher.dtype, torch.float32)) / tau_t
    log_b = u.new_zeros(u.shape[0], 1)
    log_a = u.new_zeros(1, u.shape[1])
    for _ in range(iterations):
        log_a = -_global_logsumexp_over_rows(u + log_b)
        log_b = -torch.logsumexp(u + log_a, dim=1, keepdim=True)
    center = -tau_t * log_a
    return center - center.mean()  # any constant shift gives the same softmax


def _global_logsumexp_over_rows(x: Tensor) -> Tensor:
    """logsumexp over dim 0 across every rank's rows, [1, K]."""
    # a rank without rows joins the reductions with -inf maxima and zero sums
    row_max = x.amax(dim=0, keepdim=True) if x.shape[0] else x.new_full((1, x.shape[1]), -torch.inf)
    if distributed():
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
    total = all_reduce_sum(torch.exp(x - row_max).sum(dim=0, keepdim=True))
    return row_max + torch.log(total)
