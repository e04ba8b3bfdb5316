"""Centering of the teacher's logits: EMA centers updated from exact global means, DINOv2's Sinkhorn-Knopp
centering, and the torch.distributed helpers they share.

Centers are exact global means: the per-center weighted sum and count of the teacher rows come out of the
fused op and are all-reduced (when a torch.distributed process group exists) before the EMA step
c ← m·c + (1 − m)·sum/count; a zero count leaves the center unchanged. Statistics that are not finite (NaN or inf
teacher logits) leave the center unchanged too, and a RuntimeWarning says so: on CPU tensors at once, on CUDA at
a later update, once the device has finished (no host sync).
"""
import contextlib
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


CENTER_MEANS = ("global", "per_rank")


class EMACenter(nn.Module):
    """The EMA center of DINO, iBOT and UDI: buffer `center` (default [1, K]; any shape [..., K], one center per
    row of [-1, K]) moved by c <- m·c + (1 - m)·mean from (sum, count) statistics of its teacher rows.

    EMACenter(out_dim, momentum, momentum_name='momentum', *, shape=None, mean='global')
      momentum: m in [0, 1] (ValueError naming `momentum_name`); shape: the buffer's shape (rows x K, or lightly's
      [1, 1, K]); mean: 'global' the exact mean of the rows over all ranks (sums and counts all-reduced), 'per_rank'
      each rank's mean averaged over the ranks that have rows (the reference UDI code's and lightly's way).
    update(sum [rows, K], count [rows] or [rows, 1]): one EMA step (udi_kernels.losses.update_centers), or inside
    defer_center_updates an accumulation of the statistics, applied at the context's end.
    """

    def __init__(self, out_dim: int, momentum: float, momentum_name: str = "momentum", *, shape=None,
                 mean: str = "global"):
        super().__init__()
        check_int(out_dim, "out_dim", 1)
        self.momentum = check_float(momentum, momentum_name, 0.0, 1.0)
        if mean not in CENTER_MEANS:
            raise ValueError(f"center_mean must be one of {CENTER_MEANS}, got {mean!r}")
        self.mean = mean
        self.register_buffer("center", torch.zeros(shape or (1, out_dim)))
        self.deferred = None  # inside defer_center_updates: [sum [rows, K], count [rows, 1]] so far, else None

    def update(self, center_sum: Tensor, center_count: Tensor):
        update_centers([self], [center_sum], [center_count])

    def defer(self):
        """Start accumulating the statistics of the updates (zeros: a context without updates leaves the center
        alone, and still joins the ranks' all-reduce)."""
        if self.deferred is not None:
            raise RuntimeError("defer_center_updates: the center's updates are already deferred (nested contexts)")
        rows = self.center.reshape(-1, self.center.shape[-1])
        dtype = torch.promote_types(rows.dtype, torch.float32)
        self.deferred = [torch.zeros_like(rows, dtype=dtype), rows.new_zeros(rows.shape[0], 1, dtype=dtype)]


@contextlib.contextmanager
def defer_center_updates(*modules: nn.Module):
    """Gradient accumulation's centering: inside the context the EMACenters of `modules` (DINOLoss, UDILoss,
    IBOTPatchLoss, the compat losses or any module holding them) keep their values, and their updates only add up
    their sums and counts; at the end of the context each center takes one EMA step from the exact mean over all
    the calls (and all ranks, as one call does), so that B images in one call equal B/n images in n calls. The
    teacher targets of every call use the centers from before the context, as one call of all the rows does.
    An exception inside the context discards the statistics (no update). RuntimeError for nested contexts.

        with defer_center_updates(loss):
            for micro_batch in micro_batches:
                (loss(*micro_batch, epoch) / len(micro_batches)).backward()
    """
    centers = list(dict.fromkeys(c for m in modules for c in m.modules() if isinstance(c, EMACenter)))
    started = []
    try:
        for center in centers:
            center.defer()
            started.append(center)
        yield
    except BaseException:
        for center in started:
            center.deferred = None
        raise
    stats = [center.deferred for center in centers]
    for center in centers:
        center.deferred = None
    groups = {}  # one batched update (one all-reduce) per (momentum, mean), in the centers' order
    for center, (total, count) in zip(centers, stats):
        groups.setdefault((center.momentum, center.mean), []).append((center, total, count))
    for group in groups.values():
        update_centers(*map(list, zip(*group)))


