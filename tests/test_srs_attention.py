"""udi_kernels.srs_attention (UDI_SPEC §3): reference, native CUDA, Triton and modules (compat: test_compat.py).

CPU (CI, TRITON_INTERPRET=1): float64 reference vs an independent dense-map implementation; Triton (interpreter,
fp32) vs the reference; gradcheck; opcheck; torch.compile; bad inputs; backend='native' refused (no CPU kernel).
GPU (marker gpu): CUDA and Triton vs the reference in fp32/bf16/fp16, forward and backward.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch

from udi_kernels import srs_attention
from udi_kernels.backends import why_unavailable
from udi_kernels.nn import SRSAttention
from udi_kernels.reference import srs_attention as reference
from udi_kernels.testing.poison import poison_cuda_allocator
from udi_kernels.testing.references import dense_head_path, dense_map

# (B, H, N, D, S, T): N not a power of 2, S = 1, T = 1 and 4, H = 1, D = 32/64/128, B = 1, and whole
# tokens as one head (H = 1, D = C = 384, S = 6 heads x 16 samples: how SRSAttention attends over h).
CPU_SHAPES = [(2, 3, 36, 32, 9, 1), (1, 1, 23, 64, 1, 4), (2, 2, 50, 128, 17, 4), (1, 2, 196, 64, 5, 4),
              (2, 1, 37, 384, 12, 1)]
INTERPRETER_SHAPES = [(2, 2, 36, 32, 9, 1), (1, 1, 23, 64, 1, 4), (1, 2, 40, 128, 17, 4), (1, 1, 37, 384, 20, 1)]
GPU_SHAPES = [(3, 6, 196, 64, 16, 1), (5, 6, 36, 64, 9, 1), (2, 6, 196, 64, 106, 4), (1, 1, 23, 32, 1, 4),
              (2, 2, 50, 128, 17, 4), (2, 3, 100, 48, 33, 4), (3, 1, 196, 384, 96, 1), (2, 1, 36, 512, 54, 1)]


def needs(backend, device="cpu"):
    reason = why_unavailable(backend, "srs_attention", torch.device(device))
    return pytest.mark.skipif(reason is not None, reason=str(reason))


def make_case(B, H, N, D, S, T, dtype=torch.float64, device="cpu", seed=0, rows=None):
    """Random q, k, v, taps with repeated taps, one all-zero (padding) row and weights summing to 1 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    rows = N if rows is None else rows
    q = torch.randn(B, H, rows, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(2))
    index = torch.randint(0, rows, (B, S, T), generator=g, dtype=torch.int32)
    weight = torch.rand(B, S, T, generator=g, dtype=torch.float64) + 0.1
    weight = weight / weight.sum(-1, keepdim=True)
    if T > 1:
        index[:, 0, 1] = index[:, 0, 0]  # a repeated tap
    if S > 1:
        weight[:, -1] = 0  # a padding row
    return ([t.to(device=device, dtype=dtype) for t in (q, k, v)], index.to(device),
            weight.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype))


