"""Runs every CUDA kernel of distill_ce (forward and backward) on small odd shapes, for compute-sanitizer:
    compute-sanitizer --tool memcheck python scripts/sanitize_distill_ce.py
    compute-sanitizer --tool racecheck python scripts/sanitize_distill_ce.py
"""
import torch

import udi_kernels

SHAPES = [(7, 5, 333, 2, 11), (3, 2, 1, 3, 4), (5, 3, 257, 1, 0), (2, 4, 1031, 2, 6)]  # Rs, Rt, K, n_c, P


def run(Rs, Rt, K, n_c, P, dtype):
    cuda = dict(device="cuda")
    student = torch.randn(Rs, K, dtype=dtype, **cuda).requires_grad_(True)
    teacher = torch.randn(Rt, K, dtype=dtype, **cuda)
    weight = torch.rand(P, **cuda)
    weight[::3] = 0  # weight-0 pairs take the skip path
    out = udi_kernels.distill_cross_entropy(
        student, teacher, torch.randn(n_c, K, **cuda), torch.randint(0, n_c, (Rt,), **cuda),
        torch.randint(0, Rs, (P,), **cuda), torch.randint(0, Rt, (P,), **cuda), weight, torch.rand(Rt, **cuda),
        0.1, 0.04, backend="native")
    out.loss.backward()
    torch.cuda.synchronize()
    return bool(torch.isfinite(out.loss)) and bool(torch.isfinite(student.grad).all())


def main():
    results = [run(*shape, dtype) for shape in SHAPES for dtype in (torch.float32, torch.float16, torch.bfloat16)]
    if not all(results):
        raise SystemExit("sanitize_distill_ce: non-finite output")
    print(f"sanitize_distill_ce: {len(results)} forward+backward runs ok")


if __name__ == "__main__":
    main()