@torch.no_grad()
def update_centers(emas, sums, counts):
    """One EMA step of several EMACenters (of one momentum and one mean) from their statistics: sum [rows, K] and
    count [rows] or [rows, 1] each, as one batch of small ops and at most one all-reduce, in float32 (float64 for
    float64 centers: a loss moved with .double()). Inside defer_center_updates the statistics are added up instead.
    ValueError for lists of other lengths, or centers of different momentums or means."""
    if not len(emas) == len(sums) == len(counts) or not emas:
        raise ValueError(f"update_centers needs one sum and one count per center, got {len(emas)} centers, "
                         f"{len(sums)} sums and {len(counts)} counts")
    momentum, mean = emas[0].momentum, emas[0].mean
    if any(ema.momentum != momentum for ema in emas):
        raise ValueError(f"centers updated together must share one momentum, got {[ema.momentum for ema in emas]}")
    if any(ema.mean != mean for ema in emas):
        raise ValueError(f"centers updated together must share one mean, got {[ema.mean for ema in emas]}")
    if any(ema.deferred is not None for ema in emas):
        for ema, total, count in zip(emas, sums, counts):
            ema.deferred[0] += total.reshape(ema.deferred[0].shape)
            ema.deferred[1] += count.reshape(ema.deferred[1].shape)
        return
    shapes = [ema.center.shape for ema in emas]
    centers = _stack([ema.center.reshape(-1, shape[-1]) for ema, shape in zip(emas, shapes)])
    dtype = torch.promote_types(centers.dtype, torch.float32)
    total = _stack([s.reshape(-1, s.shape[-1]) for s in sums])
    count = _stack([c.reshape(-1, 1) for c in counts])
    if mean == "per_rank":  # each rank's mean, weighing 1 where the rank has rows
        has_rows = count > 0
        total = torch.where(has_rows, total / count.clamp_min(torch.finfo(torch.float32).tiny), 0)
        count = has_rows.to(total.dtype)
    total, count = total.to(dtype), count.to(dtype)
    if distributed():
        stats = all_reduce_sum(torch.cat([total, count], dim=1))
        total, count = stats[:, :-1], stats[:, -1:]
    # normal tensors even under inference_mode, so that a later training call can save the centers for backward
    with torch.inference_mode(False):
        mean_rows = total / count.clamp_min(torch.finfo(torch.float32).tiny)
        finite = torch.isfinite(mean_rows).all(dim=1, keepdim=True)  # False for NaN/inf teacher rows or counts
        # new tensors, not copy_: the loss's autograd graph saved the old centers
        updated = torch.where(finite & (count > 0), centers * momentum + mean_rows * (1 - momentum), centers)
    _skipped_updates.report(finite)
    rows = [s.numel() // s[-1] for s in shapes]
    for ema, shape, center in zip(emas, shapes, updated.split(rows) if len(emas) > 1 else (updated,)):
        ema.center = center.reshape(shape).to(ema.center.dtype)


def expose_center_key(owner: nn.Module, child: str):
    """Keep an owner's state-dict key `center` (DINO's main_dino.py's and lightly's) for the buffer of its
    EMACenter `child`: saved as `center`, and `center` loaded into it (strict loading still checks the key)."""
    inner = f"{child}.center"

    def save(module, state, prefix, local_metadata):
        state[prefix + "center"] = state.pop(prefix + inner)

    def load(module, state, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if prefix + "center" in state:
            state[prefix + inner] = state.pop(prefix + "center")

    owner.register_state_dict_post_hook(save)
    owner.register_load_state_dict_pre_hook(load)


class EMACentered:
    """The DINO and lightly names of a loss's EMACenter child `centering_ema`: `center` (its buffer; with
    expose_center_key also the state-dict key) and `center_momentum` (read and set)."""

    @property
    def center(self) -> Tensor:
        return self.centering_ema.center

    @property
    def center_momentum(self) -> float:
        return self.centering_ema.momentum

    @center_momentum.setter
    def center_momentum(self, value: float):
        self.centering_ema.momentum = value


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


def _stack(tensors):
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


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