def dense_map_attention(q, k, v, index, weight, scale=None):
    """Independent of the reference: one dense [S, Nq] map per crop, explicit max-subtracted softmax."""
    dense = dense_map(index, weight, q.shape[2], q.dtype)
    q_s = torch.einsum("bsn,bhnd->bhsd", dense, q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bhsd,bhnd->bhsn", q_s, k) * scale
    p = torch.exp(logits - logits.amax(-1, keepdim=True))
    return torch.einsum("bhsn,bhnd->bhsd", p / p.sum(-1, keepdim=True), v)


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def forward_backward(fn, q, k, v, grad_out):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def reference_forward_backward(q, k, v, index, weight, grad_out, scale=None):
    """float64 reference outputs and gradients for inputs of any dtype."""
    return forward_backward(lambda *qkv: reference.srs_attention(*qkv, index, weight.double(), scale),
                            *(t.double() for t in (q, k, v)), grad_out.double())


def check_backend(backend, shape, dtype, device, tolerance, rows=None):
    (q, k, v), index, weight = make_case(*shape, dtype=dtype, device=device, rows=rows)
    grad_out = torch.randn(*shape[:2], shape[4], shape[3], dtype=dtype, device=device)
    expected = reference_forward_backward(q, k, v, index, weight, grad_out)
    actual = forward_backward(lambda *qkv: srs_attention(*qkv, index, weight, backend=backend), q, k, v, grad_out)
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert a.dtype == dtype and a.shape == e.shape, name
        assert torch.isfinite(a).all(), name
        assert relative_error(a, e) <= tolerance, (name, relative_error(a, e))


# ---- the reference -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", CPU_SHAPES)
def test_reference_matches_dense_maps(shape):
    (q, k, v), index, weight = make_case(*shape, seed=1)
    torch.testing.assert_close(reference.srs_attention(q, k, v, index, weight), dense_map_attention(q, k, v, index, weight),
                               rtol=1e-12, atol=1e-12)  # float64, two summation orders


def test_reference_defaults_and_int64_index():
    (q, k, v), index, _ = make_case(2, 2, 30, 16, 7, 2, seed=2)
    ones = torch.ones(index.shape, dtype=torch.float64)
    torch.testing.assert_close(reference.srs_attention(q, k, v, index.long()),
                               dense_map_attention(q, k, v, index, ones), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference.srs_attention(q, k, v, index, ones, scale=0.3),
                               dense_map_attention(q, k, v, index, ones, scale=0.3), rtol=1e-12, atol=1e-12)


def test_padding_rows_attend_uniformly():
    (q, k, v), index, weight = make_case(2, 3, 36, 32, 4, 4, seed=3)
    weight[:, 1:] = 0
    out = srs_attention(q * 1e4, k * 1e4, v, index, weight, backend="reference")
    torch.testing.assert_close(out[:, :, 1:], v.mean(2, keepdim=True).expand(-1, -1, 3, -1))
    assert torch.isfinite(out).all()


def test_reference_gradcheck():
    (q, k, v), index, weight = make_case(2, 2, 11, 8, 5, 4, seed=4)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda *qkv: reference.srs_attention(*qkv, index, weight), (q, k, v))


# ---- native: no CPU kernel; the CUDA kernel's autograd wiring -----------------------------------

def test_native_backend_on_cpu_is_an_error_saying_why():
    """There is no CPU kernel (declarations.SRS_ATTENTION: the reference is faster there): auto takes the reference,
    backend='native' raises naming the reason, for the op and for the module."""
    (q, k, v), index, weight = make_case(1, 2, 10, 8, 3, 2, dtype=torch.float32)
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("udi_kernels::srs_attention", "CPU")
    torch.testing.assert_close(srs_attention(q, k, v, index, weight),
                               srs_attention(q, k, v, index, weight, backend="reference"), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="no CPU kernel: the eager reference .* faster"):
        srs_attention(q, k, v, index, weight, backend="native")
    module = SRSAttention(16, num_heads=2, backend="native")
    with pytest.raises(RuntimeError, match="no CPU kernel"):
        module(torch.randn(1, 10, 16), index, weight)


@pytest.mark.gpu
def test_gpu_double_backward_is_refused():
    (q, k, v), index, weight = make_case(1, 1, 10, 8, 3, 2, dtype=torch.float32, device="cuda")
    q.requires_grad_()
    grad_q, = torch.autograd.grad(srs_attention(q, k, v, index, weight, backend="native").sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        grad_q.sum().backward()


@pytest.mark.gpu
def test_gpu_native_opcheck():
    (q, k, v), index, weight = make_case(2, 2, 23, 16, 5, 4, dtype=torch.float32, device="cuda")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.udi_kernels.srs_attention, (q, k, v, index, weight, 0.25))
    out, lse = torch.ops.udi_kernels.srs_attention(q, k, v, index, weight, 0.25)
    torch.library.opcheck(torch.ops.udi_kernels.srs_attention_backward,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), index, weight, out.detach(),
                           lse.detach(), 0.25))


