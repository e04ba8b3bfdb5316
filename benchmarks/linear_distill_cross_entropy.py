"""Benchmark: linear_distill_cross_entropy (the last layer fused into the loss) vs composed and eager, issue 19 §6.

    python benchmarks/linear_distill_cross_entropy.py [--quick] [--batch B] [--out DIR | --record]
    python -m benchmarks.linear_distill_cross_entropy ...

Cases (UDI_SPEC §7, K = 65536, D = 256), one call each: DINO (2 + 10 crops, every student crop against both
teacher globals but its own, 1 center) and UDI (student cls, cls+ and patch rows; teacher cls rows, cls+ targets
formed in the bottleneck and patch rows; 3 centers; 80 % of the samples valid). Student rows and the weight's
rows have norm 1 (the L2-normalised bottleneck, norm_last_layer). GPU: B = 128, bf16; CPU: B = --batch (default
8; the working-memory goal needs B >= 16 at the DINO shape, see benchmarks/NOTES.md), fp32. Implementations,
forward + backward of one call (gradients of the student rows and the weight):
  fused     linear_distill_cross_entropy(student, weight, teacher, teacher_weight, ...)
  composed  distill_cross_entropy(student @ weight.T, teacher @ teacher_weight.T, ...)
  eager     the same matmuls, then log_softmax / softmax cross-entropy and center sums in PyTorch
Time: the implementations in turn, common.ROUNDS rounds, the median per implementation (common.interleaved).
Memory, of a warm call: peak beyond the inputs (GPU torch.cuda.max_memory_allocated; CPU the peak RSS of a fresh
process per (case, implementation)), and the working memory: that peak less what stays after the call (the
gradients of student and weight, [Rs, D] and [K, D], which every implementation returns) — the issue's ≤ 1/8 goal
compares the working memory. GEMM FLOPs per implementation as in benchmarks/NOTES.md.
"""
import argparse
import json
import os
import sys
from typing import NamedTuple, Optional

import torch

if __package__ in (None, ""):  # run as a file: the repository root on the path, as with -m
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from udi.flags import int_in  # noqa: E402
from udi_kernels import distill_cross_entropy, linear_distill_cross_entropy  # noqa: E402

K, D, TAU_S, TAU_T = 65536, 256, 0.1, 0.04
L, SG = 10, 16  # local crops, global samples per crop (UDI_SPEC §7)
IMPLS = ("fused", "composed", "eager")


class Case(NamedTuple):
    name: str
    student: torch.Tensor
    weight: torch.Tensor
    teacher: torch.Tensor
    teacher_weight: torch.Tensor
    centers: torch.Tensor
    center_id: torch.Tensor
    pair_student: torch.Tensor
    pair_teacher: torch.Tensor
    pair_weight: torch.Tensor
    row_weight: torch.Tensor


def _unit_rows(rows, cols, dtype, device, grad=False):
    x = torch.nn.functional.normalize(torch.randn(rows, cols, device=device), dim=-1).to(dtype)
    return x.requires_grad_(grad)


def _crop_pairs(B, first_student, first_teacher):
    """DINO's pairs: student crop c (of 2 + L) against teacher global v (of 2), c != v; rows crop-major."""
    crop, target, image = torch.meshgrid(torch.arange(2 + L), torch.arange(2), torch.arange(B), indexing="ij")
    other = crop != target
    return first_student + (crop * B + image)[other], first_teacher + (target * B + image)[other]


