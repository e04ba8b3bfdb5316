"""Runs every CUDA kernel of srs_attention (forward, backward passes 1-3) on small odd shapes and synchronizes;
every shape also once with check_taps=False and taps out of range (-1, N, 2**31 - 1), which the kernels must
skip without reading out of bounds, and once with no rows of q (Nq = 0) or no samples (S = 0).

For: compute-sanitizer --tool memcheck|racecheck python scripts/sanitize_srs_attention.py
Prints one line and exits 0 when every run finished with finite outputs.
"""
import torch

import udi_kernels

# D = 384 and 512 run the wide-row instantiation (SRSAttention attending over whole tokens, > 48 KiB of
# shared memory per block)
SHAPES = [(1, 1, 23, 32, 1, 4), (2, 3, 37, 64, 19, 1), (1, 2, 50, 128, 17, 4), (2, 1, 9, 48, 33, 3),
          (1, 1, 37, 384, 20, 1), (1, 1, 17, 512, 9, 4)]


def run(B, H, N, D, S, T, dtype, bad_taps=False, query_rows=None):
    q = torch.randn(B, H, N if query_rows is None else query_rows, D, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    index = torch.randint(0, N, (B, S, T), device="cuda", dtype=torch.int32)
    if bad_taps:  # the first tap of each sample: -1, N, 2**31 - 1 in turn
        bad = torch.tensor([-1, N, 2**31 - 1], device="cuda", dtype=torch.int32)
        index[..., 0] = bad[torch.arange(S, device="cuda") % 3]
    weight = torch.rand(B, S, T, device="cuda")
    out = udi_kernels.srs_attention(q, k, v, index, weight, backend="native", check_taps=not bad_taps)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    return all(bool(torch.isfinite(t).all()) for t in (out, q.grad, k.grad, v.grad))


def main():
    assert udi_kernels.cuda_compiled(), "udi_kernels was built without its CUDA kernels"
    results = [run(*shape, dtype) for shape in SHAPES for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    results += [run(*shape, torch.float16, bad_taps=True) for shape in SHAPES]
    results += [run(2, 2, 19, 32, 5, 4, torch.float32, bad_taps=True, query_rows=0),
                run(2, 2, 19, 32, 0, 4, torch.float32)]
    if not all(results):
        raise SystemExit(f"sanitize_srs_attention: non-finite output in {results.count(False)} of {len(results)} runs")
    print(f"sanitize_srs_attention: {len(results)} forward+backward runs finished")


if __name__ == "__main__":
    main()
