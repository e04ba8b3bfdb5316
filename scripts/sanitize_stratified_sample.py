"""Runs the CUDA stratified_sample kernel on small odd shapes; for compute-sanitizer."""
import torch

import udi_kernels

g = torch.Generator().manual_seed(0)
for B, L, grids in ((3, 5, {}), (1, 0, dict(global_grid=13, global_window=1)), (5, 2, dict(local_grid=7, local_window=3))):
    low = 0.5 * torch.rand(B, 2 + L, 2, generator=g)
    boxes = torch.cat([low, low + 0.2 + 0.3 * torch.rand(B, 2 + L, 2, generator=g)], -1).cuda()
    udi_kernels.stratified_sample(boxes, seed=B, backend="native", **grids)
torch.cuda.synchronize()
print("sanitize_stratified_sample: ok")
