"""Benchmark: the fused DINO and UDI losses vs eager implementations written the reference's way (issue 4 §4).

    python -m benchmarks.distill_cross_entropy [--quick] [--out DIR | --record] [--backend native|triton]

GPU: DINO (2 + 10 crops, B=128, K=65536, fp16) and UDI at UDI_SPEC §7 shapes, on the teacher's logits and on
targets formed in the bottleneck (udi_case); median of CUDA-event times
(forward: do_bench, L2 flushed; fwd+bwd: back to back); fwd and fwd+bwd ms, peak extra memory, GB/s against
the §8 floor and the floor's time at the measured copy ceiling. Without a GPU: small CPU shapes (DINO also at
K = 65536), fp32. Eager and fused, and the op's backends, are timed in turn over common.ROUNDS rounds (medians).
"""
import os as _os
import sys as _sys

if not __package__:  # `python benchmarks/x.py`: the repository root on the path, as `python -m benchmarks.x` has it
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import functools

import torch
import torch.nn.functional as F

from benchmarks import common
from udi_kernels import distill_cross_entropy
from udi_kernels.backends import BACKENDS, why_unavailable
from udi_kernels.losses import DINOLoss, UDILoss, cls_plus_targets
from udi_kernels.testing.losses import random_udi_inputs, udi_loss_eager


def eager_dino(student, teacher, center, ncrops, tau_t, tau_s=0.1):
    """DINO's code path: fp32 softmax, chunks, one CE per (teacher view, student view)."""
    s = (student.float() / tau_s).chunk(ncrops)
    t = F.softmax((teacher.float() - center) / tau_t, dim=-1).detach().chunk(2)
    terms = [torch.sum(-t[iq] * F.log_softmax(s[v], dim=-1), dim=-1).mean()
             for iq in range(2) for v in range(ncrops) if v != iq]
    return sum(terms) / len(terms)


# ---- cases ---------------------------------------------------------------------------------------------------------

def fwd_and_fwd_bwd(losses, leaves, device, quick):
    """{impl: loss closure} -> {impl: dict(fwd=..., fwd_bwd=...)}, the impls interleaved (common.interleaved)."""
    def forward(loss_of):
        def step():
            with torch.no_grad():
                loss_of()
        return step

    def forward_backward(loss_of):
        def step():
            for leaf in leaves:
                leaf.grad = None
            loss_of().backward()
        return step

    fwd = common.interleaved({impl: forward(f) for impl, f in losses.items()}, device, quick)
    fwd_bwd = common.interleaved({impl: forward_backward(f) for impl, f in losses.items()}, device, quick,
                                 flush_l2=False)
    return {impl: dict(fwd=fwd[impl], fwd_bwd=fwd_bwd[impl]) for impl in losses}


def dino_case(B, K, ncrops, dtype, device, backend, quick):
    student = torch.randn(ncrops * B, K, device=device, dtype=dtype).requires_grad_(True)
    teacher = torch.randn(2 * B, K, device=device, dtype=dtype)
    fused = DINOLoss(K, ncrops, 0.04, 0.07, 30, 100, backend=backend).to(device)
    center = torch.randn(1, K, device=device)
    size = torch.finfo(dtype).bits // 8
    floor = (2 * student.numel() + student.numel() + teacher.numel()) * size
    return {"case": f"DINO {ncrops} crops B={B} K={K}", "floor_bytes": floor, "grad_bytes": student.numel() * size,
            **fwd_and_fwd_bwd({"eager": lambda: eager_dino(student, teacher, center, ncrops, 0.04),
                               "fused": lambda: fused(student, teacher, 0)}, [student], device, quick)}


def udi_case(B, L, K, Sg, Sl, dtype, device, backend, quick, bottleneck_targets=False):
    """UDILoss on the teacher's logits (UDITeacher, 4.3 GB at UDI_SPEC §7 shapes, as the reference feeds its loss)
    or, with bottleneck_targets, on UDITargets as udi.model forms them in the bottleneck (UDI_SPEC §6: the cls+
    rows arrive blended, the local-sample logits never exist). The eager baseline always starts from the logits."""
    student, teacher = random_udi_inputs(B, L, K, Sg, Sl, dtype=dtype, device=device, seed=None, valid_fraction=0.8)
    fused = UDILoss(K, 2 + L, backend=backend).to(device)
    centers = [torch.randn(1, K, device=device) for _ in range(3)]
    size = torch.finfo(dtype).bits // 8
    student_elems = sum(t.numel() for t in student)
    if bottleneck_targets:
        targets = cls_plus_targets(teacher)
        teacher_rows = (targets.cls, targets.patch, targets.cls_plus)
    else:
        targets, teacher_rows = teacher, (teacher.cls, teacher.patch, teacher.local)
    floor = 3 * student_elems * size + sum(t.numel() * t.element_size() for t in teacher_rows)
    name = f"UDI B={B} L={L} K={K}" + (" bottleneck targets" if bottleneck_targets else "")
    return {"case": name, "floor_bytes": floor, "grad_bytes": student_elems * size,
            **fwd_and_fwd_bwd({"eager": lambda: udi_loss_eager(student, teacher, centers, 0.04, dtype=torch.float32)[0],
                               "fused": lambda: fused(student, targets, 0)[0]}, list(student), device, quick)}


