"""Runs every CUDA kernel of srs_attention (forward, backward passes 1-3) on small odd shapes and synchronizes.

For: compute-sanitizer --tool memcheck|racecheck python scripts/sanitize_srs_attention.py
Prints one line and exits 0 when every run finished with finite outputs.
"""
import torch

import udi_kernels

# D = 384 and 512 run the wide-row instantiation (SRSAttention attending over whole tokens, > 48 KiB of
# shared memory per block)
SHAPES = [(1, 1, 23, 32, 1, 4), (2, 3, 37, 64, 19, 1), (1, 2, 50, 128, 17, 4), (2, 1, 9, 48, 33, 3),
          (1, 1, 37, 384, 20, 1), (1, 1, 17, 512, 9, 4)]


def run(B, H, N, D, S, T, dtype):
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    index = torch.randint(0, N, (B, S, T), device="cuda", dtype=torch.int32)
    weight = torch.rand(B, S, T, device="cuda")
    out = udi_kernels.srs_attention(q, k, v, index, weight, backend="native")
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    return all(bool(torch.isfinite(t).all()) for t in (out, q.grad, k.grad, v.grad))


def main():
    assert udi_kernels.cuda_compiled(), "udi_kernels was built without its CUDA kernels"
    results = [run(*shape, dtype) for shape in SHAPES for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    if not all(results):
        raise SystemExit(f"sanitize_srs_attention: non-finite output in {results.count(False)} of {len(results)} runs")
    print(f"sanitize_srs_attention: {len(results)} forward+backward runs finished")


if __name__ == "__main__":
    main()
