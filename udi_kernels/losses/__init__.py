"""DINO, iBOT-patch and UDI losses (UDI_SPEC §5), every one on the fused udi_kernels.distill_cross_entropy, from logits
or, with the head's last layer fused in (`weight=` / `teacher_weight=`, UDI_SPEC §10), from bottleneck rows through
udi_kernels.linear_distill_cross_entropy.

- centering:   EMA centers (exact global means, all-reduced; defer_center_updates for gradient accumulation),
               Sinkhorn-Knopp centering, distributed helpers
- pair_tables: which student row meets which teacher row with what weight (cached CSR tables), cross_entropy
- schedule:    the teacher temperature schedule
- diagnostics: the teacher's collapse diagnostics (teacher_entropies), chunk by chunk over K
- dino, ibot, udi: the losses; udi also forms UDI's teacher targets (cls_plus_targets)
The UDI inputs and their row layouts are udi_kernels.layout's (re-exported here). An empty batch (B = 0, no rows)
gives a loss of 0 with a zero gradient and leaves the centers unchanged.
"""
from ..layout import UDIStudent, UDITargets, UDITeacher
from .centering import (EMACenter, all_reduce_sum, defer_center_updates, distributed, sinkhorn_knopp_center,
                        update_centers)
from .diagnostics import teacher_entropies
from .dino import DINOLoss
from .ibot import IBOTPatchLoss
from .pair_tables import (PairTable, ScoredPairs, crop_mean_table, crop_pair_table, crop_pairs, cross_entropy,
                          identity_table)
from .schedule import teacher_temperature
from .udi import UDILoss, UDIPairTables, blend_cls_plus, blend_into, cls_plus_targets, masked_mean, udi_pair_tables

__all__ = ["DINOLoss", "EMACenter", "IBOTPatchLoss", "PairTable", "ScoredPairs", "UDILoss", "UDIPairTables",
           "UDIStudent", "UDITargets", "UDITeacher", "all_reduce_sum", "blend_cls_plus", "blend_into",
           "cls_plus_targets", "crop_mean_table", "crop_pair_table", "crop_pairs", "cross_entropy",
           "defer_center_updates", "distributed", "identity_table", "masked_mean", "sinkhorn_knopp_center",
           "teacher_entropies", "teacher_temperature",
           "udi_pair_tables", "update_centers"]
