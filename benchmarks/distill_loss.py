"""Benchmark: the fused DINO and UDI losses vs eager implementations written the reference's way (issue 4 §4).

  python benchmarks/distill_loss.py [--quick] [--out benchmarks/results/] [--backend native|triton]
GPU: DINO (2 + 10 crops, B=128, K=65536, fp16) and UDI at UDI_SPEC §7 shapes; median of triton.testing.do_bench;
fwd and fwd+bwd ms, peak extra memory, GB/s against the §8 floor. Without a GPU: small CPU shapes only.
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from udi_kernels.losses import DINOLoss, UDILoss, UDIStudent, UDITeacher


def eager_dino(student, teacher, center, ncrops, tau_t, tau_s=0.1):
    """DINO's code path: fp32 softmax, chunks, one CE per (teacher view, student view)."""
    s = (student.float() / tau_s).chunk(ncrops)
    t = F.softmax((teacher.float() - center) / tau_t, dim=-1).detach().chunk(2)
    terms = [torch.sum(-t[iq] * F.log_softmax(s[v], dim=-1), dim=-1).mean()
             for iq in range(2) for v in range(ncrops) if v != iq]
    return sum(terms) / len(terms)


def eager_udi(student: UDIStudent, teacher: UDITeacher, centers, L, tau_t, alpha=0.5, tau_s=0.1):
    """UDI_SPEC §5 the reference's way: fp32 copies, materialised targets and probabilities, loops over crops."""
    B, K = teacher.cls.shape[0] // 2, teacher.cls.shape[1]
    c_cls, c_plus, c_patch = centers
    t_cls = teacher.cls.float().chunk(2)

    def ce(t_logits, s_logits, center):
        return torch.sum(-F.softmax((t_logits - center) / tau_t, -1) * F.log_softmax(s_logits.float() / tau_s, -1), -1)

    def blend(samples, mask, cls):
        mask = mask.float()[..., None]
        return alpha * (samples.float() * mask).sum(-2) / (mask.sum(-2) + 1e-5) + (1 - alpha) * cls

    def levels(s_rows, target, center):
        g = sum(ce(target(v, None), s_rows[v], center).mean() for v in range(2)) / 2
        loc = sum(ce(target(l, g_), s_rows[2 + l], center).mean() for l in range(L) for g_ in range(2)) / (2 * L)
        return (2 * g + 2 * L * loc) / (2 + 2 * L)

    patch = teacher.patch.chunk(2)
    mask = teacher.patch_mask.chunk(2)
    local = teacher.local.reshape(L, 2, B, -1, K)
    local_mask = teacher.local_mask.reshape(L, 2, B, -1)
    plus_global = [blend(patch[v], mask[v], t_cls[1 - v]) for v in range(2)]
    plus_local = [[blend(local[l, g], local_mask[l, g], t_cls[g]) for g in range(2)] for l in range(L)]
    loss_cls = levels(student.cls.chunk(2 + L), lambda c, g: t_cls[1 - c] if g is None else t_cls[g], c_cls)
    loss_plus = levels(student.cls_plus.chunk(2 + L), lambda c, g: plus_global[c] if g is None else plus_local[c][g],
                       c_plus)
    m = teacher.patch_mask.float()
    loss_patch = (ce(teacher.patch.float(), student.patch, c_patch) * m).sum() / m.sum().clamp(min=1)
    return (loss_cls + loss_plus + loss_patch) / 3


# ---- timing --------------------------------------------------------------------------------------------------------

def gpu_measure(fn, quick):
    import triton.testing
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 200, return_mode="median")
    return ms, peak


def cpu_measure(fn, quick):
    fn()
    times = []
    for _ in range(3 if quick else 7):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2], None


def fwd_and_fwd_bwd(loss_of, leaves, measure, quick):
    def forward():
        with torch.no_grad():
            loss_of()

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        loss_of().backward()

    fwd_ms, fwd_peak = measure(forward, quick)
    fb_ms, fb_peak = measure(forward_backward, quick)
    return dict(fwd_ms=fwd_ms, fwd_bwd_ms=fb_ms, fwd_peak_bytes=fwd_peak, fwd_bwd_peak_bytes=fb_peak)


# ---- cases ---------------------------------------------------------------------------------------------------------

def dino_case(B, K, ncrops, dtype, device, backend, measure, quick):
    student = torch.randn(ncrops * B, K, device=device, dtype=dtype).requires_grad_(True)
    teacher = torch.randn(2 * B, K, device=device, dtype=dtype)
    fused = DINOLoss(K, ncrops, 0.04, 0.07, 30, 100, backend=backend).to(device)
    center = torch.randn(1, K, device=device)
    size = torch.finfo(dtype).bits // 8
    floor = (2 * student.numel() + student.numel() + teacher.numel()) * size
    return {"case": f"DINO {ncrops} crops B={B} K={K}", "floor_bytes": floor, "grad_bytes": student.numel() * size,
            "eager": fwd_and_fwd_bwd(lambda: eager_dino(student, teacher, center, ncrops, 0.04), [student],
                                     measure, quick),
            "fused": fwd_and_fwd_bwd(lambda: fused(student, teacher, 0), [student], measure, quick)}


