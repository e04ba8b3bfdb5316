"""Benchmark of SRS attention (issue 3 §4): the UDI head attention at the four UDI_SPEC §7 shapes.

Module level (what §7 measured): eager dense-map module (the reference's way), gather + SDPA, and
SRSAttention on the Triton and CUDA kernels, fp16 autocast. Op level: the attention core alone in fp16
against the bytes floor of §8 (k, v once + the tapped q rows + the output) over the measured copy ceiling.
Writes JSON and a PNG into --out and prints a table last. Without a GPU: a small CPU run.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, when not installed
from udi_kernels import srs_attention
from udi_kernels.backends import why_unavailable
from udi_kernels.nn import SRSAttention, tap_rows

C, HEADS, L = 384, 6, 10
# name: (crops per image, tokens N, samples S, taps T, backward?)
CASES = {"student_global_fwd_bwd": (2, 196, 16, 1, True), "student_local_fwd_bwd": (L, 36, 9, 1, True),
         "teacher_global_fwd": (2, 196, 16, 4, False), "teacher_local_targets_fwd": (2, 196, L * 9, 4, False)}


class DenseMapAttention(torch.nn.Module):
    """The reference's way: q, k, v for every token, dense [S, N] maps multiplied in, probabilities in memory."""

    def __init__(self, module):
        super().__init__()
        self.m = module

    def forward(self, x, dense):
        attn, (B, N, _) = self.m.attn, x.shape
        h = self.m.norm1(x)
        q, k, v = attn.qkv(h).reshape(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
        q_s = torch.einsum("bsn,bhnd->bhsd", dense.to(q.dtype), q)
        p = torch.softmax(q_s @ k.transpose(-1, -2) * (C // HEADS) ** -0.5, dim=-1)
        o = (p @ v).transpose(1, 2).reshape(B, -1, C)
        return attn.norm(attn.proj(o) + dense.to(h.dtype) @ h)


class GatherSDPA(torch.nn.Module):
    """Full q projection, taps gathered in PyTorch, then F.scaled_dot_product_attention."""

    def __init__(self, module):
        super().__init__()
        self.m = module

    def forward(self, x, index, weight):
        attn, (B, N, _) = self.m.attn, x.shape
        h = self.m.norm1(x)
        qkv = attn.qkv(h)
        tapped_q = tap_rows(qkv[..., :C], index, weight).reshape(B, -1, HEADS, C // HEADS).transpose(1, 2)
        k, v = qkv[..., C:].reshape(B, N, 2, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(tapped_q.to(k.dtype), k, v).transpose(1, 2).reshape(B, -1, C)
        return attn.norm(attn.proj(o) + tap_rows(h, index, weight))


def make_inputs(crops, N, S, T, device):
    x = torch.randn(crops, N, C, device=device)
    index = torch.randint(0, N, (crops, S, T), device=device, dtype=torch.int32)
    weight = torch.rand(crops, S, T, device=device)
    weight = weight / weight.sum(-1, keepdim=True)
    dense = torch.zeros(crops, S, N, device=device).scatter_add_(-1, index.long(), weight)
    return x, index, weight, dense


def timed(fn, device, reps):
    """Median ms (CUDA events via triton.testing.do_bench, L2 flushed) and peak extra memory in MiB."""
    fn()
    if device == "cuda":
        import triton.testing
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return triton.testing.do_bench(fn, warmup=reps, rep=reps * 4, return_mode="median"), peak
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), float("nan")


def on_backend(module, backend):
    def call(x, index, weight, dense):
        module.attn.backend = backend
        return module(x, index, weight)
    return call


def module_providers(module, device):
    dense_module, sdpa_module = DenseMapAttention(module), GatherSDPA(module)
    providers = {"eager_dense": lambda x, i, w, d: dense_module(x, d), "gather_sdpa": lambda x, i, w, d: sdpa_module(x, i, w)}
    for name, backend in (("triton", "triton"), ("cuda" if device == "cuda" else "native_cpu", "native")):
        if why_unavailable(backend, "srs_attention", torch.device(device)) is None:
            providers[name] = on_backend(module, backend)
    return providers


def run_module_case(name, batch, device, reps, autocast):
    per_image, N, S, T, backward = CASES[name]
    module = SRSAttention(C, HEADS).to(device)
    x, index, weight, dense = make_inputs(batch * per_image, N, S, T, device)
    x.requires_grad_(backward)
    results = {}
    for provider, fn in module_providers(module, device).items():
        def step():
            with torch.autocast(device, dtype=autocast, enabled=autocast is not None), torch.set_grad_enabled(backward):
                out = fn(x, index, weight, dense)
            if backward:
                out.float().square().mean().backward()
        ms, peak = timed(step, device, reps)
        results[provider] = dict(ms=ms, peak_extra_mib=peak)
    return results


def floor_bytes(crops, N, S, T, element_bytes):
    """k, v once + the tapped q rows + the output (UDI_SPEC §8)."""
    return crops * HEADS * (C // HEADS) * element_bytes * (2 * N + S * T + S)


def run_op_case(name, batch, device, reps, dtype):
    per_image, N, S, T, _ = CASES[name]
    crops, D = batch * per_image, C // HEADS
    q, k, v = (torch.randn(crops, HEADS, N, D, device=device, dtype=dtype) for _ in range(3))
    _, index, weight, _ = make_inputs(crops, N, S, T, device)
    providers = {"reference": "reference", "triton": "triton", "cuda" if device == "cuda" else "native_cpu": "native"}

    def gather_sdpa():
        q_s = tap_rows(q.flatten(0, 1).transpose(0, 1).reshape(N, crops, HEADS * D).transpose(0, 1), index, weight)
        return F.scaled_dot_product_attention(q_s.reshape(crops, S, HEADS, D).transpose(1, 2).to(dtype), k, v)
    results = {"gather_sdpa": dict(zip(("ms", "peak_extra_mib"), timed(gather_sdpa, device, reps)))}
    for provider, backend in providers.items():
        if why_unavailable(backend, "srs_attention", torch.device(device)) is None:
            ms, peak = timed(lambda: srs_attention(q, k, v, index, weight, backend=backend, check_taps=False), device,
                             reps)
            results[provider] = dict(ms=ms, peak_extra_mib=peak)
    floor = floor_bytes(crops, N, S, T, q.element_size())
    for r in results.values():
        r["gb_per_s"] = floor / r["ms"] / 1e6
    return results, floor


def copy_ceiling_gb_per_s(device, reps):
    src = torch.empty(512 << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms, _ = timed(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() / ms / 1e6


def write_outputs(report, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "srs_attention.json"), "w") as f:
        json.dump(report, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = report["module"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    providers = sorted({p for r in cases.values() for p in r})
    for i, provider in enumerate(providers):
        axes[0].bar([j + 0.8 * i / len(providers) for j in range(len(cases))],
                    [r.get(provider, {}).get("ms", 0) for r in cases.values()], 0.8 / len(providers), label=provider)
    axes[0].set_xticks(range(len(cases)), list(cases), rotation=15, fontsize=7)
    axes[0].set_ylabel("ms (median)"), axes[0].set_yscale("log"), axes[0].legend(fontsize=7)
    axes[0].set_title(f"module, B={report['batch']} ({report['device']})", fontsize=9)
    for provider in providers:
        sweep = report["sweep"]
        axes[1].plot([int(b) for b in sweep], [sweep[b].get(provider, {}).get("ms", float("nan")) for b in sweep],
                     marker="o", label=provider)
    axes[1].set_xlabel("B (images)"), axes[1].set_ylabel("ms"), axes[1].set_yscale("log"), axes[1].legend(fontsize=7)
    axes[1].set_title("student_global_fwd_bwd sweep over B", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "srs_attention.png"), dpi=110)


def print_table(report):
    print(f"\nsrs_attention on {report['device']}, B={report['batch']}"
          + (f", copy ceiling {report['copy_gb_per_s']:.0f} GB/s" if report.get("copy_gb_per_s") else ""))
    print(f"{'case':28s} {'provider':12s} {'ms':>9s} {'peak MiB':>9s} {'speedup':>8s} {'GB/s':>8s} {'% copy':>7s}")
    for level in ("module", "op"):
        for case, results in report[level].items():
            base = results.get("eager_dense", results.get("reference"))["ms"]
            for provider, r in results.items():
                gbs = r.get("gb_per_s")
                pct = 100 * gbs / report["copy_gb_per_s"] if gbs and report.get("copy_gb_per_s") else None
                print(f"{level + ':' + case:28s} {provider:12s} {r['ms']:9.3f} {r['peak_extra_mib']:9.1f} "
                      f"{base / r['ms']:7.1f}x {gbs or float('nan'):8.0f} {pct or float('nan'):6.0f}%")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and sweep points (GPU < ~60 s)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        batch, reps, sweep = 128, (10 if args.quick else 25), ([32, 128] if args.quick else [16, 32, 64, 128, 256])
        autocast, op_dtype = torch.float16, torch.float16
    else:
        print("no GPU: running a small CPU version; GPU numbers need a GPU")
        batch, reps, sweep, autocast, op_dtype = 2, 3, [1, 2], None, torch.float32
    report = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", batch=batch, module={}, op={},
                  sweep={}, floor_bytes={})
    if device == "cuda":
        report["copy_gb_per_s"] = copy_ceiling_gb_per_s(device, reps)
    for name in CASES:
        report["module"][name] = run_module_case(name, batch, device, reps, autocast)
        report["op"][name], report["floor_bytes"][name] = run_op_case(name, batch, device, reps, op_dtype)
    for b in sweep:
        report["sweep"][str(b)] = run_module_case("student_global_fwd_bwd", b, device, reps, autocast)
    write_outputs(report, args.out)
    print_table(report)


if __name__ == "__main__":
    main()