def op_backends(B, K, ncrops, dtype, device, quick):
    """{backend: fwd+bwd ms} of the op alone on the DINO pairs (every student crop against both teacher globals
    but its own), for each backend `auto` may take on this device (Triton on the CPU is the interpreter)."""
    student = torch.randn(ncrops * B, K, device=device, dtype=dtype).requires_grad_(True)
    teacher, centers = torch.randn(2 * B, K, device=device, dtype=dtype), torch.randn(1, K, device=device)
    crop, target, image = torch.meshgrid(torch.arange(ncrops), torch.arange(2), torch.arange(B), indexing="ij")
    other = crop != target
    pair_student, pair_teacher = (crop * B + image)[other].to(device), (target * B + image)[other].to(device)
    args = (teacher, centers, torch.zeros(2 * B, dtype=torch.int64, device=device), pair_student, pair_teacher,
            torch.ones(pair_student.shape, device=device), torch.ones(2 * B, device=device), 0.1, 0.04)
    steps = {}
    for backend in ("reference", "native") + (("triton",) if device.type == "cuda" else ()):
        if why_unavailable(backend, "distill_cross_entropy", device) is None:
            steps[backend] = functools.partial(_fwd_bwd, student, args, backend)
    return {b: r["ms"] for b, r in common.interleaved(steps, device, quick, flush_l2=False).items()}


def _fwd_bwd(student, args, backend):
    student.grad = None
    distill_cross_entropy(student, *args, backend=backend, check_values=False).loss.backward()


def summarize(result, copy_gb_per_s):
    for impl in ("eager", "fused"):
        r = result[impl]
        r["fwd_bwd_GBps_vs_floor"] = result["floor_bytes"] / (r["fwd_bwd"]["ms"] * 1e-3) / 1e9
    result["speedup_fwd"] = result["eager"]["fwd"]["ms"] / result["fused"]["fwd"]["ms"]
    result["speedup_fwd_bwd"] = result["eager"]["fwd_bwd"]["ms"] / result["fused"]["fwd_bwd"]["ms"]
    result["floor_ms_at_copy_ceiling"] = result["floor_bytes"] / copy_gb_per_s / 1e6
    for impl in ("eager", "fused"):
        result[impl]["fwd_bwd_pct_of_copy"] = 100 * result[impl]["fwd_bwd_GBps_vs_floor"] / copy_gb_per_s
    return result


def table_rows(results):
    return [dict(case=r["case"], impl=impl, fwd_ms=r[impl]["fwd"]["ms"], fwd_bwd_ms=r[impl]["fwd_bwd"]["ms"],
                 speedup_fwd=r["speedup_fwd"] if impl == "fused" else None,
                 speedup_fwd_bwd=r["speedup_fwd_bwd"] if impl == "fused" else None,
                 gbps=r[impl]["fwd_bwd_GBps_vs_floor"], pct_copy=r[impl]["fwd_bwd_pct_of_copy"],
                 floor_ms=r["floor_ms_at_copy_ceiling"],
                 peak_mib=common.mib(r[impl]["fwd_bwd"]["peak_extra_bytes"]))
            for r in results for impl in ("eager", "fused")]


def main():
    args = common.parse_args(__doc__.splitlines()[0],
                             **{"--backend": dict(default=None, choices=BACKENDS, help="fused loss backend (default: auto)")})
    device = common.pick_device()
    torch.manual_seed(0)
    if device.type == "cuda":
        dtype, dino_shapes, udi_shape = torch.float16, [(128, 65536, 12)], (128, 10, 65536, 16, 9)
    else:
        dtype, dino_shapes, udi_shape = torch.float32, [(8, 2048, 12), (2, 65536, 12)], (4, 3, 2048, 16, 9)
    copy_gb_per_s = common.copy_gb_per_s(device, args.quick)
    cases = [functools.partial(dino_case, *shape, dtype, device, args.backend, args.quick) for shape in dino_shapes]
    cases += [functools.partial(udi_case, *udi_shape, dtype, device, args.backend, args.quick, bottleneck_targets=b)
              for b in (False, True)]
    results = [summarize(case(), copy_gb_per_s) for case in cases]
    op_ms = op_backends(*dino_shapes[0], dtype, device, args.quick)
    payload = dict(dtype=str(dtype), quick=args.quick, backend=args.backend or "auto", copy_gb_per_s=copy_gb_per_s,
                   rounds=common.ROUNDS, results=results, op_fwd_bwd_ms=op_ms,
                   fastest=common.fastest_backends({"any": op_ms}))
    chart = ("eager vs fused loss", [r["case"] for r in results],
             {impl: [r[impl]["fwd_bwd"]["ms"] for r in results] for impl in ("eager", "fused")}, "fwd+bwd ms (median)")
    common.finish(args.out, "distill_cross_entropy", device, payload, chart, table_rows(results),
                  [("case", "case", "{}"), ("impl", "impl", "{}"), ("fwd_ms", "fwd ms", "{:.3f}"),
                   ("fwd_bwd_ms", "fwd+bwd ms", "{:.3f}"), ("speedup_fwd", "speedup fwd", "{:.1f}x"),
                   ("speedup_fwd_bwd", "fwd+bwd", "{:.1f}x"), ("gbps", "GB/s vs floor", "{:.1f}"),
                   ("pct_copy", "% copy", "{:.0f}%"), ("floor_ms", "floor ms", "{:.3f}"),
                   ("peak_mib", "peak MiB", "{:.0f}")],
                  caption=f"{dtype}, backend {args.backend or 'auto'}, copy ceiling {copy_gb_per_s:.1f} GB/s, "
                          f"medians of {common.ROUNDS} interleaved rounds")


if __name__ == "__main__":
    main()
