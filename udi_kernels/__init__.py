"""udi-kernels: fused kernels and a training loop for UDI (ECCV 2024)."""
from ._native import cuda_compiled, native_loaded
from .backends import BACKENDS
from .ops.distill_cross_entropy import DistillCrossEntropyResult, distill_cross_entropy
from .ops.linear_distill_cross_entropy import linear_distill_cross_entropy
from .ops.srs_attention import srs_attention
from .ops.stratified_sample import PairTaps, SampledPairs, stratified_sample
from .taps import dense_to_taps, one_hot_taps, taps_to_dense

__all__ = ["BACKENDS", "DistillCrossEntropyResult", "PairTaps", "SampledPairs", "cuda_compiled", "dense_to_taps",
           "distill_cross_entropy", "linear_distill_cross_entropy",
           "native_loaded", "one_hot_taps", "srs_attention", "stratified_sample",
           "taps_to_dense"]
__version__ = "0.1.0"
