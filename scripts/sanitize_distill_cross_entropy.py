"""Runs every CUDA kernel of distill_cross_entropy (forward and backward) on small odd shapes, for compute-sanitizer:
    compute-sanitizer --tool memcheck python scripts/sanitize_distill_cross_entropy.py
    compute-sanitizer --tool racecheck python scripts/sanitize_distill_cross_entropy.py
Shapes cover one and several K chunks of 4096 (the last one partial), 16-byte and scalar loads (K % 8, and a
student pointer off 16-byte alignment), rows without pairs and weight-0 pairs and rows; every shape also runs once
with check_values=False and pair_student, pair_teacher and center_id out of range (1e9, -1e12, their size, -1),
which the kernels must skip without reading out of bounds.
"""
import torch

import udi_kernels

SHAPES = [(7, 5, 333, 2, 11), (3, 2, 1, 3, 4), (5, 3, 257, 1, 0), (2, 4, 1031, 2, 6), (4, 3, 8200, 2, 5),
          (3, 2, 8197, 1, 7)]  # Rs, Rt, K, n_c, P
ALIGNED_K_SHAPE = SHAPES[4]


def misaligned(rows, K, dtype):
    """A contiguous [rows, K] tensor whose data pointer is one element past a 16-byte boundary."""
    return torch.randn(rows * K + 1, dtype=dtype, device="cuda")[1:].view(rows, K)


def with_bad_indices(indices, size):
    """1e9, -1e12, size and -1 over the first entries."""
    bad = torch.tensor([10**9, -10**12, size, -1], device="cuda")
    indices[:4] = bad[:indices.shape[0]]
    return indices


def run(Rs, Rt, K, n_c, P, dtype, offset_student, bad_indices=False):
    cuda = dict(device="cuda")
    student = misaligned(Rs, K, dtype) if offset_student else torch.randn(Rs, K, dtype=dtype, **cuda)
    student.requires_grad_(True)
    teacher = torch.randn(Rt, K, dtype=dtype, **cuda)
    weight, row_weight = torch.rand(P, **cuda), torch.rand(Rt, **cuda)
    weight[::3] = 0  # weight-0 pairs take the skip path
    row_weight[::2] = 0
    center_id, pairs = torch.randint(0, n_c, (Rt,), **cuda), (torch.randint(0, Rs, (P,), **cuda),
                                                              torch.randint(0, Rt, (P,), **cuda))
    if bad_indices:
        center_id, pairs = with_bad_indices(center_id, n_c), (with_bad_indices(pairs[0], Rs).roll(2),
                                                              with_bad_indices(pairs[1], Rt))
    out = udi_kernels.distill_cross_entropy(
        student, teacher, torch.randn(n_c, K, **cuda), center_id, *pairs, weight, row_weight, 0.1, 0.04,
        backend="native", check_values=not bad_indices)
    out.loss.backward()
    torch.cuda.synchronize()
    return bool(torch.isfinite(out.loss)) and bool(torch.isfinite(student.grad).all())


def main():
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    runs = [(shape, dtype, False) for shape in SHAPES for dtype in dtypes]
    runs += [(ALIGNED_K_SHAPE, dtype, True) for dtype in dtypes]  # K % 8 == 0 but the student is misaligned
    results = [run(*shape, dtype, offset) for shape, dtype, offset in runs]
    results += [run(*shape, torch.float16, False, bad_indices=True) for shape in SHAPES]
    if not all(results):
        raise SystemExit("sanitize_distill_cross_entropy: non-finite output")
    print(f"sanitize_distill_cross_entropy: {len(results)} forward+backward runs ok")


if __name__ == "__main__":
    main()
