"""Regression tests of issue 21 (hardening round 4), what wraps the ops: autocast (21.2), torch.compile fullgraph
with the default arguments (21.5), torch.func (21.6) and backend="" (21.12a), for every public op and CPU backend
(Triton under the interpreter)."""
import pytest
import torch
from torch.func import grad, vmap

import udi_kernels
from udi_kernels import backends
from udi_kernels.declarations import DECLARATIONS
from udi_kernels.testing.inputs import random_boxes

from test_distill_cross_entropy import make_case
from test_hardening import attention_case

OPS = ("stratified_sample", "srs_attention", "distill_cross_entropy", "linear_distill_cross_entropy")


def case_of(op):
    """(the op's first tensor argument, a function of it that calls the op with its default arguments)."""
    if op == "stratified_sample":
        return random_boxes(3, 2, torch.Generator().manual_seed(0)), udi_kernels.stratified_sample
    if op == "srs_attention":
        q, k, v, index, weight = attention_case()
        return q, lambda q, **kw: udi_kernels.srs_attention(q, k, v, index, weight, **kw)
    case = make_case(7, 5, 33, 2, 11)
    pairs = (case["center_id"], case["pair_student"], case["pair_teacher"], case["pair_weight"], case["row_weight"],
             0.1, 0.04)
    if op == "distill_cross_entropy":
        return case["student"], lambda s, **kw: udi_kernels.distill_cross_entropy(s, case["teacher"],
                                                                                  case["centers"], *pairs, **kw)
    g = torch.Generator().manual_seed(0)
    weight, teacher, teacher_weight = (torch.randn(*shape, generator=g) for shape in ((33, 16), (5, 16), (33, 16)))
    return torch.randn(7, 16, generator=g), lambda s, **kw: udi_kernels.linear_distill_cross_entropy(
        s, weight, teacher, teacher_weight, case["centers"], *pairs, **kw)


def close(a, b):
    """Integers exactly; floats to float32 rounding (rtol 1e-5, atol 1e-6), where compiled code or vmap's batching
    rules may sum in another order."""
    return torch.equal(a, b) if not a.is_floating_point() else torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def tensors(result):
    return [t for t in (result if isinstance(result, tuple) else (result,)) for t in
            (t if isinstance(t, tuple) else (t,))]


# ---- 21.12a backend="" ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", ["", " ", "Native", "cuda"])
def test_backend_that_names_none_is_refused(op, name):
    first, call = case_of(op)
    with pytest.raises(ValueError, match="backend"):
        call(first, backend=name)


# ---- 21.2 autocast ----------------------------------------------------------------------------------------------

def autocast_cases():
    for op in OPS:
        for backend in backends.available(op, "cpu"):
            for dtype in (torch.bfloat16, torch.float16):
                yield op, backend, dtype


def without_autocast_as_the_rule_casts(op, dtype):
    """The same call outside autocast, its inputs cast as the op's rule says (udi_kernels/ops/autocast.py)."""
    first, call = case_of(op)
    if op == "srs_attention":
        q, k, v, index, weight = attention_case()
        return first, lambda q, **kw: udi_kernels.srs_attention(q, k.to(dtype), v.to(dtype), index, weight, **kw)
    if op == "linear_distill_cross_entropy":
        closure = dict(zip(call.__code__.co_freevars, (c.cell_contents for c in call.__closure__)))
        w, t, tw = (closure[name].to(dtype) for name in ("weight", "teacher", "teacher_weight"))
        case, pairs = closure["case"], closure["pairs"]
        return first, lambda s, **kw: udi_kernels.linear_distill_cross_entropy(s, w, t, tw, case["centers"], *pairs,
                                                                               **kw)
    return first, call


@pytest.mark.parametrize("op,backend,dtype", list(autocast_cases()))
def test_every_backend_sees_the_dtypes_of_the_autocast_rule(op, backend, dtype):
    """Under autocast, the result is bit for bit the op's on the inputs its rule casts, outside autocast: the
    reference's matmuls do not run in the autocast dtype, and srs_attention takes q in the autocast dtype with k, v
    in float32 (a Linear's and a LayerNorm's outputs)."""
    first, call = case_of(op)
    lower = first.to(dtype) if op in ("srs_attention", "linear_distill_cross_entropy") else first
    _, expected_call = without_autocast_as_the_rule_casts(op, dtype)
    kw = {"backend": backend, **({"seed": 3} if op == "stratified_sample" else {})}
    try:
        expected = expected_call(lower, **kw)
    except TypeError as unsupported:  # bfloat16 under the Triton interpreter
        pytest.skip(str(unsupported))
    with torch.autocast("cpu", dtype=dtype):
        got = call(lower, **kw)
    assert all(torch.equal(a, e) for a, e in zip(tensors(got), tensors(expected)))


def test_mixed_dtypes_outside_autocast_are_still_refused():
    q, k, v, index, weight = attention_case()
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        udi_kernels.srs_attention(q.bfloat16(), k, v, index, weight)


# ---- 21.5 torch.compile -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
def test_every_op_compiles_fullgraph_with_its_defaults(op):
    first, call = case_of(op)
    torch._dynamo.reset()
    torch.manual_seed(7)  # stratified_sample draws its seed from the default generator, compiled or not
    got = torch.compile(call, fullgraph=True)(first)
    torch.manual_seed(7)
    assert all(close(a, e) for a, e in zip(tensors(got), tensors(call(first))))