def make_case(name, B, dtype, device) -> Case:
    ones = lambda n: torch.ones(n, device=device)  # noqa: E731
    if name == "DINO":
        ps, pt = _crop_pairs(B, 0, 0)
        Rs, Rt, center_id = (2 + L) * B, 2 * B, torch.zeros(2 * B, dtype=torch.int64)
        pair_weight, row_weight = ones(ps.shape[0]) / ps.shape[0], ones(Rt)
    else:  # UDI: cls, cls+ and patch levels in one call
        cls_s, cls_t = _crop_pairs(B, 0, 0)
        plus_s = (2 + L) * B + cls_s - cls_s.min()
        plus_t = 2 * B + torch.arange(cls_s.shape[0])  # one blended target row per crop pair
        patches = 2 * B * SG
        patch_s = 2 * (2 + L) * B + torch.arange(patches)
        patch_t = 2 * B + cls_s.shape[0] + torch.arange(patches)
        ps, pt = torch.cat([cls_s, plus_s, patch_s]), torch.cat([cls_t, plus_t, patch_t])
        Rs, Rt = 2 * (2 + L) * B + patches, 2 * B + cls_s.shape[0] + patches
        center_id = torch.cat([torch.zeros(2 * B), torch.ones(cls_s.shape[0]), torch.full((patches,), 2)]).long()
        valid = (torch.rand(patches) < 0.8).float().to(device)
        pair_weight = torch.cat([ones(2 * cls_s.shape[0]) / cls_s.shape[0], valid / valid.sum()])
        row_weight = torch.cat([ones(Rt - patches), valid])
    n_c = int(center_id.max()) + 1
    return Case(f"{name} B={B} K={K}", _unit_rows(Rs, D, dtype, device, True), _unit_rows(K, D, dtype, device, True),
                _unit_rows(Rt, D, dtype, device), _unit_rows(K, D, dtype, device),
                torch.randn(n_c, K, device=device) * 0.1, center_id.to(device), ps.to(device), pt.to(device),
                pair_weight, row_weight)


def gemm_flops(case: Case) -> dict:
    rs, rt = (case.student.shape[0] * D * K, case.teacher.shape[0] * D * K)
    return {"fused": 2 * (4 * rs + 3 * rt), "composed": 2 * (3 * rs + rt), "eager": 2 * (3 * rs + rt)}


def _pairs(case: Case):
    return (case.centers, case.center_id, case.pair_student, case.pair_teacher, case.pair_weight, case.row_weight,
            TAU_S, TAU_T)


def fused(case: Case, backend: Optional[str]):
    return linear_distill_cross_entropy(case.student, case.weight, case.teacher, case.teacher_weight, *_pairs(case),
                                        backend=backend, check_values=False).loss


def composed(case: Case, backend: Optional[str]):
    teacher = case.teacher @ case.teacher_weight.T
    return distill_cross_entropy(case.student @ case.weight.T, teacher, *_pairs(case), backend=backend,
                                 check_values=False).loss


def eager(case: Case, backend: Optional[str] = None):
    """matmul + softmax cross-entropy in PyTorch, fp32 softmax, as the DINO code computes it."""
    log_q = torch.log_softmax((case.student @ case.weight.T).float() / TAU_S, -1)
    with torch.no_grad():
        teacher = (case.teacher @ case.teacher_weight.T).float()
        p_t = torch.softmax((teacher - case.centers[case.center_id]) / TAU_T, -1)
        torch.zeros_like(case.centers).index_add_(0, case.center_id, teacher * case.row_weight[:, None])
    return -(case.pair_weight[:, None] * p_t[case.pair_teacher] * log_q[case.pair_student]).sum()


def step_of(case: Case, impl: str, backend: Optional[str]):
    loss_of = {"fused": fused, "composed": composed, "eager": eager}[impl]

    def step():
        case.student.grad = case.weight.grad = None
        loss_of(case, backend).backward()
    return step


# ---- CPU memory: a fresh process per (case, implementation) ------------------------------------------------------

def measure_rss_here(case_name, impl, B, backend):
    """Peak RSS of one forward + backward beyond the RSS before it, after one warm-up call (thread pools, BLAS
    buffers), in this process (bytes); printed as JSON."""
    case = make_case(case_name, B, torch.float32, torch.device("cpu"))
    step = step_of(case, impl, backend)
    step()
    case.student.grad = case.weight.grad = None
    print(json.dumps(common.rss_of_call(step)))  # working: less the inputs and the gradients left after it


def rss_in_fresh_process(case_name, impl, B, backend):
    return common.fresh_process_json("benchmarks.linear_distill_cross_entropy", [
        "--rss-of", case_name, impl, "--batch", str(B)] + (["--backend", backend] if backend else []))


# ---- the run -------------------------------------------------------------------------------------------------------

