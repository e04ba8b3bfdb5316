"""Regression tests of issue 21.3 (repeatability): every backend, auto included, gives the same bits run after run
at a fixed thread count, and across thread counts where udi_kernels/declarations.py says so
(BackendSupport.across_thread_counts). The native CPU kernels run on 2 OpenMP threads here."""
import pytest
import torch

import udi_kernels
from udi_kernels import backends
from udi_kernels.declarations import DECLARATIONS
from udi_kernels.testing.inputs import random_boxes

from test_distill_cross_entropy import make_case
from test_hardening import attention_case


def distill(backend):
    # float32 with many pairs per student row: the old reference's gradient (indexing's backward, index_put_ with
    # atomic adds on 2 threads) differed run to run on this case
    case = make_case(8, 4, 64, 2, 1000, seed=1)
    student = case["student"].requires_grad_()
    out = udi_kernels.distill_cross_entropy(**case, tau_s=0.1, tau_t=0.04, backend=backend)
    return (*out, *torch.autograd.grad(out.loss, student))


def linear(backend):
    """9 student and 5 teacher rows: the BLAS matmuls split their sums by thread count at this shape (not at 40
    and 16 rows), for every backend."""
    g = torch.Generator().manual_seed(0)
    case = make_case(9, 5, 8, 1, 20, seed=1)
    K, D = 300, 24
    leaves = [torch.randn(9, D, generator=g).requires_grad_(), torch.randn(K, D, generator=g).requires_grad_()]
    out = udi_kernels.linear_distill_cross_entropy(
        *leaves, torch.randn(5, D, generator=g), torch.randn(K, D, generator=g), torch.randn(1, K, generator=g),
        case["center_id"], case["pair_student"], case["pair_teacher"], case["pair_weight"], case["row_weight"],
        0.1, 0.04, backend=backend)
    return (*out, *torch.autograd.grad(out.loss, leaves))


def attention(backend):
    q, k, v, index, weight = attention_case(B=6, H=3, N=60, D=32, S=24, T=4)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = udi_kernels.srs_attention(*leaves, index, weight, backend=backend)
    return (out, *torch.autograd.grad(out, leaves, torch.ones_like(out)))


def sample(backend):
    out = udi_kernels.stratified_sample(random_boxes(8, 4, torch.Generator().manual_seed(0)), seed=5,
                                        backend=backend)
    return (*out.globals, *out.locals)


RUNS = {"distill_cross_entropy": distill, "linear_distill_cross_entropy": linear, "srs_attention": attention,
        "stratified_sample": sample}
CASES = [(op, backend) for op in RUNS for backend in backends.available(op, "cpu") + ["auto"]]


def identical(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("op,backend", CASES)
@pytest.mark.parametrize("num_threads", [1, 2])
def test_results_repeat_bit_for_bit_at_a_fixed_thread_count(op, backend, num_threads, threads):
    threads(num_threads)
    first = RUNS[op](backend)
    assert all(identical(first, RUNS[op](backend)) for _ in range(3))


def declared_across_thread_counts(op, backend):
    chosen = backend if backend != "auto" else backends.resolve(DECLARATIONS[op], torch.device("cpu"), torch.float32,
                                                                 num_samples=24, head_dim=32)
    return DECLARATIONS[op].support[chosen].across_thread_counts is None


@pytest.mark.parametrize("op,backend", CASES)
def test_results_across_thread_counts_as_declared(op, backend, threads):
    threads(1)
    one = RUNS[op](backend)
    threads(2)
    two = RUNS[op](backend)
    if declared_across_thread_counts(op, backend):
        assert identical(one, two)
    else:  # declared to differ: still the same values to float32 rounding (relative to each result's largest)
        assert all((x - y).abs().max() <= 1e-5 * x.abs().max() for x, y in zip(one, two) if x.numel())


def test_every_declared_reason_says_why():
    for declaration in DECLARATIONS.values():
        for support in declaration.support.values():
            assert support.across_thread_counts is None or len(support.across_thread_counts) > 20
