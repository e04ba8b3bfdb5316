"""Benchmark of SRS attention (issue 3 §4): the UDI head attention at the four UDI_SPEC §7 shapes.

Module level (what §7 measured): eager dense-map module (the reference's way), gather + SDPA, and
SRSAttention on the Triton and CUDA kernels, fp16 autocast; on a GPU also SRSAttention compiled with
CUDA graphs (mode="reduce-overhead"), for the four cases but not the sweep (compile time). Op level: the attention core alone in fp16
against the bytes floor of §8 (k, v once + the tapped q rows + the output) over the measured copy ceiling.
Module-level fwd+bwd closures are timed back to back (no L2 flush), the rest with do_bench (L2 flushed); the
providers of a case in turn over common.ROUNDS rounds (medians). The CPU has no native kernel (NOTES.md).

    python -m benchmarks.srs_attention [--quick] [--out DIR | --record]

Writes JSON and a PNG into --out (default benchmarks/out/, ignored by git; --record: benchmarks/results/) and
prints a table last. Without a GPU: a small CPU run.
"""
import os as _os
import sys as _sys

if not __package__:  # `python benchmarks/x.py`: the repository root on the path, as `python -m benchmarks.x` has it
    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from benchmarks import common
from udi_kernels import srs_attention
from udi_kernels.backends import why_unavailable
from udi_kernels.nn import SRSAttention, tap_rows
from udi_kernels.taps import taps_to_dense
from udi_kernels.testing.inputs import random_taps
from udi_kernels.testing.references import dense_srs_block

C, HEADS, L = 384, 6, 10
# name: (crops per image, tokens N, samples S, taps T, backward?)
CASES = {"student_global_fwd_bwd": (2, 196, 16, 1, True), "student_local_fwd_bwd": (L, 36, 9, 1, True),
         "teacher_global_fwd": (2, 196, 16, 4, False), "teacher_local_targets_fwd": (2, 196, L * 9, 4, False)}