def test_compiled_box_checks_still_refuse_bad_boxes():
    boxes = random_boxes(3, 2, torch.Generator().manual_seed(0))
    boxes[1, 2, 0] = 1.5
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="inside \\[0, 1\\]"):
        torch.compile(udi_kernels.stratified_sample, fullgraph=True)(boxes, seed=1)


def test_generator_under_compile_is_refused_by_name():
    boxes = random_boxes(3, 2, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="generator= is not supported under torch.compile"):
        torch.compile(lambda b: udi_kernels.stratified_sample(b, generator=generator), fullgraph=True)(boxes)


# ---- 21.6 torch.func --------------------------------------------------------------------------------------------

def func_cases():
    for op in OPS:
        for backend in backends.available(op, "cpu") + ["auto"]:
            yield op, backend


@pytest.mark.parametrize("check", [True, False])
@pytest.mark.parametrize("op,backend", list(func_cases()))
def test_vmap_is_the_loop_over_slices(op, backend, check):
    """vmap with the value checks on (their default) and off gives what a loop over the slices gives: exactly on
    the kernels (their vmap rule is that loop), to rounding on the reference (torch's batching rules)."""
    first, call = case_of(op)
    flag = {"stratified_sample": "check_boxes", "srs_attention": "check_taps"}.get(op, "check_values")
    kw = {"backend": backend, flag: check, **({"seed": 3} if op == "stratified_sample" else {})}
    batch = torch.stack([first, first.flip(-1)])
    got = vmap(lambda x: tensors(call(x, **kw)))(batch)
    expected = [torch.stack(parts) for parts in zip(*(tensors(call(x, **kw)) for x in batch))]
    same = torch.equal if backend in ("native", "triton") else close
    assert all(same(a, e) for a, e in zip(got, expected))


def scalar(op, call):
    if op == "srs_attention":
        return lambda x, **kw: call(x, **kw).sum()
    return lambda x, **kw: call(x, **kw).loss


@pytest.mark.parametrize("op", OPS[1:])
def test_grad_on_the_reference_is_autograds(op):
    first, call = case_of(op)
    loss = scalar(op, call)
    got = grad(lambda x: loss(x, backend="reference"))(first)
    leaf = first.detach().requires_grad_()
    expected, = torch.autograd.grad(loss(leaf, backend="reference"), leaf)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("op", OPS[1:])
def test_forward_mode_on_the_reference_is_the_directional_derivative(op):
    """jvp's tangent (forward mode) equals the reverse-mode gradient dotted with the direction, and jacfwd the
    gradient (distill_cross_entropy in float64: to 1e-10; the others, whose other tensors are float32: to 1e-4);
    the losses' hessians (forward over reverse) are symmetric."""
    first, call = case_of(op)
    loss = scalar(op, call)
    f = lambda x: loss(x, backend="reference")  # noqa: E731
    in_float64 = op == "distill_cross_entropy"
    first = first.double() if in_float64 else first
    tolerance = dict(rtol=1e-10, atol=1e-12) if in_float64 else dict(rtol=1e-4, atol=1e-5)
    direction = torch.randn(first.shape, generator=torch.Generator().manual_seed(5), dtype=first.dtype)
    _, tangent = torch.func.jvp(f, (first,), (direction,))
    assert torch.allclose(tangent, (grad(f)(first) * direction).sum(), **tolerance)
    assert torch.allclose(torch.func.jacfwd(f)(first), grad(f)(first), **tolerance)
    if op != "srs_attention":  # (its q has 1824 elements)
        hessian = torch.func.hessian(f)(first).flatten(0, 1).flatten(1)
        assert (hessian - hessian.T).abs().max() <= tolerance["rtol"] * hessian.abs().max()


@pytest.mark.parametrize("transform", ["grad", "jacrev", "vmap_grad"])
@pytest.mark.parametrize("op,backend", [(op, b) for op in OPS[1:] for b in backends.available(op, "cpu")
                                        if b != "reference"])
def test_grad_transforms_on_the_kernels_are_refused_by_name(op, backend, transform):
    first, call = case_of(op)
    loss = scalar(op, call)
    f = lambda x: loss(x, backend=backend)  # noqa: E731
    run = {"grad": lambda: grad(f)(first), "jacrev": lambda: torch.func.jacrev(f)(first),
           "vmap_grad": lambda: vmap(grad(f))(torch.stack([first, first]))}[transform]
    with pytest.raises(RuntimeError, match=f"not supported by the native and Triton kernels of {op}"):
        run()


def test_every_op_is_covered():
    assert set(OPS) == set(DECLARATIONS)


@pytest.mark.parametrize("op", ["distill_cross_entropy", "linear_distill_cross_entropy"])
def test_compiled_value_checks_still_refuse_bad_values(op):
    first, call = case_of(op)
    closure = dict(zip(call.__code__.co_freevars, (c.cell_contents for c in call.__closure__)))
    closure["case"]["pair_teacher"][0] = 99  # out of range
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="pair_teacher"):
        torch.compile(call, fullgraph=True)(first)
