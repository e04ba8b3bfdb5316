"""Pair tables: which student row meets which teacher row with what weight in a loss term, in the fused op's layout
(a student-row CSR, udi_kernels.ops.distill_cross_entropy.PairCSR), built once per structure; and `cross_entropy`, one loss
term on a table, from logits or from the head's bottleneck rows and last layer (linear_distill_cross_entropy).

Crop pairs (udi_kernels.layout) become row pairs here: student block s against teacher block t is row
s * B + b against row t * B + b for every image b (crop-major rows). The tables are built outside inference mode
(later training calls save their tensors for the backward) and cached: rebuilding one on every step costs dozens
of small launches and a sort.
"""
import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..nn import cast_for_autocast
from ..ops.distill_cross_entropy import DistillCrossEntropyResult, PairCSR, build_csr, distill_cross_entropy_csr
from ..ops.linear_distill_cross_entropy import linear_distill_cross_entropy_csr


class ScoredPairs(NamedTuple):
    student: Tensor  # [P] int64
    teacher: Tensor  # [P] int64
    weight: Tensor   # [P] float64 (the ops use it in the student's compute dtype)


class PairTable(NamedTuple):
    """A loss term's pairs in the op's layout with one center, and unit teacher-row weights [Rt] (every row counts
    once in the center): everything that depends only on the pair structure."""
    csr: PairCSR
    unit_rows: Tensor


def mean_weight(terms: int) -> float:
    """The weight of each of `terms` terms of a mean (0 when there are none: an empty batch)."""
    return 1.0 / terms if terms else 0.0


def crop_pairs(pattern: tuple, batch: int, device) -> ScoredPairs:
    """pattern ((student block, teacher block, weight), ...) -> row b of each student block against row b of its
    teacher block, weighing `weight` (float64: exact enough for float64 logits; the ops round it to the student's
    compute dtype), for b = 0 .. batch - 1, in pattern order."""
    blocks = torch.tensor([(s, t) for s, t, _ in pattern], dtype=torch.int64, device=device).reshape(-1, 1, 2)
    rows = blocks * batch + torch.arange(batch, device=device)[:, None]  # [pairs, batch, (student, teacher)]
    weight = torch.tensor([w for _, _, w in pattern], dtype=torch.float64, device=device).repeat_interleave(batch)
    return ScoredPairs(rows[..., 0].flatten(), rows[..., 1].flatten(), weight)


@torch.inference_mode(False)
def crop_pair_table(pattern: tuple, batch: int, student_blocks: int, teacher_blocks: int, device) -> PairTable:
    """crop_pairs(pattern, batch, device) as a PairTable of student_blocks · batch student rows and
    teacher_blocks · batch teacher rows."""
    return _table(crop_pairs(pattern, batch, device), student_blocks * batch, teacher_blocks * batch)


@functools.lru_cache(maxsize=64)
def crop_mean_table(pairs: tuple, batch: int, student_blocks: int, teacher_blocks: int,
                    device: torch.device) -> PairTable:
    """The mean cross-entropy over the rows of crop pairs ((student block, teacher block), ...): each pair of rows
    weighs 1 / (len(pairs) · batch). Built once per arguments."""
    weight = mean_weight(len(pairs) * batch)
    return crop_pair_table(tuple((s, t, weight) for s, t in pairs), batch, student_blocks, teacher_blocks, device)


@functools.lru_cache(maxsize=64)
@torch.inference_mode(False)
def _identity_structure(rows: int, device: torch.device) -> PairTable:
    index = torch.arange(rows, device=device)
    return _table(ScoredPairs(index, index, torch.ones(rows, device=device)), rows, rows)


def identity_table(pair_weight: Tensor) -> PairTable:
    """Row r of the student against row r of the teacher, weighing pair_weight[r] ([rows] float, given per call:
    the CSR order of identity pairs is the pair order); the structure is built once per (rows, device)."""
    table = _identity_structure(pair_weight.shape[0], pair_weight.device)
    return table._replace(csr=table.csr._replace(pair_weight=pair_weight))


def _table(pairs: ScoredPairs, student_rows: int, teacher_rows: int) -> PairTable:
    device = pairs.student.device
    center_id = torch.zeros(teacher_rows, dtype=torch.int64, device=device)
    return PairTable(build_csr(*pairs, center_id, student_rows, 1), torch.ones(teacher_rows, device=device))


def cross_entropy(student: Tensor, teacher: Tensor, center: Tensor, table: PairTable, tau_s: float, tau_t: float,
                  row_weight: Optional[Tensor] = None, *, weight: Optional[Tensor] = None,
                  teacher_weight: Optional[Tensor] = None, backend: Optional[str] = None) -> DistillCrossEntropyResult:
    """One loss term on one center [1, K]: Σ_p w_p · CE(softmax((t − c)/τt), log_softmax(s/τs)) over the table's
    pairs, and the teacher rows' (sum [1, K], count [1]) weighted by row_weight [Rt] (default: every row once).

    Logits: student [Rs, K], teacher [Rt, K] (distill_cross_entropy). The head's last layer fused in: weight [K, D]
    (its effective weight) with student [Rs, D] (its input rows), s = student @ weight.T, and teacher_weight [K, D]
    with teacher [Rt, D] or None with teacher logits [Rt, K] (linear_distill_cross_entropy: no [R, K] tensor;
    gradients to student and weight). Under autocast the rows and weights run in its dtype, as the last layer's
    F.linear does. teacher_weight without weight raises ValueError.

    The pairs of a table are valid by construction and their CSR is cached, so a call sorts nothing and the op's
    value checks (a device sync and a pass over the teacher) stay off the training path. A center kept in
    float16/bfloat16 (a loss moved with .half()) is used in float32."""
    if center.dtype not in (torch.float32, torch.float64):
        center = center.float()
    row_weight = table.unit_rows if row_weight is None else row_weight
    if weight is None:
        if teacher_weight is not None:
            raise ValueError("teacher_weight (teacher bottleneck rows) needs weight (student bottleneck rows) too")
        return distill_cross_entropy_csr(student, teacher, center, table.csr, row_weight, tau_s, tau_t,
                                         backend=backend)
    if teacher_weight is not None:
        teacher, teacher_weight = cast_for_autocast(teacher), cast_for_autocast(teacher_weight)
    return linear_distill_cross_entropy_csr(cast_for_autocast(student), cast_for_autocast(weight), teacher,
                                            teacher_weight, center, table.csr, row_weight, tau_s, tau_t,
                                            backend=backend)