class GatherSDPA(torch.nn.Module):
    """Full q projection, taps gathered in PyTorch, then F.scaled_dot_product_attention."""

    def __init__(self, module):
        super().__init__()
        self.m = module

    def forward(self, x, index, weight):
        attn, (B, N, _) = self.m.attn, x.shape
        h = self.m.norm1(x)
        qkv = attn.qkv(h)
        tapped_q = tap_rows(qkv[..., :C], index, weight)[0].reshape(B, -1, HEADS, C // HEADS).transpose(1, 2)
        k, v = qkv[..., C:].reshape(B, N, 2, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(tapped_q.to(k.dtype), k, v).transpose(1, 2).reshape(B, -1, C)
        return attn.norm(attn.proj(o) + tap_rows(h, index, weight)[0])


def make_inputs(crops, N, S, T, device):
    x = torch.randn(crops, N, C, device=device)
    index, weight = random_taps(crops, S, T, N, device)
    return x, index, weight, taps_to_dense(index, weight, N)


def on_backend(module, backend):
    def call(x, index, weight, dense):
        module.attn.backend = backend
        return module(x, index, weight)
    return call


def compiled_on_triton(module):
    """SRSAttention on Triton under torch.compile(mode="reduce-overhead"): the head runs as CUDA graphs (no CPU
    launch cost per kernel) and Inductor fuses the elementwise work around the op (LayerNorms, casts, adds)."""
    compiled = torch.compile(module, mode="reduce-overhead", fullgraph=True)

    def call(x, index, weight, dense):
        module.attn.backend = "triton"
        return compiled(x, index, weight)
    return call


def module_providers(module, device, with_compiled):
    sdpa_module = GatherSDPA(module)
    # eager_dense: the reference's way, q, k, v for every token, dense [S, N] maps, probabilities in memory
    providers = {"eager_dense": lambda x, i, w, d: dense_srs_block(module, x, d),
                 "gather_sdpa": lambda x, i, w, d: sdpa_module(x, i, w)}
    for name, backend in (("reference", "reference"), ("triton", "triton"), ("cuda", "native")):
        if why_unavailable(backend, "srs_attention", device) is None:
            providers[name] = on_backend(module, backend)
    if with_compiled and device.type == "cuda" and "triton" in providers:
        providers["triton_compiled"] = compiled_on_triton(module)
    return providers


def run_module_case(name, batch, device, quick, autocast, with_compiled=False):
    per_image, N, S, T, backward = CASES[name]
    module = SRSAttention(C, HEADS).to(device)
    x, index, weight, dense = make_inputs(batch * per_image, N, S, T, device)
    x.requires_grad_(backward)
    def step_of(fn):
        def step():
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None), \
                    torch.set_grad_enabled(backward):
                out = fn(x, index, weight, dense)
            if backward:
                out.float().square().mean().backward()
        return step
    steps = {provider: step_of(fn) for provider, fn in module_providers(module, device, with_compiled).items()}
    return common.interleaved(steps, device, quick, flush_l2=not backward)


def floor_bytes(crops, N, S, T, element_bytes):
    """k, v once + the tapped q rows + the output (UDI_SPEC §8)."""
    return crops * HEADS * (C // HEADS) * element_bytes * (2 * N + S * T + S)


def run_op_case(name, batch, device, quick, dtype):
    per_image, N, S, T, _ = CASES[name]
    crops, D = batch * per_image, C // HEADS
    q, k, v = (torch.randn(crops, HEADS, N, D, device=device, dtype=dtype) for _ in range(3))
    _, index, weight, _ = make_inputs(crops, N, S, T, device)
    providers = {"reference": "reference", "triton": "triton", "cuda": "native"}

    def gather_sdpa():
        q_s, _ = tap_rows(q.flatten(0, 1).transpose(0, 1).reshape(N, crops, HEADS * D).transpose(0, 1), index, weight)
        return F.scaled_dot_product_attention(q_s.reshape(crops, S, HEADS, D).transpose(1, 2).to(dtype), k, v)

    def op(backend):
        return lambda: srs_attention(q, k, v, index, weight, backend=backend, check_taps=False)
    steps = {"gather_sdpa": gather_sdpa, **{provider: op(backend) for provider, backend in providers.items()
                                            if why_unavailable(backend, "srs_attention", device) is None}}
    results = common.interleaved(steps, device, quick)
    floor = floor_bytes(crops, N, S, T, q.element_size())
    for r in results.values():
        r["gb_per_s"] = floor / r["ms"] / 1e6
    return results, floor


def op_ms_by_shape_class(op_results, device):
    """{"any": {backend: summed op ms over the cases}} for the backends `auto` may take on this device (Triton on
    the CPU is the interpreter, a correctness tool): the declared order is one per device type."""
    backend_of = {"reference": "reference", "cuda": "native"}
    if device.type == "cuda":
        backend_of["triton"] = "triton"
    totals = {}
    for results in op_results.values():
        for provider, backend in backend_of.items():
            if provider in results:
                totals[backend] = totals.get(backend, 0.0) + results[provider]["ms"]
    return {"any": totals}


def ms_series(cases, providers):
    return {p: [results.get(p, {}).get("ms") for results in cases.values()] for p in providers}


def table_rows(report):
    """One row per (level, case, provider) but the baseline, whose ms the row shows alongside."""
    rows = []
    for level, baseline in (("module", "eager_dense"), ("op", "reference")):
        for case, results in report[level].items():
            base_ms = results[baseline]["ms"]
            for provider, r in results.items():
                if provider == baseline:
                    continue
                gbs, ceiling = r.get("gb_per_s"), report["copy_gb_per_s"]
                rows.append(dict(case=f"{level}:{case}", provider=provider, ms=r["ms"], base_ms=base_ms,
                                 speedup=base_ms / r["ms"], gb_per_s=gbs,
                                 pct_copy=100 * gbs / ceiling if gbs and ceiling else None,
                                 peak_mib=common.mib(r["peak_extra_bytes"])))
    return rows


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    device = common.pick_device()
    if device.type == "cuda":
        batch, sweep = 128, ([32, 128] if args.quick else [16, 32, 64, 128, 256])
        autocast, op_dtype = torch.float16, torch.float16
    else:
        batch, sweep, autocast, op_dtype = 2, [1, 2], None, torch.float32
    report = dict(batch=batch, copy_gb_per_s=common.copy_gb_per_s(device, args.quick), rounds=common.ROUNDS,
                  module={}, op={}, sweep={}, floor_bytes={})
    for name in CASES:
        report["module"][name] = run_module_case(name, batch, device, args.quick, autocast, with_compiled=True)
        report["op"][name], report["floor_bytes"][name] = run_op_case(name, batch, device, args.quick, op_dtype)
    for b in sweep:
        report["sweep"][str(b)] = run_module_case("student_global_fwd_bwd", b, device, args.quick, autocast)
    report["fastest"] = common.fastest_backends(op_ms_by_shape_class(report["op"], device))

    providers = sorted({p for r in report["module"].values() for p in r})
    chart = (f"module, B={batch}", list(report["module"]), ms_series(report["module"], providers), "ms (median)",
             ("student_global_fwd_bwd sweep over B", "B (images)", sweep, ms_series(report["sweep"], providers)))
    ceiling = report["copy_gb_per_s"]
    common.finish(args.out, "srs_attention", device, report, chart, table_rows(report),
                  [("case", "case", "{}"), ("provider", "provider", "{}"), ("ms", "ms", "{:.3f}"),
                   ("base_ms", "eager ms", "{:.3f}"), ("speedup", "speedup", "{:.1f}x"), ("gb_per_s", "GB/s", "{:.0f}"),
                   ("pct_copy", "% copy", "{:.0f}%"), ("peak_mib", "peak MiB", "{:.1f}")],
                  caption=f"B={batch}, copy ceiling {ceiling:.1f} GB/s, medians of {common.ROUNDS} interleaved rounds")


if __name__ == "__main__":
    main()