# ---- Triton (interpreter on the CPU) -------------------------------------------------------------

@needs("triton")
@pytest.mark.parametrize("shape", INTERPRETER_SHAPES)
def test_triton_matches_reference(shape):
    check_backend("triton", shape, torch.float32, "cpu", 2e-6)  # fp32 with ieee dots


@needs("triton")
def test_triton_query_rows_differ_from_keys():
    check_backend("triton", (1, 2, 36, 32, 9, 4), torch.float32, "cpu", 2e-6, rows=70)


@needs("triton")
def test_triton_kernels_compile_for_an_h100_within_its_resources():
    """ptxas for sm_90 on the CPU: the tiles the wrappers pick fit in registers and shared memory (D = 64 heads and
    D = 384 rows when SRSAttention attends over h). A fresh interpreter: TRITON_INTERPRET replaces the kernels."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "triton_resources.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, script, "--check"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@needs("triton")
def test_triton_opcheck():
    from udi_kernels.ops.srs_attention import _triton_backward, _triton_forward
    (q, k, v), index, weight = make_case(1, 1, 20, 16, 3, 2, dtype=torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(_triton_forward, (q, k, v, index, weight, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out, lse = _triton_forward(q, k, v, index, weight, 0.25)
    torch.library.opcheck(_triton_backward, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), index,
                                             weight, out.detach(), lse.detach(), 0.25),
                          test_utils=("test_schema", "test_faketensor"))


# ---- torch.compile -------------------------------------------------------------------------------

def test_compile_fullgraph():
    (q, k, v), index, weight = make_case(2, 2, 23, 16, 5, 4, dtype=torch.float32, seed=6)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    compiled = torch.compile(lambda *args: srs_attention(*args, backend="reference"), fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, index, weight)
    out.square().sum().backward()
    expected = reference_forward_backward(q.detach(), k.detach(), v.detach(), index, weight, 2 * out.detach())
    torch.testing.assert_close(out.double(), expected[0], rtol=1e-5, atol=1e-5)
    for grad, e in zip((q.grad, k.grad, v.grad), expected[1:]):
        torch.testing.assert_close(grad.double(), e, rtol=1e-4, atol=1e-5)


# ---- bad inputs ----------------------------------------------------------------------------------

def _bad(**changes):
    (q, k, v), index, weight = make_case(2, 2, 10, 8, 3, 4, dtype=torch.float32)
    args = dict(q=q, k=k, v=v, index=index, weight=weight)
    args.update({name: change(args) for name, change in changes.items()})
    return args


BAD_INPUTS = [
    (dict(q=lambda a: a["q"][0]), ValueError, "q must have shape"),
    (dict(k=lambda a: a["k"][:, :, :5]), ValueError, "v must have the shape of k"),
    (dict(q=lambda a: a["q"][:, :1]), ValueError, r"k must have shape \[B=2, H=1, N, D=8\] \(like q\)"),
    (dict(k=lambda a: a["k"][:1]), ValueError, r"k must have shape \[B=2"),
    (dict(v=lambda a: a["v"].double()), TypeError, "v must have the dtype of q"),
    (dict(q=lambda a: a["q"].int()), TypeError, "q must be float16"),
    (dict(index=lambda a: a["index"].float()), TypeError, "index must be int32 or int64"),
    (dict(index=lambda a: a["index"][:1]), ValueError, "index must have shape"),
    (dict(weight=lambda a: a["weight"][:, :2]), ValueError, "weight must have the shape of index"),
    (dict(weight=lambda a: a["weight"].int()), TypeError, "weight must be a floating tensor"),
    (dict(index=lambda a: a["index"] + 10), ValueError, "index must lie in"),
    (dict(index=lambda a: a["index"] - 10), ValueError, "index must lie in"),
    (dict(weight=lambda a: a["weight"].index_fill(1, torch.tensor([1]), float("nan"))), ValueError, "finite"),
    (dict(k=lambda a: a["k"].to("meta")), ValueError, "k must be on the device of q"),
]


@pytest.mark.parametrize("changes,error,message", BAD_INPUTS)
def test_bad_inputs_raise(changes, error, message):
    with pytest.raises(error, match=message):
        srs_attention(**_bad(**changes), backend="reference")


@pytest.mark.gpu
def test_gpu_native_kernel_skips_bad_taps_itself():
    """The kernel is memory-safe on its own: taps outside q's rows are skipped (as if their weight were 0)."""
    (q, k, v), index, weight = make_case(1, 1, 10, 8, 3, 2, dtype=torch.float32, device="cuda")
    index[0, :, 1] += 10
    out, _ = torch.ops.udi_kernels.srs_attention(q, k, v, index, weight, 1.0)
    kept = torch.where(index < 10, weight, 0)
    torch.testing.assert_close(out, reference.srs_attention(q, k, v, index.clamp(max=9), kept, 1.0))
    with pytest.raises(RuntimeError, match="weight must be Float"):
        torch.ops.udi_kernels.srs_attention(q, k, v, index, weight.double(), 1.0)