def udi_case(B, L, K, Sg, Sl, dtype, device, backend, measure, quick):
    new = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)
    student = UDIStudent(new((2 + L) * B, K).requires_grad_(), new((2 + L) * B, K).requires_grad_(),
                         new(2 * B, Sg, K).requires_grad_())
    teacher = UDITeacher(new(2 * B, K), new(2 * B, Sg, K), torch.rand(2 * B, Sg, device=device) < 0.8,
                         new(2 * L * B, Sl, K), torch.rand(2 * L * B, Sl, device=device) < 0.8)
    fused = UDILoss(K, 2 + L, backend=backend).to(device)
    centers = [torch.randn(1, K, device=device) for _ in range(3)]
    size = torch.finfo(dtype).bits // 8
    student_elems = sum(t.numel() for t in student)
    floor = 3 * student_elems * size + sum(t.numel() * size for t in (teacher.cls, teacher.patch, teacher.local))
    return {"case": f"UDI B={B} L={L} K={K}", "floor_bytes": floor, "grad_bytes": student_elems * size,
            "eager": fwd_and_fwd_bwd(lambda: eager_udi(student, teacher, centers, L, 0.04), list(student),
                                     measure, quick),
            "fused": fwd_and_fwd_bwd(lambda: fused(student, teacher, 0)[0], list(student), measure, quick)}


def summarize(result, gpu):
    for impl in ("eager", "fused"):
        r = result[impl]
        r["fwd_bwd_GBps_vs_floor"] = result["floor_bytes"] / (r["fwd_bwd_ms"] * 1e-3) / 1e9
    result["speedup_fwd"] = result["eager"]["fwd_ms"] / result["fused"]["fwd_ms"]
    result["speedup_fwd_bwd"] = result["eager"]["fwd_bwd_ms"] / result["fused"]["fwd_bwd_ms"]
    if gpu:
        result["floor_ms_at_copy_ceiling"] = result["floor_bytes"] / 4.18e12 * 1e3  # UDI_SPEC §7 H200 copy rate
    return result


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [r["case"] for r in results]
    x = range(len(results))
    for offset, impl in ((-0.2, "eager"), (0.2, "fused")):
        ax.bar([i + offset for i in x], [r[impl]["fwd_bwd_ms"] for r in results], width=0.4, label=impl)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("fwd+bwd ms (median)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/")
    parser.add_argument("--backend", default=None, help="fused loss backend (default: auto)")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    torch.manual_seed(0)
    if gpu:
        device, dtype, measure = "cuda", torch.float16, gpu_measure
        shapes = dict(dino=(128, 65536, 12), udi=(128, 10, 65536, 16, 9))
    else:
        print("No GPU: small CPU shapes only; the GPU numbers need a GPU.")
        device, dtype, measure = "cpu", torch.float32, cpu_measure
        shapes = dict(dino=(8, 2048, 12), udi=(4, 3, 2048, 16, 9))
    results = [summarize(dino_case(*shapes["dino"], dtype, device, args.backend, measure, args.quick), gpu),
               summarize(udi_case(*shapes["udi"], dtype, device, args.backend, measure, args.quick), gpu)]
    os.makedirs(args.out, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name() if gpu else "cpu", dtype=str(dtype), quick=args.quick,
                backend=args.backend or "auto", torch=torch.__version__)
    with open(os.path.join(args.out, "distill_loss.json"), "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=2)
    plot(results, os.path.join(args.out, "distill_loss.png"))
    print(f"{'case':34s} {'impl':6s} {'fwd ms':>8s} {'fwd+bwd ms':>11s} {'peak MiB':>9s} {'GB/s':>7s}")
    for r in results:
        for impl in ("eager", "fused"):
            m = r[impl]
            peak = "-" if m["fwd_bwd_peak_bytes"] is None else f"{m['fwd_bwd_peak_bytes'] / 2**20:.0f}"
            print(f"{r['case']:34s} {impl:6s} {m['fwd_ms']:8.3f} {m['fwd_bwd_ms']:11.3f} {peak:>9s} "
                  f"{m['fwd_bwd_GBps_vs_floor']:7.0f}")
        print(f"{'':34s} speedup fwd {r['speedup_fwd']:.1f}x, fwd+bwd {r['speedup_fwd_bwd']:.1f}x")


if __name__ == "__main__":
    main()