def run_case(case_name, B, dtype, device, backend, quick):
    case = make_case(case_name, B, dtype, device)
    steps = {impl: step_of(case, impl, backend) for impl in IMPLS}
    # the implementations in turn, common.ROUNDS rounds: a load that drifts (a shared CPU) weighs on all alike
    timed = common.interleaved(steps, device, quick, flush_l2=False, rounds=rounds(device, quick))
    grad_bytes = sum(t.numel() * t.element_size() for t in (case.student, case.weight))
    flops = gemm_flops(case)
    result = {"case": case.name, "rows_student": case.student.shape[0], "rows_teacher": case.teacher.shape[0],
              "pairs": case.pair_student.shape[0], "grad_bytes": grad_bytes}
    for impl in IMPLS:
        ms = timed[impl]["ms"]
        if device.type == "cuda":  # the gradients of student and weight stay allocated after the call
            peak = timed[impl]["peak_extra_bytes"]
            memory = {"peak_extra_bytes": peak, "working_bytes": peak - grad_bytes}
        else:
            memory = rss_in_fresh_process(case_name, impl, B, backend)
        result[impl] = {"fwd_bwd_ms": ms, **memory, "gemm_gflop": flops[impl] / 1e9,
                        "gemm_tflops": flops[impl] / (ms * 1e-3) / 1e12}
    result["fused_time_vs_composed"] = result["fused"]["fwd_bwd_ms"] / result["composed"]["fwd_bwd_ms"]
    result["fused_working_vs_composed"] = result["fused"]["working_bytes"] / max(result["composed"]["working_bytes"], 1)
    return result


def rounds(device, quick):
    """common.ROUNDS; one with --quick on the CPU (a call takes seconds there)."""
    return 1 if quick and device.type == "cpu" else common.ROUNDS


def table_rows(results):
    return [dict(case=r["case"], impl=impl, ms=r[impl]["fwd_bwd_ms"], mib=common.mib(r[impl]["peak_extra_bytes"]),
                 working=common.mib(r[impl]["working_bytes"]), tflops=r[impl]["gemm_tflops"],
                 time_ratio=r["fused_time_vs_composed"] if impl == "fused" else None,
                 memory_ratio=r["fused_working_vs_composed"] if impl == "fused" else None)
            for r in results for impl in IMPLS]


def main():
    args = common.parse_args(__doc__.splitlines()[0], **{
        "--batch": dict(type=int_in(1, 2 ** 16), default=None, help="B (default: 128 on the GPU, 8 on the CPU)"),
        "--backend": common.backend_flag("backend of the fused and composed ops"),
        "--rss-of": dict(nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)})
    if args.rss_of:  # the child process of rss_in_fresh_process
        return measure_rss_here(*args.rss_of, args.batch, args.backend)
    device = common.pick_device()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B = args.batch or (128 if device.type == "cuda" else 8)
    results = [run_case(name, B, dtype, device, args.backend, args.quick) for name in ("DINO", "UDI")]
    payload = dict(dtype=str(dtype), batch=B, K=K, D=D, quick=args.quick, backend=args.backend or "auto",
                   rounds=rounds(device, args.quick), results=results)
    chart = ("fused vs composed vs eager, fwd+bwd", [r["case"] for r in results],
             {impl: [r[impl]["fwd_bwd_ms"] for r in results] for impl in IMPLS}, "fwd+bwd ms (median)")
    common.finish(args.out, "linear_distill_cross_entropy", device, payload, chart, table_rows(results),
                  [("case", "case", "{}"), ("impl", "impl", "{}"), ("ms", "fwd+bwd ms", "{:.2f}"),
                   ("mib", "peak extra MiB", "{:.1f}"), ("working", "working MiB", "{:.1f}"),
                   ("tflops", "GEMM TFLOP/s", "{:.3f}"), ("time_ratio", "time vs composed", "{:.2f}x"),
                   ("memory_ratio", "working vs composed", "{:.3f}x")],
                  caption=f"{dtype}, B={B}, backend {args.backend or 'auto'}"
                  + (", CPU memory: peak RSS of a fresh process" if device.type == "cpu" else ""))


if __name__ == "__main__":
    main()