def test_triton_rejects_float64():
    if why_unavailable("triton", "srs_attention", torch.device("cpu")) is not None:
        pytest.skip("triton unavailable")
    (q, k, v), index, weight = make_case(1, 1, 10, 8, 3, 1)
    with pytest.raises(TypeError, match="Triton backend supports"):
        srs_attention(q, k, v, index, weight, backend="triton")


# ---- modules ---------------------------------------------------------------------------------------

def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.2)  # LayerNorm and biases non-trivial too
    return module


# S = 7 <= head_dim = 16: the module attends over h; S = 20: over projected k, v (TappedAttention docstring).
@pytest.mark.parametrize("T,weighted", [(1, True), (4, True), (4, False)])
@pytest.mark.parametrize("S", [7, 20])
def test_srs_attention_module_matches_dense_head_path(T, weighted, S):
    B, N, C = 2, 36, 48
    module = _randomize(SRSAttention(C, num_heads=3, backend="reference")).double()
    _, index, weight = make_case(B, 1, N, 8, S, T, seed=7)
    weight = weight if weighted else None  # None: every tap weighs 1
    x = torch.randn(B, N, C, dtype=torch.float64, requires_grad=True)
    dense = dense_map(index, weight, N)
    out = module(x, index, weight)
    expected = dense_head_path(module.attn, module.norm1(x), dense)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(out.square().sum(), [x, *module.parameters()])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *module.parameters()])
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)


@needs("triton")
@pytest.mark.parametrize("S", [7, 20])
def test_triton_module_matches_dense_head_path(S):
    # fp32 on the interpreter (ieee dots) vs the dense float64 head path: max |error| / max |expected| <= 1e-5.
    B, N, C = 2, 36, 48
    module = _randomize(SRSAttention(C, num_heads=3, backend="triton"))
    _, index, weight = make_case(B, 1, N, 8, S, 4, seed=11, dtype=torch.float32)
    x = torch.randn(B, N, C, requires_grad=True)
    dense = dense_map(index, weight, N)
    out = module(x, index, weight)
    reference_module = copy.deepcopy(module).double()
    expected = dense_head_path(reference_module.attn, reference_module.norm1(x.double()), dense)
    assert relative_error(out, expected) <= 1e-5, relative_error(out, expected)
    grads = torch.autograd.grad(out.square().sum(), [x, *module.parameters()])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *reference_module.parameters()])
    for g, e in zip(grads, expected_grads):
        assert relative_error(g, e) <= 1e-5, relative_error(g, e)


