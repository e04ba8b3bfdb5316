"""The size limits that the Python checks and the C++/CUDA kernels share, declared here and nowhere else.

setup.py compiles every upper-case int of this module into the extension (-DUDI_<NAME>=<value>, read by
csrc/size_limits.h); it loads this plain module without importing udi_kernels. The ops and
udi_kernels/declarations.py import it; tests/test_stratified_sample.py checks that the built extension agrees.
"""
MAX_GRID = 4096  # cells per side of a stratified_sample grid (global, local and target grids)
SRS_ATTENTION_CUDA_MAX_HEAD_DIM = 512  # the largest head dim D the CUDA srs_attention kernel is instantiated for