@pytest.mark.parametrize("backend,dtype", [("reference", torch.float64), ("triton", torch.float32)])
def test_module_tap_checks_are_opt_in_and_change_nothing_else(backend, dtype):
    if why_unavailable(backend, "srs_attention", torch.device("cpu")) is not None:
        pytest.skip(f"{backend} unavailable")
    B, N, C, S = 2, 36, 48, 7
    fast = _randomize(SRSAttention(C, num_heads=3, backend=backend)).to(dtype)
    checked = SRSAttention(C, num_heads=3, backend=backend, check_taps=True).to(dtype)
    checked.load_state_dict(fast.state_dict())
    _, index, weight = make_case(B, 1, N, 8, S, 4, seed=9, dtype=dtype)
    x = torch.randn(B, N, C, dtype=dtype, requires_grad=True)
    results = []
    for module in (fast, checked):
        out = module(x, index, weight)
        results.append((out, *torch.autograd.grad(out.square().sum(), [x, *module.parameters()])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    bad_index = index.clone()
    bad_index[1, 3, 2] = N
    with pytest.raises(ValueError, match=r"index must lie in \[0, 36\)"):
        checked(x, bad_index, weight)
    bad_weight = weight.clone()
    bad_weight[0, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="weight must be finite"):
        checked(x, index, bad_weight)


def test_module_trains_after_an_inference_mode_call():
    """The module caches its identity taps: one built under inference_mode must still serve autograd."""
    module = SRSAttention(24, num_heads=2, backend="reference")
    index = torch.randint(0, 10, (3, 5, 1), dtype=torch.int32)  # a (B, S) no other test uses
    x = torch.randn(3, 10, 24, requires_grad=True)
    with torch.inference_mode():
        expected = module(x.detach(), index)
    out = module(x, index)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("weighted", [True, False])
def test_module_under_autocast_matches_float32(weighted):
    # bf16 autocast on the CPU vs the same module in fp32 (itself checked against float64 above):
    # max |error| / max |fp32| <= 3e-2 (bf16 keeps 8 mantissa bits; outputs are LayerNorm-scaled).
    B, N, C, S = 2, 36, 48, 7
    module = _randomize(SRSAttention(C, num_heads=3, backend="reference"))
    _, index, weight = make_case(B, 1, N, 8, S, 4, seed=10, dtype=torch.float32)
    weight = weight if weighted else None
    x = torch.randn(B, N, C, requires_grad=True)
    results = []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = module(x, index, weight)
        results.append((out, *torch.autograd.grad(out.float().square().sum(), [x, *module.parameters()])))
    for expected, actual in zip(*results):
        assert torch.isfinite(actual).all()  # dtype: CPU autocast runs LayerNorm in bf16, CUDA in fp32
        assert relative_error(actual, expected) <= 3e-2, relative_error(actual, expected)


def compiled_matches_eager(module, x, index, weight, tolerance, **compile_args):
    """The module under torch.compile(fullgraph) gives the eager module's output and gradients."""
    results = []
    for fn in (module, torch.compile(module, fullgraph=True, **compile_args)):
        for _ in range(3):  # reduce-overhead records its CUDA graph on a later call
            out = fn(x, index, weight)
            grads = torch.autograd.grad(out.float().square().sum(), [x, *module.parameters()])
        results.append((out, *grads))
    for actual, expected in zip(results[1], results[0]):
        assert relative_error(actual, expected) <= tolerance, relative_error(actual, expected)


@pytest.mark.parametrize("S", [7, 20])
def test_module_compiles_without_graph_break(S):
    module = _randomize(SRSAttention(48, num_heads=3, backend="reference"))
    _, index, weight = make_case(2, 1, 36, 8, S, 4, seed=12, dtype=torch.float32)
    compiled_matches_eager(module, torch.randn(2, 36, 48, requires_grad=True), index, weight, 1e-6,
                           backend="aot_eager")


def test_srs_attention_module_parameter_names_and_stratified_taps():
    from udi_kernels import one_hot_taps, stratified_sample
    module = SRSAttention(48, num_heads=3)
    assert {name.rsplit(".", 1)[0] for name, _ in module.named_parameters()} == {
        "norm1", "attn.qkv", "attn.proj", "attn.norm"}
    boxes = torch.tensor([[[0.0, 0.0, 0.8, 0.9], [0.2, 0.9, 1.0, 0.1], [0.1, 0.1, 0.4, 0.3]]])
    pairs = stratified_sample(boxes, seed=3, backend="reference")
    src_index, src_weight = one_hot_taps(pairs.globals.src_index[:, 0], pairs.globals.count[:, 0])
    x = torch.randn(1, 196, 48)
    student = module(x, src_index, src_weight)
    teacher = module(x, pairs.globals.tgt_index[:, 0], pairs.globals.tgt_weight[:, 0])
    assert student.shape == teacher.shape == (1, 16, 48)
    assert torch.isfinite(student).all() and torch.isfinite(teacher).all()


# ---- GPU -----------------------------------------------------------------------------------------
# Tolerances: max |error| / max |reference| against the float64 reference on the same rounded inputs.
GPU_TOLERANCES = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", list(GPU_TOLERANCES))
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_matches_reference(backend, dtype, shape):
    if why_unavailable(backend, "srs_attention", torch.device("cuda")) is not None:
        pytest.skip(f"{backend} unavailable on CUDA")
    poison_cuda_allocator()
    check_backend(backend, shape, dtype, "cuda", GPU_TOLERANCES[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_gpu_query_rows_differ_from_keys(backend):
    poison_cuda_allocator()
    check_backend(backend, (2, 6, 196, 64, 20, 1), torch.float32, "cuda", GPU_TOLERANCES[torch.float32], rows=20)


@pytest.mark.gpu
@pytest.mark.parametrize("S", [16, 106])  # attends over h / over projected k, v
def test_gpu_module_backends_agree(S):
    module = _randomize(SRSAttention(384, num_heads=6)).cuda()
    pairs_index = torch.randint(0, 196, (4, S, 4), device="cuda")
    weight = torch.rand(4, S, 4, device="cuda")
    x = torch.randn(4, 196, 384, device="cuda")
    outs = {}
    for backend in ("reference", "native", "triton"):
        module.attn.backend = backend
        outs[backend] = module(x, pairs_index, weight)
    for backend in ("native", "triton"):
        torch.testing.assert_close(outs[backend], outs["reference"], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("S", [16, 106])
def test_gpu_module_compiled_with_cuda_graphs_matches_eager(S):
    """What benchmarks/srs_attention.py times as triton_compiled: Inductor + CUDA graphs, fp16 autocast."""
    module = _randomize(SRSAttention(384, num_heads=6, backend="triton")).cuda()
    index = torch.randint(0, 196, (4, S, 4), device="cuda", dtype=torch.int32)
    weight = torch.rand(4, S, 4, device="cuda")
    x = torch.randn(4, 196, 384, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.float16):
        compiled_matches_eager(module, x, index, weight, 1e-2, mode="reduce-overhead")


@pytest.mark.gpu
def test_gpu_module_fwd_bwd_has_no_host_sync():
    module = SRSAttention(384, num_heads=6).cuda()
    x = torch.randn(8, 196, 384, device="cuda", requires_grad=True)
    index = torch.randint(0, 196, (8, 16, 4), device="cuda", dtype=torch.int32)
    weight = torch.rand(8, 16, 4, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.float16):
            out = module(x, index, weight)
        out.float().square().mean().backward()
    step()  # compiles the Triton kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_srs_attention_module_checks_its_inputs_once_per_call(monkeypatch):
    """SRSAttention checks x, index and weight once and hands norm1(x) to TappedAttention unchecked (issue 22);
    the result is TappedAttention's on norm1(x)."""
    import udi_kernels.nn as udi_nn
    calls = []
    check = udi_nn.check_module_inputs
    monkeypatch.setattr(udi_nn, "check_module_inputs", lambda *args: calls.append(args[-1]) or check(*args))
    torch.manual_seed(0)
    module = SRSAttention(12, 3, check_taps=True)
    x, index = torch.randn(2, 7, 12), torch.randint(0, 7, (2, 5, 1))
    out = module(x, index)
    assert calls == ["x"]
    torch.testing.assert_close(out, module.attn(module.norm1(x), index), rtol=0, atol=0)
    with pytest.raises(ValueError, match="index must lie in"):
        module(x, index + 7)
